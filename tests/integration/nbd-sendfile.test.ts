/**
 * Large cached reads of a raw file export sent with sendfile() (netWriteFile in native/netio.c):
 * the bytes, the reply order with everything else queued, partial sends to a slow reader, ranges
 * that end at an EOF that is not page-aligned, the file closed / truncated / evicted from the
 * page cache while segments wait, blockstats, and the fallbacks (no addon, small reads).
 * netFileStats() shows which way the segments went, so every test fails if the path is not taken.
 */
import { execFile, execFileSync, spawnSync } from 'node:child_process';
import { promisify } from 'node:util';
import { closeSync, fsyncSync, ftruncateSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeSync } from 'node:fs';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Services } from '../../src/qmp/services.js';
import { ALL_COMMANDS } from '../../src/qmp/commands/index.js';
import { silentLogger } from '../../src/util/logger.js';
import { nativeAddon, nativeOps } from '../../src/block/native.js';
import {
  listenUnixFd,
  NativeListener,
  netIoBindingFrom,
  type NativeTransport,
} from '../../src/nbd/native-transport.js';
import { NBD_CMD_DISC, NBD_CMD_FLAG_DF, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE } from '../../src/nbd/protocol.js';
import { RawNbdClient, type RawReply } from '../helpers/nbd-raw-client.js';
import { cachestatWorks, withoutAddon } from '../helpers/native.js';
import { qemuTools } from '../helpers/qcow2.js';

const netio = netIoBindingFrom(nativeAddon());
const MiB = 1 << 20;
/** Not a multiple of the page size: reads that end at EOF end inside a page. */
const SIZE = 24 * MiB + 3000;

/**
 * Whether this kernel and addon can take the path at all (cachestat needs Linux >= 6.5), and the
 * server uses the native socket layer (BLOCKD_NET=node serves with net.Socket: no sendfile).
 */
function pathAvailable(): boolean {
  if (process.env['BLOCKD_NET'] === 'node') return false;
  return !!netio?.netWriteFile && !!netio.netFileStats && cachestatWorks();
}
const AVAILABLE = pathAvailable();

function fileStats(): { sent: number; waited: number; loaded: number; zeroed: number } {
  const [sent = 0, waited = 0, loaded = 0, zeroed = 0] = netio?.netFileStats?.() ?? [];
  return { sent, waited, loaded, zeroed };
}

/** Drop the file's clean pages from the page cache (POSIX_FADV_DONTNEED; Node has no binding). */
function evict(path: string): void {
  execFileSync('/usr/bin/python3', [
    '-c',
    'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)',
    path,
  ]);
}

/** An image of random bytes, written, synced and read once (so it is clean and cached). */
function makeImage(dir: string, size = SIZE): { path: string; data: Buffer } {
  const path = join(dir, 'disk.raw');
  const data = randomBytes(size);
  const fd = openSync(path, 'w');
  writeSync(fd, data);
  fsyncSync(fd);
  closeSync(fd);
  readFileSync(path);
  return { path, data };
}

/** The data of one READ reply (simple or one OFFSET_DATA chunk), checked against `want`. */
async function readData(c: RawNbdClient, length: number, structured: boolean): Promise<{ cookie: bigint; data: Buffer }> {
  const r: RawReply | undefined = await c.reply();
  if (!r) throw new Error('connection closed');
  if (r.kind === 'simple') {
    expect(structured).toBe(false);
    expect(r.error).toBe(0);
    const data = await c.read(length);
    if (!data) throw new Error('connection closed in the data');
    return { cookie: r.cookie.readBigUInt64BE(0), data: Buffer.from(data) };
  }
  expect(r.kind).toBe('chunk');
  if (r.kind !== 'chunk') throw new Error('unexpected reply');
  expect(r.type).toBe(1); // NBD_REPLY_TYPE_OFFSET_DATA
  expect(r.flags & 1).toBe(1); // DONE: one chunk
  return { cookie: r.cookie.readBigUInt64BE(0), data: Buffer.from(r.payload.subarray(8)) };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe.skipIf(!AVAILABLE)('sendfile for large cached reads of a raw file export', () => {
  let dir: string;
  let svc: Services;
  let sock: string;
  let img: { path: string; data: Buffer };

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'blockd-sendfile-'));
    sock = join(dir, 'nbd.sock');
    svc = new Services(silentLogger());
    await svc.exports.startServer({ addr: { type: 'unix', path: sock } });
    img = makeImage(dir);
    await svc.graph.add({
      driver: 'raw',
      'node-name': 'disk',
      file: { driver: 'file', filename: img.path, 'node-name': 'disk-file' },
    });
    svc.exports.addExport({ type: 'nbd', id: 'e0', nodeName: 'disk', writable: false, name: 'disk' });
  });

  afterEach(async () => {
    await svc.shutdown();
    rmSync(dir, { recursive: true, force: true });
  });

  async function client(structured: boolean): Promise<RawNbdClient> {
    const c = await RawNbdClient.connect(sock);
    await c.handshake('disk', { structured });
    return c;
  }

  for (const structured of [false, true]) {
    it(`sends large reads as file segments with the image's bytes (${structured ? 'structured' : 'simple'} replies)`, async () => {
      const c = await client(structured);
      const ranges: Array<[number, number]> = [
        [0, 64 * 1024],
        [4097, MiB + 3], // unaligned start and length
        [SIZE - 200_000, 200_000], // ends at EOF, inside a page
        [SIZE - 65_536, 65_536],
        [3 * MiB, 20 * MiB], // large: several sendfile calls
      ];
      const before = fileStats();
      let cookie = 1n;
      for (const [off, len] of ranges) {
        c.request(NBD_CMD_READ, off, len, structured ? NBD_CMD_FLAG_DF : 0, cookie++);
        const r = await readData(c, len, structured);
        expect(r.cookie).toBe(cookie - 1n);
        expect(r.data.equals(img.data.subarray(off, off + len))).toBe(true);
      }
      expect(fileStats().sent - before.sent).toBe(ranges.length);
      c.close();
    });
  }

  it('sends large reads as file segments to clients with extended headers', async () => {
    const c = await RawNbdClient.connect(sock);
    await c.handshake('disk', { extended: true });
    const before = fileStats();
    const [off, len] = [SIZE - MiB - 1, MiB + 1];
    c.extRequest(NBD_CMD_READ, off, len, 0, 7n);
    const r = await c.reply();
    expect(r?.kind).toBe('ext');
    if (r?.kind !== 'ext') return;
    expect(r.type).toBe(1); // NBD_REPLY_TYPE_OFFSET_DATA
    expect(r.cookie.readBigUInt64BE(0)).toBe(7n);
    expect(r.payload.readBigUInt64BE(0)).toBe(BigInt(off));
    expect(r.payload.subarray(8).equals(img.data.subarray(off))).toBe(true);
    expect(fileStats().sent - before.sent).toBe(1);
    c.close();
  });

  it('counts the reads in blockstats exactly as copied reads', async () => {
    const io = svc.graph.get('disk')!.io;
    const fileIo = svc.graph.get('disk-file')!.io;
    const ops0 = io.stats.readOps;
    const bytes0 = io.stats.readBytes;
    const fops0 = fileIo.stats.readOps;
    const before = fileStats();
    const c = await client(true);
    for (let i = 0; i < 4; i++) {
      c.request(NBD_CMD_READ, i * MiB, 256 * 1024, 0, BigInt(i + 1));
      await readData(c, 256 * 1024, true);
    }
    c.request(NBD_CMD_READ, 0, 4096, 0, 9n); // small: the copied path
    await readData(c, 4096, true);
    expect(fileStats().sent - before.sent).toBe(4);
    expect(io.stats.readOps - ops0).toBe(5);
    expect(io.stats.readBytes - bytes0).toBe(4 * 256 * 1024 + 4096);
    expect(fileIo.stats.readOps - fops0).toBe(5);
    c.close();
  });

  it('keeps replies in order and intact for a reader slower than the socket (partial sends)', async () => {
    const c = await client(true);
    const before = fileStats();
    c.sock.pause();
    // Large (file segments) and small (copied) reads interleaved: far more than the socket holds.
    const reqs: Array<[number, number]> = [];
    for (let i = 0; i < 12; i++) {
      reqs.push([(i * 1_900_001) % (SIZE - 3 * MiB), 2 * MiB + i]);
      reqs.push([i * 4096 + 7, 4096]);
    }
    reqs.forEach(([off, len], i) => c.request(NBD_CMD_READ, off, len, 0, BigInt(i + 1)));
    await sleep(100);
    c.sock.resume();
    for (let i = 0; i < reqs.length; i++) {
      const [off, len] = reqs[i]!;
      const r = await readData(c, len, true);
      // The server answers synchronously served reads in request order.
      expect(r.cookie).toBe(BigInt(i + 1));
      expect(r.data.equals(img.data.subarray(off, off + len))).toBe(true);
    }
    const after = fileStats();
    expect(after.sent - before.sent).toBe(12);
    expect(after.waited - before.waited).toBeGreaterThan(0);
    c.close();
  });

  it('still sends the right bytes when the file node is reopened while segments wait', async () => {
    const c = await client(false);
    const before = fileStats();
    c.sock.pause();
    for (let i = 0; i < 6; i++) c.request(NBD_CMD_READ, i * 3 * MiB, 3 * MiB, 0, BigInt(i + 1));
    await sleep(50);
    // A new descriptor for the file node; the old one is retired.
    await svc.graph.reopen([{ driver: 'file', 'node-name': 'disk-file', filename: img.path, 'read-only': true }]);
    c.sock.resume();
    for (let i = 0; i < 6; i++) {
      const r = await readData(c, 3 * MiB, false);
      expect(r.data.equals(img.data.subarray(i * 3 * MiB, (i + 1) * 3 * MiB))).toBe(true);
    }
    expect(fileStats().waited - before.waited).toBeGreaterThan(0);
    c.close();
  });

  it('does not take the path through a filter node between the export and the file', async () => {
    // A throttle filter with limits far above what the test reads.
    await svc.objects.add({ 'qom-type': 'throttle-group', id: 'tg', limits: { 'bps-total': 1 << 30 } });
    await svc.graph.add({ driver: 'throttle', 'node-name': 'thr', 'throttle-group': 'tg', file: 'disk' });
    svc.exports.addExport({ type: 'nbd', id: 'e1', nodeName: 'thr', name: 'thr' });
    const c = await RawNbdClient.connect(sock);
    await c.handshake('thr', { structured: true });
    const before = fileStats();
    c.request(NBD_CMD_READ, 12345, 2 * MiB, 0, 1n);
    const r = await readData(c, 2 * MiB, true);
    expect(r.data.equals(img.data.subarray(12345, 12345 + 2 * MiB))).toBe(true);
    expect(fileStats().sent - before.sent).toBe(0);
    c.close();
  });

  it('keeps sending holes as OFFSET_HOLE chunks (a range with a hole takes the copying path)', async () => {
    const sparse = join(dir, 'sparse.raw');
    const fd = openSync(sparse, 'w');
    writeSync(fd, img.data.subarray(0, MiB));
    ftruncateSync(fd, 4 * MiB); // 3 MiB hole at the end
    fsyncSync(fd);
    closeSync(fd);
    readFileSync(sparse);
    await svc.graph.add({
      driver: 'raw',
      'node-name': 'sp',
      file: { driver: 'file', filename: sparse, 'node-name': 'sp-file' },
    });
    svc.exports.addExport({ type: 'nbd', id: 'e2', nodeName: 'sp', name: 'sp' });
    const c = await RawNbdClient.connect(sock);
    await c.handshake('sp', { structured: true });
    const before = fileStats();
    c.request(NBD_CMD_READ, 0, 4 * MiB, 0, 1n);
    const first = await c.reply();
    const second = await c.reply();
    expect(first?.kind === 'chunk' && first.type).toBe(1); // OFFSET_DATA for the first MiB
    expect(second?.kind === 'chunk' && second.type).toBe(2); // OFFSET_HOLE for the rest
    if (first?.kind !== 'chunk' || second?.kind !== 'chunk') return;
    expect(first.payload.subarray(8).equals(img.data.subarray(0, MiB))).toBe(true);
    expect(second.payload.readBigUInt64BE(0)).toBe(BigInt(MiB));
    expect(second.payload.readUInt32BE(8)).toBe(3 * MiB);
    // The data-only first MiB alone is a file segment.
    c.request(NBD_CMD_READ, 0, MiB, 0, 2n);
    const r = await readData(c, MiB, true);
    expect(r.data.equals(img.data.subarray(0, MiB))).toBe(true);
    expect(fileStats().sent - before.sent).toBe(1);
    c.close();
  });

  it('answers a read whose range is not cached through the copied path', async () => {
    evict(img.path);
    const fd = openSync(img.path, 'r');
    expect(nativeOps().cachedRange!(fd, 8 * MiB, MiB)).toBe(0);
    closeSync(fd);
    const before = fileStats();
    const c = await client(true);
    c.request(NBD_CMD_READ, 8 * MiB, MiB, 0, 1n);
    const r = await readData(c, MiB, true);
    expect(r.data.equals(img.data.subarray(8 * MiB, 9 * MiB))).toBe(true);
    expect(fileStats().sent - before.sent).toBe(0);
    c.close();
  });
});

describe.skipIf(!AVAILABLE)('netio file segments', () => {
  let dir: string;
  let listener: NativeListener | undefined;
  let transport: NativeTransport | undefined;
  let peer: net.Socket | undefined;

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'blockd-netfile-'));
  });

  afterEach(() => {
    peer?.destroy();
    transport?.destroy();
    listener?.close();
    peer = transport = listener = undefined;
    rmSync(dir, { recursive: true, force: true });
  });

  /** A native server transport and a paused client socket connected to it. */
  async function pair(): Promise<{ t: NativeTransport; c: net.Socket; drained: () => number }> {
    const path = join(dir, 's.sock');
    let drains = 0;
    const accepted = new Promise<NativeTransport>((resolve) => {
      listener = new NativeListener(netio!, listenUnixFd(netio!, path), (t) => {
        t.attach({
          onData: () => undefined,
          onDrain: () => void drains++,
          onClose: () => undefined,
          onError: () => undefined,
          onDirectData: () => undefined,
        });
        resolve(t);
      });
    });
    const c = net.createConnection(path);
    c.pause();
    peer = c;
    transport = await accepted;
    return { t: transport, c, drained: () => drains };
  }

  /** Read exactly n bytes from the client socket. */
  async function readAll(c: net.Socket, n: number): Promise<Buffer> {
    const parts: Buffer[] = [];
    let got = 0;
    c.resume();
    await new Promise<void>((resolve, reject) => {
      const onData = (d: Buffer) => {
        parts.push(d);
        got += d.length;
        if (got >= n) {
          c.off('data', onData);
          resolve();
        }
      };
      c.on('data', onData);
      c.once('close', () => (got < n ? reject(new Error(`closed after ${got} of ${n} bytes`)) : undefined));
    });
    return Buffer.concat(parts).subarray(0, n);
  }

  it('sends a waiting segment from its own descriptor after the caller closed the file', async () => {
    const img = makeImage(dir, 16 * MiB);
    const { t, c } = await pair();
    const before = fileStats();
    const fd = openSync(img.path, 'r');
    const hdr = Buffer.from('header--');
    const ok = t.writeFile!([hdr], fd, 1000, 12 * MiB);
    closeSync(fd); // e.g. the node was closed: the waiting rest must not depend on this fd
    expect(ok).toBe(false); // more than the socket holds: it waits
    t.write([Buffer.from('trailer')]);
    const got = await readAll(c, 8 + 12 * MiB + 7);
    expect(got.subarray(0, 8).equals(hdr)).toBe(true);
    expect(got.subarray(8, 8 + 12 * MiB).equals(img.data.subarray(1000, 1000 + 12 * MiB))).toBe(true);
    expect(got.subarray(8 + 12 * MiB).toString()).toBe('trailer');
    const after = fileStats();
    expect(after.waited - before.waited).toBe(1);
    expect(after.sent - before.sent).toBe(1);
  });

  it('tells when the peer has read what was written, by reference or not (loan marks)', async () => {
    const img = makeImage(dir, 8 * MiB);
    const { t, c } = await pair();
    expect(t.pageBorrower).toBe(t); // a unix socket
    const fd = openSync(img.path, 'r');
    t.writeFile!([Buffer.from('header--')], fd, 0, 6 * MiB); // more than the socket holds
    closeSync(fd);
    t.write([Buffer.from('trailer')]);
    const mark = t.loanMark();
    expect(mark).toBe(8 + 6 * MiB + 7);
    expect(t.loanReturned(mark)).toBe(false); // the client has not read yet
    expect(t.loanReturned(8)).toBe(false); // not even the header: it is in the socket, unread
    await readAll(c, mark);
    await sleep(20);
    expect(t.loanReturned(mark)).toBe(true);
    expect(t.loanReturned(mark + 1)).toBe(false); // nothing more was written
    t.destroy();
    expect(t.loanReturned(mark + 1)).toBe(true); // closed: no longer followed
  });

  it('reads a waiting segment on the thread pool once its pages were evicted', async () => {
    const img = makeImage(dir, 16 * MiB);
    const { t, c } = await pair();
    const before = fileStats();
    const fd = openSync(img.path, 'r');
    expect(t.writeFile!([Buffer.from('h')], fd, 0, 14 * MiB)).toBe(false);
    closeSync(fd);
    evict(img.path);
    const got = await readAll(c, 1 + 14 * MiB);
    expect(got.subarray(1).equals(img.data.subarray(0, 14 * MiB))).toBe(true);
    expect(fileStats().loaded - before.loaded).toBe(1);
  });

  it('ends a waiting segment with zeroes when the file shrank meanwhile', async () => {
    const img = makeImage(dir, 16 * MiB);
    const { t, c } = await pair();
    const fd = openSync(img.path, 'r+');
    expect(t.writeFile!([], fd, 0, 12 * MiB)).toBe(false);
    ftruncateSync(fd, 10 * MiB);
    closeSync(fd);
    const got = await readAll(c, 12 * MiB);
    // Whatever was sent before the truncation is the old data; past the new EOF only zeroes.
    expect(got.subarray(0, 10 * MiB).equals(img.data.subarray(0, 10 * MiB))).toBe(true);
    expect(got.subarray(10 * MiB).every((b) => b === 0)).toBe(true);
  });
});

describe.skipIf(!AVAILABLE || !qemuTools('nbdcopy'))('sendfile for large cached reads of qcow2 data clusters', () => {
  const CS = 64 * 1024;
  let dir: string;
  let svc: Services;
  let sock: string;
  let want: Buffer;

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'blockd-sendfile-qcow2-'));
    sock = join(dir, 'nbd.sock');
    const img = join(dir, 'disk.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CS}`, img, '8M']);
    // Clusters 0..99 written in a shuffled order, so neighbours in the guest lie apart in the
    // file (runs of one or a few clusters); cluster 100 zero, 101 compressed, 110 data among
    // unallocated ones, the rest unallocated.
    const order = Array.from({ length: 100 }, (_, i) => i);
    let x = 7;
    for (let i = order.length - 1; i > 0; i--) {
      x = (x * 1103515245 + 12345) & 0x7fffffff;
      const j = x % (i + 1);
      [order[i], order[j]] = [order[j]!, order[i]!];
    }
    const cmds = order.flatMap((c) => ['-c', `write -P ${1 + (c % 250)} ${c * CS} ${CS}`]);
    cmds.push('-c', `write -z ${100 * CS} ${CS}`, '-c', `write -c -P 9 ${101 * CS} ${CS}`, '-c', `write -P 77 ${110 * CS} ${CS}`);
    execFileSync('qemu-io', ['-f', 'qcow2', ...cmds, img], { stdio: 'ignore' });
    const raw = join(dir, 'want.raw');
    execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, raw]);
    want = readFileSync(raw);
    readFileSync(img); // cached
    svc = new Services(silentLogger());
    await svc.exports.startServer({ addr: { type: 'unix', path: sock } });
    await svc.graph.add({ driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: img, 'node-name': 'q-file' } });
    svc.exports.addExport({ type: 'nbd', id: 'e0', nodeName: 'q', name: 'disk' });
  });

  afterEach(async () => {
    await svc.shutdown();
    rmSync(dir, { recursive: true, force: true });
  });

  /** A structured client, after one small read that loaded the L2 table (async path). */
  async function warmClient() {
    const c = await RawNbdClient.connect(sock);
    await c.handshake('disk', { structured: true });
    c.request(NBD_CMD_READ, 0, 4096, NBD_CMD_FLAG_DF, 1n);
    await readData(c, 4096, true);
    return { c, q: svc.graph.get('q')!.driver };
  }

  it('sends a read over scattered data clusters as one file segment per host run, with the right bytes', async () => {
    const { c, q } = await warmClient();
    let cookie = 2n;
    let most = 0;
    for (const [off, len] of [
      [0, 4 * CS],
      [100_000, 300_000],
      [37 * CS + 1, 9 * CS - 2],
    ] as Array<[number, number]>) {
      const range = q.fileRangeSync?.(off, len, false, true);
      expect(range, `${off}+${len}`).toBeDefined();
      const pieces = range!.pieces?.length ?? 1;
      most = Math.max(most, pieces);
      const before = fileStats();
      c.request(NBD_CMD_READ, off, len, NBD_CMD_FLAG_DF, cookie);
      const r = await readData(c, len, true);
      expect(r.cookie).toBe(cookie++);
      expect(r.data.equals(want.subarray(off, off + len))).toBe(true);
      expect(fileStats().sent - before.sent, `${off}+${len}`).toBe(pieces);
    }
    expect(most).toBeGreaterThan(2); // the shuffled clusters really are apart in the file
    c.close();
  });

  it('copies what it cannot send from the file: zero, compressed, unallocated, too many pieces', async () => {
    const { c, q } = await warmClient();
    let cookie = 2n;
    for (const [off, len] of [
      [98 * CS, 3 * CS], // data, then the zero cluster
      [101 * CS, CS], // compressed
      [99 * CS, 4 * CS], // data, zero, compressed, unallocated
      [0, 100 * CS], // all data, but scattered over far more than 16 runs
    ] as Array<[number, number]>) {
      expect(q.fileRangeSync?.(off, len, false, true), `${off}+${len}`).toBeUndefined();
      const before = fileStats();
      c.request(NBD_CMD_READ, off, len, NBD_CMD_FLAG_DF, cookie);
      const r = await readData(c, len, true);
      expect(r.cookie).toBe(cookie++);
      expect(r.data.equals(want.subarray(off, off + len)), `${off}+${len}`).toBe(true);
      expect(fileStats().sent - before.sent).toBe(0);
    }
    c.close();
  });

  /**
   * One READ's chunks until DONE (structured or extended): each as [type, guest offset, length],
   * the data checked against `want` and the holes against its zeroes.
   */
  async function readChunks(c: RawNbdClient, cookie: bigint): Promise<Array<[number, number, number]>> {
    const got: Array<[number, number, number]> = [];
    for (;;) {
      const r = await c.reply();
      if (!r || (r.kind !== 'chunk' && r.kind !== 'ext')) throw new Error(`unexpected reply ${r?.kind}`);
      expect(r.cookie.readBigUInt64BE(0)).toBe(cookie);
      const off = Number(r.payload.readBigUInt64BE(0));
      if (r.type === 1) {
        const data = r.payload.subarray(8);
        expect(data.equals(want.subarray(off, off + data.length)), `data at ${off}`).toBe(true);
        got.push([1, off, data.length]);
      } else {
        expect(r.type).toBe(2); // NBD_REPLY_TYPE_OFFSET_HOLE
        const n = r.payload.readUInt32BE(8); // a 32-bit hole size in both framings
        expect(want.subarray(off, off + n).every((b) => b === 0)).toBe(true);
        got.push([2, off, n]);
      }
      if (r.flags & 1) return got;
    }
  }

  it('sends a read over data and known-zero clusters (no DF) as file data chunks and hole chunks', async () => {
    const { c, q } = await warmClient();
    let cookie = 2n;
    for (const [off, len, shape] of [
      // data, data, the zero cluster
      [98 * CS, 3 * CS, [1, 1, 2]],
      // the end of a data cluster, the start of the zero cluster (not cluster-aligned)
      [99 * CS + 100, CS + 4000, [1, 2]],
      // unallocated, unallocated, data, unallocated
      [108 * CS, 4 * CS, [2, 1, 2]],
    ] as Array<[number, number, number[]]>) {
      expect(q.fileRangeSync?.(off, len, false, true), `${off}+${len} without holes`).toBeUndefined();
      const range = q.fileRangeSync?.(off, len, true, true);
      expect(range, `${off}+${len}`).toBeDefined();
      const dataPieces = range!.pieces!.filter((p) => p.offset >= 0).length;
      const before = fileStats();
      c.request(NBD_CMD_READ, off, len, 0, cookie);
      const chunks = await readChunks(c, cookie++);
      // Adjacent data clusters may be one chunk (one host run) or two: holes are always merged.
      const merged = (ts: number[]): number[] => ts.filter((t, i, a) => !(t === 1 && a[i - 1] === 1));
      expect(merged(chunks.map(([t]) => t)), `${off}+${len}`).toEqual(merged(shape));
      expect(chunks[0]![1]).toBe(off);
      expect(chunks.reduce((n, [, , l]) => n + l, 0)).toBe(len);
      expect(chunks.filter(([t]) => t === 1).length).toBe(dataPieces);
      expect(fileStats().sent - before.sent, `${off}+${len}`).toBe(dataPieces);
    }
    // With DF the same range is one data chunk, copied.
    const before = fileStats();
    c.request(NBD_CMD_READ, 108 * CS, 4 * CS, NBD_CMD_FLAG_DF, cookie);
    const r = await readData(c, 4 * CS, true);
    expect(r.data.equals(want.subarray(108 * CS, 112 * CS))).toBe(true);
    expect(fileStats().sent - before.sent).toBe(0);
    c.close();
  });

  it('frames the data and hole chunks of such a read with extended headers too', async () => {
    const c = await RawNbdClient.connect(sock);
    await c.handshake('disk', { extended: true });
    c.extRequest(NBD_CMD_READ, 0, 4096, 0, 1n); // loads the L2 table
    await readChunks(c, 1n);
    const before = fileStats();
    c.extRequest(NBD_CMD_READ, 98 * CS + 512, 3 * CS - 1024, 0, 2n);
    const chunks = await readChunks(c, 2n);
    expect(chunks[0]![0]).toBe(1);
    expect(chunks.at(-1)).toEqual([2, 100 * CS, CS - 512]); // the zero cluster's start
    expect(chunks.reduce((n, [, , l]) => n + l, 0)).toBe(3 * CS - 1024);
    expect(fileStats().sent - before.sent).toBe(chunks.filter(([t]) => t === 1).length);
    c.close();
  });

  it('gives nbdcopy the same image as qemu-img convert', async () => {
    const out = join(dir, 'copy.raw');
    const before = fileStats();
    // Not execFileSync: the server runs in this process's event loop.
    await promisify(execFile)('nbdcopy', [`nbd+unix:///disk?socket=${sock}`, out]);
    expect(readFileSync(out).equals(want)).toBe(true);
    expect(fileStats().sent).toBeGreaterThan(before.sent);
  });
});

/** A port free on 127.0.0.1 just now. */
async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/**
 * A qcow2 host cluster can be freed and reused for other guest data while a READ reply that
 * references it (sent with sendfile, util/page-loans.ts) still waits for its client: freed
 * clusters are held from reuse until the client has read that far (qcow2/held-clusters.ts),
 * and TCP connections (whose reading cannot be followed) get such reads copied.
 */
describe.skipIf(!AVAILABLE || !qemuTools('nbdcopy'))('qcow2 clusters behind replies sent by reference', () => {
  const CS = 64 * 1024;
  let dir: string;
  let svc: Services;
  let img: string;

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'blockd-loans-'));
    img = join(dir, 'disk.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CS}`, img, '8M']);
    // Guest MiB 0 in host clusters next to each other, all 0xaa.
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 0xaa 0 ${MiB}`, img], { stdio: 'ignore' });
    readFileSync(img); // cached
    svc = new Services(silentLogger());
    await svc.graph.add({
      driver: 'qcow2',
      'node-name': 'q',
      discard: 'unmap',
      file: { driver: 'file', filename: img, 'node-name': 'q-file' },
    });
  });

  afterEach(async () => {
    await svc.shutdown();
    rmSync(dir, { recursive: true, force: true });
  });

  async function unixClient(sock: string): Promise<RawNbdClient> {
    const c = await RawNbdClient.connect(sock);
    await c.handshake('disk', { structured: true });
    return c;
  }

  /** A successful reply without data (simple, or a NONE chunk). */
  async function ok(c: RawNbdClient, cookie: bigint): Promise<void> {
    const r = await c.reply();
    if (r?.kind === 'simple') expect(r.error).toBe(0);
    else {
      expect(r?.kind).toBe('chunk');
      if (r?.kind === 'chunk') expect(r.type, 'no error chunk').toBe(0); // NBD_REPLY_TYPE_NONE
    }
    expect(r?.cookie.readBigUInt64BE(0)).toBe(cookie);
  }

  /** `req` then a flush, both answered. */
  async function flushed(c: RawNbdClient, req: () => void): Promise<void> {
    req();
    await ok(c, 1n);
    c.request(NBD_CMD_FLUSH, 0, 0, 0, 2n);
    await ok(c, 2n);
  }

  /**
   * A unix-socket server with a writable export; a client with a 1 MiB read of MiB 0 (cookie 2)
   * that it does not read yet: the reply waits in the socket (and in the server's queue) as
   * references to the host clusters' pages. Then another client discards that MiB and flushes
   * (the frees are written back).
   */
  async function unreadReplyThenDiscard(disc: boolean): Promise<{ reader: RawNbdClient; writer: RawNbdClient }> {
    const sock = join(dir, 'nbd.sock');
    await svc.exports.startServer({ addr: { type: 'unix', path: sock } });
    svc.exports.addExport({ type: 'nbd', id: 'e0', nodeName: 'q', name: 'disk', writable: true });
    const reader = await unixClient(sock);
    reader.request(NBD_CMD_READ, 0, 4096, NBD_CMD_FLAG_DF, 1n); // loads the L2 table
    await readData(reader, 4096, true);
    const before = fileStats();
    reader.sock.pause();
    reader.request(NBD_CMD_READ, 0, MiB, NBD_CMD_FLAG_DF, 2n);
    if (disc) reader.request(NBD_CMD_DISC, 0, 0, 0, 3n);
    await sleep(100);
    const after = fileStats();
    expect(after.sent + after.waited - before.sent - before.waited, 'sent by reference').toBeGreaterThan(0);
    const writer = await unixClient(sock);
    await flushed(writer, () => writer.request(NBD_CMD_TRIM, 0, MiB, 0, 1n));
    return { reader, writer };
  }

  /** The reader reads its reply: still what MiB 0 held when it was read. */
  async function replyIntact(reader: RawNbdClient): Promise<void> {
    reader.sock.resume();
    const r = await readData(reader, MiB, true);
    expect(r.cookie).toBe(2n);
    expect(r.data.findIndex((b) => b !== 0xaa), 'first byte of other data in the reply').toBe(-1);
  }

  async function shutdownClean(...clients: RawNbdClient[]): Promise<void> {
    for (const c of clients) c.close();
    await svc.shutdown();
    const check = spawnSync('qemu-img', ['check', img], { encoding: 'utf8' });
    expect(check.stdout + check.stderr).toContain('No errors were found');
    expect(check.stdout).not.toContain('leaked');
  }

  const write = (c: RawNbdClient, off: number, byte: number) => () =>
    c.request(NBD_CMD_WRITE, off, MiB, 0, 1n, Buffer.alloc(MiB, byte));

  it.each([
    ['', false],
    [' (the client sent NBD_CMD_DISC after the read: the reply is sent during the close)', true],
  ])('does not give a discarded cluster to other data before the reply sent from it was read%s', async (_, disc) => {
    const { reader, writer } = await unreadReplyThenDiscard(disc);
    const q = svc.graph.get('q')!.driver as unknown as { loans: { borrowers: number } };
    expect(q.loans.borrowers).toBe(1);
    // New data for MiB 4 needs 16 new clusters.
    await flushed(writer, write(writer, 4 * MiB, 0xee));
    await replyIntact(reader);
    // Once the reply is read, the held clusters are free for the next allocation: a second MiB
    // of new data reuses them instead of growing the file.
    await sleep(20);
    if (disc) expect(await reader.waitClosed()).toBe(true);
    else expect(q.loans.borrowers).toBe(1); // still connected, but everything read
    const sizeBefore = statSync(img).size;
    await flushed(writer, write(writer, 6 * MiB, 0x55));
    expect(statSync(img).size).toBe(sizeBefore);
    await shutdownClean(reader, writer);
    const got = execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0 0 1M', '-c', 'read -P 0xee 4M 1M', '-c', 'read -P 0x55 6M 1M', img], { encoding: 'utf8' });
    expect(got).not.toContain('Pattern verification failed');
  });

  it('keeps holding the freed clusters across a reopen of the node, and leaks nothing', async () => {
    const { reader, writer } = await unreadReplyThenDiscard(false);
    // A new driver instance on the same file (blockdev-reopen, snapshot commands) must still
    // pass over the clusters the old one freed.
    const node = svc.graph.get('q')!;
    const before = node.driver;
    await svc.graph.reopenDriver(node, false);
    expect(node.driver).not.toBe(before);
    await flushed(writer, write(writer, 4 * MiB, 0xee));
    await replyIntact(reader);
    await shutdownClean(reader, writer);
  });

  it('does not put an internal snapshot\'s tables into clusters a waiting reply references', async () => {
    const { reader, writer } = await unreadReplyThenDiscard(false);
    // The snapshot is written with the driver closed (an offline edit of the image), and its
    // table and L1 copy take the lowest free clusters: those the discard freed, if not held.
    const cmd = ALL_COMMANDS.find((c) => c.name === 'blockdev-snapshot-internal-sync')!;
    await cmd.run({ device: 'q', name: 's1' }, { services: svc, log: svc.log, origin: 'qmp', afterReply: () => undefined });
    await replyIntact(reader);
    await shutdownClean(reader, writer);
    expect(execFileSync('qemu-img', ['snapshot', '-l', img], { encoding: 'utf8' })).toContain('s1');
  });

  it('copies qcow2 reads for TCP clients, whose reading cannot be followed', async () => {
    const port = await freePort();
    await svc.exports.startServer({ addr: { type: 'inet', host: '127.0.0.1', port: String(port) } });
    svc.exports.addExport({ type: 'nbd', id: 'e0', nodeName: 'q', name: 'disk' });
    const out = join(dir, 'copy.raw');
    const before = fileStats();
    await promisify(execFile)('nbdcopy', [`nbd://127.0.0.1:${port}/disk`, out]);
    const data = readFileSync(out);
    expect(data.subarray(0, MiB).every((b) => b === 0xaa)).toBe(true);
    expect(data.subarray(MiB).every((b) => b === 0)).toBe(true);
    const after = fileStats();
    expect(after.sent + after.waited).toBe(before.sent + before.waited);
  });
});

describe('large reads without the addon (pure-JS fallback)', () => {
  withoutAddon();
  let dir: string;
  let svc: Services;

  afterEach(async () => {
    await svc.shutdown();
    rmSync(dir, { recursive: true, force: true });
  });

  it('serves the same bytes and sends no file segment', async () => {
    dir = mkdtempSync(join(tmpdir(), 'blockd-sendfile-noaddon-'));
    const sock = join(dir, 'nbd.sock');
    svc = new Services(silentLogger());
    await svc.exports.startServer({ addr: { type: 'unix', path: sock } });
    const img = makeImage(dir, 4 * MiB + 5);
    await svc.graph.add({
      driver: 'raw',
      'node-name': 'disk',
      file: { driver: 'file', filename: img.path, 'node-name': 'disk-file' },
    });
    svc.exports.addExport({ type: 'nbd', id: 'e0', nodeName: 'disk', name: 'disk' });
    const before = fileStats();
    const c = await RawNbdClient.connect(sock);
    await c.handshake('disk', { structured: true });
    c.request(NBD_CMD_READ, 3, 4 * MiB + 2, 0, 1n);
    const r = await readData(c, 4 * MiB + 2, true);
    expect(r.data.equals(img.data.subarray(3))).toBe(true);
    expect(fileStats().sent).toBe(before.sent);
    c.close();
  });
});
