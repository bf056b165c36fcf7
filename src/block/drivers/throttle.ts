/**
 * `throttle`: a filter that holds reads and writes (write-zeroes and discard count as writes, as in
 * QEMU) to the limits of a throttle group (`throttle-group=ID`, an object-add'ed throttle-group)
 * before passing them to its `file` child. Flushes and block status pass freely. There is no
 * synchronous read path: every read is accounted.
 */
import type { BlockDriver, BlockExtent, BlockNode, DriverCaps, WriteFlags, ZeroFlags } from '../types.js';
import { forwardingCaps } from '../pass-through.js';
import type { ThrottleGroup, ThrottleGroups } from '../throttle-group.js';
import { BlockError } from '../../util/errors.js';
import {
  BASE_MEMBERS,
  optError,
  optString,
  qemuJson,
  rejectUnknown,
  type DriverOpenContext,
  type Options,
} from './common.js';

const THROTTLE_MEMBERS = [...BASE_MEMBERS, 'file', 'throttle-group'];

export class ThrottleDriver implements BlockDriver {
  readonly name = 'throttle';
  readonly caps: DriverCaps;
  private closed = false;

  private constructor(
    private readonly ctx: DriverOpenContext,
    private readonly groups: ThrottleGroups,
    readonly group: ThrottleGroup,
  ) {
    this.caps = forwardingCaps(ctx.childDriver('file').caps, true);
  }

  static async open(ctx: DriverOpenContext, opts: Options): Promise<ThrottleDriver> {
    rejectUnknown(opts, THROTTLE_MEMBERS);
    const id = optString(opts, 'throttle-group');
    if (id === undefined) throw optError("Parameter 'throttle-group' is missing");
    const groups = ctx.throttleGroups;
    if (!groups) throw new BlockError('NOT_FOUND', 'ENOENT', `Throttle group '${id}' does not exist`);
    return new ThrottleDriver(ctx, groups, groups.acquire(id));
  }

  private get child() {
    return this.ctx.childIO('file');
  }

  getLength(): number {
    return this.child.size();
  }

  isDataSync(offset: number, length: number): boolean {
    return this.child.isDataSync?.(offset, length) ?? false;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    const wait = this.group.intercept(false, buf.length);
    if (wait) await wait;
    return this.child.read(buf, offset);
  }

  async write(buf: Buffer, offset: number, flags: WriteFlags): Promise<void> {
    const wait = this.group.intercept(true, buf.length);
    if (wait) await wait;
    return this.child.write(buf, offset, flags);
  }

  async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    const wait = this.group.intercept(true, length);
    if (wait) await wait;
    return this.child.writeZeroes(offset, length, flags);
  }

  async discard(offset: number, length: number): Promise<void> {
    const wait = this.group.intercept(true, length);
    if (wait) await wait;
    return this.child.discard(offset, length);
  }

  flush(): Promise<void> {
    return this.child.flush();
  }

  blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    return this.child.blockStatus(offset, length);
  }

  truncate(size: number): Promise<void> {
    return this.child.truncate(size);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.groups.release(this.group);
  }

  jsonOptions(): Record<string, unknown> {
    const child = this.ctx.childDriver('file');
    return {
      'throttle-group': this.group.name,
      driver: 'throttle',
      file: child.jsonOptions?.() ?? child.describeFilename(),
    };
  }

  describeFilename(): string {
    return `json:${qemuJson(this.jsonOptions())}`;
  }

  async queryImage(): Promise<Record<string, unknown>> {
    const sub = (await this.ctx.childDriver('file').queryImage?.()) ?? {};
    return { 'actual-size': sub['actual-size'], 'dirty-flag': sub['dirty-flag'] };
  }
}

/**
 * Drain every throttle node in the subtree of `node` (QEMU drains a node's children with it):
 * their groups let waiting requests go and stop throttling until the returned function is called.
 */
export function drainThrottleNodes(node: BlockNode): () => void {
  const groups: ThrottleGroup[] = [];
  const seen = new Set<BlockNode>();
  const walk = (n: BlockNode): void => {
    if (seen.has(n)) return;
    seen.add(n);
    if (n.driver instanceof ThrottleDriver) groups.push(n.driver.group);
    for (const c of n.children) walk(c.user.node);
  };
  walk(node);
  for (const g of groups) g.beginDrain();
  return () => {
    for (const g of groups) g.endDrain();
  };
}
