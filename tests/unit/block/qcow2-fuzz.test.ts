/**
 * Untrusted images: headers and tables with mutated bytes either fail to open with a DaemonError
 * or open and read (and write, on a copy) without crashing. Images are built by our own creator,
 * so no external tool is needed.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockGraph } from '../../../src/block/graph.js';
import { createFile, createQcow2 } from '../../../src/block/drivers/qcow2/create.js';
import { DaemonError } from '../../../src/util/errors.js';
import { silentLogger } from '../../../src/util/logger.js';

let dir: string;
let pristine: Buffer;

function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 0x100000000;
  };
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'blockd-qcow2-fuzz-'));
  const img = join(dir, 'base.qcow2');
  await createFile({ filename: img, size: 0 });
  const g = new BlockGraph(silentLogger());
  const f = await g.add({ driver: 'file', 'node-name': 'f', filename: img });
  await createQcow2(f.io, { size: 2 * 1024 * 1024, clusterSize: 4096, backingFmt: 'raw', backingFile: 'nonexistent.raw' });
  await g.del('f');
  const q = await g.add({ driver: 'qcow2', 'node-name': 'q', backing: null, file: { driver: 'file', filename: img } });
  for (let i = 0; i < 40; i++) await q.io.write(Buffer.alloc(3000, i + 1), i * 50000);
  await q.io.writeZeroes(1024 * 1024, 8192);
  await g.closeAll();
  pristine = readFileSync(img);
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Open, read everything, query block status, then try a write; only DaemonErrors may escape. */
async function exercise(bytes: Buffer, writable: boolean): Promise<'refused' | 'ok' | 'io-error'> {
  const img = join(dir, 'm.qcow2');
  writeFileSync(img, bytes);
  const g = new BlockGraph(silentLogger());
  try {
    let node;
    try {
      node = await g.add({
        driver: 'qcow2',
        'node-name': 'q',
        backing: null,
        'read-only': !writable,
        file: { driver: 'file', filename: img },
      });
    } catch (err) {
      expect(err).toBeInstanceOf(DaemonError);
      return 'refused';
    }
    let result: 'ok' | 'io-error' = 'ok';
    const size = Math.min(node.size(), 4 * 1024 * 1024);
    const step = 64 * 1024;
    for (let off = 0; off < size; off += step) {
      try {
        await node.io.read(Buffer.alloc(Math.min(step, size - off)), off);
        await node.io.blockStatus(off, Math.min(step, size - off));
      } catch (err) {
        expect(err).toBeInstanceOf(DaemonError);
        result = 'io-error';
      }
    }
    if (writable && size > 0) {
      try {
        await node.io.write(Buffer.alloc(5000, 0x77), Math.floor(size / 3));
        await node.io.flush();
      } catch (err) {
        expect(err).toBeInstanceOf(DaemonError);
        result = 'io-error';
      }
    }
    return result;
  } finally {
    await g.closeAll();
  }
}

describe('qcow2 with corrupted metadata', () => {
  it('opens the unmodified image', async () => {
    expect(await exercise(pristine, true)).toBe('ok');
  });

  it('survives random byte mutations in the header cluster', async () => {
    const rnd = prng(7);
    const outcomes = new Set<string>();
    for (let i = 0; i < 120; i++) {
      const b = Buffer.from(pristine);
      const n = 1 + Math.floor(rnd() * 4);
      for (let k = 0; k < n; k++) b[Math.floor(rnd() * 512)] = Math.floor(rnd() * 256);
      outcomes.add(await exercise(b, rnd() < 0.5));
    }
    expect(outcomes.has('refused')).toBe(true);
  });

  it('survives random mutations of the L1, L2 and refcount tables', async () => {
    const rnd = prng(11);
    for (let i = 0; i < 80; i++) {
      const b = Buffer.from(pristine);
      const n = 1 + Math.floor(rnd() * 8);
      for (let k = 0; k < n; k++) {
        // Clusters 1..8 hold the reftable, refblock, L1 and the first L2 tables (4 KiB clusters).
        const at = 4096 + Math.floor(rnd() * 8 * 4096);
        if (at < b.length) b[at] = Math.floor(rnd() * 256);
      }
      await exercise(b, rnd() < 0.5);
    }
  });

  it('refuses a truncated image cleanly', async () => {
    for (const len of [0, 3, 71, 100, 4096, 3 * 4096 + 5]) {
      expect(await exercise(pristine.subarray(0, len), false)).not.toBe('ok-crash');
    }
  });
});
