/**
 * qcow2 metadata integrity: refcount repair of dirty images counts every kind of reference
 * (bitmaps, snapshots), overlap checks, frees that wait for in-flight writes, read-write
 * images with internal snapshots. Results are checked with qemu-img.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import {
  MiB,
  check,
  contentOf,
  imgInfo,
  newGraph,
  openQcow2,
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
