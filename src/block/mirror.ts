/**
 * The mirror job (QEMU's blockdev-mirror): copy `source` to `target` while the guest keeps
 * writing, report READY once the target has caught up, keep it in sync, and on job-complete move
 * every user of the source onto the target (pivot).
 *
 * Like QEMU, the job inserts a `mirror_top` filter node above the source and moves the source's
 * users (exports, parent nodes) onto it. The filter forwards everything to the source and, after
 * a write, write-zeroes or discard has *completed* there, marks the range dirty in the job's work
 * bitmap (marking before completion could let the copy read the old data and clear the bit).
 * The copy loop copies dirty clusters until none are left: then READY; later writes are copied as
 * they come. On job-complete (or a soft block-job-cancel once ready) the job copies what is left
 * and switches the filter to write-through: from then on every completed guest write is also
 * written to the target before it is acknowledged, so nothing written between the last copy and
 * the pivot is lost. The pivot moves the filter's users onto the target; a cancel (or the soft
 * cancel) moves them back onto the source. Either way the filter is removed.
 *
 * Memory: at most `buf-size` bytes of copy buffers in flight (default 16 MiB): chunks of at most
 * 1 MiB (or buf-size if smaller), buf-size / chunk of them at a time.
 */
import { BlockError } from '../util/errors.js';
import { CopyLoop, copyExtents } from './job-copy.js';
import { errorAction, type OnError } from './block-job.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import type { Job, JobDebugEdge, JobDriver } from './jobs.js';
import { BlockNodeImpl, BlockUserImpl, filterChildPerms, permsOf } from './node.js';
import { jobBlocker } from './backup.js';
import { backingOf } from './drivers/qcow2/backing.js';
import { PassThroughDriver } from './pass-through.js';
import {
  PERM_ALL,
  PERM_CONSISTENT_READ,
  PERM_WRITE,
  PERM_WRITE_UNCHANGED,
  type BlockIO,
  type BlockNode,
  type BlockUser,
  type WriteFlags,
  type ZeroFlags,
} from './types.js';

export type MirrorSync = 'full' | 'top' | 'none';

/** Default and largest copy request of a mirror, and the default buffer size. */
export const MIRROR_MAX_CHUNK = 1 << 20;
export const MIRROR_DEFAULT_BUF = 16 << 20;

/** How the job adds and removes its filter node in the graph (BlockGraph implements it). */
export interface ImplicitNodes {
  adoptImplicit(make: (name: string) => BlockNodeImpl, name?: string): BlockNodeImpl;
  forgetImplicit(node: BlockNode): void;
}

export interface MirrorOptions {
  source: BlockNode;
  target: BlockNode;
  sync: MirrorSync;
  granularity: number;
  bufSize: number;
  onSourceError: OnError;
  onTargetError: OnError;
  filterNodeName?: string;
  graph: ImplicitNodes;
  /** Job type for events (mirror; active commit reuses the job as `commit`). */
  type?: 'mirror' | 'commit';
  /**
   * Active commit: the target is the source's backing node at this depth (source = 1); only
   * what lies above it is copied, and the target may have parents (the chain above it).
   */
  commitBaseDepth?: number;
  /**
   * The target reads as zeroes (drive-mirror created it): sync=full copies only what is
   * allocated somewhere in the source's chain, as QEMU does (`len` counts only that).
   */
  targetIsZero?: boolean;
  /** Called at the end of `clean` with whether the users moved onto the target (drive-mirror). */
  onClean?: (pivoted: boolean) => void;
}

/** The `mirror_top` filter: forwards to the source and reports completed writes. */
export class MirrorTopDriver extends PassThroughDriver {
  readonly name = 'mirror_top';
  readonly filteredRole = 'backing';
  /** Called after a write-like request completed on the source. */
  onWritten: ((offset: number, length: number) => void) | undefined;
  /** After the final sync: completed writes are also written to the target (returns its promise). */
  writeThrough:
    | ((kind: 'write' | 'zero' | 'discard', offset: number, length: number, buf?: Buffer) => Promise<void>)
    | undefined;

  private async after(kind: 'write' | 'zero' | 'discard', offset: number, length: number, buf?: Buffer): Promise<void> {
    if (this.writeThrough) await this.writeThrough(kind, offset, length, buf);
    else this.onWritten?.(offset, length);
  }

  override async write(buf: Buffer, offset: number, flags: WriteFlags): Promise<void> {
    await this.child().write(buf, offset, flags);
    await this.after('write', offset, buf.length, buf);
  }

  override async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    await this.child().writeZeroes(offset, length, flags);
    await this.after('zero', offset, length);
  }

  override async discard(offset: number, length: number): Promise<void> {
    await this.child().discard(offset, length);
    await this.after('discard', offset, length);
  }
}

/** Move user `u` from its node onto `to`, dropping its permissions on the old node first. */
function relink(u: BlockUserImpl, to: BlockNodeImpl): void {
  const from = u.node;
  if (from === to) return;
  from.removeUser(u);
  try {
    to.addUser(u);
  } catch (err) {
    from.addUser(u);
    throw err;
  }
  u.node = to;
  u.onNodeChanged?.(from, to);
}

export class MirrorJob implements JobDriver {
  readonly type: 'mirror' | 'commit';
  readonly blockJob = true;
  private loop!: CopyLoop;
  private readonly work: DirtyBitmap;
  private srcUser: BlockUser | undefined;
  private dstUser: BlockUser | undefined;
  private filter: BlockNodeImpl | undefined;
  private filterDriver: MirrorTopDriver | undefined;
  /** The users moved onto the filter (moved on to the target or back to the source at the end). */
  private moved: BlockUserImpl[] = [];
  private completeRequested = false;
  private readonly blocker: string;

  constructor(private readonly o: MirrorOptions) {
    this.type = o.type ?? 'mirror';
    this.work = new DirtyBitmap(o.source.size(), o.granularity);
    this.blocker = jobBlocker(this.type);
  }

  /** Take permissions, insert the filter and move the source's users onto it; undone by `clean`. */
  attach(): void {
    const { source, target } = this.o;
    const src = source as BlockNodeImpl;
    this.srcUser = source.attach({
      name: `node 'mirror'`,
      role: 'file',
      kind: 'node',
      perm: permsOf(PERM_CONSISTENT_READ),
      shared: permsOf(PERM_ALL),
    });
    try {
      this.dstUser = target.attach({
        name: `node 'mirror'`,
        role: 'target',
        kind: 'node',
        // Commit writes into the base what the layers above it already show: unchanged for them.
        perm: permsOf(this.o.commitBaseDepth !== undefined ? PERM_WRITE_UNCHANGED : PERM_WRITE),
        shared: permsOf(PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED),
      });
      const srcUser = this.srcUser;
      const driver = new MirrorTopDriver(() => srcUser.io, source.driver);
      this.filterDriver = driver;
      const parents = src.parents.filter((u) => u !== this.srcUser);
      this.filter = this.o.graph.adoptImplicit(
        (name) =>
          new BlockNodeImpl({
            name,
            driver,
            readOnly: source.readOnly,
            monitorOwned: false,
            options: src.options,
            childPerms: filterChildPerms,
          }),
        this.o.filterNodeName,
      );
      this.filter.addChild('backing', src);
      for (const u of parents) {
        relink(u, this.filter);
        this.moved.push(u);
      }
    } catch (err) {
      this.clean();
      throw err;
    }
    target.blockers.add(this.blocker);
    // QSD: no other job may start on the filter or the source (`Node 'X' is busy: ...`).
    this.filter?.blockers.add(this.blocker);
    source.blockers.add(this.blocker);
  }

  /**
   * QSD's mirror (and active commit) job vertex: main node (the filter), source, target and, for
   * a commit, the layers between the source and the base.
   */
  debugEdges(): JobDebugEdge[] {
    const { source, target } = this.o;
    const rw = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED | PERM_WRITE;
    const out: JobDebugEdge[] = [
      { name: 'main node', node: this.filter ?? source, perm: PERM_CONSISTENT_READ, shared: rw },
      { name: 'source', node: source, perm: 0, shared: rw },
      { name: 'target', node: target, perm: 0, shared: PERM_ALL },
    ];
    if (this.o.commitBaseDepth !== undefined) {
      const seen = new Set<BlockNode>([source]);
      for (let n = backingOf(source); n && n !== target && !seen.has(n); n = backingOf(n)) {
        seen.add(n);
        out.push({ name: 'intermediate node', node: n, perm: 0, shared: PERM_WRITE_UNCHANGED | PERM_WRITE });
      }
    }
    return out;
  }

  /** The filter node (what the source's users now use). */
  get filterNode(): BlockNode | undefined {
    return this.filter;
  }

  run(job: Job): Promise<void> {
    const g = this.o.granularity;
    const chunk = Math.max(g, Math.floor(Math.min(MIRROR_MAX_CHUNK, this.o.bufSize) / g) * g);
    this.loop = new CopyLoop({
      job,
      work: this.work,
      chunk,
      workers: Math.max(1, Math.floor(this.o.bufSize / chunk)),
      copy: (offset, length) =>
        copyExtents(this.srcIO(), this.dstIO(), offset, length, {
          topOnly: this.o.sync === 'top',
          ...(this.o.commitBaseDepth !== undefined ? { depthBelow: this.o.commitBaseDepth } : {}),
        }),
      onError: (err) => errorAction(job, this.o, err),
    });
    const f = this.filterDriver;
    if (f) {
      f.onWritten = (offset, length) => {
        this.work.mark(offset, length);
        job.totalProgress = job.currentProgress + this.loop.remaining;
        job.wake();
      };
    }
    if (this.o.source.size() === this.o.target.size()) {
      if (this.o.sync === 'full' && this.o.commitBaseDepth === undefined && !this.o.targetIsZero) this.work.fill();
      job.progress(0, Math.min(this.work.dirtyBytes, this.o.source.size()));
    }
    return this.body(job);
  }

  private srcIO(): BlockIO {
    if (!this.srcUser) throw new BlockError('DETACHED', 'EIO', 'mirror source is detached');
    return this.srcUser.io;
  }

  private dstIO(): BlockIO {
    if (!this.dstUser) throw new BlockError('DETACHED', 'EIO', 'mirror target is detached');
    return this.dstUser.io;
  }

  private async body(job: Job): Promise<void> {
    if (this.o.source.size() !== this.o.target.size()) {
      // QSD checks this in the job, after its first yield.
      await job.yieldNow();
      throw new BlockError('BAD_OPTION', 'EINVAL', 'Source and target image have different sizes');
    }
    const zeroFull = this.o.sync === 'full' && this.o.targetIsZero === true;
    if (this.o.sync === 'top' || this.o.commitBaseDepth !== undefined || zeroFull) {
      await job.yieldNow();
      await this.markAllocated(job, this.o.commitBaseDepth ?? (zeroFull ? Number.POSITIVE_INFINITY : 2));
    }
    if ((await this.loop.pass()) === 'cancelled') return;
    job.transitionToReady();
    for (;;) {
      if (job.forceCancelled) {
        // QEMU drains the source on the way out: a cancel that woke the job replies first.
        await job.yieldNow();
        return;
      }
      if (this.completeRequested || job.cancelRequested) {
        if ((await this.loop.pass()) === 'cancelled') return;
        if (this.work.dirtyBits === 0 && !this.loop.busy) {
          this.startWriteThrough();
          break;
        }
        continue;
      }
      if (this.work.dirtyBits > 0) {
        if ((await this.loop.pass()) === 'cancelled') return;
        continue;
      }
      await job.sleep();
    }
    // The final flush is I/O: a job-complete that woke the job replies first (as in QSD).
    await job.yieldNow();
    await this.dstIO().flush();
  }

  /**
   * sync=top (`below` 2): what the source's own layer holds is dirty at the start; active commit:
   * what the layers above the base (at depth `below`) hold.
   */
  private async markAllocated(job: Job, below: number): Promise<void> {
    const io = this.srcIO();
    const size = io.size();
    for (let pos = 0; pos < size && !job.forceCancelled; ) {
      const ext = await io.blockStatus(pos, Math.min(size - pos, 1 << 30));
      if (ext.length === 0) break;
      for (const e of ext) {
        if (e.depth >= 1 && e.depth < below) this.work.mark(e.offset, e.length);
        pos = e.offset + e.length;
      }
    }
    job.totalProgress = job.currentProgress + Math.min(this.loop.remaining, size);
  }

  /** From now on completed guest writes reach the target too (before they are acknowledged). */
  private startWriteThrough(): void {
    const f = this.filterDriver;
    if (!f) return;
    const dst = (): BlockIO => this.dstIO();
    f.writeThrough = async (kind, offset, length, buf) => {
      // After the pivot the job's target user is gone; the target is then written directly.
      const io = this.dstUser ? dst() : this.o.target.io;
      if (kind === 'write' && buf) await io.write(buf, offset);
      else if (kind === 'zero') await io.writeZeroes(offset, length, { mayUnmap: true });
      else await io.discard(offset, length);
    };
  }

  complete(): void {
    this.completeRequested = true;
  }

  /** block-job-cancel without force on a ready mirror completes it without pivot (QEMU). */
  cancel(job: Job, force: boolean): boolean {
    return force || !job.isReady;
  }

  setSpeed(): void {
    this.loop?.speedChanged();
  }

  commit(job: Job): void {
    if (this.completeRequested && !job.cancelRequested) this.pivot();
  }

  /** Move the filter's users onto the target. */
  private pivoted = false;

  private pivot(): void {
    this.pivoted = true;
    const target = this.o.target as BlockNodeImpl;
    // The job's own write permission on the target would conflict with the users moving there.
    this.dstUser?.detach();
    this.dstUser = undefined;
    target.blockers.delete(this.blocker);
    const moved = this.moved;
    this.moved = [];
    for (const u of moved) {
      try {
        relink(u, target);
      } catch {
        // Keep it on the source (restored in clean), as a failed pivot leaves it in QEMU.
        this.moved.push(u);
      }
    }
  }

  clean(): void {
    const source = this.o.source as BlockNodeImpl;
    this.o.target.blockers.delete(this.blocker);
    this.o.source.blockers.delete(this.blocker);
    this.dstUser?.detach();
    this.dstUser = undefined;
    for (const u of this.moved.splice(0)) {
      try {
        relink(u, source);
      } catch {
        // Moving back restores a state that was valid before.
      }
    }
    if (this.filter) {
      for (const e of this.filter.childEdges.splice(0)) e.user.detach();
      this.o.graph.forgetImplicit(this.filter);
      this.filter = undefined;
    }
    this.srcUser?.detach();
    this.srcUser = undefined;
    const done = this.o.onClean;
    this.o.onClean = undefined;
    done?.(this.pivoted);
  }
}
