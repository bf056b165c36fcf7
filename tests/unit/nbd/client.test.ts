/**
 * The NBD client (src/nbd/client) against a scripted server: negotiation, reply parsing, and
 * what bad server bytes do (a clear error, that connection closed, nothing else harmed),
 * including a bounded fuzz of the handshake and transmission replies with a fixed seed.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NbdClient } from '../../../src/nbd/client/client.js';
import {
  encodeOptionReply,
  encodeSimpleReply,
  encodeErrorChunk,
  encodeNoneChunk,
  encodeBlockStatusChunk,
  writeOffsetDataHeader,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_EPERM,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_SEND_FLUSH,
  NBD_INFO_EXPORT,
  NBD_MAGIC,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPTS_MAGIC,
  NBD_REP_ACK,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REPLY_FLAG_DONE,
  encodeRepMetaContext,
  encodeInfoExport,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_CMD_FLAG_PAYLOAD_LEN,
  NBD_CMD_TRIM,
} from '../../../src/nbd/protocol.js';
import {
  encodeBlockStatusExtChunk,
  encodeExtErrorChunk,
  encodeExtNone,
  EXT_DATA_HEADER_SIZE,
  makeTag,
  writeExtOffsetDataHeader,
} from '../../../src/nbd/protocol-ext.js';
import { silentLogger } from '../../../src/util/logger.js';

const SIZE = 1 << 20;
let dir: string;
let server: Server | undefined;
const sockets: Socket[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'nbd-client-unit-'));
});

afterEach(async () => {
  for (const s of sockets.splice(0)) s.destroy();
  await new Promise<void>((r) => (server ? server.close(() => r()) : r()));
  server = undefined;
  rmSync(dir, { recursive: true, force: true });
});

interface Req {
  type: number;
  flags: number;
  cookie: Buffer;
  offset: number;
  length: number;
  /** Extended requests: the magic as sent. */
  magic?: number;
}

interface Script {
  /** Bytes replacing the whole handshake output (fuzzing), else a well-behaved handshake. */
  mangleHandshake?: (out: Buffer) => Buffer;
  /** Transmission replies for one request. */
  answer: (r: Req) => Buffer[];
  structured?: boolean;
  /** ACK NBD_OPT_EXTENDED_HEADERS and read 32-byte requests (else UNSUP, compact). */
  extended?: boolean;
}

/** A minimal fixed-newstyle server driven by `script`. Returns the socket path. */
async function scripted(script: Script): Promise<string> {
  const path = join(dir, `s${Math.random().toString(36).slice(2)}.sock`);
  server = createServer((s) => {
    sockets.push(s);
    s.on('error', () => undefined);
    let buf = Buffer.alloc(0);
    let phase: 'flags' | 'options' | 'tx' = 'flags';
    let ext = false;
    const send = (b: Buffer): void => {
      if (!s.destroyed) s.write(script.mangleHandshake && phase !== 'tx' ? script.mangleHandshake(b) : b);
    };
    const g = Buffer.alloc(18);
    g.writeBigUInt64BE(NBD_MAGIC, 0);
    g.writeBigUInt64BE(NBD_OPTS_MAGIC, 8);
    g.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
    send(g);
    s.on('data', (c: Buffer) => {
      buf = Buffer.concat([buf, c]);
      for (;;) {
        if (phase === 'flags') {
          if (buf.length < 4) return;
          buf = buf.subarray(4);
          phase = 'options';
        } else if (phase === 'options') {
          if (buf.length < 16) return;
          const opt = buf.readUInt32BE(8);
          const len = buf.readUInt32BE(12);
          if (buf.length < 16 + len) return;
          const payload = buf.subarray(16, 16 + len);
          buf = buf.subarray(16 + len);
          if (opt === NBD_OPT_EXTENDED_HEADERS && script.extended) {
            ext = true;
            send(encodeOptionReply(opt, NBD_REP_ACK));
          } else if (opt === NBD_OPT_STRUCTURED_REPLY) {
            send(encodeOptionReply(opt, script.structured === false ? NBD_REP_ERR_UNSUP : NBD_REP_ACK));
          } else if (opt === NBD_OPT_SET_META_CONTEXT) {
            send(encodeOptionReply(opt, NBD_REP_META_CONTEXT, encodeRepMetaContext(7, 'base:allocation')));
            send(encodeOptionReply(opt, NBD_REP_ACK));
          } else if (opt === NBD_OPT_GO) {
            void payload;
            send(encodeOptionReply(opt, NBD_REP_INFO, encodeInfoExport(SIZE, NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH)));
            send(encodeOptionReply(opt, NBD_REP_ACK));
            phase = 'tx';
          } else {
            send(encodeOptionReply(opt, NBD_REP_ERR_UNSUP));
          }
        } else if (ext) {
          if (buf.length < 32) return;
          const r: Req = {
            flags: buf.readUInt16BE(4),
            type: buf.readUInt16BE(6),
            cookie: Buffer.from(buf.subarray(8, 16)),
            offset: Number(buf.readBigUInt64BE(16)),
            length: Number(buf.readBigUInt64BE(24)),
            magic: buf.readUInt32BE(0),
          };
          const extra = r.flags & NBD_CMD_FLAG_PAYLOAD_LEN ? r.length : 0;
          if (buf.length < 32 + extra) return;
          buf = buf.subarray(32 + extra);
          for (const b of script.answer(r)) if (!s.destroyed) s.write(b);
        } else {
          if (buf.length < 28) return;
          const r: Req = {
            flags: buf.readUInt16BE(4),
            type: buf.readUInt16BE(6),
            cookie: Buffer.from(buf.subarray(8, 16)),
            offset: Number(buf.readBigUInt64BE(16)),
            length: buf.readUInt32BE(24),
          };
          const extra = r.type === NBD_CMD_WRITE ? r.length : 0;
          if (buf.length < 28 + extra) return;
          buf = buf.subarray(28 + extra);
          for (const b of script.answer(r)) if (!s.destroyed) s.write(b);
        }
      }
    });
  });
  await new Promise<void>((r) => server!.listen(path, r));
  return path;
}

function open(path: string, extendedHeaders = true): Promise<NbdClient> {
  return NbdClient.open({
    extendedHeaders,
    address: { type: 'unix', path },
    exportName: 'x',
    readOnly: false,
    metaContexts: ['base:allocation'],
    reconnectDelay: 0,
    openTimeout: 0,
    connections: 1,
    log: silentLogger(),
  });
}

/** A well-behaved structured READ answer: one data chunk with `fill`. */
function dataChunk(r: Req, fill: number, flags = NBD_REPLY_FLAG_DONE, offset = r.offset, len = r.length): Buffer {
  const b = Buffer.alloc(28 + len, fill);
  writeOffsetDataHeader(b, 0, flags, r.cookie, offset, len);
  return b;
}

function good(r: Req): Buffer[] {
  if (r.type === NBD_CMD_READ) return [dataChunk(r, 0xaa)];
  if (r.type === NBD_CMD_BLOCK_STATUS) {
    return [encodeBlockStatusChunk(NBD_REPLY_FLAG_DONE, r.cookie, 7, [{ length: r.length, flags: 0 }])];
  }
  return [encodeNoneChunk(r.cookie)];
}

describe('NBD client negotiation and replies', () => {
  it('negotiates structured replies and base:allocation and reads data chunks', async () => {
    const path = await scripted({ answer: good });
    const c = await open(path);
    expect(c.info.size).toBe(SIZE);
    expect(c.info.structured).toBe(true);
    expect(c.info.contexts.get('base:allocation')).toBe(7);
    const b = Buffer.alloc(4096);
    await c.read(b, 4096);
    expect(b.every((x) => x === 0xaa)).toBe(true);
    expect(await c.blockStatus('base:allocation', 0, 65536)).toEqual([{ length: 65536, flags: 0 }]);
    await c.close();
  });

  it('falls back to simple replies when the server refuses structured replies', async () => {
    const path = await scripted({
      structured: false,
      answer: (r) => (r.type === NBD_CMD_READ ? [encodeSimpleReply(0, r.cookie), Buffer.alloc(r.length, 0x55)] : [encodeSimpleReply(0, r.cookie)]),
    });
    const c = await open(path);
    expect(c.info.structured).toBe(false);
    expect(await c.blockStatus('base:allocation', 0, 4096)).toBeUndefined();
    const b = Buffer.alloc(1000);
    await c.read(b, 10);
    expect(b.every((x) => x === 0x55)).toBe(true);
    await c.close();
  });

  it('fails a request with the server error and message, and keeps the connection', async () => {
    let n = 0;
    const path = await scripted({
      answer: (r) => (n++ === 0 ? [encodeErrorChunk(NBD_REPLY_FLAG_DONE, r.cookie, NBD_EPERM, 'no writes here')] : good(r)),
    });
    const c = await open(path);
    await expect(c.write(Buffer.alloc(512), 0, false)).rejects.toMatchObject({ errno: 'EPERM', message: 'no writes here' });
    await c.read(Buffer.alloc(512), 0);
    expect(c.liveConnections).toBe(1);
    await c.close();
  });

  it('closes the connection on read data outside the requested range', async () => {
    const path = await scripted({ answer: (r) => [dataChunk(r, 1, NBD_REPLY_FLAG_DONE, r.offset + 1)] });
    const c = await open(path);
    await expect(c.read(Buffer.alloc(512), 0)).rejects.toMatchObject({ errno: 'EIO' });
    expect(c.liveConnections).toBe(0);
    await c.close();
  });

  it('closes the connection on a reply to an unknown cookie', async () => {
    const path = await scripted({ answer: () => [encodeNoneChunk(Buffer.alloc(8, 0xee))] });
    const c = await open(path);
    await expect(c.flush()).rejects.toMatchObject({ errno: 'EIO' });
    expect(c.liveConnections).toBe(0);
  });

  it('fails a read the server did not fully answer', async () => {
    const path = await scripted({ answer: (r) => [dataChunk(r, 1, NBD_REPLY_FLAG_DONE, r.offset, r.length - 1)] });
    const c = await open(path);
    await expect(c.read(Buffer.alloc(512), 0)).rejects.toMatchObject({ errno: 'EIO' });
    // A short read is a per-request failure: the connection stays.
    expect(c.liveConnections).toBe(1);
    await c.close();
  });

  it('refuses an oversized option reply during negotiation', async () => {
    const path = await scripted({
      answer: good,
      mangleHandshake: (b) => {
        if (b.length >= 20 && b.readUInt32BE(8) === NBD_OPT_GO) b.writeUInt32BE(0x7fffffff, 16);
        return b;
      },
    });
    await expect(open(path)).rejects.toMatchObject({ code: 'NBD_SERVER_PROTOCOL' });
  });

  it('refuses an export size beyond 2^53', async () => {
    const path = await scripted({
      answer: good,
      mangleHandshake: (b) => {
        if (b.length === 32 && b.readUInt16BE(20) === NBD_INFO_EXPORT) b.writeBigUInt64BE(1n << 60n, 22);
        return b;
      },
    });
    await expect(open(path)).rejects.toThrow(/too large/);
  });
});

/** xorshift32: a deterministic PRNG for the fuzz cases. */
function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

/** Flip, overwrite or truncate a few bytes of `b`. */
function mutate(b: Buffer, rnd: () => number): Buffer {
  const out = Buffer.from(b);
  const k = 1 + (rnd() % 3);
  for (let i = 0; i < k; i++) {
    const pos = rnd() % out.length;
    switch (rnd() % 3) {
      case 0:
        out[pos] = out[pos]! ^ (1 << (rnd() % 8));
        break;
      case 1:
        out[pos] = rnd() & 0xff;
        break;
      default:
        return out.subarray(0, pos);
    }
  }
  return out;
}

describe('NBD client fuzz (bounded, seed 0x6e6264)', () => {
  it('settles every handshake with mutated server bytes (connected or a DaemonError)', async () => {
    const rnd = prng(0x6e6264);
    let opened = 0;
    let refused = 0;
    for (let i = 0; i < 60; i++) {
      let chunk = 0;
      const target = rnd() % 6;
      const path = await scripted({
        answer: good,
        mangleHandshake: (b) => (chunk++ === target ? mutate(b, rnd) : b),
      });
      // A truncated reply leaves the client waiting: the server closes after a moment.
      const t = setTimeout(() => sockets.forEach((s) => s.destroy()), 200);
      try {
        const c = await open(path);
        opened++;
        await c.close();
      } catch (err) {
        refused++;
        expect((err as { code?: unknown }).code, String(err)).toMatch(/^NBD_/);
      } finally {
        clearTimeout(t);
      }
      for (const s of sockets.splice(0)) s.destroy();
      await new Promise<void>((r) => server!.close(() => r()));
      server = undefined;
    }
    expect(opened + refused).toBe(60);
    expect(refused).toBeGreaterThan(0);
  });

  it('settles every request with mutated replies and never returns a read it did not fill', async () => {
    const rnd = prng(0x6e6265);
    let failed = 0;
    let served = 0;
    for (let i = 0; i < 40; i++) {
      const path = await scripted({ answer: (r) => good(r).map((b) => (rnd() % 2 ? mutate(b, rnd) : b)) });
      const c = await open(path);
      const t = setTimeout(() => sockets.forEach((s) => s.destroy()), 200);
      const jobs = [0, 1, 2, 3].map(async (j) => {
        const b = Buffer.alloc(512, 0x11);
        try {
          if (j === 3) await c.blockStatus('base:allocation', 0, 4096);
          else await c.read(b, j * 512);
          served++;
          // Every byte of a successful read came from the server: the fill never survives.
          if (j !== 3) expect(b.includes(0x11)).toBe(false);
        } catch (err) {
          failed++;
          expect((err as { code?: unknown }).code, String(err)).toMatch(/^NBD_/);
        }
      });
      await Promise.all(jobs);
      clearTimeout(t);
      await c.close();
      for (const s of sockets.splice(0)) s.destroy();
      await new Promise<void>((r) => server!.close(() => r()));
      server = undefined;
    }
    expect(served + failed).toBe(160);
    expect(failed).toBeGreaterThan(0);
  });
});

/** Cookie + offset of `r`, echoed by extended replies. */
function tagOf(r: Req): Buffer {
  return makeTag(r.cookie.readBigUInt64BE(0), BigInt(r.offset));
}

function goodExt(r: Req): Buffer[] {
  if (r.type === NBD_CMD_READ) {
    const b = Buffer.alloc(EXT_DATA_HEADER_SIZE + r.length, 0xbb);
    writeExtOffsetDataHeader(b, 0, NBD_REPLY_FLAG_DONE, tagOf(r), r.offset, r.length);
    return [b];
  }
  if (r.type === NBD_CMD_BLOCK_STATUS) {
    // 6 GiB of hole, then data: one extent longer than 2^32.
    return [encodeBlockStatusExtChunk(NBD_REPLY_FLAG_DONE, tagOf(r), 7, [{ length: 6 * 2 ** 30, flags: 3 }, { length: 2 ** 30, flags: 0 }])];
  }
  return [encodeExtNone(tagOf(r))];
}

describe('NBD client with extended headers (scripted server)', () => {
  it('negotiates them, sends 32-byte requests (PAYLOAD_LEN on writes) and reads extended replies', async () => {
    const seen: Req[] = [];
    const path = await scripted({ extended: true, answer: (r) => (seen.push(r), goodExt(r)) });
    const c = await open(path);
    expect(c.info.extended).toBe(true);
    expect(c.info.structured).toBe(true);
    const b = Buffer.alloc(4096);
    await c.read(b, 8192);
    expect(b.every((x) => x === 0xbb)).toBe(true);
    await c.write(Buffer.alloc(512, 1), 0, false);
    await c.trim(0, 1024);
    expect(await c.blockStatus('base:allocation', 0, SIZE)).toEqual([{ length: SIZE, flags: 3 }]);
    expect(seen.map((r) => r.magic)).toEqual([0x21e41c71, 0x21e41c71, 0x21e41c71, 0x21e41c71]);
    expect(seen[1]).toMatchObject({ type: NBD_CMD_WRITE, flags: NBD_CMD_FLAG_PAYLOAD_LEN, length: 512 });
    expect(seen[2]).toMatchObject({ type: NBD_CMD_TRIM, flags: 0, length: 1024 });
    await c.close();
  });

  it('does not ask for them with extendedHeaders off', async () => {
    const path = await scripted({ extended: true, answer: good });
    const c = await open(path, false);
    expect(c.info.extended).toBe(false);
    await c.read(Buffer.alloc(512), 0);
    await c.close();
  });

  it('fails a request with the error of an extended ERROR chunk', async () => {
    const path = await scripted({
      extended: true,
      answer: (r) => (r.type === NBD_CMD_WRITE ? [encodeExtErrorChunk(NBD_REPLY_FLAG_DONE, tagOf(r), NBD_EPERM, 'nope')] : goodExt(r)),
    });
    const c = await open(path);
    await expect(c.write(Buffer.alloc(512), 0, false)).rejects.toMatchObject({ errno: 'EPERM', message: 'nope' });
    expect(c.liveConnections).toBe(1);
    await c.close();
  });

  it('closes the connection on a wrong echoed offset, a compact reply, or a 64-bit status', async () => {
    const cases: Array<(r: Req) => Buffer[]> = [
      (r) => [encodeExtNone(makeTag(r.cookie.readBigUInt64BE(0), BigInt(r.offset + 1)))],
      // A compact 20-byte chunk (twice, so that a whole 32-byte header is there to check).
      (r) => [encodeNoneChunk(r.cookie), encodeNoneChunk(r.cookie)],
      (r) => {
        const b = encodeBlockStatusExtChunk(NBD_REPLY_FLAG_DONE, tagOf(r), 7, [{ length: 4096, flags: 0 }]);
        b.writeUInt32BE(1, 32 + 8 + 8); // high half of the status
        return [b];
      },
    ];
    for (const answer of cases) {
      const path = await scripted({ extended: true, answer });
      const c = await open(path);
      await expect(c.blockStatus('base:allocation', 0, 4096)).rejects.toMatchObject({ errno: 'EIO' });
      expect(c.liveConnections).toBe(0);
      await c.close();
      for (const s of sockets.splice(0)) s.destroy();
      await new Promise<void>((r) => server!.close(() => r()));
      server = undefined;
    }
  });
});

describe('NBD client fuzz with extended headers (bounded, seed 0x6e6266)', () => {
  it('settles every request with mutated extended replies and never returns a read it did not fill', async () => {
    const rnd = prng(0x6e6266);
    let failed = 0;
    let served = 0;
    for (let i = 0; i < 40; i++) {
      const path = await scripted({ extended: true, answer: (r) => goodExt(r).map((b) => (rnd() % 2 ? mutate(b, rnd) : b)) });
      const c = await open(path);
      expect(c.info.extended).toBe(true);
      const t = setTimeout(() => sockets.forEach((s) => s.destroy()), 200);
      const jobs = [0, 1, 2, 3].map(async (j) => {
        const b = Buffer.alloc(512, 0x11);
        try {
          if (j === 3) await c.blockStatus('base:allocation', 0, 4096);
          else await c.read(b, j * 512);
          served++;
          if (j !== 3) expect(b.includes(0x11)).toBe(false);
        } catch (err) {
          failed++;
          expect((err as { code?: unknown }).code, String(err)).toMatch(/^NBD_/);
        }
      });
      await Promise.all(jobs);
      clearTimeout(t);
      await c.close();
      for (const s of sockets.splice(0)) s.destroy();
      await new Promise<void>((r) => server!.close(() => r()));
      server = undefined;
    }
    expect(served + failed).toBe(160);
    expect(failed).toBeGreaterThan(0);
    expect(served).toBeGreaterThan(0);
  });
});
