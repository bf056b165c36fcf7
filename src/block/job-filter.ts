/**
 * The filter node a block job puts above the node it works on while it runs, as QEMU 7.2 does:
 * backup `copy-before-write`, stream `copy-on-read`, intermediate commit `commit_top` (mirror and
 * active commit have their own `mirror_top`, src/block/mirror.ts). The node is named by the
 * job's `filter-node-name` or automatically (`#blockN`), is listed by query-named-block-nodes and
 * x-debug-query-block-graph while the job runs, and goes away when the job ends.
 *
 * blockd's jobs do their work on the child itself (backup's copy-before-write is a write hook on
 * the source, stream serialises guest writes the same way), so the filter only forwards: it is
 * there for the graph's users and queries. With `moveUsers` the child's parents (exports, parent
 * nodes) move onto the filter and back onto the child when it is removed, as QEMU's
 * bdrv_replace_node; without (commit_top) the overlay keeps its backing edge.
 */
import { BlockError } from '../util/errors.js';
import { BlockNodeImpl, BlockUserImpl, filterChildPerms, type ChildPermFn } from './node.js';
import { qemuJson } from './drivers/common.js';
import type { ImplicitNodes } from './mirror.js';
import { PassThroughDriver } from './pass-through.js';
import { PERM_ALL, type BlockIO, type BlockNode } from './types.js';

export type JobFilterDriverName = 'copy-before-write' | 'copy-on-read' | 'commit_top';

/** A driver that forwards every request to its one child. */
class ForwardingFilterDriver extends PassThroughDriver {
  constructor(
    readonly name: JobFilterDriverName,
    readonly filteredRole: 'file' | 'backing',
    child: () => BlockIO,
    private readonly childNode: BlockNode,
    /** Named automatically (QEMU marks such filters implicit). */
    private readonly implicit: boolean,
  ) {
    super(child, childNode.driver);
  }

  /**
   * QSD: a named copy-on-read filter shows a `json:` filename; the others, and an implicit one
   * (no filter-node-name), show the child's file name.
   */
  override describeFilename(): string {
    if (this.name !== 'copy-on-read' || this.implicit) return super.describeFilename();
    return `json:${qemuJson({ driver: this.name, file: nodeJson(this.childNode) })}`;
  }
}

/** The options of `node` as QEMU prints them in a `json:` filename (format over file). */
function nodeJson(node: BlockNode): unknown {
  const own = node.driver.jsonOptions?.();
  if (own) return own;
  const file = node.children.find((c) => c.name === 'file')?.user.node;
  if (!file) return node.driver.describeFilename();
  return { driver: node.driverName, file: nodeJson(file) };
}

/** What a job's options say about its filter: where to register it and its name. */
export interface JobFilterSpec {
  graph: ImplicitNodes;
  /** `filter-node-name`; absent: an automatic name. */
  name: string | undefined;
}

export interface JobFilterOptions {
  graph: ImplicitNodes;
  /** The node the filter goes above. */
  child: BlockNode;
  driverName: JobFilterDriverName;
  /** The filter's edge to the child (QEMU: copy-before-write and copy-on-read `file`, commit_top `backing`). */
  role: 'file' | 'backing';
  /** `filter-node-name`; absent: an automatic name. */
  name: string | undefined;
  /** Move the child's parents (those `moveUser` accepts, default all) onto the filter while it exists. */
  moveUsers: boolean;
  moveUser?: (u: BlockUserImpl) => boolean;
  readOnly: boolean;
  /** Op blocker put on the filter (QSD: the job's, so other jobs cannot start on it). */
  blocker?: string;
  /** Put before a name error (QSD: `Could not create node: ` for backup and stream). */
  errorPrefix?: string;
  /**
   * copy-before-write: the backup target as the filter's `target` child, as in QSD's graph. The
   * edge takes no permissions (the job holds the target through its own user).
   */
  target?: BlockNode;
}

/** A job's filter node in the graph; `remove` takes it out again (idempotent). */
export class JobFilter {
  private moved: BlockUserImpl[] = [];
  private removed = false;

  private constructor(
    private readonly o: JobFilterOptions,
    readonly node: BlockNodeImpl,
  ) {}

  /** Register the filter node, link it to the child and move the child's users onto it. */
  static insert(o: JobFilterOptions): JobFilter {
    const child = o.child as BlockNodeImpl;
    const accept = o.moveUser ?? ((): boolean => true);
    const parents = o.moveUsers ? child.parents.filter(accept) : [];
    let edge: BlockUserImpl | undefined;
    let node: BlockNodeImpl;
    try {
      node = adopt(o, child, () => {
        if (!edge) throw new BlockError('DETACHED', 'EIO', 'job filter has no child');
        return edge.io;
      });
    } catch (err) {
      if (o.errorPrefix && err instanceof BlockError) {
        throw new BlockError(err.code, err.errno, `${o.errorPrefix}${err.message}`);
      }
      throw err;
    }
    const f = new JobFilter(o, node);
    try {
      edge = node.addChild(o.role, child);
      if (o.target) node.addChild('target', o.target as BlockNodeImpl);
      for (const u of parents) {
        relink(u, node);
        f.moved.push(u);
      }
      if (o.blocker) node.blockers.add(o.blocker);
    } catch (err) {
      f.remove();
      throw err;
    }
    return f;
  }

  /** Move the users back onto the child and take the filter out of the graph. */
  remove(): void {
    if (this.removed) return;
    this.removed = true;
    const child = this.o.child as BlockNodeImpl;
    for (const u of this.moved.splice(0)) {
      try {
        relink(u, child);
      } catch {
        // Moving back restores a state that was valid before the job.
      }
    }
    // Users added to the filter while the job ran (an export, a node) move down to the child.
    for (const u of [...this.node.parents]) {
      try {
        relink(u, child);
      } catch {
        // A user the child cannot take keeps pointing at the removed filter until it goes.
      }
    }
    for (const e of this.node.childEdges.splice(0)) e.user.detach();
    this.o.graph.forgetImplicit(this.node);
  }
}

/** The filtered child gets the filter's users' permissions; a `target` edge none. */
const jobFilterChildPerms: ChildPermFn = (role, perm, shared) =>
  role === 'target' ? { perm: 0, shared: PERM_ALL } : filterChildPerms(role, perm, shared);

function adopt(o: JobFilterOptions, child: BlockNodeImpl, io: () => BlockIO): BlockNodeImpl {
  return o.graph.adoptImplicit(
    (name) =>
      new BlockNodeImpl({
        name,
        driver: new ForwardingFilterDriver(o.driverName, o.role, io, child, o.name === undefined),
        readOnly: o.readOnly,
        monitorOwned: false,
        options: child.options,
        childPerms: jobFilterChildPerms,
      }),
    o.name,
  );
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
