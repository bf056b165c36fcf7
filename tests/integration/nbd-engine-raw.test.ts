/**
 * Bad input and connection management, driven with raw sockets: every case must leave
 * the server serving other clients.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { NbdServer, type NbdServerOptions } from '../../src/nbd/server.js';
import {
  encodeInfoRequest,
  encodeOption,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_OPT_GO,
  NBD_OPT_LIST,
  NBD_REP_ACK,
  NBD_REP_ERR_UNSUP,
  NBD_REP_SERVER,
} from '../../src/nbd/protocol.js';
import { silentLogger } from '../../src/util/logger.js';
import { MemoryBackend } from '../helpers/nbd-memory-backend.js';
import { RawNbdClient } from '../helpers/nbd-raw-client.js';
import { encodeRequest } from '../../src/nbd/protocol.js';
import { nativeAddon } from '../../src/block/native.js';
import { netIoBindingFrom, type NetIoBinding } from '../../src/nbd/native-transport.js';

/** Every suite runs on both socket layers: net.Socket and the addon's netio (when built). */
const NETIO = netIoBindingFrom(nativeAddon());
if (!NETIO && process.env['CI'] === 'true' && process.env['BLOCKD_NO_ADDON'] !== '1') {
  throw new Error('the native addon (netio) is required under CI');
}
const TRANSPORTS: [string, NetIoBinding | undefined][] = [['net.Socket', undefined]];
if (NETIO) TRANSPORTS.push(['native netio', NETIO]);
let netio: NetIoBinding | undefined;

let dir: string | undefined;
let server: NbdServer | undefined;
const clients: RawNbdClient[] = [];

async function setup(opts: Partial<NbdServerOptions> = {}) {
  dir = mkdtempSync(join(tmpdir(), 'nbd-raw-'));
  const path = join(dir, 'nbd.sock');
  const backend = new MemoryBackend([
    { name: 'n', size: 64 << 20, canFastZero: false },
    { name: 'ro', size: 1 << 20, readOnly: true },
  ]);
  server = new NbdServer({ backend, log: silentLogger(), netio, ...opts });
  await server.listen({ type: 'unix', path });
  const connect = async () => {
    const c = await RawNbdClient.connect(path);
    clients.push(c);
    return c;
  };
  return { path, backend, connect };
}

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  await server?.close();
  server = undefined;
  if (dir) rmSync(dir, { recursive: true, force: true });
  dir = undefined;
});

/** A fresh client that lists exports successfully (proof the server still works). */
async function stillServes(connect: () => Promise<RawNbdClient>): Promise<void> {
  const c = await connect();
  await c.greeting();
  const r = await c.option(NBD_OPT_LIST);
  expect(r.map((x) => x.type)).toEqual([NBD_REP_SERVER, NBD_REP_SERVER, NBD_REP_ACK]);
  c.close();
}

describe.each(TRANSPORTS)('on %s', (_name, binding) => {
beforeAll(() => {
  netio = binding;
});

describe('NBD engine bad input', () => {
  it('closes a connection whose option magic is wrong', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.greeting();
    const bad = encodeOption(NBD_OPT_LIST);
    bad.writeUInt32BE(0x12345678, 0);
    c.write(bad);
    expect(await c.waitClosed()).toBe(true);
    await stillServes(connect);
  });

  it('survives a client that disconnects in the middle of an option', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.greeting();
    c.write(encodeOption(NBD_OPT_GO, encodeInfoRequest('n')).subarray(0, 20));
    c.close();
    await stillServes(connect);
  });

  it('closes a connection sending an option longer than 32 MiB', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.greeting();
    const h = encodeOption(99);
    h.writeUInt32BE(32 * 1024 * 1024 + 1, 12);
    c.write(h);
    expect(await c.waitClosed()).toBe(true);
  });

  it('drains an unknown option and answers ERR_UNSUP', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.greeting();
    const r = await c.option(1234, Buffer.alloc(100000, 7));
    expect(r.map((x) => [x.type, x.payload.toString()])).toEqual([[NBD_REP_ERR_UNSUP, 'Unsupported option 1234 (<unknown>)']]);
    const l = await c.option(NBD_OPT_LIST);
    expect(l[l.length - 1]?.type).toBe(NBD_REP_ACK);
  });

  it('answers an unknown command with EINVAL and the QSD message', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.handshake('n');
    c.request(100, 0, 4096);
    expect(RawNbdClient.errorOf(await c.reply())).toEqual({ error: 22, message: 'invalid request type (100) received' });
  });

  it('refuses a read past the end with EINVAL', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.handshake('n');
    c.request(NBD_CMD_READ, (64 << 20) - 10, 4096);
    expect(RawNbdClient.errorOf(await c.reply())).toEqual({
      error: 22,
      message: 'operation past EOF; From: 67108854, Len: 4096, Size: 67108864',
    });
  });

  it('refuses a 64 MiB read with EINVAL and keeps the connection', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.handshake('n');
    c.request(NBD_CMD_READ, 0, 64 << 20);
    expect(RawNbdClient.errorOf(await c.reply())).toEqual({
      error: 22,
      message: 'len (67108864 ) is larger than max len (33554432)',
    });
    c.request(NBD_CMD_BLOCK_STATUS, 0, 0, 0, 2n);
    expect(RawNbdClient.errorOf(await c.reply())?.message).toBe('need non-zero length');
  });

  it('drains a refused 64 MiB write and keeps the stream in sync', async () => {
    const { connect, backend } = await setup();
    const c = await connect();
    await c.handshake('n');
    c.request(NBD_CMD_WRITE, 0, 64 << 20, 0, 1n, Buffer.alloc(64 << 20, 1));
    expect(RawNbdClient.errorOf(await c.reply())?.error).toBe(22);
    c.request(NBD_CMD_WRITE, 0, 4, 0, 2n, Buffer.from('abcd'));
    expect(await c.reply()).toMatchObject({ kind: 'simple', error: 0 });
    expect(backend.get('n').data.subarray(0, 5).toString()).toBe('abcd\0');
  });

  it('refuses a write to a read-only export with EINVAL and drains its payload', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.handshake('ro');
    c.request(NBD_CMD_WRITE, 0, 4, 0, 1n, Buffer.from('abcd'));
    expect(RawNbdClient.errorOf(await c.reply())).toEqual({ error: 22, message: 'Export is read-only' });
    c.request(NBD_CMD_READ, 0, 0, 0, 2n);
    expect(await c.reply()).toMatchObject({ kind: 'chunk', type: 0, flags: 1 });
  });

  it('refuses FAST_ZERO when the export does not advertise it', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.handshake('n');
    c.request(NBD_CMD_WRITE_ZEROES, 0, 4096, NBD_CMD_FLAG_FAST_ZERO);
    expect(RawNbdClient.errorOf(await c.reply())).toEqual({
      error: 22,
      message: 'unsupported flags for command write zeroes (got 0x10)',
    });
  });

  it('answers a bad request magic with EINVAL and closes, like QSD', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.handshake('n');
    c.write(Buffer.alloc(28));
    expect(RawNbdClient.errorOf(await c.reply())).toEqual({ error: 22, message: 'invalid magic (got 0x0)' });
    expect(await c.waitClosed()).toBe(true);
    await stillServes(connect);
  });

  it('lands large WRITE payloads intact whatever the split of the stream, pipelined with reads', async () => {
    const { connect, backend } = await setup();
    const c = await connect();
    await c.handshake('n');
    // Writes of 300 KiB (large enough to be read straight into their buffer on netio) and
    // small ones, a READ after each, sent as one stream cut into uneven pieces, so that header,
    // payload and the next header fall on every kind of boundary.
    const parts: Buffer[] = [];
    const expected = Buffer.alloc(4 << 20);
    let off = 0;
    for (let i = 0; i < 8; i++) {
      const len = i % 3 === 2 ? 1000 + i : 300 * 1024 + i * 7;
      const data = Buffer.alloc(len);
      for (let j = 0; j < len; j++) data[j] = (i * 31 + j * 7) & 0xff;
      data.copy(expected, off);
      parts.push(encodeRequest(NBD_CMD_WRITE, 0, BigInt(2 * i + 1), off, len), data);
      parts.push(encodeRequest(NBD_CMD_READ, 0, BigInt(2 * i + 2), off, 16));
      off += len;
    }
    const stream = Buffer.concat(parts);
    const cuts = [5, 28, 3000, 17, 65536, 131072 + 3, 12345, 28, 200000];
    for (let p = 0, k = 0; p < stream.length; k++) {
      const n = Math.min(cuts[k % cuts.length]!, stream.length - p);
      c.write(stream.subarray(p, p + n));
      p += n;
      if (k % 4 === 3) await new Promise((r) => setTimeout(r, 2));
    }
    const cookies: bigint[] = [];
    for (let i = 0; i < 16; i++) {
      const r = await c.reply();
      expect(RawNbdClient.errorOf(r)?.error).toBe(0);
      cookies.push(r!.cookie.readBigUInt64BE(0));
    }
    expect(cookies.sort((x, y) => Number(x - y))).toEqual(Array.from({ length: 16 }, (_, i) => BigInt(i + 1)));
    expect(backend.get('n').data.subarray(0, off).equals(expected.subarray(0, off))).toBe(true);
    await stillServes(connect);
  });

  it('does not apply a write whose client vanished mid-payload', async () => {
    const { connect, backend } = await setup();
    const c = await connect();
    await c.handshake('n');
    c.request(NBD_CMD_WRITE, 0, 1 << 20, 0, 1n, Buffer.alloc(1000, 9));
    await new Promise((r) => setTimeout(r, 20));
    c.close();
    await stillServes(connect);
    expect(backend.get('n').calls.filter((x) => x.op === 'write')).toEqual([]);
    expect(backend.get('n').clients).toBe(0);
  });
});

describe('NBD server connection management', () => {
  it('handles hundreds of connections opening and closing', async () => {
    const { connect, backend } = await setup();
    const batch = async () => {
      const c = await connect();
      const r = await c.handshake('n');
      expect(r[r.length - 1]?.type).toBe(NBD_REP_ACK);
      c.request(NBD_CMD_READ, 0, 512);
      await c.reply();
      c.close();
    };
    for (let round = 0; round < 6; round++) await Promise.all(Array.from({ length: 50 }, batch));
    for (let i = 0; i < 100 && (server!.connectionCount > 0 || backend.get('n').clients > 0); i++) {
      await new Promise((r) => setTimeout(r, 10));
    }
    expect(server!.connectionCount).toBe(0);
    expect(backend.get('n').clients).toBe(0);
  });

  it('delivers reads much larger than the socket buffer to a client that reads slowly', async () => {
    const { connect, backend } = await setup();
    const e = backend.get('n');
    const pattern = Buffer.alloc(16 << 20);
    for (let i = 0; i < pattern.length; i += 4) pattern.writeUInt32BE((i * 2654435761) >>> 0, i);
    e.fill(0, pattern);
    const c = await connect();
    await c.handshake('n', { structured: false });
    c.sock.pause();
    for (let i = 0; i < 4; i++) c.request(NBD_CMD_READ, i * (4 << 20), 4 << 20, 0, BigInt(i + 1));
    await new Promise((r) => setTimeout(r, 100));
    c.sock.resume();
    const got = new Map<bigint, Buffer>();
    for (let i = 0; i < 4; i++) {
      const r = await c.reply();
      expect(r?.kind).toBe('simple');
      if (r?.kind !== 'simple') return;
      expect(r.error).toBe(0);
      got.set(r.cookie.readBigUInt64BE(0), (await c.read(4 << 20))!);
    }
    for (let i = 0; i < 4; i++) {
      expect(got.get(BigInt(i + 1))?.equals(pattern.subarray(i * (4 << 20), (i + 1) * (4 << 20)))).toBe(true);
    }
  });

  it('closes the socket of a client that sends DISC and resets the connection with replies queued', async () => {
    const { connect } = await setup();
    const before = netio?.netOpenCount() ?? 0;
    const c = await connect();
    await c.handshake('n', { structured: false });
    c.sock.pause();
    for (let i = 0; i < 8; i++) c.request(NBD_CMD_READ, i * (4 << 20), 4 << 20, 0, BigInt(i + 1));
    c.request(NBD_CMD_DISC, 0, 0, 0, 99n);
    await new Promise((r) => setTimeout(r, 100));
    c.sock.destroy(); // unread replies in its buffer: the server's next send fails
    for (let i = 0; i < 100 && server!.connectionCount > 0; i++) await new Promise((r) => setTimeout(r, 10));
    expect(server!.connectionCount).toBe(0);
    if (netio) {
      for (let i = 0; i < 100 && netio.netOpenCount() > before; i++) await new Promise((r) => setTimeout(r, 10));
      expect(netio.netOpenCount()).toBe(before);
    }
    await stillServes(connect);
  });

  it('survives a client that leaves while its read replies are still queued', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.handshake('n', { structured: false });
    c.sock.pause();
    for (let i = 0; i < 8; i++) c.request(NBD_CMD_READ, i * (4 << 20), 4 << 20, 0, BigInt(i + 1));
    await new Promise((r) => setTimeout(r, 100));
    c.sock.destroy();
    for (let i = 0; i < 100 && server!.connectionCount > 0; i++) await new Promise((r) => setTimeout(r, 10));
    expect(server!.connectionCount).toBe(0);
    await stillServes(connect);
  });

  it('queues clients over maxConnections instead of refusing them', async () => {
    const { connect } = await setup({ maxConnections: 1 });
    const a = await connect();
    expect(await a.read(18)).toBeDefined();
    const b = await connect();
    let bGreeted = false;
    const bGreeting = b.read(18).then((g) => {
      bGreeted = g !== undefined;
    });
    await new Promise((r) => setTimeout(r, 50));
    expect(bGreeted).toBe(false);
    expect(server!.queuedCount).toBe(1);
    a.close();
    await bGreeting;
    expect(bGreeted).toBe(true);
  });

  it('closes clients that do not finish the handshake in time', async () => {
    const { connect } = await setup({ handshakeTimeoutMs: 100 });
    const c = await connect();
    await c.read(18);
    expect(await c.waitClosed()).toBe(true);
  });

  it('times out a stalled handshake that starts after another client finished its own', async () => {
    const { connect } = await setup({ handshakeTimeoutMs: 150 });
    const a = await connect();
    await a.handshake('n');
    await new Promise((r) => setTimeout(r, 100));
    const b = await connect();
    await b.read(18);
    expect(await b.waitClosed()).toBe(true);
    expect(a.closed).toBe(false);
    a.request(NBD_CMD_READ, 0, 512);
    expect((await a.reply())?.kind).toBe('chunk');
  });

  it('drops every client on close()', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.handshake('n');
    await server!.close();
    expect(await c.waitClosed()).toBe(true);
    expect(server!.connectionCount).toBe(0);
  });

  it('listens on TCP port 0 and reports the bound port', async () => {
    const backend = new MemoryBackend([{ name: 'n', size: 1 << 20 }]);
    server = new NbdServer({ backend, log: silentLogger() });
    const a = await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 });
    expect(a.type === 'inet' && a.port > 0).toBe(true);
  });
});
});
