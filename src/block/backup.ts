/**
 * The backup job (QEMU's blockdev-backup): a point-in-time copy of `source` into `target`.
 *
 * Point in time: the job hooks the source's write path (like the copy-before-write filter QEMU
 * inserts): a write, write-zeroes or discard that reaches a cluster not yet copied first copies
 * the cluster's old contents to the target, through the same copy loop and in-flight bookkeeping
 * as the background copy, so the two never copy a cluster twice or out of order.
 *
 * Sync modes: `full` copies everything (zero ranges as write-zeroes), `top` only what the top
 * layer of the source holds, `none` only what guest writes are about to overwrite (the job runs
 * until cancelled), `bitmap`/`incremental` the clusters dirty in a bitmap of the source. With a
 * bitmap, writes during the job are recorded on the side (QEMU's successor bitmap); at the end
 * `bitmap-mode` decides: `on-success` (and `incremental`) leaves only those writes in the bitmap
 * when the job succeeded, `always` also removes what was copied when it failed, `never` leaves
 * the bitmap as it is (old bits and new writes).
 *
 * Memory: `workers` × `chunk` bytes of copy buffers at most (4 × 1 MiB by default; x-perf
 * max-workers / max-chunk lower it), plus the copies guest writes trigger (as large as the writes).
 */
import { BlockError } from '../util/errors.js';
import { CopyLoop, copyExtents } from './job-copy.js';
import { errorAction, jobClusterSize, type OnError } from './block-job.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import type { NamedBitmap } from './dirty-bitmap-set.js';
import type { Job, JobDebugEdge, JobDriver } from './jobs.js';
import { permsOf } from './node.js';
import { JobFilter, type JobFilterSpec } from './job-filter.js';
import {
  PERM_ALL,
  PERM_CONSISTENT_READ,
  PERM_WRITE,
  PERM_WRITE_UNCHANGED,
  type BlockNode,
  type BlockUser,
} from './types.js';

export type BackupSync = 'full' | 'top' | 'none' | 'bitmap' | 'incremental';
export type BitmapMode = 'on-success' | 'never' | 'always';

export interface BackupOptions {
  source: BlockNode;
  target: BlockNode;
  sync: BackupSync;
  bitmap?: NamedBitmap;
  bitmapMode?: BitmapMode;
  onSourceError: OnError;
  onTargetError: OnError;
  /** x-perf max-workers (default 4). */
  maxWorkers?: number;
  /** x-perf max-chunk in bytes (0/absent: 1 MiB). */
  maxChunk?: number;
  /** Called at the end of `clean` (drive-backup closes the target it opened). */
  onClean?: () => void;
  /** The copy-before-write filter above the source while the job runs (filter-node-name). */
  filter?: JobFilterSpec;
}

/** Default copy request size and parallelism of the background copy. */
export const BACKUP_CHUNK = 1 << 20;
export const BACKUP_WORKERS = 4;

/** The op blocker a job puts on its target (QSD's text). */
export function jobBlocker(type: string): string {
  return `block device is in use by block job: ${type}`;
}

/**
 * Set up a backup: checks in QSD's order that can fail before the job exists, then the driver.
 * `clusterSize` comes from {@link jobClusterSize}.
 */
export class BackupJob implements JobDriver {
  readonly type = 'backup';
  readonly blockJob = true;
  private loop!: CopyLoop;
  private work!: DirtyBitmap;
  private srcUser: BlockUser | undefined;
  private dstUser: BlockUser | undefined;
  private unhook: (() => void) | undefined;
  private unhookSuccessor: (() => void) | undefined;
  private successor: DirtyBitmap | undefined;
  private readonly blocker: string;
  private filter: JobFilter | undefined;

  constructor(
    private readonly o: BackupOptions,
    private readonly clusterSize: number,
  ) {
    this.blocker = jobBlocker('backup');
  }

  /** Take permissions and freeze the bitmap (before the job exists); undone by `clean`. */
  attach(): void {
    const { source, target } = this.o;
    const size = source.size();
    const work = new DirtyBitmap(size, this.clusterSize);
    this.work = work;
    const bm = this.o.bitmap;
    if (bm && this.o.sync === 'bitmap') {
      for (let pos = 0; pos < size; ) {
        const a = bm.bits.nextDirtyArea(pos);
        if (!a) break;
        work.mark(a.offset, a.length);
        pos = a.offset + a.length;
      }
    } else {
      work.fill();
    }
    if (this.o.filter) {
      // QEMU's copy-before-write filter node: the source's users move onto it. The copy before
      // write itself stays a hook on the source's write path, which the filter forwards to.
      this.filter = JobFilter.insert({
        ...this.o.filter,
        child: source,
        driverName: 'copy-before-write',
        role: 'file',
        moveUsers: true,
        readOnly: source.readOnly,
        blocker: this.blocker,
        errorPrefix: 'Could not create node: ',
        target,
      });
    }
    // Both users stand for the copy-before-write filter's edges (file and target).
    this.srcUser = source.attach({
      name: `node '#backup'`,
      role: 'file',
      kind: 'node',
      perm: permsOf(PERM_CONSISTENT_READ),
      shared: permsOf(PERM_ALL),
    });
    try {
      this.dstUser = target.attach({
        name: `node '#backup'`,
        role: 'target',
        kind: 'node',
        perm: permsOf(PERM_WRITE),
        shared: permsOf(PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED),
      });
    } catch (err) {
      this.srcUser.detach();
      this.srcUser = undefined;
      this.filter?.remove();
      throw err;
    }
    target.blockers.add(this.blocker);
    if (bm) {
      bm.setBusy(true);
      if (bm.recording) {
        this.successor = new DirtyBitmap(size, bm.granularity);
        const succ = this.successor;
        this.unhookSuccessor = source.io.addWriteHook((offset, length) => succ.mark(offset, length));
      }
    }
  }

  private srcIO() {
    if (!this.srcUser) throw new BlockError('DETACHED', 'EIO', 'backup source is detached');
    return this.srcUser.io;
  }

  private dstIO() {
    if (!this.dstUser) throw new BlockError('DETACHED', 'EIO', 'backup target is detached');
    return this.dstUser.io;
  }

  /** Copy-before-write: old contents reach the target before a guest write changes them. */
  private beforeWrite(job: Job, offset: number, length: number): Promise<void> | undefined {
    if (job.isCompleted || this.loop.work.dirtyBits === 0) return undefined;
    return this.loop.copyNow(offset, length);
  }

  /** Not async: the loop and the write hook are in place before `start` returns. */
  run(job: Job): Promise<void> {
    const work = this.work;
    const size = this.o.source.size();
    const chunk = this.o.maxChunk && this.o.maxChunk > 0 ? Math.min(this.o.maxChunk, BACKUP_CHUNK) : BACKUP_CHUNK;
    this.loop = new CopyLoop({
      job,
      work,
      chunk,
      workers: Math.min(this.o.maxWorkers ?? BACKUP_WORKERS, BACKUP_WORKERS),
      copy: (offset, length) =>
        copyExtents(this.srcIO(), this.dstIO(), offset, length, { topOnly: this.o.sync === 'top' }),
      onError: (err) => errorAction(job, this.o, err),
    });
    job.progress(0, this.o.sync === 'none' ? size : Math.min(work.dirtyBytes, size));
    this.unhook = this.o.source.io.addWriteHook((offset, length) => this.beforeWrite(job, offset, length));
    return this.body(job);
  }

  private async body(job: Job): Promise<void> {
    if (this.o.sync === 'none') {
      // Only copy-before-write copies: idle until cancelled.
      while (!job.forceCancelled) await job.sleep();
      return;
    }
    if (this.loop.work.dirtyBits === 0) return;
    if (this.o.sync === 'top') await this.skipUnallocated(job);
    const r = await this.loop.pass();
    if (r === 'cancelled') return;
    await this.dstIO().flush();
  }

  /** sync=top: clusters with nothing in the source's own layer are not to copy (QEMU: progress shrinks). */
  private async skipUnallocated(job: Job): Promise<void> {
    const io = this.srcIO();
    const work = this.loop.work;
    const cs = this.clusterSize;
    const size = io.size();
    for (let pos = 0; pos < size && !job.forceCancelled; ) {
      const ext = await io.blockStatus(pos, Math.min(size - pos, 1 << 30));
      if (ext.length === 0) break;
      for (const e of ext) {
        if (e.depth !== 1) {
          // Clear clusters that lie entirely inside the unallocated extent.
          const first = Math.ceil(e.offset / cs);
          const endByte = e.offset + e.length;
          const last = endByte >= size ? Math.ceil(size / cs) : Math.floor(endByte / cs);
          if (last > first) work.resetBits(first, last);
        }
        pos = e.offset + e.length;
      }
    }
    job.totalProgress = job.currentProgress + Math.min(this.loop.remaining, size - job.currentProgress);
  }

  setSpeed(): void {
    this.loop?.speedChanged();
  }

  commit(): void {
    const bm = this.o.bitmap;
    if (!bm) return;
    const mode = this.o.bitmapMode ?? 'on-success';
    if (mode === 'never') return;
    // Success: the bitmap keeps only what was written while the job ran.
    if (this.successor) bm.bits.copyFrom(this.successor);
    else bm.bits.clear();
  }

  abort(): void {
    const bm = this.o.bitmap;
    if (!bm || this.o.bitmapMode !== 'always') return;
    // Failure with `always`: what was copied is no longer dirty; new writes are.
    const work = this.work;
    const cs = this.clusterSize;
    const n = work.bitCount;
    for (let i = 0; i < n; ) {
      const clean = work.nextCleanBit(i);
      if (clean < 0) break;
      let end = work.nextDirtyBit(clean);
      if (end < 0) end = n;
      bm.bits.reset(clean * cs, Math.min(end * cs, bm.bits.size) - clean * cs);
      i = end;
    }
    if (this.successor) bm.bits.merge(this.successor);
  }

  /** QSD's backup job vertex: main node (the filter) and target, no permissions of their own. */
  debugEdges(): JobDebugEdge[] {
    return [
      { name: 'main node', node: this.filter?.node ?? this.o.source, perm: 0, shared: PERM_ALL },
      { name: 'target', node: this.o.target, perm: 0, shared: PERM_ALL },
    ];
  }

  clean(): void {
    this.filter?.remove();
    this.unhook?.();
    this.unhookSuccessor?.();
    this.o.bitmap?.setBusy(false);
    this.o.target.blockers.delete(this.blocker);
    this.srcUser?.detach();
    this.dstUser?.detach();
    this.srcUser = undefined;
    this.dstUser = undefined;
    const done = this.o.onClean;
    this.o.onClean = undefined;
    done?.();
  }
}
