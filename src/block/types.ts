/**
 * Block layer contracts.
 *
 * - `BlockDriver` is what a driver implements (file, raw, null-co, later qcow2 and filters).
 *   Drivers are never called directly by upper layers: `io.ts` wraps them.
 * - `BlockNode` is what other layers (exports, jobs, QMP) see of a node.
 * - `BlockUser` is a permission-holding attachment to a node (QEMU's BlockBackend / BdrvChild).
 *   Its `node` can be swapped by the graph (live overlays: `blockdev-snapshot` moves every parent
 *   of a node onto the overlay), so users must read `user.node` / `user.io` on every request
 *   instead of caching the node.
 */
import type { PageLoans } from '../util/page-loans.js';

// ---------------------------------------------------------------------------------------------
// Block status

/** Extent flags (bit mask). */
export const EXTENT_DATA = 1;
/** The range reads as zeroes. */
export const EXTENT_ZERO = 2;
/** The range is allocated in some layer of the chain (`depth` > 0). */
export const EXTENT_ALLOCATED = 4;

/**
 * One block-status extent. `depth`: 1 = allocated in this node, N = in the N-th backing layer
 * (this node is 1, its backing is 2, ...), 0 = unallocated in the whole chain
 * (qemu:allocation-depth semantics).
 */
export interface BlockExtent {
  offset: number;
  length: number;
  /** Bit mask of EXTENT_DATA | EXTENT_ZERO | EXTENT_ALLOCATED. */
  flags: number;
  depth: number;
}

// ---------------------------------------------------------------------------------------------
// Permissions (QEMU's BLK_PERM_* model)

/** The permissions a user can take on a node, or share with other users. */
export interface BlockPerms {
  consistentRead?: boolean;
  write?: boolean;
  writeUnchanged?: boolean;
  resize?: boolean;
}

/** Bit values; they match QEMU's BLK_PERM_* so that image lock bytes are compatible. */
export const PERM_CONSISTENT_READ = 0x1;
export const PERM_WRITE = 0x2;
export const PERM_WRITE_UNCHANGED = 0x4;
export const PERM_RESIZE = 0x8;
export const PERM_ALL = 0xf;

/** What `BlockNode.attach()` takes. */
export interface BlockUserSpec {
  /**
   * How the user is named in permission errors, e.g. `an unnamed block device` for exports, or
   * `node 'X'` for a parent node. `role` is the child role (`root`, `file`, `backing`, `target`).
   */
  name: string;
  role?: string;
  perm: BlockPerms;
  shared: BlockPerms;
  /** Kind of user, for `blockdev-del` checks: a backend (export/job) or a parent node. */
  kind?: 'backend' | 'node';
  /** A parent node (kind 'node'), for graph walking. */
  parent?: BlockNode;
}

/** A permission-holding attachment to a node. */
export interface BlockUser {
  readonly spec: Readonly<BlockUserSpec>;
  /** The node this user is currently attached to (changes when the graph moves parents). */
  readonly node: BlockNode;
  /** Shorthand for `node.io`. */
  readonly io: BlockIO;
  /** Change the permissions this user holds; throws BlockError('PERM_CONFLICT') on conflict. */
  setPerms(perm: BlockPerms, shared: BlockPerms): void;
  /** Release the permissions and detach. Idempotent. */
  detach(): void;
  /** Called by the graph after `node` changed (e.g. `blockdev-snapshot` moved this user). */
  onNodeChanged?: (oldNode: BlockNode, newNode: BlockNode) => void;
}

// ---------------------------------------------------------------------------------------------
// Drivers

export interface WriteFlags {
  /** Force unit access: data is on stable storage when the promise resolves. */
  fua?: boolean;
}

export interface ZeroFlags extends WriteFlags {
  /** The range may be deallocated (NBD: no NO_HOLE flag). */
  mayUnmap?: boolean;
  /** Fail with ENOTSUP instead of writing zero buffers (NBD FAST_ZERO). */
  noFallback?: boolean;
}

/** What a driver can do natively; io.ts supplies fallbacks for the rest. */
export interface DriverCaps {
  /** Driver implements writeZeroes efficiently (no data written). */
  writeZeroes: boolean;
  /** Driver implements FUA itself; otherwise io.ts follows the write with a flush. */
  fua: boolean;
  /** Driver implements discard (otherwise discard is a successful no-op). */
  discard: boolean;
  /** Driver implements block status (otherwise "all data, allocated"). */
  blockStatus: boolean;
  /** Driver can change its length. */
  resize: boolean;
  /** Driver may answer some reads synchronously (tryReadSync). */
  readSync: boolean;
  /** Reads of unwritten ranges are guaranteed zero (NBD: can trust ZERO). */
  zeroInit?: boolean;
}

/** A range of an open file (BlockDriver.fileRangeSync): `fd` is valid only synchronously. */
export interface FileRange {
  fd: number;
  /** File offset of the first byte. */
  offset: number;
  /**
   * Set when the bytes are not contiguous in the file (a qcow2 range over clusters stored apart):
   * the file offset and length of each piece, in order; the lengths add up to the requested
   * length, and the first piece starts at `offset`.
   */
  pieces?: ReadonlyArray<FilePiece>;
  /**
   * Set by a driver whose host bytes can come to hold other guest data while a reply that
   * references them waits in a socket (qcow2: a cluster freed, then reused): whoever sends the
   * range by reference registers with `loans.lend()`, and the driver reuses a freed cluster
   * only once a fence over those loans has passed (util/page-loans.ts).
   */
  loans?: PageLoans;
}

/**
 * One contiguous piece of a FileRange. In a range asked for with `holes` (fileRangeSync), an
 * `offset` of -1 marks a run that reads as zeroes and has no file bytes behind it.
 */
export interface FilePiece {
  offset: number;
  length: number;
}

/**
 * A driver instance bound to one node. All ranges it receives are already checked by io.ts
 * (inside [0, length], integers); buffers may have any alignment.
 */
export interface BlockDriver {
  /** Driver name as in BlockdevDriver (`file`, `raw`, `null-co`, ...). */
  readonly name: string;
  readonly caps: DriverCaps;
  /**
   * A job's filter driver (mirror_top, copy-before-write, ...): the role of the child it filters.
   * Queries then show that child's chain below it (QEMU's bdrv_filter_or_cow_bs) and no
   * `backing_file` (a filter has no backing file name of its own).
   */
  readonly filteredRole?: 'file' | 'backing';
  /** Current virtual size in bytes. */
  getLength(): number;
  /** Fill `buf` (all of it) from `offset`. */
  read(buf: Buffer, offset: number): Promise<void>;
  /**
   * Optional synchronous fast path: fill `buf` without blocking (e.g. preadv2(RWF_NOWAIT) from the
   * page cache). Returns false when it would block or is unavailable; the caller then uses `read`.
   */
  tryReadSync?(buf: Buffer, offset: number): boolean;
  /**
   * Optional: true when the driver knows, without blocking, that `[offset, offset+length)` is all
   * data (no hole or zero extent), so a reader needs no block status; false when not or unsure.
   */
  isDataSync?(offset: number, length: number): boolean;
  /**
   * Optional: true when the driver knows, without blocking, that `[offset, offset+length)` reads
   * as zeroes (zero or unallocated clusters with nothing below), so a reader may skip the read
   * (an NBD reply becomes a hole chunk, as QSD sends); false when not or unsure.
   */
  isZeroSync?(offset: number, length: number): boolean;
  /**
   * Optional: when the node's bytes `[offset, offset+length)` are exactly bytes of one open file
   * (contiguous, or in a few pieces: FileRange.pieces), hold no hole (as isDataSync), and are all
   * in the page cache right now (checked without blocking), that file range; else undefined.
   * Only drivers whose data is stored as plain bytes of their child implement it (file, raw, and
   * qcow2 for ranges of data clusters), so any other node in between (filter, throttle,
   * compressed or zero clusters) ends the path. The fd is only valid until the caller returns to
   * the event loop. Counts nothing: io.ts does.
   * `holes`: the caller can send zero runs without bytes (an NBD reply with hole chunks), so runs
   * known to read as zeroes (qcow2 zero clusters, unallocated ones with nothing below) may be
   * pieces with offset -1; the range then holds at least one piece of file bytes.
   * `lending`: the caller registers the ranges it sends by reference with their `loans`
   * (FileRange.loans); a driver whose host bytes can change owners (qcow2) returns no range
   * without it.
   */
  fileRangeSync?(offset: number, length: number, holes?: boolean, lending?: boolean): FileRange | undefined;
  /**
   * The file's identity (`st_dev:st_ino` and its birth time), the same for every driver
   * instance of the file: per-image state that must outlive a reopen is kept by it (file
   * driver only).
   */
  imageIdentity?(): string;
  write(buf: Buffer, offset: number, flags: WriteFlags): Promise<void>;
  /**
   * Optional callback form of a plain write (no flags): start writing `buf` at `offset` and
   * return true, then call `done` exactly once, never before returning (undefined on success,
   * the error otherwise); or return false without side effects to make the caller use `write`.
   * Only drivers whose write is a plain pwrite of one file range implement it (file without
   * O_DIRECT, raw over such a file), so the per-request promises of every layer are saved on
   * the hottest path (4 KiB NBD writes); anything else in between ends the path. Counts
   * nothing: io.ts does.
   */
  submitWrite?(buf: Buffer, offset: number, done: WriteDone): boolean;
  writeZeroes?(offset: number, length: number, flags: ZeroFlags): Promise<void>;
  discard?(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  /** Extents covering [offset, offset+length) in order, possibly shorter (never longer). */
  blockStatus?(offset: number, length: number): Promise<BlockExtent[]>;
  truncate?(size: number): Promise<void>;
  close(): Promise<void>;
  /** The `file` string of query-named-block-nodes (a path, `null-co://`, `json:{...}`). */
  describeFilename(): string;
  /**
   * The options that describe this node in a `json:{...}` filename, in the order QEMU prints
   * them (e.g. `{driver: 'file', filename: '/x'}`). Undefined = the plain filename is enough.
   */
  jsonOptions?(): Record<string, unknown>;
  /**
   * Driver-specific members of query-named-block-nodes' `image` (ImageInfo): `actual-size`,
   * `dirty-flag`, `cluster-size`, `format-specific`, ...
   */
  queryImage?(): Promise<Record<string, unknown>>;
  /**
   * Called when the cumulative permissions of the node's users change (file driver: image locks).
   * Throws BlockError to refuse (e.g. `Failed to get "write" lock`).
   */
  checkPerms?(perm: number, shared: number): void;
  setPerms?(perm: number, shared: number): void;
}

// ---------------------------------------------------------------------------------------------
// Node-facing API

/**
 * Per-node I/O counters (query-blockstats with `query-nodes`, see docs/qmp.md). Counted by
 * io.ts for every request that passed the range checks; `invalid*` counts the ones that did not.
 */
export interface BlockStats {
  readOps: number;
  readBytes: number;
  writeOps: number;
  writeBytes: number;
  zeroOps: number;
  zeroBytes: number;
  discardOps: number;
  discardBytes: number;
  flushOps: number;
  /** Every failed request (the sum of the failed* counters below). */
  failedOps: number;
  failedReadOps: number;
  /** Failed writes and write-zeroes. */
  failedWriteOps: number;
  failedDiscardOps: number;
  failedFlushOps: number;
  /** Requests refused by the range checks (out of range, beyond 2^53). */
  invalidReadOps: number;
  invalidWriteOps: number;
  invalidDiscardOps: number;
  /** Largest end offset of a write or write-zeroes seen (QEMU's wr_highest_offset). */
  wrHighestOffset: number;
  /** Discards the driver itself was asked for, and how they ended (file: driver-specific stats). */
  driverDiscardOk: number;
  driverDiscardFailed: number;
  driverDiscardBytesOk: number;
}

/**
 * Called for every write-like request (write, write-zeroes, discard) on a node after range and
 * permission checks and before the driver is asked; dirty bitmaps and write tracking (cbw) hook
 * here. An async hook delays the write (copy-before-write); a throwing hook fails it.
 */
export type WriteHook = (
  offset: number,
  length: number,
  kind: 'write' | 'zero' | 'discard',
) => void | Promise<void>;

/** The checked I/O wrapper of a node (`io.ts`). Every upper layer does I/O through it. */
export interface BlockIO {
  read(buf: Buffer, offset: number): Promise<void>;
  /** Synchronous fast path; false means "use read()". Never throws for I/O reasons. */
  tryReadSync(buf: Buffer, offset: number): boolean;
  /** True when the range is known, without blocking, to be all data (see BlockDriver.isDataSync). */
  isDataSync?(offset: number, length: number): boolean;
  /**
   * The cached file range behind `[offset, offset+length)` (see BlockDriver.fileRangeSync), or
   * undefined. A range returned counts as a read done (blockstats), as tryReadSync's do.
   * `holes`, `lending`: see BlockDriver.fileRangeSync.
   */
  fileRangeSync?(offset: number, length: number, holes?: boolean, lending?: boolean): FileRange | undefined;
  /** The node's BlockDriver.imageIdentity (a file node), undefined otherwise. */
  imageIdentity?(): string | undefined;
  /** True when the range is known, without blocking, to read as zeroes (see BlockDriver.isZeroSync). */
  isZeroSync?(offset: number, length: number): boolean;
  write(buf: Buffer, offset: number, flags?: WriteFlags): Promise<void>;
  /**
   * Optional callback form of `write` without flags (see BlockDriver.submitWrite): true when
   * the write was started and `done` will be called once, later; false (no side effects) when
   * this node cannot take it now (write hooks such as dirty bitmaps, a write threshold,
   * detect-zeroes, a pending resize, a read-only node, an out-of-range request, a driver
   * without the path): the caller then uses `write`, which does all of that. Counts
   * blockstats as `write` does.
   */
  submitWrite?(buf: Buffer, offset: number, done: WriteDone): boolean;
  writeZeroes(offset: number, length: number, flags?: ZeroFlags): Promise<void>;
  discard(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  blockStatus(offset: number, length: number): Promise<BlockExtent[]>;
  truncate(size: number): Promise<void>;
  /** Current size. */
  size(): number;
  /** Write hooks (dirty bitmaps, write notifiers). Returns an unsubscribe function. */
  addWriteHook(hook: WriteHook): () => void;
  readonly stats: BlockStats;
  /** block-set-write-threshold's offset (0 = none); query-named-block-nodes' `write_threshold`. */
  readonly writeThreshold: number;
  /**
   * Arm (or with 0 disarm) the write threshold: the first write, write-zeroes or discard that
   * ends past `offset` calls `onExceeded` once, before it reaches the driver, and disarms it.
   */
  setWriteThreshold(offset: number, onExceeded?: WriteThresholdListener): void;
}

/** Completion of a submitWrite: undefined on success, else the error. */
export type WriteDone = (err?: Error) => void;

/** Told how far a request went past the write threshold, and what the threshold was. */
export type WriteThresholdListener = (amountExceeded: number, threshold: number) => void;

/** A child edge of a node. */
export interface BlockChild {
  /** Role name: `file`, `backing`, `target`, ... */
  readonly name: string;
  readonly user: BlockUser;
}

export interface BlockNode {
  readonly name: string;
  readonly driverName: string;
  readonly readOnly: boolean;
  /** Created by a top-level blockdev-add (only those can be blockdev-del'd). */
  readonly monitorOwned: boolean;
  readonly io: BlockIO;
  readonly driver: BlockDriver;
  /** Child edges in creation order. */
  readonly children: readonly BlockChild[];
  /** Every user attached to this node (exports, jobs, parent nodes). */
  readonly parents: readonly BlockUser[];
  size(): number;
  /** Take permissions on the node. Throws BlockError('PERM_CONFLICT' | 'READ_ONLY'). */
  attach(spec: BlockUserSpec): BlockUser;
  /** Reasons this node may not be deleted/changed (op blockers), e.g. `node is used as backing hd of 'Y'`. */
  readonly blockers: Set<string>;
}
