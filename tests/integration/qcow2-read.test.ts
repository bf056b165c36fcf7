/**
 * Images made and filled by qemu-img/qemu-io read identically through our qcow2 driver:
 * cluster sizes, v2/v3, compressed clusters, zero clusters, extended L2, backing chains.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { writeFileSync } from 'node:fs';
import type { BlockGraph } from '../../src/block/graph.js';
import { EXTENT_ZERO } from '../../src/block/types.js';
import {
  MiB,
  contentOf,
  firstDiff,
  newGraph,
  openQcow2,
  qemuImg,
  qemuIo,
  qemuTools,
  readAll,
  rm,
  tmp,
} from '../helpers/qcow2.js';

const tools = qemuTools();

/** Fill an image with a mix of data, zeroes and discards (qemu-io). */
function fill(img: string, size: number): void {
  qemuIo(
    img,
    'qcow2',
    'write -P 0x11 0 4k',
    `write -P 0x22 ${Math.floor(size / 3)} 100k`,
    `write -z ${Math.floor(size / 2)} 64k`,
    `write -P 0x33 ${size - 8192} 8k`,
    `write -P 0x44 ${Math.floor(size / 4) + 1000} 3000`,
    `discard ${Math.floor(size / 3)} 64k`,
  );
}

describe.skipIf(!tools)('qcow2 read compatibility with qemu-img', () => {
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

  const variants: [string, string[]][] = [
    ['v3 with 64 KiB clusters', []],
    ['v3 with 512 B clusters', ['-o', 'cluster_size=512']],
    ['v3 with 4 KiB clusters', ['-o', 'cluster_size=4096']],
    ['v3 with 2 MiB clusters', ['-o', 'cluster_size=2M']],
    ['v2 (compat=0.10)', ['-o', 'compat=0.10']],
    ['v3 with 1-bit refcounts', ['-o', 'refcount_bits=1']],
    ['v3 with 64-bit refcounts', ['-o', 'refcount_bits=64']],
    ['v3 with extended L2 entries', ['-o', 'extended_l2=on,cluster_size=64k']],
  ];
  for (const [name, opts] of variants) {
    it(`reads a ${name} image exactly like qemu-img`, async () => {
      const img = join(dir, 'a.qcow2');
      const size = 5 * MiB + 512;
      qemuImg('create', '-f', 'qcow2', ...opts, img, String(size));
      fill(img, size);
      const node = await openQcow2(g, 'q', img, { 'read-only': true });
      expect(node.size()).toBe(size);
      const ours = await readAll(node);
      expect(firstDiff(ours, contentOf(img, dir))).toBe(-1);
    });
  }

  it('reads clusters compressed by qemu-img convert -c', async () => {
    const raw = join(dir, 'src.raw');
    const pattern = Buffer.alloc(3 * MiB);
    for (let i = 0; i < pattern.length; i++) pattern[i] = (i * 7 + (i >> 12)) & 0xff;
    pattern.fill(0, MiB, MiB + 300000);
    writeFileSync(raw, pattern);
    const img = join(dir, 'c.qcow2');
    qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, img);
    const node = await openQcow2(g, 'q', img, { 'read-only': true });
    expect(firstDiff(await readAll(node), pattern)).toBe(-1);
  });

  it('reads a three-level chain with raw at the bottom', async () => {
    const base = join(dir, 'base.raw');
    const mid = join(dir, 'mid.qcow2');
    const top = join(dir, 'top.qcow2');
    qemuImg('create', '-f', 'raw', base, '4M');
    qemuIo(base, 'raw', 'write -P 1 0 1M');
    qemuImg('create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', mid, '4M');
    qemuIo(mid, 'qcow2', 'write -P 2 512k 1M', 'write -z 100k 8k');
    qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'mid.qcow2', '-F', 'qcow2', top, '6M');
    qemuIo(top, 'qcow2', 'write -P 3 1M 4k', 'write -z 0 4k', 'write -P 4 5M 10k');
    const expected = contentOf(top, dir);
    const node = await openQcow2(g, 'top', top);
    expect(firstDiff(await readAll(node), expected)).toBe(-1);
  });

  it('reports unallocated clusters without a backing file as zero with depth 0', async () => {
    const img = join(dir, 'a.qcow2');
    qemuImg('create', '-f', 'qcow2', img, '4M');
    qemuIo(img, 'qcow2', 'write -P 1 1M 64k');
    const node = await openQcow2(g, 'q', img, { 'read-only': true });
    const ext = await node.io.blockStatus(0, 4 * MiB);
    expect(ext[0]).toMatchObject({ offset: 0, length: MiB, flags: EXTENT_ZERO, depth: 0 });
    expect(ext[1]).toMatchObject({ offset: MiB, length: 65536, depth: 1 });
  });

  it('refuses a file that is not qcow2 with a clear error', async () => {
    const img = join(dir, 'x.raw');
    writeFileSync(img, Buffer.alloc(65536, 1));
    await expect(openQcow2(g, 'q', img)).rejects.toThrow('Image is not in qcow2 format');
  });
});
