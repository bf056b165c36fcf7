/**
 * External snapshots (blockdev-snapshot, blockdev-snapshot-sync): put an overlay on top of a
 * node. QEMU's external_snapshot_prepare checks, in its order, then bdrv_append: the overlay
 * gets the old node as its backing child and takes over every other parent of the old node
 * (exports, jobs, parent nodes), so writes go to the overlay and reads of what it does not
 * have fall through to the old node. The commit makes the old node read-only (graph.setReadOnly).
 */
import { BlockError } from '../util/errors.js';
import { BlockNodeImpl, type BlockUserImpl } from './node.js';
import { BACKING_ROLE, attachBacking, backingOf, detachBackingBlocker } from './drivers/qcow2/backing.js';
import { PERM_CONSISTENT_READ, type BlockNode } from './types.js';

/** Drivers that can have a backing child. */
const SUPPORTS_BACKING: ReadonlySet<string> = new Set(['qcow2']);
/** Filter drivers (QEMU: "Filters cannot be used as overlays"). */
const FILTERS: ReadonlySet<string> = new Set(['copy-before-write']);

function impl(n: BlockNode): BlockNodeImpl {
  if (!(n instanceof BlockNodeImpl)) throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `unknown node '${n.name}'`);
  return n;
}

/** The snapshotted node must carry no op blocker (backing of another node, used by a job). */
export function checkSnapshotSource(node: BlockNode): void {
  const blocker = node.blockers.values().next();
  if (!blocker.done) throw new BlockError('BUSY', 'EBUSY', `Node '${node.name}' is busy: ${blocker.value}`);
}

/** The overlay checks of external_snapshot_prepare, QEMU's texts. */
export function checkOverlay(overlay: BlockNode): void {
  const o = impl(overlay);
  if ((o.cumulative().perm & PERM_CONSISTENT_READ) !== 0) {
    throw new BlockError('BAD_OPTION', 'EINVAL', 'The overlay is already in use');
  }
  if (FILTERS.has(o.driverName)) throw new BlockError('BAD_OPTION', 'EINVAL', 'Filters cannot be used as overlays');
  if (backingOf(o)) throw new BlockError('BAD_OPTION', 'EINVAL', 'The overlay already has a backing image');
  if (!SUPPORTS_BACKING.has(o.driverName)) {
    throw new BlockError('BAD_OPTION', 'EINVAL', 'The overlay does not support backing images');
  }
}

/**
 * bdrv_append: link `node` as the backing of `overlay` and move every parent of `node` onto
 * `overlay`. Permission conflicts undo everything. Returns the undo (transaction abort).
 */
export function appendOverlay(nodeRef: BlockNode, overlayRef: BlockNode): () => void {
  const node = impl(nodeRef);
  const overlay = impl(overlayRef);
  const movers = [...node.parents];
  attachBacking(overlay, node);
  const moved: BlockUserImpl[] = [];
  const undo = (): void => {
    for (const u of moved.reverse()) {
      try {
        u.moveTo(node);
      } catch {
        // Moving back restores a state that was valid before.
      }
    }
    moved.length = 0;
    const i = overlay.childEdges.findIndex((e) => e.name === BACKING_ROLE);
    if (i >= 0) {
      const [e] = overlay.childEdges.splice(i, 1);
      e?.user.detach();
    }
    detachBackingBlocker(overlay, node);
  };
  try {
    for (const u of movers) {
      u.moveTo(overlay);
      moved.push(u);
    }
  } catch (err) {
    undo();
    throw err;
  }
  return undo;
}
