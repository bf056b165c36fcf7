/**
 * NBD extended headers (NBD_OPT_EXTENDED_HEADERS) on the server, driven with raw sockets on both
 * socket layers: every command in its 32-byte form, extended reply chunks echoing cookie and
 * offset, NBD_CMD_FLAG_PAYLOAD_LEN rules, the block-status payload filter, framing errors, and
 * 64-bit lengths (effect lengths and BLOCK_STATUS_EXT extents) on big sparse exports.
 */
import { mkdtempSync, openSync, closeSync, writeSync, ftruncateSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { NbdServer } from '../../src/nbd/server.js';
import {
  encodeOption,
  encodeRequest,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_PAYLOAD_LEN,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_LIST,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_EXT_HEADER_REQD,
  NBD_REP_INFO,
  NBD_REP_SERVER,
  NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  type OptionReply,
} from '../../src/nbd/protocol.js';
import { silentLogger } from '../../src/util/logger.js';
import { MemoryBackend } from '../helpers/nbd-memory-backend.js';
import { RawNbdClient, type RawReply } from '../helpers/nbd-raw-client.js';
import { Daemon } from '../helpers/in-process-daemon.js';
import { nativeAddon } from '../../src/block/native.js';
import { netIoBindingFrom, type NetIoBinding } from '../../src/nbd/native-transport.js';

const NETIO = netIoBindingFrom(nativeAddon());
const TRANSPORTS: [string, NetIoBinding | undefined][] = [['net.Socket', undefined]];
if (NETIO) TRANSPORTS.push(['native netio', NETIO]);
let netio: NetIoBinding | undefined;

const MiB = 1 << 20;
const GiB = 2 ** 30;
const TiB = 2 ** 40;

let dir: string | undefined;
let server: NbdServer | undefined;
let daemon: Daemon | undefined;
const clients: RawNbdClient[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  await server?.close();
  server = undefined;
  await daemon?.shutdown();
  daemon = undefined;
  if (dir) rmSync(dir, { recursive: true, force: true });
  dir = undefined;
});

async function setup() {
  dir = mkdtempSync(join(tmpdir(), 'nbd-xhdr-'));
  const path = join(dir, 'nbd.sock');
  const backend = new MemoryBackend([
    { name: 'n', size: 64 * MiB, dirtyBitmap: 'b0' },
    { name: 'async', size: 4 * MiB, syncReads: false },
    { name: 'ro', size: MiB, readOnly: true },
  ]);
  server = new NbdServer({ backend, log: silentLogger(), netio });
  await server.listen({ type: 'unix', path });
  const connect = async () => {
    const c = await RawNbdClient.connect(path);
    clients.push(c);
    return c;
  };
  return { path, backend, connect };
}

/** A fresh compact client lists the exports (the server still works). */
async function stillServes(connect: () => Promise<RawNbdClient>): Promise<void> {
  const c = await connect();
  await c.greeting();
  const r = await c.option(NBD_OPT_LIST);
  expect(r.at(-1)?.type).toBe(NBD_REP_ACK);
  expect(r.filter((x) => x.type === NBD_REP_SERVER).length).toBeGreaterThan(0);
  c.close();
}

type Ext = Extract<RawReply, { kind: 'ext' }>;

async function ext(c: RawNbdClient): Promise<Ext> {
  const r = await c.reply();
  if (r?.kind !== 'ext') throw new Error(`expected an extended reply, got ${JSON.stringify(r)}`);
  return r;
}

/** Chunks of one reply, up to the one with DONE. */
async function extReply(c: RawNbdClient): Promise<Ext[]> {
  const out: Ext[] = [];
  for (let i = 0; i < 1000; i++) {
    const r = await ext(c);
    out.push(r);
    if (r.flags & 1) return out;
  }
  throw new Error('no DONE chunk');
}

/** BLOCK_STATUS_EXT payload: context id and (length, flags) pairs. */
function statusExt(r: Ext): { id: number; extents: Array<[number, number]> } {
  expect(r.type).toBe(NBD_REPLY_TYPE_BLOCK_STATUS_EXT);
  const p = r.payload;
  const n = p.readUInt32BE(4);
  expect(p.length).toBe(8 + 16 * n);
  const extents: Array<[number, number]> = [];
  for (let i = 0; i < n; i++) {
    expect(p.readUInt32BE(8 + 16 * i + 8)).toBe(0); // high half of the status: zero
    extents.push([Number(p.readBigUInt64BE(8 + 16 * i)), p.readUInt32BE(8 + 16 * i + 12)]);
  }
  return { id: p.readUInt32BE(0), extents };
}

function goFlags(replies: OptionReply[]): number {
  const exp = replies.find((r) => r.type === NBD_REP_INFO && r.payload.readUInt16BE(0) === 0)!;
  return exp.payload.readUInt16BE(10);
}

describe.each(TRANSPORTS)('extended headers on %s', (_name, binding) => {
  beforeAll(() => {
    netio = binding;
  });

  it('negotiates: ACK, then GO advertises DF and BLOCK_STATUS_PAYLOAD; STRUCTURED_REPLY is refused after it', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.greeting();
    expect((await c.option(NBD_OPT_EXTENDED_HEADERS)).map((r) => r.type)).toEqual([NBD_REP_ACK]);
    expect((await c.option(NBD_OPT_STRUCTURED_REPLY)).map((r) => r.type)).toEqual([NBD_REP_ERR_EXT_HEADER_REQD]);
    const c2 = await connect();
    const go = await c2.handshake('n', { extended: true, contexts: ['base:allocation'] });
    expect(go.at(-1)?.type).toBe(NBD_REP_ACK);
    expect(goFlags(go) & (1 << 7)).not.toBe(0);
    expect(goFlags(go) & (1 << 12)).not.toBe(0);
  });

  it('closes a client that sends EXPORT_NAME after extended headers', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.greeting();
    await c.option(NBD_OPT_EXTENDED_HEADERS);
    c.write(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from('n')));
    expect(await c.waitClosed()).toBe(true);
    await stillServes(connect);
  });

  it('reads with an OFFSET_DATA chunk echoing cookie and offset (sync and async exports)', async () => {
    const { connect, backend } = await setup();
    backend.get('n').fill(8192, Buffer.alloc(4096, 0x61));
    backend.get('async').fill(0, Buffer.alloc(8192, 0x62));
    for (const [name, off, byte] of [['n', 8192, 0x61], ['async', 4096, 0x62]] as const) {
      const c = await connect();
      await c.handshake(name, { extended: true });
      c.extRequest(NBD_CMD_READ, off, 4096, NBD_CMD_FLAG_FUA, 0x1122334455667788n);
      const [r] = await extReply(c);
      expect(r).toMatchObject({ type: NBD_REPLY_TYPE_OFFSET_DATA, flags: 1, offset: BigInt(off), length: 8n + 4096n });
      expect(r!.cookie.readBigUInt64BE(0)).toBe(0x1122334455667788n);
      expect(Number(r!.payload.readBigUInt64BE(0))).toBe(off);
      expect(r!.payload.subarray(8).equals(Buffer.alloc(4096, byte))).toBe(true);
    }
  });

  it('answers a sparse read with OFFSET_DATA/OFFSET_HOLE chunks, and one data chunk with DF', async () => {
    const { connect, backend } = await setup();
    // An export without the synchronous read path: reads go through the backend, which reports holes.
    backend.get('async').fill(MiB + 65536, Buffer.alloc(4096, 0x7a));
    const c = await connect();
    await c.handshake('async', { extended: true });
    c.extRequest(NBD_CMD_READ, MiB, 128 * 1024, 0, 5n);
    const chunks = await extReply(c);
    expect(chunks.every((x) => x.offset === BigInt(MiB) && x.cookie.readBigUInt64BE(0) === 5n)).toBe(true);
    const got = Buffer.alloc(128 * 1024, 0xff);
    for (const ch of chunks) {
      const at = Number(ch.payload.readBigUInt64BE(0)) - MiB;
      if (ch.type === NBD_REPLY_TYPE_OFFSET_HOLE) {
        expect(ch.length).toBe(12n);
        got.fill(0, at, at + ch.payload.readUInt32BE(8));
      } else {
        expect(ch.type).toBe(NBD_REPLY_TYPE_OFFSET_DATA);
        ch.payload.copy(got, at, 8);
      }
    }
    expect(chunks.some((x) => x.type === NBD_REPLY_TYPE_OFFSET_HOLE)).toBe(true);
    expect(got.equals(backend.get('async').data.subarray(MiB, MiB + 128 * 1024))).toBe(true);
    c.extRequest(NBD_CMD_READ, MiB, 128 * 1024, NBD_CMD_FLAG_DF, 6n);
    const df = await extReply(c);
    expect(df.map((x) => x.type)).toEqual([NBD_REPLY_TYPE_OFFSET_DATA]);
  });

  it('writes with NBD_CMD_FLAG_PAYLOAD_LEN, and every other command answers a NONE chunk', async () => {
    const { connect, backend } = await setup();
    const c = await connect();
    await c.handshake('n', { extended: true });
    const data = Buffer.alloc(3 * MiB, 0x33); // spread over several socket reads
    c.extRequest(NBD_CMD_WRITE, 4096, data.length, NBD_CMD_FLAG_PAYLOAD_LEN | NBD_CMD_FLAG_FUA, 1n, data);
    c.extRequest(NBD_CMD_FLUSH, 0, 0, 0, 2n);
    c.extRequest(NBD_CMD_TRIM, 8 * MiB, MiB, 0, 3n);
    c.extRequest(NBD_CMD_WRITE_ZEROES, 4096, 4096, 0, 4n);
    c.extRequest(NBD_CMD_CACHE, 0, 40 * MiB, 0, 5n); // above the 32 MiB compact bound
    const seen = new Map<bigint, Ext>();
    for (let i = 0; i < 5; i++) {
      const r = await ext(c);
      seen.set(r.cookie.readBigUInt64BE(0), r);
    }
    for (const [cookie, off] of [[1n, 4096n], [2n, 0n], [3n, BigInt(8 * MiB)], [4n, 4096n], [5n, 0n]] as const) {
      expect(seen.get(cookie)).toMatchObject({ type: NBD_REPLY_TYPE_NONE, flags: 1, offset: off, length: 0n });
    }
    const d = backend.get('n').data;
    expect(d.subarray(4096, 8192).equals(Buffer.alloc(4096))).toBe(true);
    expect(d.subarray(8192, 4096 + data.length).equals(data.subarray(4096))).toBe(true);
    const calls = backend.get('n').calls.map((x) => x.op);
    expect(calls).toEqual(expect.arrayContaining(['write', 'flush', 'trim', 'writeZeroes', 'cache']));
  });

  it('answers errors with extended ERROR chunks (QSD texts) and keeps going', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.handshake('n', { extended: true });
    c.extRequest(NBD_CMD_READ, 64 * MiB - 10, 4096, 0, 1n);
    const r = await ext(c);
    expect(r).toMatchObject({ type: 0x8001, flags: 1, offset: BigInt(64 * MiB - 10) });
    expect(RawNbdClient.errorOf(r)).toEqual({ error: 22, message: 'operation past EOF; From: 67108854, Len: 4096, Size: 67108864' });
    c.extRequest(NBD_CMD_READ, 0, 33 * MiB, 0, 2n);
    expect(RawNbdClient.errorOf(await ext(c))?.message).toBe('len (34603008 ) is larger than max len (33554432)');
    // A 2^63 effect length fits no export.
    c.extRequest(NBD_CMD_TRIM, 0, 1n << 63n, 0, 3n);
    expect(RawNbdClient.errorOf(await ext(c))).toEqual({
      error: 22,
      message: 'operation past EOF; From: 0, Len: 9223372036854775808, Size: 67108864',
    });
    c.extRequest(NBD_CMD_BLOCK_STATUS, 0, 4096, 0, 4n);
    expect(RawNbdClient.errorOf(await ext(c))?.message).toBe('CMD_BLOCK_STATUS not negotiated');
    c.extRequest(NBD_CMD_READ, 0, 0, 0, 5n);
    expect(await ext(c)).toMatchObject({ type: NBD_REPLY_TYPE_NONE, flags: 1 });
  });

  it('refuses writes on a read-only export after draining the payload', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.handshake('ro', { extended: true });
    c.extRequest(NBD_CMD_WRITE, 0, 4, NBD_CMD_FLAG_PAYLOAD_LEN, 1n, Buffer.from('abcd'));
    expect(RawNbdClient.errorOf(await ext(c))).toEqual({ error: 22, message: 'Export is read-only' });
    c.extRequest(NBD_CMD_READ, 0, 512, 0, 2n);
    expect(await ext(c)).toMatchObject({ type: NBD_REPLY_TYPE_OFFSET_DATA });
  });

  it('applies the payload-length rules: drain and EINVAL, no payload without the flag, disconnect above 32 MiB', async () => {
    const { connect, backend } = await setup();
    const c = await connect();
    await c.handshake('n', { extended: true });
    // READ has no payload form: its payload is consumed, then EINVAL.
    c.extRequest(NBD_CMD_READ, 0, 100, NBD_CMD_FLAG_PAYLOAD_LEN, 1n, Buffer.alloc(100, 0x55));
    expect(RawNbdClient.errorOf(await ext(c))).toEqual({ error: 22, message: 'unsupported flags for command read (got 0x20)' });
    c.extRequest(NBD_CMD_TRIM, 0, 8, NBD_CMD_FLAG_PAYLOAD_LEN, 2n, Buffer.alloc(8, 0x21));
    expect(RawNbdClient.errorOf(await ext(c))?.error).toBe(22);
    // WRITE without the flag: the length is an effect length, nothing follows; refused.
    c.extRequest(NBD_CMD_WRITE, 0, 4096, 0, 3n);
    expect(RawNbdClient.errorOf(await ext(c))).toEqual({ error: 22, message: 'write without NBD_CMD_FLAG_PAYLOAD_LEN' });
    // The stream is still in sync.
    c.extRequest(NBD_CMD_WRITE, 0, 4, NBD_CMD_FLAG_PAYLOAD_LEN, 4n, Buffer.from('wxyz'));
    expect(await ext(c)).toMatchObject({ type: NBD_REPLY_TYPE_NONE });
    expect(backend.get('n').data.subarray(0, 4).toString()).toBe('wxyz');
    // A payload above the maximum payload size: hard disconnect, nothing else harmed.
    c.extRequest(NBD_CMD_WRITE, 0, 32 * MiB + 1, NBD_CMD_FLAG_PAYLOAD_LEN, 5n);
    expect(await c.waitClosed()).toBe(true);
    await stillServes(connect);
  });

  it('filters block status by the context ids in the payload (NBD_FLAG_BLOCK_STATUS_PAYLOAD)', async () => {
    const { connect, backend } = await setup();
    backend.get('n').fill(0, Buffer.alloc(8192, 1));
    const c = await connect();
    await c.handshake('n', { extended: true, contexts: ['base:allocation', 'qemu:dirty-bitmap:b0'] });
    c.extRequest(NBD_CMD_BLOCK_STATUS, 0, MiB, 0, 1n);
    const both = await extReply(c);
    expect(both.map((x) => statusExt(x).id).sort()).toEqual([0, 1]);
    const base = both.find((x) => statusExt(x).id === 0)!;
    expect(statusExt(base).extents).toEqual([[8192, 0], [MiB - 8192, 3]]);
    // Payload: [0..7] effect length, then the ids.
    const pl = Buffer.alloc(12);
    pl.writeBigUInt64BE(BigInt(MiB), 0);
    pl.writeUInt32BE(1, 8);
    c.extRequest(NBD_CMD_BLOCK_STATUS, 0, pl.length, NBD_CMD_FLAG_PAYLOAD_LEN, 2n, pl);
    const one = await extReply(c);
    expect(one.map((x) => statusExt(x).id)).toEqual([1]);
    expect(one[0]!.offset).toBe(0n);
    // An unknown id: the payload is consumed, then EINVAL.
    pl.writeUInt32BE(7, 8);
    c.extRequest(NBD_CMD_BLOCK_STATUS, 0, pl.length, NBD_CMD_FLAG_PAYLOAD_LEN, 3n, pl);
    expect(RawNbdClient.errorOf(await ext(c))?.error).toBe(22);
    // A payload of the wrong shape.
    c.extRequest(NBD_CMD_BLOCK_STATUS, 0, 10, NBD_CMD_FLAG_PAYLOAD_LEN, 4n, Buffer.alloc(10));
    expect(RawNbdClient.errorOf(await ext(c))?.error).toBe(22);
    c.extRequest(NBD_CMD_BLOCK_STATUS, 0, 4096, NBD_CMD_FLAG_REQ_ONE, 5n);
    const req1 = await extReply(c);
    expect(req1.map((x) => statusExt(x).extents.length)).toEqual([1, 1]);
  });

  it('treats a compact request or a bad magic after negotiation as a framing error', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.handshake('n', { extended: true });
    c.write(Buffer.concat([encodeRequest(NBD_CMD_READ, 0, 1n, 0, 512), Buffer.alloc(4)]));
    const r = await ext(c);
    expect(RawNbdClient.errorOf(r)).toEqual({ error: 22, message: 'invalid magic (got 0x25609513)' });
    expect(r.cookie.readBigUInt64BE(0)).toBe(0n);
    expect(await c.waitClosed()).toBe(true);
    const d = await connect();
    await d.handshake('n', { extended: true });
    d.write(Buffer.alloc(32, 0xee));
    expect(RawNbdClient.errorOf(await ext(d))?.message).toBe('invalid magic (got 0xeeeeeeee)');
    expect(await d.waitClosed()).toBe(true);
    await stillServes(connect);
  });

  it('closes after NBD_CMD_DISC', async () => {
    const { connect } = await setup();
    const c = await connect();
    await c.handshake('n', { extended: true });
    c.extRequest(NBD_CMD_DISC, 0, 0, 0, 9n);
    expect(await c.waitClosed()).toBe(true);
  });

  it('leaves compact clients as they were (simple replies, u32 BLOCK_STATUS)', async () => {
    const { connect } = await setup();
    const c = await connect();
    const go = await c.handshake('n', { structured: false });
    expect(goFlags(go) & ((1 << 7) | (1 << 12))).toBe(0);
    c.request(NBD_CMD_WRITE, 0, 4, 0, 1n, Buffer.from('abcd'));
    expect(await c.reply()).toMatchObject({ kind: 'simple', error: 0 });
    const s = await connect();
    await s.handshake('n', { contexts: ['base:allocation'] });
    c.close();
    s.request(NBD_CMD_BLOCK_STATUS, 0, MiB, 0, 2n);
    expect(await s.reply()).toMatchObject({ kind: 'chunk', type: 5 });
  });
});

describe('extended headers with 64-bit lengths on big exports (in-process daemon)', () => {
  async function bigDaemon(): Promise<{ path: string; d: Daemon }> {
    dir = mkdtempSync(join(tmpdir(), 'nbd-xhdr-big-'));
    const path = join(dir, 'nbd.sock');
    daemon = new Daemon();
    await daemon.ok('nbd-server-start', { addr: { type: 'unix', data: { path } } });
    return { path, d: daemon };
  }

  it('reports an 8 TiB null-co export as one 64-bit extent, where compact replies stop below 4 GiB', async () => {
    const { path, d } = await bigDaemon();
    await d.ok('blockdev-add', { driver: 'null-co', 'node-name': 'z', size: 8 * TiB, 'read-zeroes': true });
    await d.ok('block-export-add', { type: 'nbd', id: 'z', 'node-name': 'z', writable: true });
    const c = await RawNbdClient.connect(path);
    clients.push(c);
    await c.handshake('z', { extended: true, contexts: ['base:allocation'] });
    c.extRequest(NBD_CMD_BLOCK_STATUS, 0, 8 * TiB, 0, 1n);
    const [r] = await extReply(c);
    expect(statusExt(r!).extents).toEqual([[8 * TiB, 3]]);
    // Effect lengths beyond 4 GiB for TRIM, WRITE_ZEROES and CACHE.
    c.extRequest(NBD_CMD_WRITE_ZEROES, TiB, 5 * GiB, 0, 2n);
    c.extRequest(NBD_CMD_TRIM, 2 * TiB, 6 * GiB, 0, 3n);
    c.extRequest(NBD_CMD_CACHE, 3 * TiB, 7 * GiB, 0, 4n);
    for (let i = 0; i < 3; i++) expect(await ext(c)).toMatchObject({ type: NBD_REPLY_TYPE_NONE, flags: 1 });
    // REQ_ONE: one extent, not longer than the request.
    c.extRequest(NBD_CMD_BLOCK_STATUS, GiB, 5 * GiB, NBD_CMD_FLAG_REQ_ONE, 5n);
    expect(statusExt((await extReply(c))[0]!).extents).toEqual([[5 * GiB, 3]]);

    const s = await RawNbdClient.connect(path);
    clients.push(s);
    await s.handshake('z', { contexts: ['base:allocation'] });
    s.request(NBD_CMD_BLOCK_STATUS, 0, 0xffffffff, 0, 1n);
    const cr = await s.reply();
    expect(cr).toMatchObject({ kind: 'chunk', type: 5 });
    const p = (cr as { payload: Buffer }).payload;
    let total = 0;
    for (let o = 4; o < p.length; o += 8) total += p.readUInt32BE(o);
    expect(total).toBeLessThanOrEqual(0xffffffff);
  });

  it('reports the holes of a sparse 16 GiB file in single extents, after a small data head', async () => {
    const { path, d } = await bigDaemon();
    const img = join(dir!, 'sparse.raw');
    const fd = openSync(img, 'w');
    ftruncateSync(fd, 16 * GiB);
    writeSync(fd, Buffer.alloc(MiB, 0x5a), 0, MiB, 10 * GiB);
    writeSync(fd, Buffer.alloc(4096, 0x5a), 0, 4096, 0);
    closeSync(fd);
    await d.ok('blockdev-add', { driver: 'raw', 'node-name': 's', file: { driver: 'file', filename: img } });
    await d.ok('block-export-add', { type: 'nbd', id: 's', 'node-name': 's' });
    const c = await RawNbdClient.connect(path);
    clients.push(c);
    await c.handshake('s', { extended: true, contexts: ['base:allocation'] });
    c.extRequest(NBD_CMD_BLOCK_STATUS, 0, 16 * GiB, 0, 1n);
    const ext0 = statusExt((await extReply(c))[0]!).extents;
    // A fragmented first window does not stop the answer while its last run is long.
    expect(ext0).toEqual([[4096, 0], [10 * GiB - 4096, 3], [MiB, 0], [6 * GiB - MiB, 3]]);
    c.extRequest(NBD_CMD_READ, 10 * GiB, 4096, 0, 2n);
    const [rd] = await extReply(c);
    expect(rd!.offset).toBe(BigInt(10 * GiB));
    expect(rd!.payload.subarray(8).equals(Buffer.alloc(4096, 0x5a))).toBe(true);
  });
});
