/**
 * What a SIGKILL would leave behind, checked deterministically: the qcow2 driver writes through
 * the page cache, so a copy of the image file taken while none of its I/O is in flight is what
 * the file would hold if the process died at that moment. Between metadata write-backs nothing
 * on disk may be counted but unreferenced (docs/qcow2.md "Metadata write order and crashes"):
 * every such copy must pass `qemu-img check` with no leaks and no corruption.
 *
 * The writes are concurrent and cross L2 table boundaries (4 KiB clusters: one L2 table per
 * 2 MiB), so new L2 tables are linked while other requests' data writes are in flight; small
 * caches force refcount block evictions and cache-pressure write-backs; a resize grows the L1
 * table in the middle.
 */
import { describe, expect, it } from 'vitest';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { check, KiB, MiB, newGraph, openQcow2, qemuImg, qemuTools, rm, tmp } from '../helpers/qcow2.js';

const tools = qemuTools();

/** Deterministic pseudo-random order of `n` items. */
function shuffled(n: number, seed: number): number[] {
  const a = Array.from({ length: n }, (_, i) => i);
  let s = seed >>> 0;
  for (let i = n - 1; i > 0; i--) {
    s = (s * 1664525 + 1013904223) >>> 0;
    const j = s % (i + 1);
    [a[i], a[j]] = [a[j] as number, a[i] as number];
  }
  return a;
}

const CASES = [
  { name: 'default caches', opts: {} },
  { name: 'small caches', opts: { 'l2-cache-size': 8 * 4 * KiB, 'refcount-cache-size': 4 * 4 * KiB } },
];

describe.skipIf(!tools)('qcow2: image copies taken between requests check clean', () => {
  it.each(CASES)('$name', async ({ opts }) => {
    const dir = tmp();
    const g = newGraph();
    try {
      const img = join(dir, 'q.qcow2');
      const size = 48 * MiB;
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, String(size));
      const node = await openQcow2(g, 'q', img, opts);
      const chunk = 64 * KiB;
      const order = shuffled(size / chunk, 7);
      const batch = 48; // requests in flight together
      for (let b = 0; b * batch < order.length; b++) {
        const part = order.slice(b * batch, (b + 1) * batch);
        await Promise.all(part.map((i) => node.io.write(Buffer.alloc(chunk, 1 + (i % 250)), i * chunk)));
        if (b === 8) await node.io.truncate(size + 64 * MiB); // grows the L1 table mid-stream
        const copy = join(dir, `snap-${b}.qcow2`);
        copyFileSync(img, copy);
        const c = check(copy);
        expect(c.code, `after batch ${b}: ${c.out.slice(0, 1500)}`).toBe(0);
        rm(copy);
      }
      await g.closeAll();
      const c = check(img);
      expect(c.code, c.out.slice(0, 1500)).toBe(0);
    } finally {
      rm(dir);
    }
  }, 120_000);
});
