/**
 * `copy-before-write`: a filter that keeps a point-in-time view of its `file` child in its
 * `target` child (QEMU's copy-before-write, used for fleecing / pull-mode backup).
 *
 * blockd's version hooks the write path of the `file` node itself (BlockIO.addWriteHook), so
 * every write, write-zeroes and discard that reaches that node, from any user (an export on the
 * node, the filter, a job), first copies the old contents of the clusters it touches into the
 * target, once per cluster; the guest write waits for that copy. With the target a qcow2
 * overlay whose backing is the `file` node, reading the target then shows the node as it was
 * when the filter was added. Reads and writes through the filter itself go to `file`.
 *
 * The point-in-time view can also be read through a `snapshot-access` node on top of the filter
 * (QEMU 7.2's fleecing): `snapshotRead` takes copied clusters from the target and the others from
 * `file`, holding back a guest write to a cluster whose old data is being read.
 *
 * Limits: no `bitmap` (copy only a bitmap's dirty areas), `on-cbw-error` or `cbw-timeout`; a
 * copy failure fails the guest write (QEMU's default `break-guest-write`).
 */
import { BlockError } from '../../util/errors.js';
import { DirtyBitmap } from '../dirty-bitmap.js';
import {
  EXTENT_ALLOCATED,
  EXTENT_DATA,
  PERM_ALL,
  PERM_CONSISTENT_READ,
  PERM_WRITE,
  type BlockDriver,
  type BlockExtent,
  type BlockIO,
  type DriverCaps,
  type WriteFlags,
  type ZeroFlags,
} from '../types.js';
import { forwardingCaps } from '../pass-through.js';
import type { ChildPermFn } from '../node.js';
import { BASE_MEMBERS, optError, qemuJson, rejectUnknown, type DriverOpenContext, type Options } from './common.js';

const CBW_MEMBERS = [...BASE_MEMBERS, 'file', 'target', 'bitmap', 'on-cbw-error', 'cbw-timeout'];
/** Copy unit when the target has no cluster size (QEMU: at least 64 KiB). */
const MIN_CLUSTER = 65536;

/** `file` is passed through; the filter writes `target` and lets everyone else do anything. */
export const cbwChildPerms: ChildPermFn = (role, perm, shared) =>
  role === 'target'
    ? { perm: PERM_CONSISTENT_READ | PERM_WRITE, shared: PERM_ALL }
    : { perm, shared };

export class CopyBeforeWriteDriver implements BlockDriver {
  readonly name = 'copy-before-write';
  readonly caps: DriverCaps;
  /** Clusters already copied to the target (or never needing it). */
  private readonly done: DirtyBitmap;
  private readonly inflight = new Map<number, Promise<void>>();
  /** Snapshot reads (snapshot-access) of the source in flight: guest writes wait for them. */
  private readonly snapReads = new Set<{ first: number; last: number; done: Promise<void> }>();
  private readonly unhook: () => void;
  private readonly cluster: number;

  private constructor(
    private readonly ctx: DriverOpenContext,
    cluster: number,
  ) {
    this.caps = forwardingCaps(ctx.childDriver('file').caps, false);
    this.cluster = cluster;
    this.done = new DirtyBitmap(this.fileIO.size(), cluster);
    this.unhook = this.fileIO.addWriteHook((offset, length) => this.beforeWrite(offset, length));
  }

  static async open(ctx: DriverOpenContext, opts: Options): Promise<CopyBeforeWriteDriver> {
    rejectUnknown(opts, CBW_MEMBERS);
    for (const k of ['bitmap', 'on-cbw-error', 'cbw-timeout']) {
      if (opts[k] !== undefined) throw optError(`Option '${k}' of copy-before-write is not supported by blockd`);
    }
    const fileSize = ctx.childIO('file').size();
    const targetSize = ctx.childIO('target').size();
    if (targetSize !== fileSize) {
      throw optError(`Source and target sizes differ: ${fileSize} vs ${targetSize}`);
    }
    let cs = MIN_CLUSTER;
    try {
      const info = await ctx.childDriver('target').queryImage?.();
      const c = info?.['cluster-size'];
      if (typeof c === 'number' && c > cs) cs = c;
    } catch {
      // No image info: keep the default unit.
    }
    return new CopyBeforeWriteDriver(ctx, cs);
  }

  private get fileIO(): BlockIO {
    return this.ctx.childIO('file');
  }

  private get targetIO(): BlockIO {
    return this.ctx.childIO('target');
  }

  /** Before a write lands on `file`: copy the old clusters it touches that were not copied yet. */
  private async beforeWrite(offset: number, length: number): Promise<void> {
    if (length <= 0) return;
    const cs = this.cluster;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + length - 1) / cs);
    const waits: Promise<void>[] = [];
    let runStart = -1;
    const flush = (end: number): void => {
      if (runStart < 0) return;
      const p = this.copy(runStart, end);
      for (let c = runStart; c < end; c++) this.inflight.set(c, p);
      waits.push(p);
      runStart = -1;
    };
    for (let c = first; c <= last; c++) {
      const busy = this.inflight.get(c);
      if (busy) {
        flush(c);
        waits.push(busy);
        continue;
      }
      if (this.done.getBit(c)) {
        flush(c);
        continue;
      }
      if (runStart < 0) runStart = c;
    }
    flush(last + 1);
    await Promise.all(waits);
    // A snapshot read of the old data still in flight must finish before the write lands.
    const reads = [...this.snapReads].filter((r) => r.first <= last && r.last >= first).map((r) => r.done);
    if (reads.length) await Promise.allSettled(reads);
  }

  // ---- the point-in-time view (snapshot-access) ----------------------------------------------

  /**
   * Read the node as it was when the filter was added: clusters already copied come from the
   * target, the others from `file` (unchanged so far; a guest write waits for this read).
   */
  async snapshotRead(buf: Buffer, offset: number): Promise<void> {
    const cs = this.cluster;
    const end = offset + buf.length;
    let pos = offset;
    while (pos < end) {
      const c = Math.floor(pos / cs);
      const copied = this.done.getBit(c) && !this.inflight.has(c);
      // Extend the run over clusters in the same state.
      let next = (c + 1) * cs;
      while (next < end) {
        const n = Math.floor(next / cs);
        if ((this.done.getBit(n) && !this.inflight.has(n)) !== copied) break;
        next += cs;
      }
      const runEnd = Math.min(next, end);
      const part = buf.subarray(pos - offset, runEnd - offset);
      if (copied) {
        await this.targetIO.read(part, pos);
      } else {
        let finish!: () => void;
        const rec = { first: c, last: Math.floor((runEnd - 1) / cs), done: new Promise<void>((r) => (finish = r)) };
        this.snapReads.add(rec);
        try {
          await this.fileIO.read(part, pos);
        } finally {
          this.snapReads.delete(rec);
          finish();
        }
      }
      pos = runEnd;
    }
  }

  /** Block status of the point-in-time view: copied clusters are data, the rest is `file`'s. */
  async snapshotBlockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    const cs = this.cluster;
    const c = Math.floor(offset / cs);
    if (this.done.getBit(c)) {
      let end = this.done.nextCleanBit(c);
      const endByte = end < 0 ? offset + length : Math.min(offset + length, end * cs);
      return [{ offset, length: endByte - offset, flags: EXTENT_DATA | EXTENT_ALLOCATED, depth: 1 }];
    }
    const nextDone = this.done.nextDirtyBit(c);
    const limit = nextDone < 0 ? offset + length : Math.min(offset + length, nextDone * cs);
    return this.fileIO.blockStatus(offset, limit - offset);
  }

  /**
   * The reader no longer needs [offset, offset+length) of the view (snapshot-access discard):
   * whole clusters in it are not copied any more, and their copies in the target are discarded.
   */
  async snapshotDiscard(offset: number, length: number): Promise<void> {
    const cs = this.cluster;
    const first = Math.ceil(offset / cs);
    const last = Math.floor((offset + length) / cs);
    if (last <= first) return;
    this.done.setBits(first, last);
    const end = Math.min(last * cs, this.targetIO.size());
    if (end > first * cs) await this.targetIO.discard(first * cs, end - first * cs);
  }

  /** Copy clusters [from, to) from file to target, then mark them done. */
  private async copy(from: number, to: number): Promise<void> {
    const cs = this.cluster;
    const size = Math.min(this.fileIO.size(), this.targetIO.size());
    try {
      for (let c = from; c < to; ) {
        const n = Math.min(to - c, Math.max(1, Math.floor((4 << 20) / cs)));
        const start = c * cs;
        const end = Math.min((c + n) * cs, size);
        if (end > start) {
          const buf = Buffer.allocUnsafe(end - start);
          await this.fileIO.read(buf, start);
          await this.targetIO.write(buf, start);
        }
        this.done.setBits(c, c + n);
        c += n;
      }
    } catch (err) {
      throw new BlockError('CBW_FAILED', 'EIO', `copy-before-write to '${this.ctx.nodeName}' target failed`, {
        cause: err,
      });
    } finally {
      for (let c = from; c < to; c++) this.inflight.delete(c);
    }
  }

  getLength(): number {
    return this.fileIO.size();
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.fileIO.read(buf, offset);
  }

  write(buf: Buffer, offset: number, flags: WriteFlags): Promise<void> {
    return this.fileIO.write(buf, offset, flags);
  }

  writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.fileIO.writeZeroes(offset, length, flags);
  }

  discard(offset: number, length: number): Promise<void> {
    return this.fileIO.discard(offset, length);
  }

  flush(): Promise<void> {
    return this.fileIO.flush();
  }

  blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    return this.fileIO.blockStatus(offset, length);
  }

  async close(): Promise<void> {
    this.unhook();
    await Promise.allSettled([...new Set(this.inflight.values())]);
  }

  describeFilename(): string {
    return `json:${qemuJson(this.jsonOptions())}`;
  }

  jsonOptions(): Record<string, unknown> {
    const f = this.ctx.childDriver('file');
    const t = this.ctx.childDriver('target');
    return {
      driver: 'copy-before-write',
      file: f.jsonOptions?.() ?? f.describeFilename(),
      target: t.jsonOptions?.() ?? t.describeFilename(),
    };
  }
}
