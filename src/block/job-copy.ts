/**
 * The copy loop shared by the data-moving block jobs (backup, mirror, commit, stream): it walks
 * a work bitmap of what is left to copy, copies it in chunks with a bounded number of requests in
 * flight, honours the job's speed limit (`speed`, block-job-set-speed), passes a pause point
 * before every chunk, counts progress for query-jobs, and lets copy-before-write users claim a
 * range ahead of the loop (`copyNow`).
 *
 * Memory: at most `workers` chunks of at most `chunk` bytes are in flight (their buffers), plus
 * the work and in-flight bitmaps (one bit per granule, allocated lazily: see DirtyBitmap).
 *
 * Clusters being copied are marked in an in-flight bitmap: the loop never starts a second copy of
 * a cluster still in flight (two writes of the same target range could land out of order), and
 * `copyNow` waits for the in-flight copy instead of copying again.
 */
import { BlockError, DaemonError, errnoOf } from '../util/errors.js';
import { jobCancelledError, type Job } from './jobs.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { EXTENT_ZERO, type BlockIO } from './types.js';

/** Longest single timer (setTimeout's limit). */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** Length of one rate-limit time slice (ms): the burst a job may copy at once. */
export const RATE_SLICE_MS = 100;

/**
 * A rate limiter in bytes per second with time slices (the scheme of QEMU's ratelimit): each
 * slice admits `speed * slice` bytes; a request that exceeds what is left is still admitted, and
 * the caller then waits until the slices it used up have passed.
 */
export class RateLimit {
  private sliceStart = 0;
  private sliceEnd = 0;
  private dispatched = 0;

  constructor(private readonly sliceMs = RATE_SLICE_MS) {}

  /** Forget what was dispatched (the speed changed). */
  reset(): void {
    this.sliceStart = 0;
    this.sliceEnd = 0;
    this.dispatched = 0;
  }

  /** Account `bytes` dispatched now at `speed` (bytes/s, 0 = unlimited). */
  account(bytes: number, speed: number, now: number): void {
    if (speed <= 0) return;
    if (now >= this.sliceEnd) {
      this.sliceStart = now;
      this.sliceEnd = now + this.sliceMs;
      this.dispatched = 0;
    }
    this.dispatched += bytes;
    const quota = (speed * this.sliceMs) / 1000;
    if (this.dispatched >= quota) {
      // Used up this slice and maybe more: the slice lasts until the excess is paid for.
      this.sliceEnd = this.sliceStart + (this.dispatched / quota) * this.sliceMs;
    }
  }

  /** How long (ms) to wait before dispatching more at `speed`. */
  waitMs(speed: number, now: number): number {
    if (speed <= 0) return 0;
    const quota = (speed * this.sliceMs) / 1000;
    if (this.dispatched < quota || now >= this.sliceEnd) return 0;
    return this.sliceEnd - now;
  }
}

export interface CopyLoopOptions {
  job: Job;
  /** What is left to copy; bits are cleared when a chunk is claimed. Its granularity is the cluster. */
  work: DirtyBitmap;
  /** Largest chunk in bytes (rounded down to whole clusters, at least one). */
  chunk: number;
  /** Most chunks in flight at once. */
  workers: number;
  /**
   * Copy [offset, offset+length) (clipped to the bitmap's size). With `rateByCopied`, resolves
   * with the bytes really copied (a job that skips ranges, like stream, pays only for those).
   */
  copy(offset: number, length: number): Promise<void | number>;
  /** Charge the speed limit with the bytes `copy` reports, after each chunk (default: claimed bytes, at dispatch). */
  rateByCopied?: boolean;
  /**
   * A chunk failed: 'fail' ends the pass with the error (default), 'retry' leaves the clusters to
   * do and goes on (the hook may have paused the job first: on-error=stop).
   */
  onError?(err: unknown, offset: number, length: number): 'fail' | 'retry';
  /** Count copied bytes as progress (default true). */
  countProgress?: boolean;
  /** Clock in ms (tests). */
  now?: () => number;
}

interface InFlight {
  start: number;
  end: number;
  done: Promise<void>;
}

/** What a pass stopped for. */
export type PassResult = 'done' | 'cancelled';

export class CopyLoop {
  readonly work: DirtyBitmap;
  readonly limit = new RateLimit();
  private readonly inflightBits: DirtyBitmap;
  private readonly inflight = new Set<InFlight>();
  private readonly job: Job;
  private readonly chunkClusters: number;
  private readonly workers: number;
  private readonly now: () => number;
  private cursor = 0;
  /** The first error of a chunk copy; the pass stops and rethrows it. */
  private failure: unknown;
  private failed = false;
  /** Bytes being copied right now. */
  inflightBytes = 0;

  constructor(private readonly opts: CopyLoopOptions) {
    this.job = opts.job;
    this.work = opts.work;
    this.inflightBits = new DirtyBitmap(opts.work.size, opts.work.granularity);
    this.chunkClusters = Math.max(1, Math.floor(opts.chunk / opts.work.granularity));
    this.workers = Math.max(1, Math.floor(opts.workers));
    this.now = opts.now ?? (() => performance.now());
  }

  /** Bytes still to copy: dirty in the work bitmap or in flight. */
  get remaining(): number {
    return this.work.dirtyBytes + this.inflightBytes;
  }

  get busy(): boolean {
    return this.inflight.size > 0;
  }

  /** Reset the rate limiter (the job's speed changed). */
  speedChanged(): void {
    this.limit.reset();
  }

  /**
   * Copy until the work bitmap is clean and nothing is in flight. Passes a pause point before each
   * chunk, sleeps as the speed limit says, and returns 'cancelled' (after in-flight chunks ended)
   * once the job is force-cancelled. Rethrows the first chunk error.
   */
  async pass(): Promise<PassResult> {
    const job = this.job;
    let yielded = false;
    for (;;) {
      if (this.failed) {
        await this.drain();
        throw this.failure;
      }
      if (job.forceCancelled) {
        await this.drain();
        return 'cancelled';
      }
      if (job.pauseCount > 0 && this.inflight.size > 0) {
        // A pause takes effect between chunks: what is in flight completes first (as in QEMU).
        await this.drain();
        continue;
      }
      if (job.pauseCount > 0) yielded = false;
      await job.pausePoint();
      if (job.forceCancelled) continue;
      if (await this.rateLimitSleep()) yielded = false;
      if (job.forceCancelled || this.failed || job.pauseCount > 0) continue;
      const area = this.inflight.size < this.workers ? this.nextArea() : undefined;
      if (!area) {
        if (this.inflight.size === 0) {
          if (this.work.dirtyBits === 0) return 'done';
          // Everything dirty is in flight elsewhere (copyNow): nothing to wait for here.
          this.cursor = 0;
          continue;
        }
        if (!yielded) {
          yielded = true;
          job.notifyYield();
        }
        await this.waitAny();
        continue;
      }
      if (!yielded) {
        yielded = true;
        // The first I/O since the job started or last slept: a command that started or woke the
        // job replies first.
        await job.yieldNow();
        if (job.forceCancelled) {
          continue;
        }
      }
      this.start(area.start, area.end);
      if (this.opts.rateByCopied !== true) this.limit.account(area.bytes, job.speed, this.now());
    }
  }

  /**
   * Sleep while the speed limit asks for it (woken early by set-speed, pause, cancel). Returns
   * whether it slept.
   */
  private async rateLimitSleep(): Promise<boolean> {
    let slept = false;
    for (;;) {
      const ms = this.limit.waitMs(this.job.speed, this.now());
      if (ms <= 0 || this.job.forceCancelled || this.job.pauseCount > 0) return slept;
      slept = true;
      // setTimeout's limit is 2^31-1 ms; a longer wait just sleeps again.
      await this.job.sleep(Math.min(Math.ceil(ms), MAX_TIMER_MS), false);
    }
  }

  /** The next dirty run of clusters not in flight, from the cursor (wrapping once). */
  private nextArea(): { start: number; end: number; bytes: number } | undefined {
    const nbits = this.work.bitCount;
    if (this.work.dirtyBits === 0) return undefined;
    for (let round = 0; round < 2; round++) {
      let from = round === 0 ? this.cursor : 0;
      const stop = round === 0 ? nbits : Math.min(this.cursor, nbits);
      while (from < stop) {
        const i = this.work.nextDirtyBit(from, stop);
        if (i < 0) break;
        if (this.inflightBits.getBit(i)) {
          const j = this.inflightBits.nextCleanBit(i, stop);
          from = j < 0 ? stop : j;
          continue;
        }
        let end = this.work.nextCleanBit(i, Math.min(stop, i + this.chunkClusters));
        if (end < 0) end = Math.min(stop, i + this.chunkClusters);
        const busy = this.inflightBits.nextDirtyBit(i, end);
        if (busy >= 0) end = busy;
        this.cursor = end;
        const g = this.work.granularity;
        const bytes = Math.min(end * g, this.work.size) - i * g;
        return { start: i, end, bytes };
      }
    }
    return undefined;
  }

  /** Claim clusters [start, end) and copy them in the background. */
  private start(start: number, end: number): InFlight {
    const g = this.work.granularity;
    const offset = start * g;
    const length = Math.min(end * g, this.work.size) - offset;
    this.work.resetBits(start, end);
    this.inflightBits.setBits(start, end);
    this.inflightBytes += length;
    const rec: InFlight = { start, end, done: Promise.resolve() };
    rec.done = (async () => {
      try {
        const copied = await this.opts.copy(offset, length);
        if (this.opts.rateByCopied === true && typeof copied === 'number' && copied > 0) {
          this.limit.account(copied, this.job.speed, this.now());
        }
        if (this.opts.countProgress !== false) this.job.progress(length, this.remaining - length);
      } catch (err) {
        // Not copied: the clusters stay to do (a retry, or the job's end, sees them).
        this.work.setBits(start, end);
        if (!this.failed && this.opts.onError?.(err, offset, length) !== 'retry') {
          this.failed = true;
          this.failure = err;
        }
        throw err;
      } finally {
        this.inflightBits.resetBits(start, end);
        this.inflightBytes -= length;
        this.inflight.delete(rec);
        this.job.wake();
      }
    })();
    // Failures are collected in `failure`; the promise itself must not reject unobserved.
    rec.done.catch(() => undefined);
    this.inflight.add(rec);
    return rec;
  }

  private async waitAny(): Promise<void> {
    await Promise.race([...this.inflight].map((r) => r.done.catch(() => undefined)));
  }

  /** Wait until nothing is in flight. */
  async drain(): Promise<void> {
    while (this.inflight.size > 0) await this.waitAny();
  }

  /**
   * Copy-before-write: make sure every cluster of [offset, offset+length) that is still to do
   * has been copied before returning (copy it now, or wait for the copy in flight). Throws when
   * such a copy fails.
   */
  async copyNow(offset: number, length: number): Promise<void> {
    if (length <= 0) return;
    const g = this.work.granularity;
    const first = Math.floor(offset / g);
    const last = Math.min(this.work.bitCount, Math.ceil((offset + length) / g));
    const waits: Promise<void>[] = [];
    for (const r of this.inflight) {
      if (r.start < last && r.end > first) waits.push(r.done);
    }
    let i = first;
    while (i < last) {
      const d = this.work.nextDirtyBit(i, last);
      if (d < 0) break;
      let end = this.work.nextCleanBit(d, last);
      if (end < 0) end = last;
      const busy = this.inflightBits.nextDirtyBit(d, end);
      if (busy >= 0 && busy === d) {
        const free = this.inflightBits.nextCleanBit(d, end);
        i = free < 0 ? end : free;
        continue;
      }
      if (busy >= 0) end = busy;
      waits.push(this.start(d, end).done);
      i = end;
    }
    await Promise.all(waits);
  }
}

/** A copy failed on one side: `read` (the source) or `write` (the target), as BLOCK_JOB_ERROR says. */
export class CopyError extends BlockError {
  constructor(
    readonly operation: 'read' | 'write',
    cause: unknown,
  ) {
    super('COPY_FAILED', cause instanceof DaemonError ? cause.errno : errnoOf(cause), cause instanceof Error ? cause.message : String(cause), { cause });
  }
}

async function side<T>(operation: 'read' | 'write', p: Promise<T>): Promise<T> {
  try {
    return await p;
  } catch (err) {
    throw new CopyError(operation, err);
  }
}

/** How `copyExtents` treats parts of the source. */
export interface CopyExtentsOptions {
  /** Skip ranges not allocated in the source's top layer (sync=top). */
  topOnly?: boolean;
  /**
   * Copy only ranges allocated above the layer at this depth (1 = the source itself): commit and
   * stream copy what lies above their base (`depthBelow` = the base's depth).
   */
  depthBelow?: number;
  /** Leave zero ranges alone instead of writing zeroes to the target (target known to read zero). */
  skipZeroes?: boolean;
  signal?: AbortSignal;
}

/**
 * Copy [offset, offset+length) from `src` to `dst` by block status: data is read and written,
 * zero ranges become write-zeroes (or are skipped), and with `topOnly` only what the source's own
 * layer holds is copied. One buffer of at most `length` bytes at a time.
 */
export async function copyExtents(
  src: BlockIO,
  dst: BlockIO,
  offset: number,
  length: number,
  opts: CopyExtentsOptions = {},
): Promise<void> {
  const end = offset + length;
  let pos = offset;
  while (pos < end) {
    if (opts.signal?.aborted) throw jobCancelledError();
    const extents = await side('read', src.blockStatus(pos, end - pos));
    if (extents.length === 0) break;
    for (const e of extents) {
      const n = Math.min(e.length, end - e.offset);
      if (n <= 0) continue;
      if ((opts.topOnly && e.depth !== 1) || (opts.depthBelow !== undefined && !(e.depth >= 1 && e.depth < opts.depthBelow))) {
        // Not in the layers to copy: left to the backing chain.
      } else if (e.flags & EXTENT_ZERO) {
        if (!opts.skipZeroes) await side('write', dst.writeZeroes(e.offset, n, { mayUnmap: true }));
      } else {
        const buf = Buffer.allocUnsafe(n);
        await side('read', src.read(buf, e.offset));
        await side('write', dst.write(buf, e.offset));
      }
      pos = e.offset + n;
    }
  }
}
