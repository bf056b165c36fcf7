/**
 * The block node graph: registry, blockdev-add (children inline or by reference, QSD's option
 * inheritance and auto names), blockdev-del (QSD's checks and order), queries, shutdown.
 */
import { randomInt } from 'node:crypto';
import { BlockError } from '../util/errors.js';
import type { Logger } from '../util/logger.js';
import { FileDriver } from './drivers/file.js';
import { NullDriver } from './drivers/null.js';
import { RawDriver } from './drivers/raw.js';
import { CopyBeforeWriteDriver, cbwChildPerms } from './drivers/copy-before-write.js';
import { SnapshotAccessDriver, snapshotAccessChildPerms } from './drivers/snapshot-access.js';
import { ThrottleDriver } from './drivers/throttle.js';
import { ThrottleGroups } from './throttle-group.js';
import { Qcow2Driver } from './drivers/qcow2/qcow2.js';
import {
  BACKING_ROLE,
  attachBacking,
  backingOf,
  detachBackingBlocker,
  probeFormat,
  qcow2ChildPerms,
} from './drivers/qcow2/backing.js';
import { optError, type DriverOpenContext, type Options } from './drivers/common.js';
import { nativeLoadError } from './native.js';
import {
  describeBitmaps,
  existingBitmapsOf,
  isPersistentBitmapDriver,
  loadPersistentBitmaps,
  storePersistentBitmaps,
} from './dirty-bitmap-set.js';
import { BlockNodeImpl, filterChildPerms, formatChildPerms, type ChildPermFn, type NodeOptionsInfo } from './node.js';
import { debugBlockGraph, type XDbgGraph, type XDbgJob } from './graph-debug.js';
import { applyReadOnly, inheritingChildren, planReopen } from './reopen.js';
import type { BlockDriver, BlockIO, BlockNode } from './types.js';

/** Every value of QSD 7.2's BlockdevDriver enum, in its order. */
export const BLOCKDEV_DRIVERS = [
  'blkdebug', 'blklogwrites', 'blkreplay', 'blkverify', 'bochs', 'cloop', 'compress',
  'copy-before-write', 'copy-on-read', 'dmg', 'file', 'snapshot-access', 'ftp', 'ftps', 'gluster',
  'host_cdrom', 'host_device', 'http', 'https', 'iscsi', 'luks', 'nbd', 'nfs', 'null-aio',
  'null-co', 'nvme', 'parallels', 'preallocate', 'qcow', 'qcow2', 'qed', 'quorum', 'raw', 'rbd',
  'replication', 'ssh', 'throttle', 'vdi', 'vhdx', 'vmdk', 'vpc', 'vvfat',
] as const;

/** Node names: a letter, then letters, digits, '-', '.', '_'; at most 31 characters. */
const NODE_NAME_RE = /^[A-Za-z][A-Za-z0-9._-]*$/;
const NODE_NAME_MAX = 31;

/** Options an inline child inherits from its parent (QEMU's bdrv_inherited_options). */
interface Inherited {
  readOnly: boolean;
  autoReadOnly: boolean;
  cacheDirect: boolean;
  cacheNoFlush: boolean;
  forceShare: boolean;
}

/** How a driver is opened: its child members and the factory. */
interface DriverSpec {
  children: readonly { member: string; required: boolean }[];
  childPerms?: ChildPermFn;
  /** Child permissions that depend on whether the node is writable. */
  childPermsFor?: (writable: boolean) => ChildPermFn;
  /** The driver has a `backing` member (qcow2). */
  backing?: boolean;
  open(ctx: DriverOpenContext, opts: Options): Promise<BlockDriver>;
}

const DRIVERS: Partial<Record<string, DriverSpec>> = {
  file: { children: [], open: (ctx, o) => FileDriver.open(ctx, o) },
  raw: {
    children: [{ member: 'file', required: true }],
    childPerms: formatChildPerms,
    open: async (ctx, o) => new RawDriver(ctx, o),
  },
  qcow2: {
    children: [{ member: 'file', required: true }],
    childPermsFor: qcow2ChildPerms,
    backing: true,
    open: (ctx, o) => Qcow2Driver.open(ctx, o),
  },
  'copy-before-write': {
    children: [
      { member: 'file', required: true },
      { member: 'target', required: true },
    ],
    childPerms: cbwChildPerms,
    open: (ctx, o) => CopyBeforeWriteDriver.open(ctx, o),
  },
  'snapshot-access': {
    children: [{ member: 'file', required: true }],
    childPerms: snapshotAccessChildPerms,
    open: (ctx, o) => SnapshotAccessDriver.open(ctx, o),
  },
  'null-co': { children: [], open: async (_ctx, o) => new NullDriver('null-co', o) },
  'null-aio': { children: [], open: async (_ctx, o) => new NullDriver('null-aio', o) },
  throttle: {
    children: [{ member: 'file', required: true }],
    childPerms: filterChildPerms,
    open: (ctx, o) => ThrottleDriver.open(ctx, o),
  },
};

/**
 * A driver supplied from outside the block layer (the composition root registers them, e.g. the
 * `nbd` protocol driver, whose client lives in nbd/ which block/ may not import). No children.
 */
export type ExternalDriverOpen = (ctx: DriverOpenContext, opts: Options) => Promise<BlockDriver>;

/** Validate a user-supplied node name (QSD's texts). */
export function checkNodeName(name: string): void {
  if (!NODE_NAME_RE.test(name)) throw optError(`Invalid node-name: '${name}'`);
  if (name.length > NODE_NAME_MAX) throw optError('Node name too long');
}

export class BlockGraph {
  private readonly nodes = new Map<string, BlockNodeImpl>();
  /** Creation order, for newest-first queries and parent-first shutdown. */
  private order: BlockNodeImpl[] = [];
  private autoCounter = 0;

  private readonly external = new Map<string, DriverSpec>();

  /** Where drivers' QMP events go (set by the composition root; none = dropped). */
  eventSink: ((event: string, data: Record<string, unknown>) => void) | undefined;
  /** Throttle groups of the `throttle` nodes (limits from the throttle-group objects). */
  readonly throttleGroups = new ThrottleGroups();

  constructor(readonly log: Logger) {
    const why = nativeLoadError();
    if (why) log.debug({ reason: why }, 'native block addon not in use, using the JS fallback');
  }

  /** Make `driver` (a BlockdevDriver name) openable by `open` (see {@link ExternalDriverOpen}). */
  registerDriver(driver: (typeof BLOCKDEV_DRIVERS)[number], open: ExternalDriverOpen): void {
    this.external.set(driver, { children: [], open });
  }

  /** Look a node up by name. */
  get(name: string): BlockNode | undefined {
    return this.nodes.get(name);
  }

  /** Look a node up or fail with QSD's `Cannot find device='X' nor node-name='X'`. */
  find(name: string): BlockNode {
    const n = this.nodes.get(name);
    if (!n) {
      throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Cannot find device='${name}' nor node-name='${name}'`);
    }
    return n;
  }

  /** All nodes, newest first. */
  list(): BlockNode[] {
    return [...this.order].reverse();
  }

  private autoName(): string {
    // '#block' + per-process counter + two random digits (QSD's format; tools treat it as opaque).
    let name: string;
    do {
      name = `#block${this.autoCounter++}${String(randomInt(100)).padStart(2, '0')}`;
    } while (this.nodes.has(name));
    return name;
  }

  /**
   * blockdev-add: open a node and its inline children. On failure everything opened by this
   * call is closed again and the graph is unchanged.
   */
  async add(opts: Options): Promise<BlockNode> {
    if (opts['node-name'] === undefined) throw optError("'node-name' must be specified for the root node");
    return this.openTemporary(opts);
  }

  /**
   * Open a node and its inline children, all or nothing (what `add` does once the root has a
   * name). Also used alone for a node needed for the length of one operation (blockdev-create's
   * `file` given as options, like QEMU's temporary BlockdevRef open): auto-named unless the
   * options name it. Close such a node with `closeTemporary`.
   */
  async openTemporary(opts: Options): Promise<BlockNode> {
    const created: BlockNodeImpl[] = [];
    try {
      return await this.open(opts, undefined, created, 'root');
    } catch (err) {
      for (const n of created.reverse()) await this.destroy(n).catch(() => undefined);
      throw err;
    }
  }

  /**
   * Open a node as QEMU's bdrv_open does for an implicitly created node (the overlay of
   * blockdev-snapshot-sync): named, but not owned by the monitor (blockdev-del refuses it) and
   * gone once nothing uses it (`releaseUnused`).
   */
  async addImplicit(opts: Options): Promise<BlockNode> {
    const node = await this.add(opts);
    const n = this.impl(node);
    n.monitorOwned = false;
    n.onUnused = () => {
      this.releaseUnused(n).catch((err: unknown) => this.log.warn({ err, node: n.name }, 'could not close an unused node'));
    };
    return n;
  }

  /**
   * Close `node` if it is not owned by the monitor and has no users left (QEMU's last unref).
   * Resolves once it and the inline children only it used are closed, also when another call
   * started closing it (the unused hook and a transaction's clean step can both get here).
   */
  async releaseUnused(node: BlockNode): Promise<void> {
    const pending = this.releasing.get(node);
    if (pending) return pending;
    const n = this.nodes.get(node.name);
    // A job's filter node goes with its job, not with its last user.
    if (!n || n !== node || n.monitorOwned || n.parents.length > 0 || n.driver.filteredRole) return;
    const p = this.destroy(n).finally(() => this.releasing.delete(node));
    this.releasing.set(node, p);
    return p;
  }

  private readonly releasing = new Map<BlockNode, Promise<void>>();

  /** Close a node opened by `openTemporary` (and its inline children). */
  async closeTemporary(node: BlockNode): Promise<void> {
    const n = this.nodes.get(node.name);
    if (n && n === node) await this.destroy(n);
  }

  private async open(
    opts: Options,
    inherited: Inherited | undefined,
    created: BlockNodeImpl[],
    role: string,
  ): Promise<BlockNodeImpl> {
    const driverName = opts['driver'];
    if (driverName === undefined) throw optError("Parameter 'driver' is missing");
    if (typeof driverName !== 'string') throw optError("Invalid parameter type for 'driver', expected: string");
    if (!(BLOCKDEV_DRIVERS as readonly string[]).includes(driverName)) {
      throw optError(`Parameter 'driver' does not accept value '${driverName}'`);
    }
    const spec = DRIVERS[driverName] ?? this.external.get(driverName);
    if (!spec) throw optError(`Driver '${driverName}' is not supported by blockd`);

    // Name first (QEMU assigns it before the driver opens its children).
    let name: string;
    const given = opts['node-name'];
    if (given !== undefined) {
      if (typeof given !== 'string') throw optError("Invalid parameter type for 'node-name', expected: string");
      checkNodeName(given);
      if (this.nodes.has(given)) throw optError(`Duplicate nodes with node-name='${given}'`);
      name = given;
    } else {
      name = this.autoName();
    }

    const nodeOpts = this.effectiveOptions(opts, inherited, role);
    if (nodeOpts.forceShare && !nodeOpts.readOnly) {
      throw optError('force-share=on can only be used with read-only images');
    }
    // Reserve the name so that inline children cannot take it.
    const reserved = name;
    this.reserved.add(reserved);
    try {
      // Children: references must exist; inline definitions are opened now.
      const children: { role: string; node: BlockNodeImpl }[] = [];
      for (const c of spec.children) {
        const ref = opts[c.member];
        if (ref === undefined) {
          if (c.required) throw optError(`Parameter '${c.member}' is missing`);
          continue;
        }
        children.push({ role: c.member, node: await this.resolveChild(ref, c.member, nodeOpts, created) });
      }

      let nodeRef: BlockNodeImpl | undefined;
      const ctx: DriverOpenContext = {
        nodeName: name,
        readOnly: nodeOpts.readOnly,
        options: nodeOpts,
        log: this.log.child({ node: name }),
        childIO: (r) => {
          const edge = nodeRef?.childEdges.find((e) => e.name === r);
          const node = edge?.user.node ?? children.find((c) => c.role === r)?.node;
          if (!node) throw new BlockError('NO_CHILD', 'EIO', `node '${name}' has no '${r}' child`);
          return node.io;
        },
        childDriver: (r) => {
          const edge = nodeRef?.childEdges.find((e) => e.name === r);
          const node = edge?.user.node ?? children.find((c) => c.role === r)?.node;
          if (!node) throw new BlockError('NO_CHILD', 'EIO', `node '${name}' has no '${r}' child`);
          return node.driver;
        },
        hasChild: (r) =>
          (nodeRef?.childEdges.some((e) => e.name === r) ?? false) || children.some((c) => c.role === r),
        emitEvent: (event, data) => this.eventSink?.(event, data),
        throttleGroups: this.throttleGroups,
      };
      const driver = await spec.open(ctx, opts);
      const readOnly = driver instanceof FileDriver ? driver.readOnlyOpen : nodeOpts.readOnly;
      const node = new BlockNodeImpl({
        name,
        driver,
        readOnly,
        monitorOwned: inherited === undefined,
        options: nodeOpts,
        ...(spec.childPerms ? { childPerms: spec.childPerms } : {}),
        ...(spec.childPermsFor ? { childPermsFor: spec.childPermsFor } : {}),
        openOptions: opts,
      });
      nodeRef = node;
      this.register(node);
      created.push(node);
      for (const c of children) node.addChild(c.role, c.node);
      if (spec.backing) await this.openBacking(node, opts, nodeOpts, created);
      await loadPersistentBitmaps(node);
      this.log.debug({ node: name, driver: driverName }, 'block node opened');
      return node;
    } finally {
      this.reserved.delete(reserved);
    }
  }

  private readonly reserved = new Set<string>();

  /**
   * The `backing` member of a format node: absent = the chain recorded in the image (opened
   * read-only with automatic names), `null` (or deprecated "") = none, a name = that node,
   * an object = an inline node.
   */
  private async openBacking(
    node: BlockNodeImpl,
    opts: Options,
    parent: NodeOptionsInfo & Inherited,
    created: BlockNodeImpl[],
  ): Promise<void> {
    const ref = opts[BACKING_ROLE];
    if (ref === null || ref === '') return;
    let child: BlockNodeImpl;
    if (ref === undefined) {
      const req = node.driver instanceof Qcow2Driver ? node.driver.backingRequest() : undefined;
      if (!req) return;
      try {
        const driver = req.format ?? (await probeFormat(req.filename));
        child = await this.open({ driver, file: { driver: 'file', filename: req.filename } }, parent, created, BACKING_ROLE);
      } catch (err) {
        throw optError(`Could not open backing file: ${err instanceof Error ? err.message : String(err)}`);
      }
    } else if (typeof ref === 'string') {
      const n = this.nodes.get(ref);
      if (!n) throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Cannot find device='${ref}' nor node-name='${ref}'`);
      child = n;
    } else {
      child = await this.resolveChild(ref, BACKING_ROLE, parent, created);
    }
    attachBacking(node, child);
  }

  private register(node: BlockNodeImpl): void {
    this.nodes.set(node.name, node);
    this.order.push(node);
  }

  private effectiveOptions(opts: Options, inh: Inherited | undefined, role: string): NodeOptionsInfo & Inherited {
    const bool = (k: string): boolean | undefined => {
      const v = opts[k];
      if (v === undefined) return undefined;
      if (typeof v !== 'boolean') throw optError(`Invalid parameter type for '${k}', expected: boolean`);
      return v;
    };
    const cache = opts['cache'];
    if (cache !== undefined && (cache === null || typeof cache !== 'object' || Array.isArray(cache))) {
      throw optError("Invalid parameter type for 'cache', expected: object");
    }
    const c = (cache ?? {}) as Options;
    for (const k of Object.keys(c)) {
      if (k !== 'direct' && k !== 'no-flush') throw optError(`Parameter 'cache.${k}' is unexpected`);
    }
    const cbool = (k: string): boolean | undefined => {
      const v = c[k];
      if (v === undefined) return undefined;
      if (typeof v !== 'boolean') throw optError(`Invalid parameter type for 'cache.${k}', expected: boolean`);
      return v;
    };
    const en = <T extends string>(k: string, values: readonly T[]): T | undefined => {
      const v = opts[k];
      if (v === undefined) return undefined;
      if (typeof v !== 'string') throw optError(`Invalid parameter type for '${k}', expected: string`);
      if (!(values as readonly string[]).includes(v)) throw optError(`Parameter '${k}' does not accept value '${v}'`);
      return v as T;
    };
    if (bool('active') === false) throw optError("Option 'active=false' is not supported by blockd");
    const backing = role === 'backing';
    return {
      // Backing children default to read-only; other inline children inherit.
      readOnly: bool('read-only') ?? (backing ? true : (inh?.readOnly ?? false)),
      autoReadOnly: bool('auto-read-only') ?? (backing ? false : (inh?.autoReadOnly ?? false)),
      cacheDirect: cbool('direct') ?? inh?.cacheDirect ?? false,
      cacheNoFlush: cbool('no-flush') ?? inh?.cacheNoFlush ?? false,
      forceShare: bool('force-share') ?? inh?.forceShare ?? false,
      // Lower layers default to unmap; the parent's policy still filters what reaches them.
      discard: en('discard', ['ignore', 'unmap'] as const) ?? (inh ? 'unmap' : 'ignore'),
      detectZeroes: en('detect-zeroes', ['off', 'on', 'unmap'] as const) ?? 'off',
    };
  }

  private async resolveChild(
    ref: unknown,
    member: string,
    parent: NodeOptionsInfo & Inherited,
    created: BlockNodeImpl[],
  ): Promise<BlockNodeImpl> {
    if (typeof ref === 'string') {
      const n = this.nodes.get(ref);
      if (!n) throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Cannot find device='${ref}' nor node-name='${ref}'`);
      return n;
    }
    if (ref === null || typeof ref !== 'object' || Array.isArray(ref)) {
      throw optError(`Invalid parameter type for '${member}', expected: BlockdevRef`);
    }
    const childOpts = ref as Options;
    const given = childOpts['node-name'];
    if (typeof given === 'string' && this.reserved.has(given)) {
      throw optError(`Duplicate nodes with node-name='${given}'`);
    }
    return this.open(childOpts, parent, created, member);
  }

  /**
   * blockdev-del: checks in QSD's order (in use by an export/job, op blockers, not owned by the
   * monitor, used as a child), then closes the node and the inline children only it used.
   */
  async del(name: string): Promise<void> {
    const node = this.nodes.get(name);
    if (!node) throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Failed to find node with node-name='${name}'`);
    if (node.hasBackendUsers()) throw new BlockError('IN_USE', 'EBUSY', `Node ${name} is in use`);
    const blocker = node.blockers.values().next();
    if (!blocker.done) throw new BlockError('BUSY', 'EBUSY', `Node '${name}' is busy: ${blocker.value}`);
    if (!node.monitorOwned) throw new BlockError('NOT_OWNED', 'EPERM', `Node ${name} is not owned by the monitor`);
    if (node.hasParentNodes()) throw new BlockError('IN_USE', 'EBUSY', `Block device ${name} is in use`);
    await this.destroy(node);
  }

  /** Close a node, detach its children and take unowned children with no other parent along. */
  private async destroy(node: BlockNodeImpl): Promise<void> {
    if (!this.nodes.has(node.name)) return;
    this.nodes.delete(node.name);
    this.order = this.order.filter((n) => n !== node);
    try {
      await storePersistentBitmaps(node);
    } catch (err) {
      this.log.warn({ err, node: node.name }, 'could not store persistent dirty bitmaps');
    }
    try {
      await node.driver.close();
    } catch (err) {
      this.log.warn({ err, node: node.name }, 'error closing block node');
    }
    const edges = node.childEdges.splice(0);
    for (const e of edges) {
      const child = e.user.node;
      if (e.name === BACKING_ROLE) detachBackingBlocker(node, child);
      e.user.detach();
      if (!child.monitorOwned && child.parents.length === 0 && !child.driver.filteredRole) await this.destroy(child);
    }
    this.log.debug({ node: node.name }, 'block node closed');
  }

  /** blockdev-reopen: full options per node; blockd changes `read-only` only (reopen.ts). */
  async reopen(list: readonly Options[]): Promise<void> {
    await applyReadOnly(planReopen(list, (name) => this.nodes.get(name)), (n, ro) => this.reopenDriver(n, ro));
  }

  /**
   * Make a node read-only or writable with the inline children that inherit from it (QEMU's
   * bdrv_reopen_set_read_only: the external snapshot commit); see reopen.ts.
   */
  async setReadOnly(node: BlockNode, readOnly: boolean): Promise<void> {
    const n = this.impl(node);
    const list = [
      { node: n, readOnly },
      ...inheritingChildren(n).map((c) => ({ node: c, readOnly, options: c.openOptions })),
    ];
    await applyReadOnly(list, (x, ro) => this.reopenDriver(x, ro));
  }

  private impl(node: BlockNode): BlockNodeImpl {
    const n = this.nodes.get(node.name);
    if (!n || n !== node) throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Failed to find node with node-name='${node.name}'`);
    return n;
  }

  /**
   * Close the driver of `node` and open the same driver again over the same children, read-only
   * or not, while I/O to the node waits. `between` runs with no driver open, on the `file`
   * child (offline edits of the image: internal snapshots, the backing file name). If the new
   * open fails, the node is opened again as it was and the error is thrown. Persistent dirty
   * bitmaps stay in memory: a writable driver stores them before closing and the new one
   * takes them up again (marks them in use when writable; they are read-only when it is not).
   */
  async reopenDriver(node: BlockNode, readOnly: boolean, between?: (file: BlockIO) => Promise<void>): Promise<void> {
    const n = this.impl(node);
    const spec = DRIVERS[n.driverName];
    if (!spec) throw new BlockError('NOT_SUPPORTED', 'ENOTSUP', `Block format '${n.driverName}' used by node '${n.name}' does not support reopening files`);
    // The driver's own mode (the node's flag may already have changed: reopen.ts).
    const wasReadOnly = n.driver instanceof Qcow2Driver ? !n.driver.writable : n.readOnly;
    const opts = n.openOptions as Options;
    await n.io.exclusive(async () => {
      await n.driver.flush();
      if (!wasReadOnly) await storePersistentBitmaps(n);
      await n.driver.close();
      let firstErr: unknown;
      try {
        if (between) {
          const file = n.childEdges.find((e) => e.name === 'file')?.user.node;
          if (!file) throw new BlockError('NO_CHILD', 'EIO', `node '${n.name}' has no 'file' child`);
          await between(file.io);
        }
        n.replaceDriver(await spec.open(this.reopenContext(n, readOnly), opts));
        await this.retakeBitmaps(n);
        return;
      } catch (err) {
        firstErr = err;
      }
      try {
        n.replaceDriver(await spec.open(this.reopenContext(n, wasReadOnly), opts));
        await this.retakeBitmaps(n);
      } catch (err) {
        // The node stays without a working driver: every request fails from now on.
        this.log.error({ err, node: n.name }, 'could not open the node again after a failed reopen');
      }
      throw firstErr;
    });
  }

  /** After a reopen: the new driver loads the bitmap directory; the bitmaps in memory stay. */
  private async retakeBitmaps(n: BlockNodeImpl): Promise<void> {
    const d = n.driver;
    if (!isPersistentBitmapDriver(d)) return;
    const loaded = await d.loadBitmaps();
    const set = existingBitmapsOf(n);
    for (const l of loaded) {
      const b = set?.persistent().find((x) => x.name === l.name);
      if (b) b.readonly = l.readonly;
    }
  }

  /** A driver context over the node's current children (reopen). */
  private reopenContext(node: BlockNodeImpl, readOnly: boolean): DriverOpenContext {
    const child = (r: string): BlockNode => {
      const e = node.childEdges.find((x) => x.name === r);
      if (!e) throw new BlockError('NO_CHILD', 'EIO', `node '${node.name}' has no '${r}' child`);
      return e.user.node;
    };
    return {
      nodeName: node.name,
      readOnly,
      options: node.options,
      log: this.log.child({ node: node.name }),
      childIO: (r) => child(r).io,
      childDriver: (r) => child(r).driver,
      hasChild: (r) => node.childEdges.some((e) => e.name === r),
      emitEvent: (event, data) => this.eventSink?.(event, data),
      throttleGroups: this.throttleGroups,
    };
  }

  /** x-debug-query-block-graph (with a vertex for each of `jobs`). */
  debugGraph(jobs: readonly XDbgJob[] = []): XDbgGraph {
    return debugBlockGraph(this.order, jobs);
  }

  /**
   * Register a node a job built (QEMU's implicit filter nodes, e.g. mirror_top) under `name` or an
   * automatic one, so that queries list it. `make` gets the name. Take it out with `forgetImplicit`.
   */
  adoptImplicit(make: (name: string) => BlockNodeImpl, name?: string): BlockNodeImpl {
    if (name !== undefined) {
      checkNodeName(name);
      if (this.nodes.has(name)) throw optError(`Duplicate nodes with node-name='${name}'`);
    }
    const node = make(name ?? this.autoName());
    this.register(node);
    return node;
  }

  /** Take a node registered by `adoptImplicit` out of the registry (its edges are the caller's). */
  forgetImplicit(node: BlockNode): void {
    if (this.nodes.get(node.name) !== node) return;
    this.nodes.delete(node.name);
    this.order = this.order.filter((n) => n !== node);
  }

  /** Close every node, parents before children, flushing data. */
  async closeAll(): Promise<void> {
    for (const n of this.list()) {
      try {
        await n.io.flush();
      } catch (err) {
        this.log.warn({ err, node: n.name }, 'flush on close failed');
      }
    }
    while (this.order.length > 0) {
      const top = [...this.order].reverse().find((n) => !n.hasParentNodes()) ?? this.order[this.order.length - 1];
      if (!top) break;
      await this.destroy(top);
    }
  }

  /** One BlockDeviceInfo of query-named-block-nodes (QSD 7.2 member set and order). */
  async describe(node: BlockNode, flat = true): Promise<Record<string, unknown>> {
    const n = node as BlockNodeImpl;
    const filename = n.driver.describeFilename();
    const image = await this.imageInfo(n, flat);
    const backing = n.driver.filteredRole ? undefined : backingOf(n);
    return {
      'iops_rd': 0,
      'detect_zeroes': n.options.detectZeroes,
      image,
      'iops_wr': 0,
      ro: n.readOnly,
      'node-name': n.name,
      // QEMU 7.2 counts the depth while nesting backing images, so flat output reports 0.
      'backing_file_depth': flat ? 0 : filterOrCowDepth(n),
      drv: n.driverName,
      iops: 0,
      'bps_wr': 0,
      'write_threshold': n.io.writeThreshold,
      ...(backing ? { 'backing_file': backing.driver.describeFilename() } : {}),
      ...bitmapMember(n),
      encrypted: false,
      bps: 0,
      'bps_rd': 0,
      cache: { 'no-flush': n.options.cacheNoFlush, direct: n.options.cacheDirect, writeback: true },
      file: filename,
    };
  }

  /** ImageInfo of a node, QSD's member order; `backing-image` nested unless `flat`. */
  private async imageInfo(n: BlockNode, flat: boolean, depth = 0): Promise<Record<string, unknown>> {
    const extra = (await n.driver.queryImage?.()) ?? {};
    const all: Record<string, unknown> = {
      'virtual-size': n.size(),
      filename: n.driver.describeFilename(),
      format: n.driverName,
      ...Object.fromEntries(Object.entries(extra).filter(([, v]) => v !== undefined)),
    };
    const backing = filterOrCow(n);
    if (backing && !flat && depth < 64) all['backing-image'] = await this.imageInfo(backing, false, depth + 1);
    const order = IMAGE_INFO_ORDER;
    const keys = Object.keys(all).sort((a, b) => {
      const ia = order.indexOf(a);
      const ib = order.indexOf(b);
      return (ia < 0 ? order.length : ia) - (ib < 0 ? order.length : ib);
    });
    return Object.fromEntries(keys.map((k) => [k, all[k]]));
  }

  /** query-named-block-nodes. `flat` only matters once nodes have backing images. */
  async queryNamedBlockNodes(flat = false): Promise<Record<string, unknown>[]> {
    const out: Record<string, unknown>[] = [];
    for (const n of this.list()) out.push(await this.describe(n, flat));
    return out;
  }
}

/** Member order of ImageInfo as QSD 7.2 prints it. */
const IMAGE_INFO_ORDER = [
  'backing-image',
  'backing-filename-format',
  'virtual-size',
  'filename',
  'cluster-size',
  'format',
  'actual-size',
  'format-specific',
  'full-backing-filename',
  'backing-filename',
  'dirty-flag',
];

/** `dirty-bitmaps` of BlockDeviceInfo, left out when the node has none (QSD). */
function bitmapMember(node: BlockNode): { 'dirty-bitmaps'?: unknown[] } {
  const b = describeBitmaps(node);
  return b ? { 'dirty-bitmaps': b } : {};
}

/** The node below `n` in its chain: a job filter's filtered child, else the backing node. */
function filterOrCow(n: BlockNode): BlockNode | undefined {
  const role = n.driver.filteredRole;
  if (role) return n.children.find((c) => c.name === role)?.user.node;
  return backingOf(n);
}

/** backing_file_depth counted through job filters, as QEMU's bdrv_filter_or_cow_bs walk. */
function filterOrCowDepth(n: BlockNode): number {
  let depth = 0;
  const seen = new Set<BlockNode>([n]);
  for (let cur = filterOrCow(n); cur && !seen.has(cur); cur = filterOrCow(cur)) {
    seen.add(cur);
    depth++;
  }
  return depth;
}
