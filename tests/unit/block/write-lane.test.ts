/**
 * The addon's write lane (native/blockd_native.c): batches written in order by one worker, which
 * stays with the lane for a while after it runs dry (BLOCKD_LANE_SPIN_US / BLOCKD_LANE_PARK_US,
 * read when a lane is created) and must still leave promptly when the lane is closed.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { nativeOps, type WriteLaneOps } from '../../../src/block/native.js';

const lane: WriteLaneOps | undefined = nativeOps().writeLane;
if (process.env['CI'] === 'true' && process.env['BLOCKD_NO_ADDON'] !== '1' && !lane) {
  throw new Error('write lane tests need the native addon under CI');
}

function submit(
  ops: WriteLaneOps,
  l: object,
  fd: number,
  bufs: Buffer[],
  offsets: number[],
): Promise<number[]> {
  return new Promise((resolve) => {
    const results = new Float64Array(bufs.length);
    ops.submit(l, fd, bufs, offsets, results, () => resolve(Array.from(results)));
  });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe.skipIf(!lane)('native write lane', () => {
  let dir: string;
  let fd: number;
  const saved = {
    spin: process.env['BLOCKD_LANE_SPIN_US'],
    park: process.env['BLOCKD_LANE_PARK_US'],
  };

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'blockd-lane-'));
    fd = openSync(join(dir, 'f'), 'w+');
  });
  afterEach(() => {
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
    for (const [k, v] of [
      ['BLOCKD_LANE_SPIN_US', saved.spin],
      ['BLOCKD_LANE_PARK_US', saved.park],
    ] as const) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  });

  function withLane(spinUs: number, parkUs: number): object {
    process.env['BLOCKD_LANE_SPIN_US'] = String(spinUs);
    process.env['BLOCKD_LANE_PARK_US'] = String(parkUs);
    return lane!.create();
  }

  for (const [spin, park] of [
    [0, 0],
    [0, 60_000_000],
    [500, 0],
    [200, 60_000_000],
  ] as const) {
    const name = `writes batches that come while the worker waits or has left (${spin}/${park} µs)`;
    it(name, async () => {
      const l = withLane(spin, park);
      const a = Buffer.alloc(4096, 0xaa);
      const b = Buffer.alloc(8192, 0xbb);
      expect(await submit(lane!, l, fd, [a], [0])).toEqual([4096]);
      // The worker has run dry: it spins, waits, or has gone back to the pool.
      await sleep(5);
      expect(await submit(lane!, l, fd, [b, a], [4096, 12288])).toEqual([8192, 4096]);
      // Batches queued in one turn, the later one overwriting the earlier: issue order holds.
      const c = Buffer.alloc(4096, 0xcc);
      const runs = [submit(lane!, l, fd, [a], [16384]), submit(lane!, l, fd, [c], [16384])];
      expect(await Promise.all(runs)).toEqual([[4096], [4096]]);
      lane!.close(l);
      const got = readFileSync(join(dir, 'f'));
      expect(got.length).toBe(20480);
      expect(got.subarray(0, 4096).every((x) => x === 0xaa)).toBe(true);
      expect(got.subarray(4096, 12288).every((x) => x === 0xbb)).toBe(true);
      expect(got.subarray(12288, 16384).every((x) => x === 0xaa)).toBe(true);
      expect(got.subarray(16384).every((x) => x === 0xcc)).toBe(true);
    });
  }

  it('wakes a parked worker on close instead of waiting for its 60 s park to end', async () => {
    const l = withLane(0, 60_000_000);
    expect(await submit(lane!, l, fd, [Buffer.alloc(512, 1)], [0])).toEqual([512]);
    await sleep(5);
    // close() blocks until the worker has left: without the wake-up that is the whole 60 s park
    // (the bound is a hang detector, far from any real timing).
    const t0 = performance.now();
    lane!.close(l);
    expect(performance.now() - t0).toBeLessThan(30_000);
    // Another lane on the same pool still gets a worker (the parked one has left).
    const m = withLane(0, 0);
    expect(await submit(lane!, m, fd, [Buffer.alloc(512, 2)], [512])).toEqual([512]);
    lane!.close(m);
  });

  it('parks at most two workers, so lanes of many files cannot take the thread pool', async () => {
    // More lanes than pool threads (UV_THREADPOOL_SIZE, 4 by default in the test process), each
    // with a 60 s park: if every worker parked, the later lanes' first runs and the read below
    // would wait for a pool thread for a minute (the test times out).
    const lanes = Array.from({ length: 12 }, () => withLane(0, 60_000_000));
    for (const [i, l] of lanes.entries()) {
      expect(await submit(lane!, l, fd, [Buffer.alloc(512, i + 1)], [i * 512])).toEqual([512]);
    }
    const read = await new Promise<number[]>((resolve) => {
      const results = new Float64Array(1);
      const done = (): void => resolve(Array.from(results));
      nativeOps().ioBatch!(fd, false, [Buffer.alloc(512)], [0], results, done);
    });
    expect(read).toEqual([512]);
    for (const l of lanes) lane!.close(l);
    const got = readFileSync(join(dir, 'f'));
    for (let i = 0; i < 12; i++) expect(got[i * 512]).toBe(i + 1);
  });

  it('reports errno per write (EBADF on a closed fd) and keeps the lane usable', async () => {
    const l = withLane(0, 60_000_000);
    const bad = openSync(join(dir, 'g'), 'w');
    closeSync(bad);
    const r = await submit(lane!, l, bad, [Buffer.alloc(512)], [0]);
    expect(r[0]).toBeLessThan(0);
    expect(await submit(lane!, l, fd, [Buffer.alloc(512, 3)], [0])).toEqual([512]);
    lane!.close(l);
  });
  it('reports many batches in submission order, each with its own results', async () => {
    const l = withLane(0, 60_000_000);
    const order: number[] = [];
    const runs: Promise<number[]>[] = [];
    for (let i = 0; i < 200; i++) {
      const p = submit(lane!, l, fd, [Buffer.alloc(512, i & 0xff), Buffer.alloc(i + 1, 1)], [i * 512, 200 * 512 + i]);
      runs.push(p.then((r) => (order.push(i), r)));
    }
    const results = await Promise.all(runs);
    expect(order).toEqual(Array.from({ length: 200 }, (_, i) => i));
    for (const [i, r] of results.entries()) expect(r).toEqual([512, i + 1]);
    lane!.close(l);
    const got = readFileSync(join(dir, 'f'));
    for (let i = 0; i < 200; i++) expect(got[i * 512]).toBe(i & 0xff);
  });

  it('ignores a second close, and refuses batches once closed', () => {
    const l = withLane(0, 0);
    lane!.close(l);
    lane!.close(l);
    expect(() => lane!.submit(l, fd, [Buffer.alloc(512)], [0], new Float64Array(1), () => undefined)).toThrow(
      /write lane is closed/,
    );
  });
});
