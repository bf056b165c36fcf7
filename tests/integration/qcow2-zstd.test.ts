/**
 * qcow2 images with compression_type=zstd made by qemu-img/qemu-io read through our qcow2
 * driver exactly like the source data (4 KiB, 64 KiB and 2 MiB clusters), and without the
 * native addon they open with a warning and refuse compressed reads with a clear ENOTSUP.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { randomFillSync } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import { BlockGraph } from '../../src/block/graph.js';
import type { BlockGraph as Graph } from '../../src/block/graph.js';
import { zstdOpsIfAvailable } from '../../src/block/native.js';
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
import { withoutAddon } from '../helpers/native.js';

const tools = qemuTools();
const withZstd = zstdOpsIfAvailable() !== undefined;

/** Compressible patterns, an incompressible random stretch, zeroes and a text-like region. */
function sourceData(size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = (i * 7 + (i >> 12)) & 0xff;
  randomFillSync(b, MiB, 300_000);
  b.fill(0, 2 * MiB, 2 * MiB + 200_000);
  const words = ['qcow2 ', 'zstd ', 'cluster ', 'frame ', 'blockd '];
  for (let off = 3 * MiB, i = 0; off < 3 * MiB + 500_000; i++) {
    off += b.write(words[(i * 31) % words.length] ?? '', off);
  }
  return b;
}

/** qemu-img info --output=json → format-specific data. */
function formatData(img: string): Record<string, unknown> {
  const info = JSON.parse(qemuImg('info', '--output=json', img)) as {
    'format-specific': { data: Record<string, unknown> };
  };
  return info['format-specific'].data;
}

/** Guest bytes that qemu-img map reports as data without a host offset: compressed clusters. */
function compressedBytes(img: string): number {
  const map = JSON.parse(qemuImg('map', '--output=json', img)) as { length: number; data: boolean; offset?: number }[];
  return map.filter((e) => e.data && e.offset === undefined).reduce((n, e) => n + e.length, 0);
}

describe.skipIf(!tools)('qcow2 images with zstd compressed clusters', () => {
  let dir: string;
  let g: Graph;
  beforeEach(() => {
    dir = tmp('blockd-qcow2-zstd-');
    g = newGraph();
  });
  afterEach(async () => {
    await g.closeAll();
    rm(dir);
  });

  for (const [name, cs] of [
    ['4 KiB', '4096'],
    ['64 KiB', '65536'],
    ['2 MiB', '2M'],
  ] as const) {
    it.skipIf(!withZstd)(`reads an image converted with zstd and ${name} clusters like the source`, async () => {
      const raw = join(dir, 'src.raw');
      const data = sourceData(5 * MiB + 4096);
      writeFileSync(raw, data);
      const img = join(dir, 'z.qcow2');
      qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=zstd,cluster_size=${cs}`, raw, img);
      expect(formatData(img)['compression-type']).toBe('zstd');
      expect(compressedBytes(img)).toBeGreaterThan(0);
      const node = await openQcow2(g, 'q', img, { 'read-only': true });
      expect(node.size()).toBe(data.length);
      expect(firstDiff(await readAll(node), data)).toBe(-1);
    });
  }

  it.skipIf(!withZstd)('reads zstd clusters written by qemu-io into a created image, mixed with plain data', async () => {
    const img = join(dir, 'w.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', 'compression_type=zstd,cluster_size=65536', img, '8M');
    expect(formatData(img)['compression-type']).toBe('zstd');
    qemuIo(img, 'qcow2', 'write -c -P 0x5a 0 64k', 'write -c -P 0x11 1M 256k', 'write -P 0x22 2M 64k', 'write -c -P 0x33 7M 1M');
    expect(compressedBytes(img)).toBe(64 * 1024 + 256 * 1024 + MiB);
    const node = await openQcow2(g, 'q', img, { 'read-only': true });
    expect(firstDiff(await readAll(node), contentOf(img, dir))).toBe(-1);
  });

  it.skipIf(!withZstd)('reads guest data written over a zstd image read-write, keeping the compressed rest', async () => {
    const raw = join(dir, 'src.raw');
    const data = sourceData(4 * MiB);
    writeFileSync(raw, data);
    const img = join(dir, 'z.qcow2');
    qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', raw, img);
    const node = await openQcow2(g, 'q', img);
    const patch = Buffer.alloc(4096, 0x77);
    await node.io.write(patch, 100_000);
    patch.copy(data, 100_000);
    expect(firstDiff(await readAll(node), data)).toBe(-1);
  });

  describe('without the native addon', () => {
    withoutAddon();

    it('opens with a warning and refuses compressed reads with a clear ENOTSUP', async () => {
      const raw = join(dir, 'src.raw');
      writeFileSync(raw, sourceData(4 * MiB));
      const img = join(dir, 'z.qcow2');
      qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', raw, img);
      const lines: string[] = [];
      const lg = new BlockGraph(pino({ level: 'warn' }, { write: (s: string) => void lines.push(s) }));
      try {
        const node = await openQcow2(lg, 'q', img, { 'read-only': true });
        expect(lines.some((l) => /zstd/.test(l) && /"level":40/.test(l))).toBe(true);
        await expect(node.io.read(Buffer.alloc(65536), 0)).rejects.toMatchObject({
          errno: 'ENOTSUP',
          message: expect.stringMatching(/^zstd compressed clusters cannot be read: the native addon is disabled/),
        });
      } finally {
        await lg.closeAll();
      }
    });
  });
});
