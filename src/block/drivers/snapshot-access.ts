/**
 * `snapshot-access`: a read-only view of the point in time kept by the `copy-before-write` filter
 * that is its `file` child (QEMU 7.2 fleecing). Reads and block status come from the filter's
 * snapshot (copied clusters from its target, the rest from the filter's source); a discard tells
 * the filter that the reader is done with a range (no more copies for it). Writes are refused.
 * Over a child that is not a copy-before-write node, reads fail with ENOTSUP, as in QSD.
 */
import { BlockError } from '../../util/errors.js';
import { PERM_ALL, PERM_CONSISTENT_READ, type BlockDriver, type BlockExtent, type DriverCaps } from '../types.js';
import type { ChildPermFn } from '../node.js';
import { CopyBeforeWriteDriver } from './copy-before-write.js';
import { BASE_MEMBERS, rejectUnknown, type DriverOpenContext, type Options } from './common.js';

const MEMBERS = [...BASE_MEMBERS, 'file'];

/** The view only reads its child and lets everybody else do anything. */
export const snapshotAccessChildPerms: ChildPermFn = (_role, perm) => ({
  perm: perm & PERM_CONSISTENT_READ,
  shared: PERM_ALL,
});

export class SnapshotAccessDriver implements BlockDriver {
  readonly name = 'snapshot-access';
  readonly caps: DriverCaps = {
    writeZeroes: false,
    fua: false,
    discard: true,
    blockStatus: true,
    resize: false,
    readSync: false,
  };

  constructor(private readonly ctx: DriverOpenContext) {}

  static async open(ctx: DriverOpenContext, opts: Options): Promise<SnapshotAccessDriver> {
    rejectUnknown(opts, MEMBERS);
    return new SnapshotAccessDriver(ctx);
  }

  private cbw(): CopyBeforeWriteDriver {
    const d = this.ctx.childDriver('file');
    if (!(d instanceof CopyBeforeWriteDriver)) {
      throw new BlockError('NOT_SUPPORTED', 'ENOTSUP', `'${this.ctx.nodeName}': the file child is not a copy-before-write node`);
    }
    return d;
  }

  getLength(): number {
    return this.ctx.childIO('file').size();
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.cbw().snapshotRead(buf, offset);
  }

  async write(): Promise<void> {
    throw new BlockError('NOT_SUPPORTED', 'EACCES', `'${this.ctx.nodeName}' (snapshot-access) cannot be written`);
  }

  discard(offset: number, length: number): Promise<void> {
    return this.cbw().snapshotDiscard(offset, length);
  }

  async flush(): Promise<void> {
    // Nothing is written through this node.
  }

  blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    return this.cbw().snapshotBlockStatus(offset, length);
  }

  async close(): Promise<void> {
    // The child is closed by the graph.
  }

  describeFilename(): string {
    return this.ctx.childDriver('file').describeFilename();
  }

  jsonOptions(): Record<string, unknown> {
    const f = this.ctx.childDriver('file');
    return { driver: 'snapshot-access', file: f.jsonOptions?.() ?? f.describeFilename() };
  }

}
