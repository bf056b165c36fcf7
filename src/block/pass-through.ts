/**
 * The driver of a job's filter node (mirror's `mirror_top`, and the `copy-before-write`,
 * `copy-on-read` and `commit_top` filters of src/block/job-filter.ts): every request goes to the
 * one child, and the node shows its child's image as QSD shows a filter's. Subclasses add what
 * their job needs around the forwarding (mirror_top reports completed writes).
 */
import type { BlockDriver, BlockExtent, BlockIO, DriverCaps, WriteFlags, ZeroFlags } from './types.js';

/**
 * The capabilities of a node that forwards every request to one child whose own capabilities
 * are `child` (job filters, copy-before-write, throttle): everything is passed on, io.ts
 * supplies the fallbacks below, and nothing is served synchronously.
 */
export function forwardingCaps(child: DriverCaps, resize: boolean): DriverCaps {
  return {
    writeZeroes: true,
    fua: true,
    discard: true,
    blockStatus: true,
    resize,
    readSync: false,
    zeroInit: child.zeroInit ?? false,
  };
}

export abstract class PassThroughDriver implements BlockDriver {
  abstract readonly name: string;
  abstract readonly filteredRole: 'file' | 'backing';
  readonly caps: DriverCaps;

  constructor(
    protected readonly child: () => BlockIO,
    protected readonly childDriver: BlockDriver,
  ) {
    this.caps = forwardingCaps(childDriver.caps, false);
  }

  getLength(): number {
    return this.child().size();
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.child().read(buf, offset);
  }

  write(buf: Buffer, offset: number, flags: WriteFlags): Promise<void> {
    return this.child().write(buf, offset, flags);
  }

  writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.child().writeZeroes(offset, length, flags);
  }

  discard(offset: number, length: number): Promise<void> {
    return this.child().discard(offset, length);
  }

  flush(): Promise<void> {
    return this.child().flush();
  }

  blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    return this.child().blockStatus(offset, length);
  }

  async close(): Promise<void> {
    // Nothing of its own: the child belongs to whoever opened it.
  }

  describeFilename(): string {
    return this.childDriver.describeFilename();
  }

  queryImage(): Promise<Record<string, unknown>> {
    return filterImageInfo(this.childDriver);
  }
}

/** What QSD shows as the image of a job's filter node: three members of its child's image. */
export async function filterImageInfo(child: BlockDriver): Promise<Record<string, unknown>> {
  const info = (await child.queryImage?.()) ?? {};
  return { 'actual-size': info['actual-size'], 'cluster-size': info['cluster-size'], 'dirty-flag': info['dirty-flag'] };
}
