/**
 * Changing the read-only state of open nodes (QEMU's bdrv_reopen_multiple for `read-only`):
 * blockdev-reopen and the commit of an external snapshot (the old top becomes read-only).
 *
 * A set of changes is applied all or nothing. Nodes becoming read-only go parents first: the
 * node is flushed, no user may still hold write or resize, then its child edges drop those
 * permissions (image locks follow) and the driver reopens. Nodes becoming writable go children
 * first, so that the child is writable when the parent asks for write on it. Any failure undoes
 * the steps already done, in reverse.
 */
import { BlockError } from '../util/errors.js';
import type { BlockNodeImpl, NodeOptionsInfo } from './node.js';
import { PERM_RESIZE, PERM_WRITE, type BlockDriver } from './types.js';

/** A driver that can change its access mode while open (file: a new descriptor). */
export interface ReopenableDriver {
  reopen(readOnly: boolean): Promise<void>;
}

function reopenable(d: BlockDriver): d is BlockDriver & ReopenableDriver {
  return typeof (d as Partial<ReopenableDriver>).reopen === 'function';
}

/**
 * Reopen a node's driver by closing it and opening it again (graph.reopenDriver): for drivers
 * without their own `reopen` whose state depends on being writable (qcow2: refcounts, caches).
 */
export type DriverSwap = (node: BlockNodeImpl, readOnly: boolean) => Promise<void>;

/** Drivers with no state that depends on being writable: the node's flag is all there is. */
const NO_REOPEN_STATE: ReadonlySet<string> = new Set(['raw', 'null-co', 'null-aio', 'copy-before-write', 'throttle']);

export interface ReadOnlyChange {
  node: BlockNodeImpl;
  readOnly: boolean;
  /**
   * The node's options once the change is done (default: the old ones with `read-only` set,
   * which makes it the node's own). Children that follow their parent keep their options: they
   * go on inheriting.
   */
  options?: Readonly<Record<string, unknown>>;
  /** Node-level options that change with it (blockdev-reopen: detect-zeroes, discard, auto-read-only). */
  nodeOptions?: Partial<NodeOptionsInfo>;
}

/** Whether `anc` is `node` or above it (a parent, grand-parent, ... through any role). */
function isAncestor(anc: BlockNodeImpl, node: BlockNodeImpl): boolean {
  const stack = [anc];
  const seen = new Set<BlockNodeImpl>();
  while (stack.length) {
    const n = stack.pop() as BlockNodeImpl;
    if (n === node) return true;
    if (seen.has(n)) continue;
    seen.add(n);
    for (const e of n.childEdges) stack.push(e.user.node);
  }
  return false;
}

/** Sort so that ancestors come first. */
function parentsFirst(list: BlockNodeImpl[]): BlockNodeImpl[] {
  const out: BlockNodeImpl[] = [];
  const rest = [...list];
  while (rest.length) {
    const i = rest.findIndex((n) => !rest.some((o) => o !== n && isAncestor(o, n)));
    const [n] = rest.splice(i < 0 ? 0 : i, 1);
    if (n) out.push(n);
  }
  return out;
}

/**
 * The nodes that follow `node` when it is reopened: inline children (not monitor-owned) other
 * than backing files, recursively, unless their own options set `read-only`.
 */
export function inheritingChildren(node: BlockNodeImpl): BlockNodeImpl[] {
  const out: BlockNodeImpl[] = [];
  const walk = (n: BlockNodeImpl): void => {
    for (const e of n.childEdges) {
      const c = e.user.node as BlockNodeImpl;
      if (e.name === 'backing' || c.monitorOwned || out.includes(c)) continue;
      if (c.openOptions['read-only'] !== undefined) continue;
      out.push(c);
      walk(c);
    }
  };
  walk(node);
  return out;
}

/** Drivers reopened by closing and opening them again. */
const SWAPPED: ReadonlySet<string> = new Set(['qcow2']);

/** Refuse up front what the driver cannot do (QEMU's text). */
function checkSupported(node: BlockNodeImpl): void {
  if (reopenable(node.driver) || NO_REOPEN_STATE.has(node.driverName) || SWAPPED.has(node.driverName)) return;
  throw new BlockError(
    'NOT_SUPPORTED',
    'ENOTSUP',
    `Block format '${node.driverName}' used by node '${node.name}' does not support reopening files`,
  );
}

/** The driver's part of a reopen. */
async function reopenDriver(n: BlockNodeImpl, readOnly: boolean, swap: DriverSwap): Promise<void> {
  if (reopenable(n.driver)) await n.driver.reopen(readOnly);
  else if (SWAPPED.has(n.driverName)) await swap(n, readOnly);
}

/** Apply the changes all or nothing. Changes that match the current state are skipped. */
export async function applyReadOnly(changes: readonly ReadOnlyChange[], swap: DriverSwap): Promise<void> {
  const todo = changes.filter((c) => c.node.readOnly !== c.readOnly);
  for (const c of todo) checkSupported(c.node);
  const toRo = parentsFirst(todo.filter((c) => c.readOnly).map((c) => c.node));
  const toRw = parentsFirst(todo.filter((c) => !c.readOnly).map((c) => c.node)).reverse();
  const undo: (() => Promise<void> | void)[] = [];
  try {
    for (const n of toRo) {
      await n.io.flush();
      // Parents going read-only in this set came first and have dropped write already.
      if (n.parents.some((u) => (u.perm & (PERM_WRITE | PERM_RESIZE)) !== 0)) {
        throw new BlockError('READ_ONLY', 'EPERM', `Read-only block node '${n.name}' cannot support read-write users`);
      }
      // The driver first (qcow2 writes back and marks the image clean while it may still write).
      await reopenDriver(n, true, swap);
      undo.push(() => reopenDriver(n, false, swap));
      n.setReadOnly(true);
      undo.push(() => {
        n.setReadOnly(false);
        n.refreshPerms();
      });
      n.refreshPerms();
    }
    for (const n of toRw) {
      // Permissions first: the children must grant write before a writable driver opens.
      n.setReadOnly(false);
      undo.push(() => {
        n.setReadOnly(true);
        n.refreshPerms();
      });
      n.refreshPerms();
      await reopenDriver(n, false, swap);
      undo.push(() => reopenDriver(n, true, swap));
    }
    for (const c of changes) {
      c.node.openOptions = c.options ?? { ...c.node.openOptions, 'read-only': c.readOnly };
      if (c.nodeOptions) Object.assign(c.node.options, c.nodeOptions);
    }
  } catch (err) {
    for (const u of undo.reverse()) {
      try {
        await u();
      } catch {
        // Best effort: restoring a state that held before.
      }
    }
    throw err;
  }
}

/** Options every driver takes that identify the node. */
const FIXED_KEYS = ['driver', 'node-name'];
/** Node-level options blockd changes besides `read-only` (handled by nodeOptionsOf). */
const NODE_KEYS = ['detect-zeroes', 'discard', 'auto-read-only'];

/**
 * The node-level options of a reopen entry: as QEMU, an absent `detect-zeroes` is `off` and an
 * absent `auto-read-only` false; an absent `discard` keeps the current policy (inline children
 * get theirs from the parent at open). A `file` node keeps its discard policy (its descriptor
 * decides at open whether it punches holes).
 */
function nodeOptionsOf(node: BlockNodeImpl, o: Record<string, unknown>): Partial<NodeOptionsInfo> {
  const dz = (o['detect-zeroes'] ?? 'off') as NodeOptionsInfo['detectZeroes'];
  const discard = (o['discard'] ?? node.options.discard) as NodeOptionsInfo['discard'];
  if (discard !== node.options.discard && node.driverName === 'file') throw cannotChange('discard');
  if (dz === 'unmap' && discard !== 'unmap') {
    throw new BlockError(
      'BAD_OPTION',
      'EINVAL',
      'setting detect-zeroes to unmap is not allowed without setting discard operation to unmap',
    );
  }
  return { detectZeroes: dz, discard, autoReadOnly: o['auto-read-only'] === true };
}

function sameValue(a: unknown, b: unknown): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

function cannotChange(key: string): BlockError {
  return new BlockError('BAD_OPTION', 'EINVAL', `Cannot change the option '${key}'`);
}

/**
 * blockdev-reopen: turn a list of full BlockdevOptions (already schema-checked) into read-only
 * changes, with QSD's errors for a missing node-name, an unknown node and a changed driver.
 * blockd can change `read-only` only: any other option must keep the value it was opened with
 * and children must be given by the name of the current child ("Cannot change the option 'X'").
 * Inline children that inherit from a listed node and are not listed follow its read-only state.
 */
export function planReopen(
  list: readonly Record<string, unknown>[],
  lookup: (name: string) => BlockNodeImpl | undefined,
): ReadOnlyChange[] {
  const wanted = new Map<BlockNodeImpl, Record<string, unknown>>();
  for (const o of list) {
    const name = o['node-name'];
    if (typeof name !== 'string') throw new BlockError('BAD_OPTION', 'EINVAL', 'node-name not specified');
    const node = lookup(name);
    if (!node) throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Failed to find node with node-name='${name}'`);
    if (o['driver'] !== node.driverName) throw cannotChange('driver');
    const roles = new Set(node.childEdges.map((e) => e.name));
    const old = node.openOptions;
    const keys = new Set([...Object.keys(o), ...Object.keys(old)]);
    for (const k of keys) {
      if (FIXED_KEYS.includes(k) || NODE_KEYS.includes(k) || k === 'read-only') continue;
      if (roles.has(k) || k === 'backing') {
        const child = node.childEdges.find((e) => e.name === k)?.user.node;
        const v = o[k];
        // An absent backing keeps the current one (QEMU: no change without the option).
        if (v === undefined && k === 'backing') continue;
        if (v === null && !child) continue;
        if (typeof v !== 'string' || v !== child?.name) throw cannotChange(k);
        continue;
      }
      if (!sameValue(o[k], old[k])) throw cannotChange(k);
    }
    wanted.set(node, o);
  }
  const out: ReadOnlyChange[] = [...wanted].map(([node, o]) => ({
    node,
    readOnly: o['read-only'] === true,
    options: o,
    nodeOptions: nodeOptionsOf(node, o),
  }));
  // Children inherit only a `read-only` the parent's entry states (QEMU copies it as a default
  // into the child's options): without it they keep their state, so making a parent writable
  // again needs its read-only child listed too.
  for (const [node, o] of wanted) {
    if (o['read-only'] === undefined) continue;
    for (const c of inheritingChildren(node)) {
      if (!wanted.has(c) && !out.some((x) => x.node === c)) {
        out.push({ node: c, readOnly: o['read-only'] === true, options: c.openOptions });
      }
    }
  }
  return out;
}
