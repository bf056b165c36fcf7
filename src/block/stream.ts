/**
 * The stream job (QEMU's block-stream): copy into `top` every range that `top` does not allocate
 * but a layer above `base` does (the whole chain without a base), so that the layers between top
 * and base are no longer needed; then make `base` the backing node of `top`, in the graph and in
 * the qcow2 header (the backing file name), and let go of the layers that dropped out (nodes the
 * monitor did not add close when nothing else uses them, as QEMU's last unref).
 *
 * The walk is QEMU's stream_run on the shared copy loop (job-copy.ts): chunks of 512 KiB in order, one at a time; each chunk checks the top's
 * allocation, then the chain's below it, and copies only what lies above the base. Progress counts
 * every byte walked (total = the image size), as QEMU's. Guest writes to the top that overlap the
 * chunk being copied wait until its copy is written, so they land after it. Not covered: a guest
 * write already inside the driver when a chunk's allocation is checked (QEMU's copy-on-read
 * filter serialises those; blockd has no such filter and refuses `filter-node-name`).
 */
import { BlockError } from '../util/errors.js';
import { CopyError, CopyLoop } from './job-copy.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { errorAction, type OnError } from './block-job.js';
import { jobBlocker } from './backup.js';
import type { Job, JobDebugEdge, JobDriver } from './jobs.js';
import { permsOf, type BlockNodeImpl } from './node.js';
import { JobFilter, type JobFilterSpec } from './job-filter.js';
import { BACKING_ROLE, backingBlocker, backingOf, detachBackingBlocker } from './drivers/qcow2/backing.js';
import { setBackingFile } from './drivers/qcow2/header-write.js';
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

/** QEMU's STREAM_CHUNK. */
export const STREAM_CHUNK = 512 * 1024;

/** What the job needs of the graph at its end (BlockGraph implements it). */
export interface StreamGraph {
  reopenDriver(node: BlockNode, readOnly: boolean, between?: (file: BlockIO) => Promise<void>): Promise<void>;
  releaseUnused(node: BlockNode): Promise<void>;
}

export interface StreamOptions {
  top: BlockNode;
  /** The node that becomes top's backing (undefined: stream the whole chain, no backing left). */
  base: BlockNode | undefined;
  /** The backing file name recorded in top's header (QEMU's backing_file_str). */
  backingFile: string | undefined;
  onError: OnError;
  graph: StreamGraph;
  /** The copy-on-read filter above top while the job runs (filter-node-name). */
  filter?: JobFilterSpec;
}

export class StreamJob implements JobDriver {
  readonly type = 'stream';
  readonly blockJob = true;
  private user: BlockUser | undefined;
  private unhook: (() => void) | undefined;
  private loop: CopyLoop | undefined;
  /** The copy in flight (at most one), for guest writes that overlap it. */
  private inflight: { offset: number; end: number; done: Promise<void> } | undefined;
  private readonly blocker = jobBlocker('stream');
  private filter: JobFilter | undefined;
  /** The job's own writes to the top (offset:length), which must not wait for themselves. */
  private readonly selfWrites = new Set<string>();
  /** The nodes between top and base (top's backing first). */
  private readonly intermediates: BlockNode[] = [];
  /** Depth of the base seen from top (top = 1); Infinity without a base. */
  private readonly baseDepth: number;

  constructor(private readonly o: StreamOptions) {
    let depth = 1;
    for (let n = backingOf(o.top); n && n !== o.base; n = backingOf(n)) {
      this.intermediates.push(n);
      depth++;
    }
    this.baseDepth = o.base ? depth + 1 : Number.POSITIVE_INFINITY;
  }

  /** Take the top's permissions and put the job's blocker on top and the intermediate nodes. */
  attach(): void {
    if (this.o.filter) {
      // QEMU's copy-on-read filter: top's users (exports, parent nodes) move onto it.
      this.filter = JobFilter.insert({
        ...this.o.filter,
        child: this.o.top,
        driverName: 'copy-on-read',
        role: 'file',
        moveUsers: true,
        readOnly: this.o.top.readOnly,
        blocker: this.blocker,
        errorPrefix: 'Could not create node: ',
      });
    }
    this.user = this.o.top.attach({
      name: `node '#stream'`,
      role: 'file',
      kind: 'node',
      perm: permsOf(PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED),
      shared: permsOf(PERM_ALL),
    });
    for (const n of [this.o.top, ...this.intermediates]) n.blockers.add(this.blocker);
  }

  private io(): BlockIO {
    if (!this.user) throw new BlockError('DETACHED', 'EIO', 'stream top is detached');
    return this.user.io;
  }

  /** Guest writes to the top wait for an overlapping copy in flight. */
  private beforeWrite(offset: number, length: number): Promise<void> | undefined {
    const key = `${offset}:${length}`;
    if (this.selfWrites.delete(key)) return undefined;
    const f = this.inflight;
    if (!f || offset >= f.end || offset + length <= f.offset) return undefined;
    return f.done.catch(() => undefined);
  }

  run(job: Job): Promise<void> {
    // Nothing between top and base: nothing to stream, no progress (QEMU's stream_run).
    if (this.intermediates.length === 0) return Promise.resolve();
    const size = this.o.top.size();
    job.progress(0, size);
    this.unhook = this.o.top.io.addWriteHook((offset, length) => this.beforeWrite(offset, length));
    return this.body(job, size);
  }

  /** The shared copy loop, one chunk at a time over a work bitmap of the whole image. */
  private async body(job: Job, size: number): Promise<void> {
    const io = this.io();
    const work = new DirtyBitmap(size, STREAM_CHUNK);
    work.fill();
    this.loop = new CopyLoop({
      job,
      work,
      chunk: STREAM_CHUNK,
      workers: 1,
      rateByCopied: true,
      copy: async (offset, len) => {
        let done: () => void = () => undefined;
        this.inflight = { offset, end: offset + len, done: new Promise<void>((r) => (done = r)) };
        try {
          return await this.copyChunk(io, offset, len);
        } finally {
          this.inflight = undefined;
          done();
        }
      },
      onError: (err) => errorAction(job, { onSourceError: this.o.onError, onTargetError: this.o.onError }, err),
    });
    if ((await this.loop.pass()) === 'cancelled') return;
    await io.flush();
  }

  /**
   * Copy the parts of [offset, offset+length) that lie above the base but not in the top.
   * Returns the bytes copied. Read errors (and write errors: QEMU's copy-on-read reports both as
   * a read) are CopyErrors with operation 'read'.
   */
  private async copyChunk(io: BlockIO, offset: number, length: number): Promise<number> {
    const end = offset + length;
    let copied = 0;
    let extents;
    try {
      extents = await io.blockStatus(offset, length);
    } catch (err) {
      throw new CopyError('read', err);
    }
    for (const e of extents) {
      const from = Math.max(e.offset, offset);
      const to = Math.min(e.offset + e.length, end);
      if (to <= from || !(e.depth >= 2 && e.depth < this.baseDepth)) continue;
      try {
        if (e.flags & EXTENT_ZERO) {
          this.selfWrites.add(`${from}:${to - from}`);
          await io.writeZeroes(from, to - from, { mayUnmap: false });
        } else {
          const buf = Buffer.allocUnsafe(to - from);
          await io.read(buf, from);
          this.selfWrites.add(`${from}:${to - from}`);
          await io.write(buf, from);
        }
      } catch (err) {
        this.selfWrites.clear();
        throw new CopyError('read', err);
      }
      copied += to - from;
    }
    return copied;
  }

  setSpeed(): void {
    this.loop?.speedChanged();
  }

  /**
   * QEMU's stream_prepare: record the base in top's header (its file name or `backing-file`, and
   * its format; no base: no backing file), then make it top's backing node in the graph.
   */
  async prepare(): Promise<void> {
    const { top, base } = this.o;
    if (this.intermediates.length === 0) return; // base is already top's backing
    const name = base ? (this.o.backingFile ?? base.driver.describeFilename()) : '';
    if (top.driverName === 'qcow2') {
      await this.o.graph.reopenDriver(top, top.readOnly, (file) => setBackingFile(file, name, base ? base.driverName : ''));
    }
    const t = top as BlockNodeImpl;
    const i = t.childEdges.findIndex((e) => e.name === BACKING_ROLE);
    const edge = i >= 0 ? t.childEdges[i] : undefined;
    if (!edge) return;
    const old = edge.user.node;
    detachBackingBlocker(top, old);
    if (base) {
      edge.user.moveTo(base as BlockNodeImpl);
      base.blockers.add(backingBlocker(top));
    } else {
      t.childEdges.splice(i, 1);
      edge.user.detach();
    }
    // The layers that dropped out close now (QEMU unrefs them here), top down, unless the
    // monitor added them or something else still uses them.
    for (const n of this.intermediates) n.blockers.delete(this.blocker);
    for (const n of this.intermediates) await this.o.graph.releaseUnused(n);
  }

  /** QSD's stream job vertex: main node (the filter), the active node and the layers streamed. */
  debugEdges(): JobDebugEdge[] {
    const below = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;
    return [
      { name: 'main node', node: this.filter?.node ?? this.o.top, perm: 0, shared: PERM_ALL },
      { name: 'active node', node: this.o.top, perm: 0, shared: below | PERM_WRITE },
      ...this.intermediates.map((node) => ({ name: 'intermediate node', node, perm: 0, shared: below })),
    ];
  }

  clean(): void {
    this.unhook?.();
    this.unhook = undefined;
    this.filter?.remove();
    for (const n of [this.o.top, ...this.intermediates]) n.blockers.delete(this.blocker);
    this.user?.detach();
    this.user = undefined;
  }
}
