/**
 * A node of the graph, its users (parents, exports, jobs) and QEMU-style permissions.
 *
 * Permissions propagate downwards: a node's cumulative permissions are the union of what its
 * users hold; format/filter nodes pass them on to their children (`childPerms`). Every change is
 * checked first against the other users of the node and the driver (file: image locks) and rolled
 * back on conflict, so a refused attach leaves nothing behind.
 */
import { BlockError } from '../util/errors.js';
import { NodeIO } from './io.js';
import {
  PERM_ALL,
  PERM_CONSISTENT_READ,
  PERM_RESIZE,
  PERM_WRITE,
  PERM_WRITE_UNCHANGED,
  type BlockChild,
  type BlockDriver,
  type BlockIO,
  type BlockNode,
  type BlockPerms,
  type BlockUser,
  type BlockUserSpec,
} from './types.js';

export const PERM_NAMES: readonly [number, string][] = [
  [PERM_CONSISTENT_READ, 'consistent read'],
  [PERM_WRITE, 'write'],
  [PERM_WRITE_UNCHANGED, 'write unchanged'],
  [PERM_RESIZE, 'resize'],
];

export function permBits(p: BlockPerms): number {
  return (
    (p.consistentRead ? PERM_CONSISTENT_READ : 0) |
    (p.write ? PERM_WRITE : 0) |
    (p.writeUnchanged ? PERM_WRITE_UNCHANGED : 0) |
    (p.resize ? PERM_RESIZE : 0)
  );
}

export function permsOf(bits: number): BlockPerms {
  return {
    consistentRead: (bits & PERM_CONSISTENT_READ) !== 0,
    write: (bits & PERM_WRITE) !== 0,
    writeUnchanged: (bits & PERM_WRITE_UNCHANGED) !== 0,
    resize: (bits & PERM_RESIZE) !== 0,
  };
}

export function permNames(bits: number): string {
  return PERM_NAMES.filter(([b]) => bits & b)
    .map(([, n]) => n)
    .join(', ');
}

/** How a node passes its users' permissions on to a child (QEMU's bdrv_child_perm). */
export type ChildPermFn = (role: string, perm: number, shared: number) => { perm: number; shared: number };

/**
 * Format drivers whose child holds the guest data as is (raw): pass permissions through. What
 * the users do not share (an export never shares resize) is not shared further down; with no
 * users everything is shared (QEMU's raw_child_perm, as x-debug-query-block-graph shows it).
 * Drivers with metadata in the child (qcow2) add their own restrictions on top.
 */
export const formatChildPerms: ChildPermFn = (_role, perm, shared) => ({ perm, shared });

/** Filters: pass everything through unchanged. */
export const filterChildPerms: ChildPermFn = (_role, perm, shared) => ({ perm, shared });

export interface NodeInit {
  name: string;
  driver: BlockDriver;
  readOnly: boolean;
  monitorOwned: boolean;
  /** The options as given (after defaults), for query output. */
  options: NodeOptionsInfo;
  childPerms?: ChildPermFn;
  /** Child permissions that depend on whether the node is writable (re-derived on reopen). */
  childPermsFor?: (writable: boolean) => ChildPermFn;
  /** The blockdev options the node was opened with (blockdev-reopen compares against them). */
  openOptions?: Readonly<Record<string, unknown>>;
}

/** Node options other layers and the query need. */
export interface NodeOptionsInfo {
  cacheDirect: boolean;
  cacheNoFlush: boolean;
  discard: 'ignore' | 'unmap';
  detectZeroes: 'off' | 'on' | 'unmap';
  forceShare: boolean;
  autoReadOnly: boolean;
}

/** Creation counter of users: x-debug-query-block-graph lists backends in creation order. */
let userSeq = 0;

export class BlockUserImpl implements BlockUser {
  /** Creation order among all users. */
  readonly seq = userSeq++;
  perm: number;
  shared: number;
  private attached = true;
  onNodeChanged?: (oldNode: BlockNode, newNode: BlockNode) => void;

  constructor(
    readonly spec: Readonly<BlockUserSpec>,
    public node: BlockNodeImpl,
  ) {
    this.perm = permBits(spec.perm);
    this.shared = permBits(spec.shared);
  }

  get io(): BlockIO {
    return this.node.io;
  }

  get isAttached(): boolean {
    return this.attached;
  }

  /** How permission errors name this user. */
  describe(): string {
    return `${this.spec.name} (uses node '${this.node.name}' as '${this.spec.role ?? 'root'}' child)`;
  }

  setPerms(perm: BlockPerms, shared: BlockPerms): void {
    if (!this.attached) throw new BlockError('DETACHED', 'EINVAL', 'block user is detached');
    this.node.changeUser(this, permBits(perm), permBits(shared));
  }

  /** Bit-level variant used for propagation. */
  setPermBits(perm: number, shared: number): void {
    this.node.changeUser(this, perm, shared);
  }

  detach(): void {
    if (!this.attached) return;
    this.attached = false;
    this.node.removeUser(this);
  }

  /** Graph-internal: move this user onto another node, keeping its permissions. */
  moveTo(target: BlockNodeImpl): void {
    const old = this.node;
    target.addUser(this);
    old.removeUser(this);
    this.node = target;
    this.onNodeChanged?.(old, target);
  }
}

export class BlockNodeImpl implements BlockNode {
  readonly name: string;
  private drv: BlockDriver;
  /** Created by a top-level blockdev-add (false for inline children and implicit overlays). */
  monitorOwned: boolean;
  readonly io: NodeIO;
  readonly options: NodeOptionsInfo;
  readonly blockers = new Set<string>();
  readonly childEdges: { name: string; user: BlockUserImpl }[] = [];
  private readonly users: BlockUserImpl[] = [];
  private ro: boolean;
  private childPerms: ChildPermFn;
  private readonly childPermsFor: ((writable: boolean) => ChildPermFn) | undefined;
  /** The blockdev options the node was opened with (empty when unknown). */
  openOptions: Readonly<Record<string, unknown>>;
  /** Permissions currently applied to the driver (for rollback). */
  private appliedPerm = 0;
  private appliedShared = PERM_ALL;

  constructor(init: NodeInit) {
    this.name = init.name;
    this.drv = init.driver;
    this.ro = init.readOnly;
    this.monitorOwned = init.monitorOwned;
    this.options = init.options;
    this.childPermsFor = init.childPermsFor;
    this.childPerms = init.childPermsFor?.(!init.readOnly) ?? init.childPerms ?? formatChildPerms;
    this.openOptions = init.openOptions ?? {};
    this.io = new NodeIO(this, init.driver);
  }

  get driver(): BlockDriver {
    return this.drv;
  }

  get driverName(): string {
    return this.drv.name;
  }

  /**
   * Graph-internal (reopen, inside `io.exclusive`): the node's driver is now `driver`, opened
   * over the same children; the old one has been closed.
   */
  replaceDriver(driver: BlockDriver): void {
    this.drv = driver;
    this.io.replaceDriver(driver);
  }

  get readOnly(): boolean {
    return this.ro;
  }

  get children(): readonly BlockChild[] {
    return this.childEdges;
  }

  get parents(): readonly BlockUserImpl[] {
    return this.users;
  }

  size(): number {
    return this.driver.getLength();
  }

  /** Union of the permissions the users hold, and intersection of what they share. */
  cumulative(exclude?: BlockUserImpl): { perm: number; shared: number } {
    let perm = 0;
    let shared = PERM_ALL;
    for (const u of this.users) {
      if (u === exclude) continue;
      perm |= u.perm;
      shared &= u.shared;
    }
    return { perm, shared };
  }

  attach(spec: BlockUserSpec): BlockUserImpl {
    const user = new BlockUserImpl(spec, this);
    this.addUser(user);
    return user;
  }

  /** Attach an existing user object (used by attach() and by graph moves). */
  addUser(user: BlockUserImpl): void {
    this.checkAgainstUsers(user, user.perm, user.shared);
    this.users.push(user);
    try {
      this.refreshPerms();
    } catch (err) {
      this.users.splice(this.users.indexOf(user), 1);
      this.refreshPermsBestEffort();
      throw err;
    }
  }

  removeUser(user: BlockUserImpl): void {
    const i = this.users.indexOf(user);
    if (i < 0) return;
    this.users.splice(i, 1);
    // Dropping permissions cannot conflict.
    this.refreshPermsBestEffort();
    if (this.users.length === 0) this.onUnused?.();
  }

  /** Called when the last user goes (the graph closes implicitly created nodes then). */
  onUnused: (() => void) | undefined;

  changeUser(user: BlockUserImpl, perm: number, shared: number): void {
    this.checkAgainstUsers(user, perm, shared);
    const old = { perm: user.perm, shared: user.shared };
    user.perm = perm;
    user.shared = shared;
    try {
      this.refreshPerms();
    } catch (err) {
      user.perm = old.perm;
      user.shared = old.shared;
      this.refreshPermsBestEffort();
      throw err;
    }
  }

  private checkAgainstUsers(user: BlockUserImpl, perm: number, shared: number): void {
    if (perm & (PERM_WRITE | PERM_RESIZE) && this.ro) {
      throw new BlockError('READ_ONLY', 'EPERM', 'Block node is read-only');
    }
    for (const other of this.users) {
      if (other === user) continue;
      const a = perm & ~other.shared;
      if (a) throw this.conflict(a, user, other);
      const b = other.perm & ~shared;
      if (b) throw this.conflict(b, other, user);
    }
  }

  private conflict(bits: number, requiredBy: BlockUserImpl, unsharedBy: BlockUserImpl): BlockError {
    const fmt = (u: BlockUserImpl): string =>
      `${u.spec.name} (uses node '${this.name}' as '${u.spec.role ?? 'root'}' child)`;
    return new BlockError(
      'PERM_CONFLICT',
      'EPERM',
      `Permission conflict on node '${this.name}': permissions '${permNames(bits)}' are both required by ` +
        `${fmt(requiredBy)} and unshared by ${fmt(unsharedBy)}.`,
    );
  }

  /** Apply the cumulative permissions to the driver and the children; throws on conflict. */
  refreshPerms(): void {
    const { perm, shared } = this.cumulative();
    this.driver.checkPerms?.(perm, shared);
    const done: { user: BlockUserImpl; perm: number; shared: number }[] = [];
    try {
      for (const edge of this.childEdges) {
        const want = this.childPerms(edge.name, perm, shared);
        const prev = { user: edge.user, perm: edge.user.perm, shared: edge.user.shared };
        if (want.perm !== prev.perm || want.shared !== prev.shared) {
          edge.user.setPermBits(want.perm, want.shared);
          done.push(prev);
        }
      }
    } catch (err) {
      for (const d of done.reverse()) {
        try {
          d.user.setPermBits(d.perm, d.shared);
        } catch {
          // Restoring earlier permissions cannot conflict.
        }
      }
      throw err;
    }
    this.driver.setPerms?.(perm, shared);
    this.appliedPerm = perm;
    this.appliedShared = shared;
  }

  private refreshPermsBestEffort(): void {
    try {
      this.refreshPerms();
    } catch {
      // Only reached when restoring a state that was valid before.
    }
  }

  /** Graph-internal: attach `child` as a child edge with the role `role`. */
  addChild(role: string, child: BlockNodeImpl): BlockUserImpl {
    const { perm, shared } = this.cumulative();
    const want = this.childPerms(role, perm, shared);
    const user = child.attach({
      name: `node '${this.name}'`,
      role,
      kind: 'node',
      parent: this,
      perm: permsOf(want.perm),
      shared: permsOf(want.shared),
    });
    this.childEdges.push({ name: role, user });
    return user;
  }

  /** Whether a user of kind 'backend' (export, job) is attached. */
  hasBackendUsers(): boolean {
    return this.users.some((u) => u.spec.kind !== 'node');
  }

  hasParentNodes(): boolean {
    return this.users.some((u) => u.spec.kind === 'node');
  }

  /** For debugging/tests: the permissions last applied. */
  appliedPermissions(): { perm: number; shared: number } {
    return { perm: this.appliedPerm, shared: this.appliedShared };
  }

  /**
   * Change the read-only state (reopen). Child permissions that depend on it are derived
   * again; the caller refreshes permissions (refreshPerms) and rolls back on failure.
   */
  setReadOnly(ro: boolean): void {
    this.ro = ro;
    if (this.childPermsFor) this.childPerms = this.childPermsFor(!ro);
  }

  /** The permissions this node currently asks of the child edge `role` (reopen pre-checks). */
  wantedChildPerms(role: string): { perm: number; shared: number } {
    const { perm, shared } = this.cumulative();
    return this.childPerms(role, perm, shared);
  }
}
