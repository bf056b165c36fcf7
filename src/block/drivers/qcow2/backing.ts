/**
 * Backing chains in the graph: the `backing` child edge (permissions, op blocker), chain walking,
 * format probing of an auto-opened backing file (blockdev-snapshot's graph change is in
 * ../../snapshot-external.ts).
 */
import { open } from 'node:fs/promises';
import { BlockError } from '../../../util/errors.js';
import {
  formatChildPerms,
  type BlockNodeImpl,
  type BlockUserImpl,
  type ChildPermFn,
} from '../../node.js';
import { PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED } from '../../types.js';
import type { BlockNode } from '../../types.js';
import { QCOW_MAGIC } from './format.js';

export const BACKING_ROLE = 'backing';

/** The op blocker a backing node carries (QSD's text). */
export function backingBlocker(parent: BlockNode): string {
  return `node is used as backing hd of '${parent.name}'`;
}

/**
 * Child permissions of a qcow2 node. `file`: metadata must stay consistent, so nobody else may
 * write or resize it, and a writable node writes it. `backing`: read only, and others may write
 * (QEMU's default permissions for COW children).
 */
export function qcow2ChildPerms(writable: boolean): ChildPermFn {
  return (role, perm, shared) => {
    if (role === BACKING_ROLE) {
      const p = perm & PERM_CONSISTENT_READ;
      let s = (shared & PERM_WRITE) !== 0 ? PERM_WRITE | PERM_RESIZE : 0;
      s |= PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;
      return { perm: p, shared: s & PERM_ALL };
    }
    const base = formatChildPerms(role, perm, shared);
    return {
      perm: base.perm | PERM_CONSISTENT_READ | (writable ? PERM_WRITE | PERM_RESIZE : 0),
      shared: base.shared & ~(PERM_WRITE | PERM_RESIZE),
    };
  };
}

/** The backing node of `node`, if any. */
export function backingOf(node: BlockNode): BlockNode | undefined {
  return node.children.find((c) => c.name === BACKING_ROLE)?.user.node;
}

/** Number of backing layers below `node` (QEMU's backing_file_depth). */
export function backingDepth(node: BlockNode): number {
  let n = 0;
  let cur = backingOf(node);
  const seen = new Set<BlockNode>();
  while (cur && !seen.has(cur)) {
    seen.add(cur);
    n++;
    cur = backingOf(cur);
  }
  return n;
}

/** Whether `needle` is `node` or anywhere below it (children of every role). */
export function reaches(node: BlockNode, needle: BlockNode): boolean {
  const stack = [node];
  const seen = new Set<BlockNode>();
  while (stack.length) {
    const n = stack.pop() as BlockNode;
    if (n === needle) return true;
    if (seen.has(n)) continue;
    seen.add(n);
    for (const c of n.children) stack.push(c.user.node);
  }
  return false;
}

/** Link `child` as the backing of `parent` (loops refused). */
export function attachBacking(parent: BlockNodeImpl, child: BlockNodeImpl): BlockUserImpl {
  if (reaches(child, parent)) {
    throw new BlockError(
      'BAD_OPTION',
      'EINVAL',
      `Making '${child.name}' a backing child of '${parent.name}' would create a cycle`,
    );
  }
  if (parent.childEdges.some((e) => e.name === BACKING_ROLE)) {
    throw new BlockError('BAD_OPTION', 'EINVAL', `Node '${parent.name}' already has a backing child`);
  }
  const user = parent.addChild(BACKING_ROLE, child);
  child.blockers.add(backingBlocker(parent));
  return user;
}

/** Undo attachBacking's blocker when the edge goes away. */
export function detachBackingBlocker(parent: BlockNode, child: BlockNodeImpl): void {
  child.blockers.delete(backingBlocker(parent));
}

/** Probe an image file's format for a backing file without a recorded format (qcow2 or raw). */
export async function probeFormat(filename: string): Promise<string> {
  let fh;
  try {
    fh = await open(filename, 'r');
  } catch {
    return 'raw'; // the real open reports the error
  }
  try {
    const b = Buffer.alloc(4);
    const { bytesRead } = await fh.read(b, 0, 4, 0);
    return bytesRead === 4 && b.readUInt32BE(0) === QCOW_MAGIC ? 'qcow2' : 'raw';
  } finally {
    await fh.close();
  }
}
