/**
 * qcow2 metadata integrity: refcount repair of dirty images counts every kind of reference
 * (bitmaps, snapshots), overlap checks, frees that wait for in-flight writes, read-write
 * images with internal snapshots. Results are checked with qemu-img.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { BlockIO, BlockNode } from '../../src/block/types.js';
import { Qcow2Driver } from '../../src/block/drivers/qcow2/qcow2.js';
import type { DriverOpenContext } from '../../src/block/drivers/common.js';
import { silentLogger } from '../../src/util/logger.js';
import { Daemon } from '../helpers/in-process-daemon.js';
import {
  MiB,
  check,
  contentOf,
  imgInfo,
  newGraph,
  openQcow2,
  peek,
  poke,
  qemuImg,
  qemuIo,
  qemuTools,
  rm,
  setIncompatible,
  tmp,
} from '../helpers/qcow2.js';

const tools = qemuTools();

/** Bitmap names and flags from qemu-img info. */
function bitmapsOf(img: string): Array<{ name: string; flags: string[] }> {
  const fs = imgInfo(img)['format-specific'] as { data?: { bitmaps?: Array<{ name: string; flags: string[] }> } };
  return fs.data?.bitmaps ?? [];
}

describe.skipIf(!tools)('qcow2 refcount repair of a dirty image', () => {
  let dir: string;
  beforeEach(() => {
    dir = tmp();
  });
  afterEach(() => rm(dir));

  it('keeps the clusters of persistent bitmaps allocated', async () => {
    const img = join(dir, 'a.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', img, '64M');
    qemuIo(img, 'qcow2', 'write -P 0x11 0 4M');
    qemuImg('bitmap', '--add', '-g', '64k', img, 'b0');
    // qemu-io loads the (auto) bitmap, records these writes and stores it at exit.
    qemuIo(img, 'qcow2', 'write -P 0x22 8M 2M', 'write -P 0x23 40M 1M');
    const before = contentOf(img, dir);
    setIncompatible(img, 1n);

    const g = newGraph();
    const node = await openQcow2(g, 'q', img);
    // Enough new allocations to land on every cluster the repair wrongly thought free.
    for (let i = 0; i < 32; i++) await node.io.write(Buffer.alloc(64 * 1024, 0x40 + i), 16 * MiB + i * 128 * 1024);
    await node.io.flush();
    await g.closeAll();

    const c = check(img);
    expect(c.code, c.out).toBe(0);
    expect(bitmapsOf(img).map((b) => b.name)).toEqual(['b0']);
    const after = contentOf(img, dir);
    expect(after.subarray(0, 16 * MiB).equals(before.subarray(0, 16 * MiB))).toBe(true);
    expect(after.subarray(40 * MiB).equals(before.subarray(40 * MiB))).toBe(true);
  });
});

/** A 64 MiB image with guest cluster 0 allocated: L1 at 0x30000, L2 at 0x40000, data at 0x50000. */
function smallImage(dir: string): string {
  const img = join(dir, 'o.qcow2');
  qemuImg('create', '-f', 'qcow2', img, '64M');
  qemuIo(img, 'qcow2', 'write -P 0x11 0 64k');
  expect(peek(img, 0x40000, 8).toString('hex')).toBe('8000000000050000');
  return img;
}

/** Point L2 entry 0 (guest cluster 0) at host offset `host` (COPIED set). */
/** An in-process daemon with `img` opened as qcow2 node 'q' over file node 'f'. */
async function qcow2InDaemon(img: string, readOnly: boolean): Promise<{ daemon: Daemon; node: BlockNode }> {
  const daemon = new Daemon();
  const ro = readOnly ? { 'read-only': true } : {};
  await daemon.ok('blockdev-add', {
    driver: 'qcow2',
    'node-name': 'q',
    ...ro,
    file: { driver: 'file', 'node-name': 'f', filename: img, ...ro },
  });
  return { daemon, node: daemon.svc.graph.find('q') };
}

/** The data of every BLOCK_IMAGE_CORRUPTED the daemon emitted. */
function corruptionEvents(daemon: Daemon): Record<string, unknown>[] {
  return daemon.events.filter((e) => e.event === 'BLOCK_IMAGE_CORRUPTED').map((e) => e.data);
}

function pointL2At(img: string, host: number): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE((1n << 63n) | BigInt(host), 0);
  poke(img, 0x40000, b);
}

function corruptFlag(img: string): boolean {
  const fs = imgInfo(img)['format-specific'] as { data: { corrupt?: boolean } };
  return fs.data.corrupt === true;
}

describe.skipIf(!tools)('qcow2 overlap checks', () => {
  let dir: string;
  beforeEach(() => {
    dir = tmp();
  });
  afterEach(() => rm(dir));

  it('refuses a guest write that would land on the active L1 table and marks the image corrupt', async () => {
    const img = smallImage(dir);
    pointL2At(img, 0x30000);
    const l1Before = peek(img, 0x30000, 65536);
    const g = newGraph();
    const node = await openQcow2(g, 'q', img);
    await expect(node.io.write(Buffer.alloc(4096, 0x22), 0)).rejects.toMatchObject({
      errno: 'EIO',
      message: expect.stringContaining('Preventing invalid write on metadata (overlaps with active L1 table)'),
    });
    // From then on the node does no I/O at all (QEMU: "No medium found").
    await expect(node.io.read(Buffer.alloc(4096), 1 * MiB)).rejects.toMatchObject({ errno: 'EINVAL' });
    await expect(node.io.write(Buffer.alloc(4096, 0x33), 1 * MiB)).rejects.toMatchObject({ errno: 'EINVAL' });
    await g.closeAll();
    expect(peek(img, 0x30000, 65536).equals(l1Before)).toBe(true);
    expect(corruptFlag(img)).toBe(true);
    await expect(openQcow2(newGraph(), 'q', img)).rejects.toThrow('qcow2: Image is corrupt; cannot be opened read/write');
  });

  it('emits BLOCK_IMAGE_CORRUPTED with the fields QSD sends', async () => {
    const img = smallImage(dir);
    pointL2At(img, 0x10000); // the refcount table
    const g = newGraph();
    const file = await g.add({ driver: 'file', 'node-name': 'f', filename: img });
    const events: Array<{ event: string; data: Record<string, unknown> }> = [];
    const ctx: DriverOpenContext = {
      nodeName: 'n0',
      readOnly: false,
      options: {
        cacheDirect: false,
        cacheNoFlush: false,
        discard: 'ignore',
        detectZeroes: 'off',
        forceShare: false,
        autoReadOnly: false,
      },
      log: silentLogger(),
      childIO: () => file.io,
      childDriver: () => file.driver,
      emitEvent: (event, data) => events.push({ event, data }),
    };
    const d = await Qcow2Driver.open(ctx, {});
    await expect(d.write(Buffer.alloc(4096, 0x22), 0, {})).rejects.toMatchObject({ errno: 'EIO' });
    await expect(d.write(Buffer.alloc(4096, 0x22), 0, {})).rejects.toMatchObject({ errno: 'EINVAL' });
    expect(events).toEqual([
      {
        event: 'BLOCK_IMAGE_CORRUPTED',
        data: {
          device: '',
          msg: 'Preventing invalid write on metadata (overlaps with refcount table)',
          offset: 0x10000,
          'node-name': 'n0',
          fatal: true,
          size: 4096,
        },
      },
    ]);
    await d.close();
    await g.closeAll();
    expect(corruptFlag(img)).toBe(true);
  });

  it('puts BLOCK_IMAGE_CORRUPTED on the QMP event bus of the daemon', async () => {
    const img = smallImage(dir);
    pointL2At(img, 0x10000);
    const { daemon, node } = await qcow2InDaemon(img, false);
    await expect(node.io.write(Buffer.alloc(4096, 0x22), 0)).rejects.toMatchObject({ errno: 'EIO' });
    expect(corruptionEvents(daemon)).toEqual([
      {
        device: '',
        msg: 'Preventing invalid write on metadata (overlaps with refcount table)',
        offset: 0x10000,
        'node-name': 'q',
        fatal: true,
        size: 4096,
      },
    ]);
    await daemon.svc.shutdown();
    expect(corruptFlag(img)).toBe(true);
  });

  it('marks a writable image corrupt when a read meets an unaligned data cluster, as QSD does', async () => {
    const img = smallImage(dir);
    pointL2At(img, 0x50200);
    const { daemon, node } = await qcow2InDaemon(img, false);
    await expect(node.io.read(Buffer.alloc(4096), 0)).rejects.toMatchObject({ errno: 'EIO' });
    await expect(node.io.read(Buffer.alloc(4096), 1 * MiB)).rejects.toMatchObject({ errno: 'EINVAL' });
    expect(corruptionEvents(daemon)).toEqual([
      {
        device: '',
        msg: 'Cluster allocation offset 0x50200 unaligned (L2 offset: 0x40000, L2 index: 0)',
        'node-name': 'q',
        fatal: true,
      },
    ]);
    await daemon.svc.shutdown();
    expect(corruptFlag(img)).toBe(true);
  });

  it('signals corruption once and non-fatally on a read-only image, which stays usable', async () => {
    const img = smallImage(dir);
    pointL2At(img, 0x50200);
    const { daemon, node } = await qcow2InDaemon(img, true);
    await expect(node.io.read(Buffer.alloc(4096), 0)).rejects.toMatchObject({ errno: 'EIO' });
    await expect(node.io.read(Buffer.alloc(4096), 0)).rejects.toMatchObject({ errno: 'EIO' });
    const other = Buffer.alloc(4096, 1);
    await node.io.read(other, 1 * MiB);
    expect(other.equals(Buffer.alloc(4096))).toBe(true);
    expect(corruptionEvents(daemon)).toEqual([
      {
        device: '',
        msg: 'Cluster allocation offset 0x50200 unaligned (L2 offset: 0x40000, L2 index: 0)',
        'node-name': 'q',
        fatal: false,
      },
    ]);
    await daemon.svc.shutdown();
    expect(corruptFlag(img)).toBe(false);
  });

  it('catches an L1 table placed on the refcount table at the first write, as QSD does', async () => {
    const img = smallImage(dir);
    const off = Buffer.alloc(8);
    off.writeBigUInt64BE(0x10000n, 0);
    poke(img, 40, off); // l1_table_offset = refcount table: L1[0] now names the refcount block
    const g = newGraph();
    const node = await openQcow2(g, 'q', img);
    await expect(node.io.write(Buffer.alloc(4096, 1), 0)).rejects.toThrow('overlaps with active L2 table');
    await g.closeAll();
    expect(corruptFlag(img)).toBe(true);
  });

  it('lets the write through with overlap-check none', async () => {
    const img = smallImage(dir);
    pointL2At(img, 0x30000);
    const g = newGraph();
    const node = await openQcow2(g, 'q', img, { 'overlap-check': 'none' });
    await node.io.write(Buffer.alloc(8, 0), 8);
    await g.closeAll();
    expect(corruptFlag(img)).toBe(false);
  });

  it('honours per-kind switches of the object form', async () => {
    const img = smallImage(dir);
    pointL2At(img, 0x30000);
    const g = newGraph();
    const node = await openQcow2(g, 'q', img, { 'overlap-check': { template: 'all', 'active-l1': false } });
    await node.io.write(Buffer.alloc(8, 0), 8);
    await g.closeAll();
    expect(corruptFlag(img)).toBe(false);
    // constant = header, L1, refcount table, snapshot table, bitmap directory: not refcount blocks.
    const img2 = smallImage(dir);
    pointL2At(img2, 0x30000);
    const g2 = newGraph();
    const n2 = await openQcow2(g2, 'q', img2, { 'overlap-check': { template: 'constant' } });
    await expect(n2.io.write(Buffer.alloc(512, 1), 0)).rejects.toThrow('overlaps with active L1 table');
    await g2.closeAll();
  });

  it('leaves refcount blocks unchecked under the constant template', async () => {
    const img = smallImage(dir);
    pointL2At(img, 0x20000);
    const g = newGraph();
    const node = await openQcow2(g, 'q', img, { 'overlap-check': 'constant' });
    await node.io.write(Buffer.alloc(8, 0), 4096);
    await g.closeAll();
    expect(corruptFlag(img)).toBe(false);
  });

  it('rejects invalid overlap-check values with QEMU\'s messages', async () => {
    const img = smallImage(dir);
    const g = newGraph();
    const bad: Array<[unknown, string]> = [
      ['foo', "Parameter 'overlap-check' does not accept value 'foo'"],
      [{ template: 'foo' }, "Parameter 'template' does not accept value 'foo'"],
      [{ bogus: true }, "Parameter 'overlap-check.bogus' is unexpected"],
      [{ 'active-l1': 'yes' }, "Invalid parameter type for 'overlap-check.active-l1', expected: boolean"],
    ];
    for (const [v, msg] of bad) {
      await expect(openQcow2(g, 'q', img, { 'overlap-check': v })).rejects.toThrow(msg);
    }
    for (const v of ['none', 'constant', 'cached', 'all', { template: 'none', 'refcount-block': true }]) {
      await openQcow2(g, 'q', img, { 'overlap-check': v });
      await g.closeAll();
    }
  });

  it('raises no false alarm under allocation, table growth and frees with overlap-check all', async () => {
    const img = join(dir, 'grow.qcow2');
    // 512-byte clusters: a refcount block covers 128 KiB and the first refcount table 8 MiB,
    // so 12 MiB of data needs new refcount blocks and a bigger table.
    qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=512', img, '64M');
    const g = newGraph();
    const node = await openQcow2(g, 'q', img, { 'overlap-check': 'all' });
    for (let i = 0; i < 200; i++) {
      await node.io.write(Buffer.alloc(65536, i & 0xff), ((i * 7919) % 1024) * 65536);
      if (i % 50 === 49) {
        await node.io.writeZeroes(((i * 31) % 1024) * 65536, 65536, { mayUnmap: true });
        await node.io.flush();
      }
    }
    await node.io.truncate(128 * MiB);
    await node.io.write(Buffer.alloc(65536, 0x5a), 100 * MiB);
    await g.closeAll();
    const c = check(img);
    expect(c.code, c.out).toBe(0);
    expect(corruptFlag(img)).toBe(false);
  });
});

describe.skipIf(!tools)('qcow2 frees and in-flight writes', () => {
  let dir: string;
  beforeEach(() => {
    dir = tmp();
  });
  afterEach(() => rm(dir));

  it('does not hand out a discarded cluster while an earlier overwrite of it is still in flight', async () => {
    const img = smallImage(dir); // guest cluster 0 -> host 0x50000
    const g = newGraph();
    const node = await openQcow2(g, 'q', img, { discard: 'unmap' });
    await node.io.read(Buffer.alloc(4096), 0); // L2 table cached: overwrites take the fast path
    const fileIO = node.children.find((c) => c.name === 'file')?.user.node.io as BlockIO;
    const realWrite = fileIO.write.bind(fileIO);
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let cArrived!: () => void;
    const cSeen = new Promise<void>((r) => (cArrived = r));
    let hold = true;
    // The file shim holds the first overwrite of host 0x50000 until released.
    fileIO.write = async (buf, off, flags) => {
      if (hold && off === 0x50000 && buf[0] === 0xbb) {
        hold = false;
        await gate;
      }
      if (buf[0] === 0xcc) cArrived();
      return realWrite(buf, off, flags);
    };
    const pB = node.io.write(Buffer.alloc(4096, 0xbb), 0); // in place, held in the "pool"
    await node.io.discard(0, 65536); // drops guest cluster 0 -> host 0x50000
    const pF = node.io.flush(); // frees 0x50000 ...
    const pC = node.io.write(Buffer.alloc(65536, 0xcc), 65536); // ... which first fit hands out again
    // Without the barrier C is written into 0x50000 now; with it, C waits behind the flush.
    await Promise.race([cSeen.then(() => pC), sleep(300)]);
    release();
    await Promise.all([pB, pF, pC]);
    const got = Buffer.alloc(65536);
    await node.io.read(got, 65536);
    expect(got.equals(Buffer.alloc(65536, 0xcc))).toBe(true);
    const zero = Buffer.alloc(65536, 1);
    await node.io.read(zero, 0);
    expect(zero.equals(Buffer.alloc(65536))).toBe(true);
    fileIO.write = realWrite;
    await g.closeAll();
    const c = check(img);
    expect(c.code, c.out).toBe(0);
  });
});

describe.skipIf(!tools)('qcow2 frees and in-flight reads', () => {
  let dir: string;
  beforeEach(() => {
    dir = tmp();
  });
  afterEach(() => rm(dir));

  it('does not let a read still in flight to a discarded cluster return its next owner\'s data', async () => {
    const img = smallImage(dir); // guest cluster 0 -> host 0x50000
    const g = newGraph();
    const node = await openQcow2(g, 'q', img, { discard: 'unmap' });
    await node.io.write(Buffer.alloc(65536, 0xaa), 0);
    const fileIO = node.children.find((c) => c.name === 'file')?.user.node.io as BlockIO;
    const realRead = fileIO.read.bind(fileIO);
    const realTry = fileIO.tryReadSync.bind(fileIO);
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let hold = true;
    // Reads take the asynchronous path, and the first one of host 0x50000 waits in the "pool".
    fileIO.tryReadSync = () => false;
    fileIO.read = async (buf, off) => {
      if (hold && off === 0x50000) {
        hold = false;
        await gate;
      }
      return realRead(buf, off);
    };
    const got = Buffer.alloc(65536);
    const pA = node.io.read(got, 0);
    await sleep(20);
    await node.io.discard(0, 65536); // drops guest cluster 0 -> host 0x50000
    const pF = node.io.flush(); // frees 0x50000 once nothing issued before is in flight
    const pC = node.io.write(Buffer.alloc(65536, 0xcc), 65536); // may get 0x50000 after that
    await Promise.race([pC, sleep(300)]);
    release();
    await Promise.all([pA, pF, pC]);
    // Old contents (the read was issued first) or zeroes, never the next owner's bytes.
    expect(got.equals(Buffer.alloc(65536, 0xaa))).toBe(true);
    fileIO.read = realRead;
    fileIO.tryReadSync = realTry;
    await g.closeAll();
    const c = check(img);
    expect(c.code, c.out).toBe(0);
  });
});

/** A deterministic pseudo-random generator (tests must not depend on Math.random). */
function rng(seed: number): () => number {
  let x = seed >>> 0;
  return () => {
    x = (x * 1664525 + 1013904223) >>> 0;
    return x / 0x100000000;
  };
}

describe.skipIf(!tools)('qcow2 read-write with internal snapshots', () => {
  let dir: string;
  beforeEach(() => {
    dir = tmp();
  });
  afterEach(() => rm(dir));

  /** 32 MiB image, data written by QEMU, then snapshot s1; returns the image and its content. */
  function snapshotted(opts = 'cluster_size=65536'): { img: string; old: Buffer } {
    const img = join(dir, 's.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', opts, img, '32M');
    qemuIo(img, 'qcow2', 'write -P 0x11 0 8M', 'write -P 0x12 12M 1M', 'write -c -P 0x13 20M 128k', 'write -z 24M 1M');
    qemuImg('snapshot', '-c', 's1', img);
    return { img, old: contentOf(img, dir) };
  }

  /** Writes, partial writes, zeroes and discards over shared and unshared clusters. */
  async function churn(io: BlockIO, shadow: Buffer, seed: number): Promise<void> {
    const r = rng(seed);
    for (let i = 0; i < 120; i++) {
      const off = Math.floor(r() * (shadow.length / 512 - 256)) * 512;
      const len = (1 + Math.floor(r() * 128)) * 512;
      const op = r();
      if (op < 0.6) {
        const b = Buffer.alloc(len, 0x20 + (i % 200));
        await io.write(b, off);
        b.copy(shadow, off);
      } else if (op < 0.8) {
        await io.writeZeroes(off, len, { mayUnmap: op < 0.7 });
        shadow.fill(0, off, off + len);
      } else {
        // Discard is only visible where it covers whole clusters; mirror it by reading back.
        await io.discard(off, len);
        const back = Buffer.alloc(len);
        await io.read(back, off);
        back.copy(shadow, off);
      }
      if (i % 40 === 39) await io.flush();
    }
  }

  it.each([
    ['64 KiB clusters', 'cluster_size=65536'],
    ['4 KiB clusters, 8-bit refcounts', 'cluster_size=4096,refcount_bits=8'],
    ['extended L2', 'cluster_size=65536,extended_l2=on'],
  ])('writes copy-on-write and leaves the snapshot intact (%s)', async (_name, opts) => {
    const { img, old } = snapshotted(opts);
    const shadow = Buffer.from(old);
    const g = newGraph();
    const node = await openQcow2(g, 'q', img, { discard: 'unmap' });
    await churn(node.io, shadow, 7);
    await g.closeAll();

    const c = check(img);
    expect(c.code, c.out).toBe(0);
    expect(contentOf(img, dir).equals(shadow)).toBe(true);
    expect(qemuImg('snapshot', '-l', img)).toContain('s1');
    const copy = join(dir, 'copy.qcow2');
    copyFileSync(img, copy);
    qemuImg('snapshot', '-a', 's1', copy);
    expect(contentOf(copy, dir).equals(old)).toBe(true);
    expect(check(copy).code).toBe(0);
  });

  it('refuses to resize an image with snapshots', async () => {
    const { img } = snapshotted();
    const g = newGraph();
    const node = await openQcow2(g, 'q', img);
    await expect(node.io.truncate(64 * MiB)).rejects.toThrow("Can't resize an image which has snapshots");
    await g.closeAll();
    expect(check(img).code).toBe(0);
  });

  it('repairs a dirty image with snapshots without freeing their clusters', async () => {
    const { img, old } = snapshotted('cluster_size=65536,lazy_refcounts=on');
    qemuIo(img, 'qcow2', 'write -P 0x44 4M 2M'); // after the snapshot: shared clusters copied
    const now = contentOf(img, dir);
    setIncompatible(img, 1n);
    const shadow = Buffer.from(now);
    const g = newGraph();
    const node = await openQcow2(g, 'q', img);
    // Fresh allocations: without the snapshot's references they would reuse its clusters.
    for (let i = 0; i < 48; i++) {
      const b = Buffer.alloc(65536, 0x60 + i);
      await node.io.write(b, 26 * MiB + i * 65536);
      b.copy(shadow, 26 * MiB + i * 65536);
    }
    await g.closeAll();
    const c = check(img);
    expect(c.code, c.out).toBe(0);
    expect(contentOf(img, dir).equals(shadow)).toBe(true);
    const copy = join(dir, 'copy.qcow2');
    copyFileSync(img, copy);
    qemuImg('snapshot', '-a', 's1', copy);
    expect(contentOf(copy, dir).equals(old)).toBe(true);
  });
});
