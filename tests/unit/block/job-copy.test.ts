import { describe, expect, it } from 'vitest';
import { CopyLoop, RateLimit, copyExtents } from '../../../src/block/job-copy.js';
import { DirtyBitmap } from '../../../src/block/dirty-bitmap.js';
import { JobManager, type Job } from '../../../src/block/jobs.js';
import { EXTENT_ALLOCATED, EXTENT_DATA, EXTENT_ZERO, type BlockExtent, type BlockIO } from '../../../src/block/types.js';

const G = 65536;

interface Ev {
  event: string;
  data: Record<string, unknown>;
}

/** A gate per copy: the test decides when each copy finishes. */
class Copies {
  calls: { offset: number; length: number; finish: (err?: Error) => void }[] = [];
  inflight = 0;
  maxInflight = 0;
  /** Ranges being copied right now (to catch overlapping copies). */
  active: { offset: number; length: number }[] = [];
  overlap = false;
  auto = false;

  copy = (offset: number, length: number): Promise<void> => {
    for (const a of this.active) if (offset < a.offset + a.length && a.offset < offset + length) this.overlap = true;
    const rec = { offset, length };
    this.active.push(rec);
    this.inflight++;
    this.maxInflight = Math.max(this.maxInflight, this.inflight);
    return new Promise<void>((resolve, reject) => {
      const finish = (err?: Error): void => {
        this.inflight--;
        this.active.splice(this.active.indexOf(rec), 1);
        if (err) reject(err);
        else resolve();
      };
      if (this.auto) setImmediate(() => finish());
      else this.calls.push({ offset, length, finish });
    });
  };

  finishAll(): void {
    const c = this.calls.splice(0);
    for (const x of c) x.finish();
  }
}

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

async function settle(n = 5): Promise<void> {
  for (let i = 0; i < n; i++) await tick();
}

function setup(size: number, opts: { workers?: number; chunk?: number; onError?: (err: unknown) => 'fail' | 'retry' } = {}) {
  const evs: Ev[] = [];
  const m = new JobManager((event, data) => evs.push({ event, data }));
  const copies = new Copies();
  const work = new DirtyBitmap(size, G);
  work.fill();
  let loop!: CopyLoop;
  let result: string | undefined;
  const job = m.start(
    'j',
    {
      type: 'backup',
      blockJob: true,
      run: async (j: Job) => {
        loop = new CopyLoop({
          job: j,
          work,
          chunk: opts.chunk ?? G,
          workers: opts.workers ?? 2,
          copy: copies.copy,
          ...(opts.onError ? { onError: opts.onError } : {}),
        });
        j.progress(0, size);
        result = await loop.pass();
      },
    },
    { autoDismiss: false },
  );
  const statuses = (): string[] =>
    evs.filter((e) => e.event === 'JOB_STATUS_CHANGE').map((e) => String(e.data['status']));
  return { m, job, copies, work, evs, statuses, loop: () => loop, result: () => result };
}

describe('RateLimit', () => {
  it('admits a slice worth of bytes at once, then asks to wait for the excess', () => {
    const r = new RateLimit(100);
    // 1000 B/s: 100 bytes per 100 ms slice.
    r.account(50, 1000, 0);
    expect(r.waitMs(1000, 0)).toBe(0);
    r.account(250, 1000, 10);
    // 300 bytes dispatched = 3 slices from the slice start at 0.
    expect(r.waitMs(1000, 10)).toBe(290);
    expect(r.waitMs(1000, 300)).toBe(0);
  });

  it('never waits without a limit', () => {
    const r = new RateLimit();
    r.account(1 << 30, 0, 0);
    expect(r.waitMs(0, 0)).toBe(0);
  });

  it('forgets what was dispatched on reset', () => {
    const r = new RateLimit(100);
    r.account(1 << 20, 1, 0);
    expect(r.waitMs(1, 0)).toBeGreaterThan(0);
    r.reset();
    expect(r.waitMs(1, 0)).toBe(0);
  });
});

describe('CopyLoop', () => {
  it('copies every dirty cluster once, with at most `workers` copies in flight, and counts progress', async () => {
    const s = setup(16 * G, { workers: 3, chunk: 2 * G });
    s.copies.auto = true;
    await s.job.whenCompleted();
    expect(s.result()).toBe('done');
    expect(s.copies.maxInflight).toBe(3);
    expect(s.copies.overlap).toBe(false);
    expect(s.work.dirtyBits).toBe(0);
    expect(s.job.currentProgress).toBe(16 * G);
    expect(s.job.totalProgress).toBe(16 * G);
    expect(s.statuses().slice(-3)).toEqual(['waiting', 'pending', 'concluded']);
  });

  it('clips the last chunk to the bitmap size', async () => {
    const s = setup(G + 1000, { chunk: 4 * G });
    await settle();
    expect(s.copies.calls.map((c) => [c.offset, c.length])).toEqual([[0, G + 1000]]);
    s.copies.finishAll();
    await s.job.whenCompleted();
    expect(s.job.currentProgress).toBe(G + 1000);
  });

  it('does not start a second copy of a cluster that is dirtied again while in flight', async () => {
    const s = setup(2 * G, { workers: 4, chunk: G });
    await settle();
    expect(s.copies.calls.length).toBe(2);
    s.work.setBits(0, 1);
    await settle();
    expect(s.copies.calls.length).toBe(2);
    s.copies.calls[0]!.finish();
    s.copies.calls.splice(0, 1);
    await settle();
    // Now the re-dirtied cluster is copied again.
    expect(s.copies.calls.map((c) => c.offset)).toEqual([G, 0]);
    expect(s.copies.overlap).toBe(false);
    s.copies.finishAll();
    await s.job.whenCompleted();
    expect(s.work.dirtyBits).toBe(0);
  });

  it('copyNow copies clusters still to do and waits for those in flight', async () => {
    const s = setup(8 * G, { workers: 1, chunk: G });
    await settle();
    expect(s.copies.calls.map((c) => c.offset)).toEqual([0]);
    let done = false;
    const p = s.loop()
      .copyNow(0, 3 * G)
      .then(() => (done = true));
    await settle();
    // Cluster 0 is in flight (waited for), clusters 1-2 are copied now.
    expect(s.copies.calls.map((c) => [c.offset, c.length])).toEqual([
      [0, G],
      [G, 2 * G],
    ]);
    s.copies.calls[1]!.finish();
    s.copies.calls.splice(1, 1);
    await settle();
    expect(done).toBe(false);
    s.copies.calls[0]!.finish();
    s.copies.calls.splice(0, 1);
    await p;
    expect(done).toBe(true);
    expect(s.work.getBit(1)).toBe(false);
    s.copies.auto = true;
    s.copies.finishAll();
    await s.job.whenCompleted();
    expect(s.job.currentProgress).toBe(8 * G);
  });

  it('lets in-flight copies finish before parking at a pause point', async () => {
    const s = setup(8 * G, { workers: 2, chunk: G });
    await settle();
    expect(s.copies.calls.length).toBe(2);
    s.m.pause('j');
    await settle();
    expect(s.job.status).toBe('running');
    s.copies.finishAll();
    await settle();
    expect(s.job.status).toBe('paused');
    expect(s.copies.calls.length).toBe(0);
    expect(s.job.currentProgress).toBe(2 * G);
    s.m.resume('j');
    s.copies.auto = true;
    await s.job.whenCompleted();
    expect(s.job.currentProgress).toBe(8 * G);
  });

  it('stops at the next chunk on a forced cancel, after what is in flight', async () => {
    const s = setup(8 * G, { workers: 2, chunk: G });
    await settle();
    s.m.cancel('j');
    await settle();
    expect(s.job.isCompleted).toBe(false);
    s.copies.finishAll();
    await s.job.whenCompleted();
    expect(s.copies.calls.length).toBe(0);
    expect(s.job.error).toBe('Operation canceled');
    expect(s.work.dirtyBits).toBe(6);
  });

  it('fails the pass with the first copy error and leaves the clusters to do', async () => {
    const s = setup(4 * G, { workers: 1, chunk: G });
    await settle();
    s.copies.calls[0]!.finish(new Error('Input/output error'));
    await s.job.whenCompleted();
    expect(s.job.error).toBe('Input/output error');
    expect(s.work.getBit(0)).toBe(true);
  });

  it('retries a failed chunk when the error policy says so', async () => {
    const errors: unknown[] = [];
    const s = setup(2 * G, {
      workers: 1,
      chunk: G,
      onError: (e) => {
        errors.push(e);
        return 'retry';
      },
    });
    await settle();
    s.copies.calls.shift()!.finish(new Error('EIO'));
    await settle();
    expect(errors.length).toBe(1);
    s.copies.auto = true;
    s.copies.finishAll();
    await s.job.whenCompleted();
    expect(s.job.error).toBeUndefined();
    expect(s.job.currentProgress).toBe(2 * G);
  });

  it('waits as the speed limit says and continues at once when the limit is lifted', async () => {
    const s = setup(4 * G, { workers: 4, chunk: G });
    s.job.speed = 1;
    await settle();
    // One chunk is admitted; the next waits for far longer than the test runs.
    s.copies.finishAll();
    await settle();
    s.copies.finishAll();
    await settle();
    expect(s.job.currentProgress).toBeLessThanOrEqual(2 * G);
    expect(s.job.idle).toBe(true);
    s.copies.auto = true;
    await s.m.verb(s.job, () => s.m.setSpeed(s.job, 0));
    await s.job.whenCompleted();
    expect(s.job.currentProgress).toBe(4 * G);
  });
});

/** A fake source with a fixed extent map, and a target that records what it was asked. */
function fakeIO(extents: BlockExtent[], size: number) {
  const ops: string[] = [];
  const io = {
    blockStatus: async (offset: number, length: number) =>
      extents
        .filter((e) => e.offset + e.length > offset && e.offset < offset + length)
        .map((e) => {
          const s = Math.max(e.offset, offset);
          return { ...e, offset: s, length: Math.min(e.offset + e.length, offset + length) - s };
        }),
    read: async (buf: Buffer, offset: number) => {
      buf.fill(1);
      ops.push(`read ${offset}+${buf.length}`);
    },
    write: async (buf: Buffer, offset: number) => {
      ops.push(`write ${offset}+${buf.length}`);
    },
    writeZeroes: async (offset: number, length: number) => {
      ops.push(`zero ${offset}+${length}`);
    },
    size: () => size,
  };
  return { io: io as unknown as BlockIO, ops };
}

describe('copyExtents', () => {
  const ext: BlockExtent[] = [
    { offset: 0, length: G, flags: EXTENT_DATA | EXTENT_ALLOCATED, depth: 1 },
    { offset: G, length: G, flags: EXTENT_ZERO, depth: 0 },
    { offset: 2 * G, length: G, flags: EXTENT_DATA | EXTENT_ALLOCATED, depth: 2 },
  ];

  it('reads and writes data and turns zero ranges into write-zeroes', async () => {
    const { io, ops } = fakeIO(ext, 3 * G);
    await copyExtents(io, io, 0, 3 * G);
    expect(ops).toEqual([`read 0+${G}`, `write 0+${G}`, `zero ${G}+${G}`, `read ${2 * G}+${G}`, `write ${2 * G}+${G}`]);
  });

  it('copies only the top layer with topOnly', async () => {
    const { io, ops } = fakeIO(ext, 3 * G);
    await copyExtents(io, io, 0, 3 * G, { topOnly: true });
    expect(ops).toEqual([`read 0+${G}`, `write 0+${G}`]);
  });

  it('tags a failure with the side that failed', async () => {
    const { io } = fakeIO(ext, 3 * G);
    const bad = { ...io, write: async () => Promise.reject(new Error('No space left on device')) } as unknown as BlockIO;
    await expect(copyExtents(io, bad, 0, G)).rejects.toMatchObject({ operation: 'write' });
    const badRead = { ...io, read: async () => Promise.reject(new Error('EIO')) } as unknown as BlockIO;
    await expect(copyExtents(badRead, io, 0, G)).rejects.toMatchObject({ operation: 'read' });
  });
});
