/**
 * The qcow2 fast paths (one-pass block status over many L2 tables, synchronous reads, the
 * "all data" probe) give exactly what qemu-img sees, also after our own writes.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { cachestatWorks } from '../helpers/native.js';
import type { BlockGraph } from '../../src/block/graph.js';
import { EXTENT_DATA, EXTENT_ZERO, type BlockExtent, type BlockNode } from '../../src/block/types.js';
import {
  MiB,
  check,
  contentOf,
  firstDiff,
  newGraph,
  openQcow2,
  qemuImg,
  qemuIo,
  qemuTools,
  rm,
  tmp,
} from '../helpers/qcow2.js';

const tools = qemuTools();
const CS = 4096;
const SIZE = 16 * MiB; // 8 L2 tables of 512 entries with 4 KiB clusters

interface Run {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

function merge(runs: Run[]): Run[] {
  const out: Run[] = [];
  for (const r of runs) {
    const last = out[out.length - 1];
    if (last && last.data === r.data && last.zero === r.zero && last.start + last.length === r.start) {
      last.length += r.length;
    } else {
      out.push({ ...r });
    }
  }
  return out;
}

function qemuMap(img: string): Run[] {
  const list = JSON.parse(qemuImg('map', '--output=json', '-f', 'qcow2', img)) as Array<{
    start: number;
    length: number;
    data: boolean;
    zero: boolean;
  }>;
  return merge(list.map((e) => ({ start: e.start, length: e.length, data: e.data, zero: e.zero })));
}

function ourMap(ext: BlockExtent[]): Run[] {
  return merge(
    ext.map((e) => ({
      start: e.offset,
      length: e.length,
      data: (e.flags & EXTENT_DATA) !== 0,
      zero: (e.flags & EXTENT_ZERO) !== 0,
    })),
  );
}

/** A deterministic pseudo-random generator. */
function rng(seed: number): () => number {
  let x = seed;
  return () => {
    x = (x * 1103515245 + 12345) & 0x7fffffff;
    return x / 0x80000000;
  };
}

/** Scatter data, zero and compressed clusters over the image with qemu-io (shuffled order). */
function fragment(img: string): void {
  const rnd = rng(7);
  const cmds: string[] = [];
  const touched = new Set<number>();
  for (let i = 0; i < 600; i++) {
    const c = Math.floor(rnd() * (SIZE / CS));
    const n = 1 + Math.floor(rnd() * 3);
    const len = Math.min(n * CS, SIZE - c * CS);
    const r = rnd();
    // qemu-io writes compressed clusters only where nothing was written before.
    if (r >= 0.85 && !touched.has(c)) {
      cmds.push(`write -c -P ${1 + (i % 250)} ${c * CS} ${CS}`);
      touched.add(c);
      continue;
    }
    for (let k = 0; k < len / CS; k++) touched.add(c + k);
    if (r < 0.7) cmds.push(`write -P ${1 + (i % 250)} ${c * CS} ${len}`);
    else cmds.push(`write -z ${c * CS} ${len}`);
  }
  for (let i = 0; i < cmds.length; i += 100) qemuIo(img, 'qcow2', ...cmds.slice(i, i + 100));
}

describe.skipIf(!tools)('qcow2 fast paths', () => {
  let dir: string;
  let g: BlockGraph;

  beforeEach(() => {
    dir = tmp();
    g = newGraph();
  });

  afterEach(async () => {
    await g.closeAll();
    rm(dir);
  });

  /** A fragmented image, its qemu-img map and content (taken before we open it). */
  async function fragmented(): Promise<{ map: Run[]; content: Buffer; node: BlockNode }> {
    const img = join(dir, 'frag.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', `cluster_size=${CS}`, img, String(SIZE));
    fragment(img);
    const map = qemuMap(img);
    const content = contentOf(img, dir);
    return { map, content, node: await openQcow2(g, 'q', img) };
  }

  it('answers block status for a range spanning many L2 tables in one call, as qemu-img map', async () => {
    const { map, node } = await fragmented();
    const ext = await node.io.blockStatus(0, SIZE);
    const last = ext[ext.length - 1];
    expect(last && last.offset + last.length).toBe(SIZE);
    expect(ourMap(ext)).toEqual(map);
  });

  it('merges equal neighbours across an L2 table boundary', async () => {
    const img = join(dir, 'b.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', `cluster_size=${CS}`, img, String(SIZE));
    // 2 MiB per L2 table: one data run from 1 MiB to 3 MiB crosses the first boundary.
    qemuIo(img, 'qcow2', `write -P 5 ${MiB} ${2 * MiB}`);
    const node = await openQcow2(g, 'q', img);
    const ext = await node.io.blockStatus(0, SIZE);
    expect(ext.map((e) => [e.offset, e.length, e.flags & (EXTENT_DATA | EXTENT_ZERO)])).toEqual([
      [0, MiB, EXTENT_ZERO],
      [MiB, 2 * MiB, EXTENT_DATA],
      [3 * MiB, SIZE - 3 * MiB, EXTENT_ZERO],
    ]);
  });

  it('keeps block status exact after its own writes, zero writes and discards', async () => {
    const img = join(dir, 'frag.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', `cluster_size=${CS}`, img, String(SIZE));
    fragment(img);
    const node = await openQcow2(g, 'q', img, { discard: 'unmap' });
    await node.io.blockStatus(0, SIZE); // build the cached per-table kinds first
    const rnd = rng(11);
    for (let i = 0; i < 300; i++) {
      const c = Math.floor(rnd() * (SIZE / CS));
      const r = rnd();
      if (r < 0.5) await node.io.write(Buffer.alloc(CS, 9), c * CS);
      else if (r < 0.75) await node.io.writeZeroes(c * CS, CS, { mayUnmap: rnd() < 0.5 });
      else await node.io.discard(c * CS, CS);
    }
    const ours = ourMap(await node.io.blockStatus(0, SIZE));
    await g.closeAll();
    expect(check(img).code).toBe(0);
    expect(ours).toEqual(qemuMap(img));
  });

  it('returns the same bytes from synchronous reads as qemu-img', async () => {
    const { content: expected, node } = await fragmented();
    // Warm the L2 cache with one pass of ordinary reads.
    const warm = Buffer.alloc(MiB);
    for (let off = 0; off < SIZE; off += MiB) await node.io.read(warm, off);
    const rnd = rng(3);
    let sync = 0;
    for (let i = 0; i < 2000; i++) {
      const len = 1 + Math.floor(rnd() * 3 * CS);
      const off = Math.floor(rnd() * (SIZE - len));
      const buf = Buffer.alloc(len, 0xee);
      if (node.io.tryReadSync(buf, off)) {
        sync++;
        expect(firstDiff(buf, expected.subarray(off, off + len))).toBe(-1);
      }
      const slow = Buffer.alloc(len, 0xdd);
      await node.io.read(slow, off);
      expect(firstDiff(slow, expected.subarray(off, off + len))).toBe(-1);
    }
    // Compressed clusters always take the async path; the rest is in the page cache (when the
    // file driver has a synchronous read at all: it needs the native addon).
    const file = node.children.find((c) => c.name === 'file')?.user.node;
    if (file?.driver.caps.readSync) expect(sync).toBeGreaterThan(0);
  });

  it('declines synchronous reads of unallocated clusters that have a backing file', async () => {
    const base = join(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', `cluster_size=${CS}`, base, String(SIZE));
    qemuIo(base, 'qcow2', 'write -P 7 0 64k');
    qemuImg('create', '-f', 'qcow2', '-o', `cluster_size=${CS}`, '-b', base, '-F', 'qcow2', top);
    const node = await openQcow2(g, 'top', top);
    const buf = Buffer.alloc(CS);
    await node.io.read(buf, 0);
    expect(node.io.tryReadSync(buf, 0)).toBe(false);
    expect(buf.every((b) => b === 7)).toBe(true);
  });

  it('writes in place through the callback path only into plain data clusters, as qemu-img sees them', async () => {
    const img = join(dir, 'frag.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', `cluster_size=${CS}`, img, String(SIZE));
    fragment(img);
    // Clusters with a host offset and data: the only ones an overwrite needs no allocation for
    // (compressed clusters have no offset in qemu-img's map).
    const plain = new Set<number>();
    for (const e of JSON.parse(qemuImg('map', '--output=json', '-f', 'qcow2', img)) as Array<{
      start: number;
      length: number;
      data: boolean;
      offset?: number;
    }>) {
      if (e.data && e.offset !== undefined) for (let o = e.start; o < e.start + e.length; o += CS) plain.add(o / CS);
    }
    const expected = contentOf(img, dir);
    const node = await openQcow2(g, 'q', img);
    await node.io.blockStatus(0, SIZE); // caches every L2 table
    const rnd = rng(11);
    let accepted = 0;
    let refused = 0;
    for (let i = 0; i < 400; i++) {
      const c = Math.floor(rnd() * (SIZE / CS));
      const inOff = Math.floor(rnd() * 8) * 512;
      const len = 512 * (1 + Math.floor(rnd() * ((CS - inOff) / 512)));
      const buf = Buffer.alloc(len, 1 + (i % 250));
      const off = c * CS + inOff;
      const settled = new Promise<Error | undefined>((resolve) => {
        if (node.io.submitWrite?.(buf, off, resolve)) {
          accepted++;
          // Accepted only where no allocation or copy-on-write is needed.
          expect(plain.has(c), `cluster ${c}`).toBe(true);
        } else {
          refused++;
          resolve(node.io.write(buf, off).then(() => undefined));
        }
      });
      expect(await settled).toBeUndefined();
      buf.copy(expected, off);
      plain.add(c); // written now (in place or newly allocated)
    }
    expect(accepted).toBeGreaterThan(50);
    expect(refused).toBeGreaterThan(10);
    // A write across a cluster boundary takes write().
    expect(node.io.submitWrite?.(Buffer.alloc(1024), [...plain][0]! * CS + CS - 512, () => undefined)).toBe(false);
    expect(node.io.stats.writeOps).toBe(400);
    await g.closeAll();
    expect(check(img).code).toBe(0);
    expect(firstDiff(contentOf(img, dir), expected)).toBe(-1);
  });

  it('does not overwrite clusters shared with an internal snapshot in place', async () => {
    const img = join(dir, 's.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', `cluster_size=${CS}`, img, String(SIZE));
    qemuIo(img, 'qcow2', 'write -P 7 0 64k');
    qemuImg('snapshot', '-c', 'snap1', img);
    const node = await openQcow2(g, 'q', img);
    await node.io.blockStatus(0, SIZE);
    expect(node.io.submitWrite?.(Buffer.alloc(512, 9), 0, () => undefined)).toBe(false);
    await node.io.write(Buffer.alloc(512, 9), 0); // copy-on-write: the cluster is ours now
    const done = await new Promise<Error | undefined>((resolve) => {
      expect(node.io.submitWrite?.(Buffer.alloc(512, 8), 512, resolve)).toBe(true);
    });
    expect(done).toBeUndefined();
    await g.closeAll();
    expect(check(img).code).toBe(0);
    const now = contentOf(img, dir);
    expect(now.subarray(0, 512).every((b) => b === 9)).toBe(true);
    expect(now.subarray(512, 1024).every((b) => b === 8)).toBe(true);
    expect(now.subarray(1024, 65536).every((b) => b === 7)).toBe(true);
    // The snapshot still has the old bytes.
    qemuImg('snapshot', '-a', 'snap1', img);
    expect(contentOf(img, dir).subarray(0, 65536).every((b) => b === 7)).toBe(true);
  });

  it('reports a range as all data only when every cluster in it is a data cluster', async () => {
    const img = join(dir, 'd.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', `cluster_size=${CS}`, img, String(SIZE));
    qemuIo(img, 'qcow2', 'write -P 1 0 64k', 'write -z 64k 4k', 'write -P 2 68k 4k');
    const node = await openQcow2(g, 'q', img);
    await node.io.blockStatus(0, SIZE); // loads the L2 table
    const drv = node.driver;
    expect(drv.isDataSync?.(0, 64 * 1024)).toBe(true);
    expect(drv.isDataSync?.(60 * 1024, 8 * 1024)).toBe(false);
    expect(drv.isDataSync?.(68 * 1024, 4 * 1024)).toBe(true);
    expect(drv.isDataSync?.(68 * 1024, 8 * 1024)).toBe(false);
  });

  it('reports a cluster as reading zeroes exactly where qemu-img map says zero', async () => {
    const { map, node } = await fragmented();
    await node.io.blockStatus(0, SIZE); // loads every L2 table
    let zeroes = 0;
    for (const r of map) {
      for (let o = r.start; o < r.start + r.length; o += CS) {
        expect({ o, zero: node.io.isZeroSync?.(o, CS) }).toEqual({ o, zero: r.zero && !r.data });
        if (r.zero && !r.data) zeroes++;
      }
    }
    expect(zeroes).toBeGreaterThan(0);
    // A range is zero only when all of it is.
    const z = map.find((r) => r.zero && !r.data)!;
    const d = map.find((r) => r.data && r.start === z.start + z.length);
    if (d) expect(node.io.isZeroSync?.(d.start - CS, 2 * CS)).toBe(false);
  });

  it('does not report unallocated clusters as zeroes when there is a backing file', async () => {
    const base = join(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', `cluster_size=${CS}`, base, String(SIZE));
    qemuImg('create', '-f', 'qcow2', '-o', `cluster_size=${CS}`, '-b', base, '-F', 'qcow2', top);
    qemuIo(top, 'qcow2', 'write -z 64k 4k');
    qemuIo(top, 'qcow2', `write -P 5 ${64 * 1024 + CS} ${CS}`); // data right after the zero cluster
    const node = await openQcow2(g, 'top', top);
    await node.io.blockStatus(0, SIZE);
    expect(node.io.isZeroSync?.(0, CS)).toBe(false);
    expect(node.io.isZeroSync?.(64 * 1024, CS)).toBe(true); // a zero cluster hides the backing file
    // Nor as hole pieces of a sparse file range (NBD reads with hole chunks): the zero cluster
    // may be one, the unallocated cluster over the backing file may not.
    expect(node.io.fileRangeSync?.(64 * 1024 - CS, 3 * CS, true, true)).toBeUndefined();
    if (cachestatWorks()) {
      const r = node.io.fileRangeSync?.(64 * 1024, 2 * CS, true, true);
      expect(r?.pieces?.map((p) => [p.offset < 0, p.length])).toEqual([
        [true, CS],
        [false, CS],
      ]);
    }
  });

  it('zero-fills around a partial write into a reused cluster that still holds old bytes', async () => {
    const img = join(dir, 'r.qcow2');
    qemuImg('create', '-f', 'qcow2', img, String(4 * MiB));
    const node = await openQcow2(g, 'q', img, { discard: 'unmap', 'pass-discard-request': false });
    await node.io.write(Buffer.alloc(65536, 0xaa), 0);
    await node.io.flush();
    const hostOf = (guest: number): number | undefined =>
      (JSON.parse(qemuImg('map', '-U', '--output=json', '-f', 'qcow2', img)) as Array<{ start: number; offset?: number }>)
        .find((e) => e.start === guest)?.offset;
    const oldHost = hostOf(0);
    expect(oldHost).toBeGreaterThan(0);
    // The host cluster is freed (not punched): it keeps its 0xaa bytes on disk.
    await node.io.writeZeroes(0, 65536, { mayUnmap: true });
    await node.io.flush();
    await node.io.write(Buffer.alloc(4096, 0xbb), MiB + 8192);
    const back = Buffer.alloc(65536);
    await node.io.read(back, MiB);
    const want = Buffer.alloc(65536);
    want.fill(0xbb, 8192, 8192 + 4096);
    expect(firstDiff(back, want)).toBe(-1);
    await node.io.flush();
    expect(hostOf(MiB)).toBe(oldHost); // the freed cluster was reused
    await g.closeAll();
    expect(check(img).code).toBe(0);
    expect(firstDiff(contentOf(img, dir).subarray(MiB, MiB + 65536), want)).toBe(-1);
  });

  it.each([
    ['standard', 'cluster_size=65536'],
    ['extended', 'cluster_size=65536,extended_l2=on'],
  ])('writes partial clusters into fresh space so that qemu-img reads zeroes around them (%s L2)', async (_kind, o) => {
    const img = join(dir, 'f.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', o, img, String(8 * MiB));
    const node = await openQcow2(g, 'q', img);
    const rnd = rng(5);
    const model = Buffer.alloc(8 * MiB);
    const writes: Promise<void>[] = [];
    const slot = 40960; // one write per slot: concurrent writes never overlap, but share clusters
    for (let i = 0; i < 200; i++) {
      const len = 512 * (1 + Math.floor(rnd() * 16));
      const off = i * slot + 512 * Math.floor(rnd() * ((slot - len) / 512));
      const data = Buffer.alloc(len, 1 + (i % 250));
      data.copy(model, off);
      writes.push(node.io.write(data, off));
      if (writes.length === 8) await Promise.all(writes.splice(0));
    }
    await Promise.all(writes);
    await g.closeAll();
    expect(check(img).code).toBe(0);
    expect(firstDiff(contentOf(img, dir), model)).toBe(-1);
  });

  it('stays exact with an L2 cache much smaller than the image (LRU eviction, dirty tables kept)', async () => {
    const img = join(dir, 'frag.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', `cluster_size=${CS}`, img, String(SIZE));
    fragment(img);
    const content = contentOf(img, dir);
    // 3 tables of 4 KiB for 8 tables' worth of disk: constant eviction.
    const node = await openQcow2(g, 'q', img, { 'l2-cache-size': 3 * CS });
    const model = Buffer.from(content);
    const rnd = rng(9);
    for (let i = 0; i < 400; i++) {
      const len = 512 * (1 + Math.floor(rnd() * 24));
      const off = 512 * Math.floor(rnd() * ((SIZE - len) / 512));
      if (rnd() < 0.4) {
        const data = Buffer.alloc(len, 1 + (i % 250));
        data.copy(model, off);
        await node.io.write(data, off);
      } else {
        const got = Buffer.alloc(len);
        await node.io.read(got, off);
        expect(firstDiff(got, model.subarray(off, off + len))).toBe(-1);
      }
    }
    const ours = ourMap(await node.io.blockStatus(0, SIZE));
    await g.closeAll();
    expect(ours).toEqual(qemuMap(img));
    expect(check(img).code).toBe(0);
    expect(firstDiff(contentOf(img, dir), model)).toBe(-1);
  });
});
