/**
 * Images written by our qcow2 driver pass `qemu-img check` (no errors, no leaks) and hold exactly
 * the content we wrote (compared through qemu-img convert).
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import type { BlockGraph } from '../../src/block/graph.js';
import type { BlockNode } from '../../src/block/types.js';
import {
  KiB,
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

/** Deterministic PRNG so failures reproduce. */
function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 0x100000000;
  };
}

/** Random writes, zeroes and discards, mirrored into `shadow`; many requests in flight. */
async function randomOps(node: BlockNode, shadow: Buffer, seed: number, count: number, cs: number): Promise<void> {
  const rnd = prng(seed);
  const size = shadow.length;
  const batch: Promise<void>[] = [];
  for (let i = 0; i < count; i++) {
    const kind = rnd();
    const len = Math.max(1, Math.floor(rnd() * 200 * KiB));
    const off = Math.min(size - len, Math.floor(rnd() * size));
    if (kind < 0.6) {
      const data = Buffer.alloc(len, (i % 250) + 1);
      data.writeUInt32BE(i, 0);
      data.copy(shadow, off);
      // Overlapping in-flight requests have no defined order: keep a batch disjoint by waiting.
      batch.push(node.io.write(data, off));
    } else if (kind < 0.8) {
      shadow.fill(0, off, off + len);
      batch.push(node.io.writeZeroes(off, len, { mayUnmap: rnd() < 0.5 }));
    } else {
      // Discard only whole clusters change content (to zero, as qemu does on v3).
      const a = Math.ceil(off / cs) * cs;
      const b = Math.floor((off + len) / cs) * cs;
      if (b > a) shadow.fill(0, a, b);
      batch.push(node.io.discard(off, len));
    }
    await Promise.all(batch.splice(0));
  }
}

describe.skipIf(!tools)('qcow2 writes checked by qemu-img', () => {
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

  const variants: [string, string[], number][] = [
    ['v3 64 KiB clusters', [], 64 * KiB],
    ['v3 4 KiB clusters and 1-bit refcounts', ['-o', 'cluster_size=4096,refcount_bits=1'], 4096],
    ['v3 512 B clusters', ['-o', 'cluster_size=512'], 512],
    ['v2', ['-o', 'compat=0.10'], 64 * KiB],
    ['v3 lazy refcounts', ['-o', 'lazy_refcounts=on'], 64 * KiB],
    ['v3 extended L2', ['-o', 'extended_l2=on'], 64 * KiB],
  ];
  for (const [name, opts, cs] of variants) {
    it(`leaves a clean image after random writes, zeroes and discards (${name})`, async () => {
      const img = join(dir, 'a.qcow2');
      const size = 6 * MiB;
      qemuImg('create', '-f', 'qcow2', ...opts, img, String(size));
      const node = await openQcow2(g, 'q', img, { discard: 'unmap' });
      const shadow = Buffer.alloc(size);
      await randomOps(node, shadow, 42, 120, cs);
      await node.io.flush();
      await g.del('q');
      const c = check(img);
      expect(c.out).toContain('No errors were found');
      expect(c.code).toBe(0);
      expect(firstDiff(contentOf(img, dir), shadow)).toBe(-1);
    });
  }

  it('writes many clusters in parallel and grows the refcount table', async () => {
    const img = join(dir, 'p.qcow2');
    // 512 B clusters with 16-bit refcounts: one refblock covers 128 KiB, the table 8 MiB.
    qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=512', img, '24M');
    const node = await openQcow2(g, 'q', img);
    const shadow = Buffer.alloc(24 * MiB);
    const big: Promise<void>[] = [];
    for (let i = 0; i < 12; i++) {
      const data = Buffer.alloc(MiB, 0xa0 + i);
      data.copy(shadow, i * 2 * MiB);
      big.push(node.io.write(data, i * 2 * MiB));
    }
    // Two halves of one new cluster at once: allocation must be serialised.
    big.push(node.io.write(Buffer.alloc(256, 0xee), 23 * MiB), node.io.write(Buffer.alloc(256, 0xef), 23 * MiB + 256));
    shadow.fill(0xee, 23 * MiB, 23 * MiB + 256);
    shadow.fill(0xef, 23 * MiB + 256, 23 * MiB + 512);
    await Promise.all(big);
    const ops: Promise<void>[] = [];
    for (let i = 0; i < 600; i++) {
      const off = ((i * 7919) % 24000) * 1024;
      const data = Buffer.alloc(1024, (i % 200) + 1);
      data.copy(shadow, off);
      ops.push(node.io.write(data, off));
    }
    // Each 1 KiB slot is written once, so parallel order does not matter.
    await Promise.all(ops);
    await g.del('q');
    const c = check(img);
    expect(c.code, c.out).toBe(0);
    expect(firstDiff(contentOf(img, dir), shadow)).toBe(-1);
  });

  it('copies partial clusters from the backing file on write (copy-on-write)', async () => {
    const base = join(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    qemuImg('create', '-f', 'qcow2', base, '4M');
    qemuIo(base, 'qcow2', 'write -P 0x5a 0 4M');
    qemuImg('create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '4M');
    const node = await openQcow2(g, 'top', top, { discard: 'unmap' });
    const shadow = Buffer.alloc(4 * MiB, 0x5a);
    await node.io.write(Buffer.alloc(1000, 1), 70000);
    Buffer.alloc(1000, 1).copy(shadow, 70000);
    await node.io.writeZeroes(2 * MiB, 64 * KiB);
    shadow.fill(0, 2 * MiB, 2 * MiB + 64 * KiB);
    await node.io.discard(3 * MiB, 128 * KiB);
    shadow.fill(0, 3 * MiB, 3 * MiB + 128 * KiB);
    await g.del('top');
    expect(check(top).code).toBe(0);
    expect(firstDiff(contentOf(top, dir), shadow)).toBe(-1);
    expect(firstDiff(contentOf(base, dir), Buffer.alloc(4 * MiB, 0x5a))).toBe(-1);
  });

  it('grows and shrinks an image with block_resize semantics', async () => {
    const img = join(dir, 'r.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=4096', img, '1M');
    const node = await openQcow2(g, 'q', img);
    await node.io.write(Buffer.alloc(8192, 7), MiB - 8192);
    await node.io.truncate(8 * MiB + 512); // needs a bigger L1 (4 KiB clusters: 2 MiB per L2)
    await node.io.write(Buffer.alloc(4096, 9), 8 * MiB - 4096);
    await node.io.truncate(MiB - 4096);
    await node.io.truncate(2 * MiB);
    await g.del('q');
    const c = check(img);
    expect(c.code, c.out).toBe(0);
    const expected = Buffer.alloc(2 * MiB);
    expected.fill(7, MiB - 8192, MiB - 4096);
    expect(firstDiff(contentOf(img, dir), expected)).toBe(-1);
  });

  it('sets the dirty bit while lazy refcounts are in use and clears it on close', async () => {
    const img = join(dir, 'l.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', img, '1M');
    const node = await openQcow2(g, 'q', img);
    await node.io.write(Buffer.alloc(4096, 1), 0);
    await node.io.flush();
    const incompat = (): bigint => readFileSync(img).readBigUInt64BE(72);
    expect(incompat() & 1n).toBe(1n);
    await g.del('q');
    expect(incompat() & 1n).toBe(0n);
    expect(check(img).code).toBe(0);
  });

  it('repairs the refcounts of a dirty image left by a crashed qemu-io', async () => {
    const img = join(dir, 'd.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', img, '2M');
    // qemu-io's abort kills it with SIGABRT, leaving the dirty bit and stale refcounts behind.
    spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 0 128k', '-c', 'abort', img], { stdio: 'ignore' });
    expect(check(img).code).toBe(2);
    const node = await openQcow2(g, 'q', img);
    await node.io.write(Buffer.alloc(4096, 0x43), MiB);
    await g.del('q');
    const c = check(img);
    expect(c.code, c.out).toBe(0);
    const expected = Buffer.alloc(2 * MiB);
    expected.fill(0x42, 0, 128 * KiB);
    expected.fill(0x43, MiB, MiB + 4096);
    expect(firstDiff(contentOf(img, dir), expected)).toBe(-1);
  });

  it('rejects a resize to a size that is not a multiple of 512', async () => {
    const img = join(dir, 'r.qcow2');
    qemuImg('create', '-f', 'qcow2', img, '1M');
    const node = await openQcow2(g, 'q', img);
    await expect(node.io.truncate(1000)).rejects.toThrow('The new size must be a multiple of 512');
  });

  it('overwrites compressed clusters and frees their space', async () => {
    const img = join(dir, 'c.qcow2');
    const raw = join(dir, 'c.raw');
    qemuImg('create', '-f', 'raw', raw, '2M');
    qemuIo(raw, 'raw', 'write -P 0x61 0 2M');
    qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, img);
    const node = await openQcow2(g, 'q', img, { discard: 'unmap' });
    const shadow = Buffer.alloc(2 * MiB, 0x61);
    await node.io.write(Buffer.alloc(100, 2), 65536 + 10);
    Buffer.alloc(100, 2).copy(shadow, 65536 + 10);
    await node.io.writeZeroes(0, 65536, { mayUnmap: true });
    shadow.fill(0, 0, 65536);
    await g.del('q');
    const c = check(img);
    expect(c.code, c.out).toBe(0);
    expect(firstDiff(contentOf(img, dir), shadow)).toBe(-1);
  });
});
