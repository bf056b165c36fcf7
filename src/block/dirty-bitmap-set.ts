/**
 * Named dirty bitmaps of block nodes (QEMU's BdrvDirtyBitmap list per node).
 *
 * Each node gets its set lazily (a WeakMap keyed by the node, so nothing outlives the node).
 * The set hooks the node's io once: every write, write-zeroes and discard that reaches the node
 * marks every recording bitmap before the driver is asked, so a write is in the bitmaps before
 * it is acknowledged. The rules and error texts are QSD 7.2's (qmp.md §3.5, §4.3).
 */
import { BlockError } from '../util/errors.js';
import { DirtyBitmap, isValidGranularity } from './dirty-bitmap.js';
import type { BlockNode } from './types.js';

/** Longest bitmap name (QEMU BDRV_BITMAP_MAX_NAME_SIZE). */
export const BITMAP_MAX_NAME = 1023;
/** Granularity used when a node has no cluster size (QEMU). */
export const DEFAULT_GRANULARITY = 65536;

/** What a check refuses (QEMU's BDRV_BITMAP_* check flags). */
export const CHECK_BUSY = 1;
export const CHECK_RO = 2;
export const CHECK_INCONSISTENT = 4;
/** Modify the bits: everything refused. */
export const CHECK_DEFAULT = CHECK_BUSY | CHECK_RO | CHECK_INCONSISTENT;
/** Only flip recording / read: read-only bitmaps allowed. */
export const CHECK_ALLOW_RO = CHECK_BUSY | CHECK_INCONSISTENT;

/** One entry of query-named-block-nodes' `dirty-bitmaps` (BlockDirtyInfo), in QSD's member order. */
export interface BlockDirtyInfo {
  name: string;
  recording: boolean;
  persistent: boolean;
  busy: boolean;
  granularity: number;
  count: number;
  inconsistent?: true;
}

/**
 * A driver that can keep bitmaps in its image (qcow2). The graph loads them at open and stores
 * them on clean close; `canStoreBitmap` vets `block-dirty-bitmap-add persistent=true`.
 */
export interface PersistentBitmapDriver {
  /** Throws (with QSD's text) when a new persistent bitmap cannot be stored. */
  canStoreBitmap(name: string, granularity: number): void;
  /** Bitmaps found in the image at open (in-use ones come back `inconsistent`). */
  loadBitmaps(): Promise<LoadedBitmap[]>;
  /** Write the given persistent bitmaps (all of them: ones left out are dropped from the image). */
  storeBitmaps(bitmaps: readonly NamedBitmap[]): Promise<void>;
  /** Drop one bitmap from the image at once (block-dirty-bitmap-remove). */
  removeStoredBitmap?(name: string): Promise<void>;
}

/** A bitmap as a persistent driver hands it over at open. */
export interface LoadedBitmap {
  name: string;
  granularity: number;
  /** The `auto` flag: recording. */
  enabled: boolean;
  /** Left `in_use` by a crash: contents cannot be trusted. */
  inconsistent: boolean;
  /** Loaded from a read-only image: cannot be modified. */
  readonly: boolean;
  /** Fill the bits (not called for inconsistent bitmaps). */
  load(into: DirtyBitmap): Promise<void>;
}

/** Whether a driver implements {@link PersistentBitmapDriver}. */
export function isPersistentBitmapDriver(d: unknown): d is PersistentBitmapDriver {
  const x = d as Partial<PersistentBitmapDriver> | null;
  return (
    typeof x?.canStoreBitmap === 'function' &&
    typeof x.loadBitmaps === 'function' &&
    typeof x.storeBitmaps === 'function'
  );
}

export function bitmapNotFound(name: string): BlockError {
  return new BlockError('BITMAP_NOT_FOUND', 'ENOENT', `Dirty bitmap '${name}' not found`);
}

export class NamedBitmap {
  recording: boolean;
  persistent: boolean;
  inconsistent: boolean;
  readonly: boolean;
  private busyFlag = false;

  constructor(
    readonly name: string,
    readonly bits: DirtyBitmap,
    opts: { recording: boolean; persistent: boolean; inconsistent?: boolean; readonly?: boolean },
  ) {
    this.recording = opts.recording;
    this.persistent = opts.persistent;
    this.inconsistent = opts.inconsistent ?? false;
    this.readonly = opts.readonly ?? false;
  }

  get granularity(): number {
    return this.bits.granularity;
  }

  /** True while an export or job (or a pending transactional remove) uses the bitmap. */
  get busy(): boolean {
    return this.busyFlag;
  }

  setBusy(busy: boolean): void {
    this.busyFlag = busy;
  }

  /** Refuse the bitmap for an operation (QSD's texts, in QEMU's check order). */
  check(flags: number): void {
    if (flags & CHECK_BUSY && this.busyFlag) {
      throw new BlockError(
        'BITMAP_BUSY',
        'EBUSY',
        `Bitmap '${this.name}' is currently in use by another operation and cannot be used`,
      );
    }
    if (flags & CHECK_RO && this.readonly) {
      throw new BlockError('BITMAP_READONLY', 'EPERM', `Bitmap '${this.name}' is readonly and cannot be modified`);
    }
    if (flags & CHECK_INCONSISTENT && this.inconsistent) {
      throw new BlockError(
        'BITMAP_INCONSISTENT',
        'EINVAL',
        `Bitmap '${this.name}' is inconsistent and cannot be used`,
      );
    }
  }

  info(): BlockDirtyInfo {
    const i: BlockDirtyInfo = {
      name: this.name,
      recording: this.recording,
      persistent: this.persistent,
      busy: this.busyFlag,
      granularity: this.granularity,
      count: this.bits.dirtyBytes,
    };
    if (this.inconsistent) i.inconsistent = true;
    return i;
  }
}

export interface AddBitmapOptions {
  name: string;
  granularity: number;
  persistent?: boolean;
  disabled?: boolean;
}

/** The bitmaps of one node. */
export class NodeBitmaps {
  /** Oldest first; queries list newest first like QSD. */
  private readonly items: NamedBitmap[] = [];
  private unhook: (() => void) | undefined;

  constructor(readonly node: BlockNode) {}

  get size(): number {
    return this.items.length;
  }

  /** Newest first. */
  list(): readonly NamedBitmap[] {
    this.syncSize();
    return [...this.items].reverse();
  }

  get(name: string): NamedBitmap | undefined {
    return this.items.find((b) => b.name === name);
  }

  /** Find or fail with `Dirty bitmap 'X' not found`. */
  find(name: string): NamedBitmap {
    const b = this.get(name);
    if (!b) throw bitmapNotFound(name);
    this.syncSize();
    return b;
  }

  /** Create a bitmap (checks granularity, duplicates and name length in QSD's order). */
  add(o: AddBitmapOptions): NamedBitmap {
    if (!isValidGranularity(o.granularity)) {
      throw new BlockError('BITMAP_GRANULARITY', 'EINVAL', 'Granularity must be power of 2 and at least 512');
    }
    if (this.get(o.name)) throw new BlockError('BITMAP_EXISTS', 'EEXIST', `Bitmap already exists: ${o.name}`);
    if (Buffer.byteLength(o.name) > BITMAP_MAX_NAME) {
      throw new BlockError('BITMAP_NAME', 'EINVAL', `Bitmap name too long: ${o.name}`);
    }
    const bm = new NamedBitmap(o.name, new DirtyBitmap(this.node.size(), o.granularity), {
      recording: !o.disabled,
      persistent: o.persistent ?? false,
    });
    this.insert(bm);
    return bm;
  }

  /** Put a bitmap object (new, loaded from an image, or restored by a transaction) in the set. */
  insert(bm: NamedBitmap): void {
    if (this.get(bm.name)) throw new BlockError('BITMAP_EXISTS', 'EEXIST', `Bitmap already exists: ${bm.name}`);
    this.items.push(bm);
    this.unhook ??= this.node.io.addWriteHook((offset, length, kind) => this.onWrite(offset, length, kind));
  }

  /** Drop a bitmap from the set (no checks: callers check first). */
  delete(bm: NamedBitmap): void {
    const i = this.items.indexOf(bm);
    if (i >= 0) this.items.splice(i, 1);
    if (this.items.length === 0 && this.unhook) {
      this.unhook();
      this.unhook = undefined;
    }
  }

  /** Persistent bitmaps, oldest first (what a driver stores). */
  persistent(): NamedBitmap[] {
    this.syncSize();
    return this.items.filter((b) => b.persistent);
  }

  /** Bring every bitmap to the node's current size (a resize happened). */
  syncSize(): void {
    const size = this.node.size();
    for (const b of this.items) if (b.bits.size !== size) b.bits.resize(size);
  }

  private onWrite(offset: number, length: number, kind: 'write' | 'zero' | 'discard'): void {
    if (kind === 'discard' && !discardReachesDriver(this.node)) return;
    for (const b of this.items) {
      if (!b.recording) continue;
      if (b.bits.size !== this.node.size()) b.bits.resize(this.node.size());
      b.bits.mark(offset, length);
    }
  }
}

/**
 * QEMU only marks a discard that is passed on (node opened with discard=unmap and a driver that
 * can discard); an ignored discard changes nothing and is not recorded.
 */
function discardReachesDriver(node: BlockNode): boolean {
  const opts = (node as { options?: { discard?: string } }).options;
  return opts?.discard === 'unmap' && node.driver.caps.discard;
}

const sets = new WeakMap<BlockNode, NodeBitmaps>();

/** The bitmap set of a node (created on first use). */
export function bitmapsOf(node: BlockNode): NodeBitmaps {
  let s = sets.get(node);
  if (!s) {
    s = new NodeBitmaps(node);
    sets.set(node, s);
  }
  return s;
}

/** The bitmap set of a node if it ever had one. */
export function existingBitmapsOf(node: BlockNode): NodeBitmaps | undefined {
  return sets.get(node);
}

/** `dirty-bitmaps` for query-named-block-nodes, or undefined when the node has none. */
export function describeBitmaps(node: BlockNode): BlockDirtyInfo[] | undefined {
  const s = sets.get(node);
  if (!s || s.size === 0) return undefined;
  return s.list().map((b) => b.info());
}

/** Filter drivers whose only data child is `file` (QEMU: is_filter). */
const FILTER_DRIVERS = new Set([
  'copy-before-write',
  'copy-on-read',
  'throttle',
  'preallocate',
  'compress',
  'blklogwrites',
  'blkdebug',
  'blkverify',
  'blkreplay',
  'snapshot-access',
]);

/**
 * Find a bitmap by name on `node` or down its backing / filter chain (how NBD exports resolve a
 * plain bitmap name). Returns the bitmap and the node that holds it.
 */
export function findInChain(node: BlockNode, name: string): { node: BlockNode; bitmap: NamedBitmap } | undefined {
  const seen = new Set<BlockNode>();
  let cur: BlockNode | undefined = node;
  while (cur && !seen.has(cur)) {
    seen.add(cur);
    const b = sets.get(cur)?.get(name);
    if (b) {
      sets.get(cur)?.syncSize();
      return { node: cur, bitmap: b };
    }
    const role: string = FILTER_DRIVERS.has(cur.driverName) ? 'file' : 'backing';
    const next: BlockNode | undefined = cur.children.find((c) => c.name === role)?.user.node;
    cur = next;
  }
  return undefined;
}

/**
 * Default granularity for a new bitmap on `node`: the cluster size clamped to 4 KiB..64 KiB,
 * or 64 KiB when the node has none (QEMU bdrv_get_default_bitmap_granularity).
 */
export async function defaultGranularity(node: BlockNode): Promise<number> {
  let cs: unknown;
  try {
    cs = (await node.driver.queryImage?.())?.['cluster-size'];
  } catch {
    cs = undefined;
  }
  if (typeof cs !== 'number' || !(cs > 0)) return DEFAULT_GRANULARITY;
  return Math.min(65536, Math.max(4096, cs));
}

/**
 * Open: load the bitmaps a persistent driver keeps in its image (blockdev-add fails with the
 * driver's error when the directory is corrupt).
 */
export async function loadPersistentBitmaps(node: BlockNode): Promise<void> {
  const d = node.driver;
  if (!isPersistentBitmapDriver(d)) return;
  const loaded = await d.loadBitmaps();
  if (loaded.length === 0) return;
  const set = bitmapsOf(node);
  for (const l of loaded) {
    const bits = new DirtyBitmap(node.size(), l.granularity);
    if (!l.inconsistent) await l.load(bits);
    set.insert(
      new NamedBitmap(l.name, bits, {
        recording: l.enabled,
        persistent: true,
        inconsistent: l.inconsistent,
        readonly: l.readonly,
      }),
    );
  }
}

/** Clean close: hand the node's persistent bitmaps to its driver to store. */
export async function storePersistentBitmaps(node: BlockNode): Promise<void> {
  const d = node.driver;
  if (!isPersistentBitmapDriver(d)) return;
  await d.storeBitmaps(existingBitmapsOf(node)?.persistent() ?? []);
}
