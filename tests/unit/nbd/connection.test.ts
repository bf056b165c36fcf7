import { describe, expect, it } from 'vitest';
import { NbdConnection, normalizeExtents } from '../../../src/nbd/connection.js';
import {
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_PAYLOAD_LEN,
  NBD_CMD_TRIM,
  NBD_EXTENDED_REPLY_MAGIC,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
} from '../../../src/nbd/protocol.js';
import { encodeExtRequest } from '../../../src/nbd/protocol-ext.js';
import { silentLogger } from '../../../src/util/logger.js';
import { FakeSocket, settle } from '../../helpers/nbd-fake-socket.js';
import { MemoryBackend, type MemExportOptions } from '../../helpers/nbd-memory-backend.js';

const SIZE = 1 << 20;

function start(exp: Partial<MemExportOptions> = {}, opts: { maxInFlight?: number } = {}) {
  const backend = new MemoryBackend([{ name: 'n', size: SIZE, ...exp }]);
  const e = backend.get('n');
  e.fill(8192, Buffer.alloc(8192, 0xab));
  const sock = new FakeSocket();
  const conn = new NbdConnection(sock.asTransport(), {
    id: 1,
    backend,
    log: silentLogger(),
    clientAddress: 'unix',
    handshakeTimeoutMs: 0,
    ...opts,
  });
  conn.start();
  return { sock, conn, e };
}

const u32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n, 0);
  return b;
};
const cookie = (n: number) => BigInt(n);

/** Client flags + STRUCTURED_REPLY + SET_META_CONTEXT + GO. */
function handshakeBytes(): Buffer {
  return Buffer.concat([
    u32(3),
    encodeOption(NBD_OPT_STRUCTURED_REPLY),
    encodeOption(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('n', ['base:allocation'])),
    encodeOption(NBD_OPT_GO, encodeInfoRequest('n', [3])),
  ]);
}

function session(): Buffer {
  return Buffer.concat([
    handshakeBytes(),
    encodeRequest(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, cookie(1), 0, 8),
    Buffer.from('ABCDEFGH'),
    encodeRequest(NBD_CMD_READ, 0, cookie(2), 8190, 8),
    encodeRequest(NBD_CMD_BLOCK_STATUS, 0, cookie(3), 0, 65536),
    encodeRequest(9, 0, cookie(4), 0, 0),
    encodeRequest(NBD_CMD_WRITE, 0, cookie(5), SIZE - 2, 4),
    Buffer.from('WXYZ'),
    encodeRequest(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, cookie(6), 4096, 4096),
    encodeRequest(NBD_CMD_FLUSH, 0, cookie(7), 0, 0),
    encodeRequest(NBD_CMD_READ, 0, cookie(8), 32768, 4096),
    encodeRequest(NBD_CMD_DISC, 0, cookie(9), 0, 0),
  ]);
}

/** The same session with extended headers: 32-byte requests, PAYLOAD_LEN, a drained payload. */
function extSession(): Buffer {
  const filter = Buffer.alloc(12);
  filter.writeBigUInt64BE(65536n, 0);
  return Buffer.concat([
    u32(3),
    encodeOption(NBD_OPT_EXTENDED_HEADERS),
    encodeOption(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('n', ['base:allocation'])),
    encodeOption(NBD_OPT_GO, encodeInfoRequest('n', [3])),
    encodeExtRequest(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_PAYLOAD_LEN, cookie(1), 0, 8),
    Buffer.from('ABCDEFGH'),
    encodeExtRequest(NBD_CMD_READ, 0, cookie(2), 8190, 8),
    encodeExtRequest(NBD_CMD_BLOCK_STATUS, 0, cookie(3), 0, 65536),
    encodeExtRequest(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_PAYLOAD_LEN, cookie(4), 0, 12),
    filter,
    encodeExtRequest(NBD_CMD_TRIM, NBD_CMD_FLAG_PAYLOAD_LEN, cookie(5), 0, 6),
    Buffer.from('drain!'),
    encodeExtRequest(NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, cookie(6), SIZE - 2, 4),
    Buffer.from('WXYZ'),
    encodeExtRequest(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, cookie(7), 4096, 4096),
    encodeExtRequest(NBD_CMD_FLUSH, 0, cookie(8), 0, 0),
    encodeExtRequest(NBD_CMD_READ, 0, cookie(9), 32768, 4096),
    encodeExtRequest(NBD_CMD_DISC, 0, cookie(10), 0, 0),
  ]);
}

/** Split server output into the handshake bytes and replies grouped by cookie. */
function parseOutput(out: Buffer): { handshake: string; replies: Map<string, string> } {
  let p = 18;
  while (p + 20 <= out.length && out.readBigUInt64BE(p) === NBD_REP_MAGIC) p += 20 + out.readUInt32BE(p + 16);
  const handshake = out.subarray(0, p).toString('hex');
  const replies = new Map<string, string>();
  while (p < out.length) {
    const magic = out.readUInt32BE(p);
    let len: number;
    let ck: string;
    if (magic === NBD_SIMPLE_REPLY_MAGIC) {
      len = 16;
      ck = out.subarray(p + 8, p + 16).toString('hex');
    } else if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
      len = 20 + out.readUInt32BE(p + 16);
      ck = out.subarray(p + 8, p + 16).toString('hex');
    } else if (magic === NBD_EXTENDED_REPLY_MAGIC) {
      len = 32 + Number(out.readBigUInt64BE(p + 24));
      ck = out.subarray(p + 8, p + 16).toString('hex');
    } else {
      throw new Error(`bad magic at ${p}`);
    }
    replies.set(ck, (replies.get(ck) ?? '') + out.subarray(p, p + len).toString('hex'));
    p += len;
  }
  return { handshake, replies };
}

async function runSplit(bytes: Buffer, at: number[]): Promise<{ out: Buffer; e: ReturnType<typeof start>['e']; sock: FakeSocket }> {
  const { sock, e } = start();
  let prev = 0;
  for (const cut of [...at, bytes.length]) {
    sock.feed(bytes.subarray(prev, cut));
    prev = cut;
    await settle(2);
  }
  await settle();
  return { out: sock.output(), e, sock };
}

describe('NbdConnection input parsing', () => {
  it('answers a scripted session the same whatever the read boundaries', async () => {
    const bytes = session();
    const ref = await runSplit(bytes, []);
    const refParsed = parseOutput(ref.out);
    expect(refParsed.replies.size).toBe(8); // DISC has no reply
    for (let k = 1; k < bytes.length; k++) {
      const { out } = await runSplit(bytes, [k]);
      const parsed = parseOutput(out);
      expect(parsed.handshake, `split at ${k}`).toBe(refParsed.handshake);
      expect(parsed.replies, `split at ${k}`).toEqual(refParsed.replies);
    }
  });

  it('handles a session delivered one byte at a time', async () => {
    const bytes = session();
    const ref = parseOutput((await runSplit(bytes, [])).out);
    const cuts = Array.from({ length: bytes.length - 1 }, (_, i) => i + 1);
    const got = await runSplit(bytes, cuts);
    expect(parseOutput(got.out)).toEqual(ref);
    expect(got.e.data.subarray(0, 8).toString()).toBe('ABCDEFGH');
  });

  it('drains a refused WRITE payload and keeps the stream in sync', async () => {
    const { out } = await runSplit(session(), []);
    const { replies } = parseOutput(out);
    const five = replies.get('0000000000000005')!;
    expect(five.slice(0, 8)).toBe('668e33ef'); // an ERROR chunk...
    const eight = replies.get('0000000000000008')!;
    expect(eight.length).toBeGreaterThan(0); // ...and the next requests still parse
  });

  it('answers an extended-header session the same whatever the read boundaries', async () => {
    const bytes = extSession();
    const ref = await runSplit(bytes, []);
    const refParsed = parseOutput(ref.out);
    expect(refParsed.replies.size).toBe(9); // DISC has no reply
    // Every reply is an extended chunk; the refused TRIM payload was drained.
    for (const r of refParsed.replies.values()) expect(r.slice(0, 8)).toBe('6e8a278c');
    expect(refParsed.replies.get('0000000000000005')!.slice(12, 16)).toBe('8001');
    // The write past the end was refused (its payload drained), nothing written.
    expect(ref.e.data.subarray(SIZE - 2).equals(Buffer.alloc(2))).toBe(true);
    for (let k = 1; k < bytes.length; k++) {
      const { out, e } = await runSplit(bytes, [k]);
      const parsed = parseOutput(out);
      expect(parsed.handshake, `split at ${k}`).toBe(refParsed.handshake);
      expect(parsed.replies, `split at ${k}`).toEqual(refParsed.replies);
      expect(e.data.subarray(0, 8).toString(), `split at ${k}`).toBe('ABCDEFGH');
    }
  });

  it('closes after DISC once in-flight requests are answered', async () => {
    const { sock } = await runSplit(session(), []);
    expect(sock.ended || sock.destroyed).toBe(true);
  });
});

describe('NbdConnection reading into a reused buffer', () => {
  /** Feed `bytes` through onRead() in pieces cut at `at`, scribbling over the buffer after each read. */
  async function runReused(bytes: Buffer, at: number[]) {
    const backend = new MemoryBackend([{ name: 'n', size: SIZE }]);
    const e = backend.get('n');
    e.fill(8192, Buffer.alloc(8192, 0xab));
    const sock = new FakeSocket();
    const t = sock.asTransport(true);
    const conn = new NbdConnection(t, {
      id: 1,
      backend,
      log: silentLogger(),
      clientAddress: 'unix',
      handshakeTimeoutMs: 0,
    });
    conn.start();
    const shared = Buffer.alloc(bytes.length);
    let prev = 0;
    for (const cut of [...at, bytes.length]) {
      const n = bytes.copy(shared, 0, prev, cut);
      t.onRead(n, shared);
      shared.fill(0xee);
      prev = cut;
      await settle(2);
    }
    await settle();
    return { out: sock.output(), e };
  }

  it('does the same with extended headers', async () => {
    const bytes = extSession();
    const ref = parseOutput((await runSplit(bytes, [])).out);
    for (let k = 1; k < bytes.length; k += 5) {
      const { out, e } = await runReused(bytes, [k, Math.min(bytes.length, k + 33)]);
      expect(parseOutput(out), `split at ${k}`).toEqual(ref);
      expect(e.data.subarray(0, 8).toString(), `split at ${k}`).toBe('ABCDEFGH');
    }
  });

  it('answers like the data-event path whatever the read boundaries, keeping no view of the buffer', async () => {
    const bytes = session();
    const ref = parseOutput((await runSplit(bytes, [])).out);
    for (let k = 1; k < bytes.length; k += 7) {
      const { out, e } = await runReused(bytes, [k, Math.min(bytes.length, k + 30)]);
      expect(parseOutput(out), `split at ${k}`).toEqual(ref);
      expect(e.data.subarray(0, 8).toString(), `split at ${k}`).toBe('ABCDEFGH');
    }
  });
});

describe('NbdConnection transmission', () => {
  it('limits requests in flight to the window', async () => {
    const { sock, e } = start({ syncReads: false, delayMs: 5 }, { maxInFlight: 2 });
    const reqs = Array.from({ length: 10 }, (_, i) => encodeRequest(NBD_CMD_READ, 0, cookie(i + 1), i * 4096, 4096));
    sock.feed(Buffer.concat([handshakeBytes(), ...reqs]));
    for (let i = 0; i < 50 && parseOutput(sock.output()).replies.size < 10; i++) {
      await new Promise((r) => setTimeout(r, 5));
    }
    expect(parseOutput(sock.output()).replies.size).toBe(10);
    expect(e.peakInFlight).toBeLessThanOrEqual(2);
    expect(sock.paused).toBe(false);
  });

  it('serves reads through the synchronous path without calling read()', async () => {
    const { sock, e } = start();
    sock.feed(Buffer.concat([handshakeBytes(), encodeRequest(NBD_CMD_READ, 0, cookie(1), 8192, 16)]));
    await settle();
    expect(e.calls.filter((c) => c.op === 'read')).toEqual([]);
    const out = sock.output();
    expect(out.subarray(out.length - 16).equals(Buffer.alloc(16, 0xab))).toBe(true);
  });

  it('sends zero ranges as OFFSET_HOLE chunks on the async path', async () => {
    const { sock } = start({ syncReads: false });
    sock.feed(Buffer.concat([handshakeBytes(), encodeRequest(NBD_CMD_READ, 0, cookie(1), 4096, 3 * 4096)]));
    await settle();
    const r = parseOutput(sock.output()).replies.get('0000000000000001')!;
    const b = Buffer.from(r, 'hex');
    // hole [4096,8192) then data [8192,16384) with DONE
    expect(b.readUInt16BE(6)).toBe(2);
    expect(b.readUInt16BE(32 + 6)).toBe(1);
    expect(b.readUInt16BE(32 + 4)).toBe(1);
  });

  it('maps a backend failure to an error chunk with the errno', async () => {
    const { sock, e } = start();
    e.failNext = { op: 'write', errno: 'ENOSPC' };
    sock.feed(Buffer.concat([handshakeBytes(), encodeRequest(NBD_CMD_WRITE, 0, cookie(1), 0, 4), Buffer.from('abcd')]));
    await settle();
    const b = Buffer.from(parseOutput(sock.output()).replies.get('0000000000000001')!, 'hex');
    expect(b.readUInt16BE(6)).toBe(0x8001);
    expect(b.readUInt32BE(20)).toBe(28);
  });

  it('calls onDisconnect once when the client goes away', async () => {
    const { sock, conn, e } = start();
    sock.feed(handshakeBytes());
    await settle();
    expect(e.clients).toBe(1);
    sock.destroy();
    await conn.closed;
    expect(e.clients).toBe(0);
  });
});

describe('normalizeExtents', () => {
  it('merges equal neighbours, drops empty extents and clamps to the request', () => {
    expect(
      normalizeExtents(
        [
          { length: 10, flags: 1 },
          { length: 0, flags: 2 },
          { length: 5, flags: 1 },
          { length: 100, flags: 0 },
        ],
        20,
        10,
      ),
    ).toEqual([
      { length: 15, flags: 1 },
      { length: 5, flags: 0 },
    ]);
  });

  it('hands on a list that is already wire-safe without copying it', () => {
    const ext = [
      { length: 10, flags: 1 },
      { length: 5, flags: 0 },
    ];
    expect(normalizeExtents(ext, 20, 10)).toBe(ext);
    expect(normalizeExtents(ext, 12, 10)).toEqual([
      { length: 10, flags: 1 },
      { length: 2, flags: 0 },
    ]);
  });

  it('returns at most max extents', () => {
    expect(normalizeExtents([{ length: 1, flags: 1 }, { length: 1, flags: 0 }], 2, 1)).toEqual([{ length: 1, flags: 1 }]);
  });
});
