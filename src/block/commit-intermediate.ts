/**
 * The commit job of an intermediate layer (QEMU's block-commit with `top` below the active
 * layer, block/commit.c): copy into `base` what `top` and the layers between it and `base` hold,
 * then make `base` the backing node of top's overlay, in the graph and in the overlay's qcow2
 * header (`backing-file`, else the base's file name; the base's format), and let go of the
 * layers that dropped out (nodes the monitor did not add close when nothing else uses them).
 *
 * The walk is QEMU's commit_run on the shared copy loop (job-copy.ts): 512 KiB chunks in order, progress counts every byte (total =
 * top's size), only ranges allocated above the base are copied (zero ranges as write-zeroes),
 * read errors are reported as `read` and write errors as `write`. Nothing writes to top and the
 * layers below it (they are backing nodes), so the copy needs no guard against guest writes;
 * the base is written with the `write unchanged` permission, as the layers above it read the
 * same data before and after. A read-only base is reopened read-write for the job (the command
 * does it) and read-only again in `clean`, as QEMU does.
 */
import { BlockError } from '../util/errors.js';
import { CopyError, CopyLoop } from './job-copy.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { errorAction, type OnError } from './block-job.js';
import { jobBlocker } from './backup.js';
import type { Job, JobDebugEdge, JobDriver } from './jobs.js';
import { permsOf, type BlockNodeImpl } from './node.js';
import { BACKING_ROLE, backingBlocker, backingOf, detachBackingBlocker } from './drivers/qcow2/backing.js';
import { setBackingFile } from './drivers/qcow2/header-write.js';
import { STREAM_CHUNK, type StreamGraph } from './stream.js';
import { JobFilter, type JobFilterSpec } from './job-filter.js';
import {
  EXTENT_ZERO,
  PERM_ALL,
  PERM_CONSISTENT_READ,
  PERM_WRITE,
  PERM_WRITE_UNCHANGED,
  type BlockIO,
  type BlockNode,
  type BlockUser,
} from './types.js';

/** What the job needs of the graph (BlockGraph implements it). */
export interface CommitGraph extends StreamGraph {
  setReadOnly(node: BlockNode, readOnly: boolean): Promise<void>;
}

export interface IntermediateCommitOptions {
  /** The node whose backing is `top` (it keeps its place; its backing becomes `base`). */
  overlay: BlockNode;
  top: BlockNode;
  base: BlockNode;
  backingFile: string | undefined;
  onError: OnError;
  graph: CommitGraph;
  /** The base was reopened read-write for the job: made read-only again in `clean`. */
  baseWasReadOnly?: boolean;
  /** The node the job was started on (QEMU's "main node"): blocked for other jobs while it runs. */
  device?: BlockNode;
  /** The commit_top filter above top while the job runs (filter-node-name). */
  filter?: JobFilterSpec;
}

export class IntermediateCommitJob implements JobDriver {
  readonly type = 'commit';
  readonly blockJob = true;
  private src: BlockUser | undefined;
  private dst: BlockUser | undefined;
  private loop: CopyLoop | undefined;
  private readonly blocker = jobBlocker('commit');
  private filter: JobFilter | undefined;
  /** top and the layers between it and base. */
  private readonly committed: BlockNode[] = [];

  constructor(private readonly o: IntermediateCommitOptions) {
    const seen = new Set<BlockNode>();
    for (let n: BlockNode | undefined = o.top; n && n !== o.base && !seen.has(n); n = backingOf(n)) {
      seen.add(n);
      this.committed.push(n);
    }
  }

  /** Base depth seen from top (top = 1). */
  private get baseDepth(): number {
    return this.committed.length + 1;
  }

  attach(): void {
    if (this.o.filter) {
      // QEMU's commit_top (read-only, top as its backing) becomes the overlay's backing node;
      // the backing op blocker moves along with the overlay's edge.
      const overlay = this.o.overlay;
      this.filter = JobFilter.insert({
        ...this.o.filter,
        child: this.o.top,
        driverName: 'commit_top',
        role: 'backing',
        moveUsers: true,
        moveUser: (u) => u.spec.kind === 'node' && u.spec.parent === overlay && u.spec.role === BACKING_ROLE,
        readOnly: true,
      });
      if (this.filter.node.parents.length > 0) {
        detachBackingBlocker(overlay, this.o.top as BlockNodeImpl);
        this.filter.node.blockers.add(backingBlocker(overlay));
      }
    }
    this.src = this.o.top.attach({
      name: `node '#commit'`,
      role: 'file',
      kind: 'node',
      perm: permsOf(PERM_CONSISTENT_READ),
      shared: permsOf(PERM_ALL),
    });
    try {
      this.dst = this.o.base.attach({
        name: `node '#commit'`,
        role: 'target',
        kind: 'node',
        perm: permsOf(PERM_WRITE_UNCHANGED),
        shared: permsOf(PERM_ALL),
      });
    } catch (err) {
      this.src.detach();
      this.src = undefined;
      this.removeFilter();
      throw err;
    }
    for (const n of this.committed) n.blockers.add(this.blocker);
    this.o.device?.blockers.add(this.blocker);
  }

  private users(): { src: BlockIO; dst: BlockIO } {
    if (!this.src || !this.dst) throw new BlockError('DETACHED', 'EIO', 'commit nodes are detached');
    return { src: this.src.io, dst: this.dst.io };
  }

  run(job: Job): Promise<void> {
    const size = this.o.top.size();
    job.progress(0, size);
    return this.body(job, size);
  }

  /** The shared copy loop, one chunk at a time over a work bitmap of top's whole size. */
  private async body(job: Job, size: number): Promise<void> {
    const { src, dst } = this.users();
    const work = new DirtyBitmap(size, STREAM_CHUNK);
    work.fill();
    this.loop = new CopyLoop({
      job,
      work,
      chunk: STREAM_CHUNK,
      workers: 1,
      rateByCopied: true,
      copy: (offset, len) => this.copyChunk(src, dst, offset, len),
      onError: (err) => errorAction(job, { onSourceError: this.o.onError, onTargetError: this.o.onError }, err),
    });
    if ((await this.loop.pass()) === 'cancelled') return;
    await dst.flush();
  }

  private async copyChunk(src: BlockIO, dst: BlockIO, offset: number, length: number): Promise<number> {
    const end = offset + length;
    let extents;
    try {
      extents = await src.blockStatus(offset, length);
    } catch (err) {
      throw new CopyError('read', err);
    }
    let copied = 0;
    for (const e of extents) {
      const from = Math.max(e.offset, offset);
      const to = Math.min(e.offset + e.length, end);
      if (to <= from || !(e.depth >= 1 && e.depth < this.baseDepth)) continue;
      if (e.flags & EXTENT_ZERO) {
        try {
          await dst.writeZeroes(from, to - from, { mayUnmap: false });
        } catch (err) {
          throw new CopyError('write', err);
        }
      } else {
        const buf = Buffer.allocUnsafe(to - from);
        try {
          await src.read(buf, from);
        } catch (err) {
          throw new CopyError('read', err);
        }
        try {
          await dst.write(buf, from);
        } catch (err) {
          throw new CopyError('write', err);
        }
      }
      copied += to - from;
    }
    return copied;
  }

  setSpeed(): void {
    this.loop?.speedChanged();
  }

  /**
   * QEMU's bdrv_drop_intermediate: record the base in the overlay's header, then make it the
   * overlay's backing node in the graph.
   */
  async prepare(): Promise<void> {
    const { overlay, base, top, graph } = this.o;
    // The overlay's backing edge goes back from the filter to top before it moves to the base.
    this.removeFilter();
    const name = this.o.backingFile ?? base.driver.describeFilename();
    if (overlay.driverName === 'qcow2') {
      const ro = overlay.readOnly;
      if (ro) await graph.setReadOnly(overlay, false);
      try {
        await graph.reopenDriver(overlay, false, (file) => setBackingFile(file, name, base.driverName));
      } finally {
        if (ro) await graph.setReadOnly(overlay, true);
      }
    }
    const ov = overlay as BlockNodeImpl;
    const edge = ov.childEdges.find((e) => e.name === BACKING_ROLE);
    if (!edge || edge.user.node !== top) return;
    detachBackingBlocker(overlay, top as BlockNodeImpl);
    edge.user.moveTo(base as BlockNodeImpl);
    base.blockers.add(backingBlocker(overlay));
    // The committed layers close now (QEMU unrefs them here), top down, unless the monitor
    // added them or something else still uses them.
    for (const n of this.committed) n.blockers.delete(this.blocker);
    this.src?.detach();
    this.src = undefined;
    for (const n of this.committed) await graph.releaseUnused(n);
  }

  /** Take the commit_top filter out: the overlay's backing edge (and its blocker) back on top. */
  private removeFilter(): void {
    const f = this.filter;
    if (!f) return;
    this.filter = undefined;
    f.remove();
    const ov = this.o.overlay as BlockNodeImpl;
    if (ov.childEdges.some((e) => e.name === BACKING_ROLE && e.user.node === this.o.top)) {
      this.o.top.blockers.add(backingBlocker(ov));
    }
  }

  /** QSD's commit job vertex: main node (the device), the committed layers and the base. */
  debugEdges(): JobDebugEdge[] {
    return [
      { name: 'main node', node: this.o.device ?? this.o.overlay, perm: 0, shared: PERM_ALL },
      ...this.committed.map((node) => ({
        name: 'intermediate node',
        node,
        perm: 0,
        shared: PERM_WRITE_UNCHANGED | PERM_WRITE,
      })),
      { name: 'base', node: this.o.base, perm: 0, shared: PERM_ALL },
    ];
  }

  clean(): void {
    this.removeFilter();
    this.o.device?.blockers.delete(this.blocker);
    for (const n of this.committed) n.blockers.delete(this.blocker);
    this.src?.detach();
    this.dst?.detach();
    this.src = undefined;
    this.dst = undefined;
    const graph = this.o.graph;
    const base = this.o.base;
    const restore = this.o.baseWasReadOnly === true;
    if (restore) void graph.setReadOnly(base, true).catch(() => undefined);
  }
}
