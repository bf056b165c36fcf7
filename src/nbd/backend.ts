/**
 * The interface the NBD engine talks to. The export layer (`src/export/`) implements
 * it on top of block nodes; tests implement it in memory. This module imports
 * nothing from `src/block` (layering rule: block and nbd never import each other).
 *
 * Lifecycle seen from the engine:
 *  1. During the handshake the engine calls {@link NbdBackend.listExports} (LIST) and
 *     {@link NbdBackend.openExport} (INFO, GO, EXPORT_NAME, LIST/SET_META_CONTEXT).
 *     `openExport` is a lookup only: it must not take references or count clients.
 *  2. When a client commits to an export (GO acknowledged / EXPORT_NAME), the engine
 *     calls {@link NbdExportHandle.onConnect}. That is where the export layer counts
 *     clients, enforces limits, and refuses clients of an export being deleted.
 *  3. In transmission the engine calls the I/O methods of the handle. Requests are
 *     validated (range, flags, size, writability) before they reach the backend,
 *     so the backend only sees in-range, permitted requests.
 *  4. When the connection ends, {@link NbdSession.onDisconnect} is called exactly once,
 *     after every in-flight request has settled.
 *
 * Errors: reject (or throw) with a `DaemonError` whose `errno` says what happened;
 * `src/nbd/errors.ts` narrows it to an NBD error the way QEMU does. Any other error
 * value is treated as EIO.
 */
import type { DaemonError } from '../util/errors.js';
import type { PageLoans } from '../util/page-loans.js';
import type { NbdExtent } from './protocol.js';
import { NBD_MAX_BUFFER_SIZE } from './protocol.js';

export type { NbdExtent } from './protocol.js';

/** One entry of an NBD_OPT_LIST reply. */
export interface NbdExportSummary {
  name: string;
  /** Sent after the name in NBD_REP_SERVER (QEMU appends it with no separator). */
  description?: string;
}

/** Block size constraints advertised in NBD_INFO_BLOCK_SIZE (NBD spec: Block size constraints). */
export interface NbdBlockSizes {
  /** Power of two, 1..65536. QSD: the node's request alignment (1 for buffered files). */
  minimum: number;
  /** Power of two, >= max(minimum, 512). QSD: max(4096, minimum). */
  preferred: number;
  /** Max READ/WRITE payload, >= preferred. QSD: min(max transfer, 32 MiB). */
  maximum: number;
}

/** QSD defaults: (1, 4096, 32 MiB). */
export const DEFAULT_BLOCK_SIZES: Readonly<NbdBlockSizes> = Object.freeze({
  minimum: 1,
  preferred: 4096,
  maximum: NBD_MAX_BUFFER_SIZE,
});

/**
 * One metadata context (`base:allocation`, `qemu:dirty-bitmap:bm0`, ...).
 */
export interface NbdMetaContext {
  /** Full name, `namespace:leaf`. */
  readonly name: string;
  /**
   * Status of `[offset, offset+length)`. Return 1..maxExtents consecutive extents
   * starting at `offset`, each with length > 0. They may stop before the end of the
   * range (the client re-queries), and should not run past it (QEMU never does; the
   * engine clamps the last extent to the request and merges equal neighbours).
   * `offset + length` is within the export.
   *
   * `maxExtentLength` (default 2^32 - 1, what a BLOCK_STATUS chunk can carry) is raised to
   * Number.MAX_SAFE_INTEGER for clients with extended headers (NBD_REPLY_TYPE_BLOCK_STATUS_EXT):
   * a provider may then answer with longer extents, and may look further at once.
   */
  blockStatus(offset: number, length: number, maxExtents: number, maxExtentLength?: number): Promise<NbdExtent[]>;
}

/**
 * A namespace's contexts. The export layer supplies one provider per namespace
 * (`base`, `qemu`); {@link StaticContextProvider} implements the usual query rules.
 */
export interface NbdMetaContextProvider {
  /** Namespace without the colon: `'base'`, `'qemu'`. */
  readonly namespace: string;
  /**
   * Contexts matching `query` (which always starts with `namespace + ':'`), or every
   * context of the namespace when `query` is `''` (LIST with no queries).
   * `forSet` = SET_META_CONTEXT: namespace-wide queries (`base:`, `qemu:`,
   * `qemu:dirty-bitmap:`) select nothing there, they only list. Unknown leaves
   * return `[]` (never an error: NBD spec, SET MUST NOT fail on unknown leaves).
   */
  listContexts(query: string, forSet: boolean): readonly NbdMetaContext[];
}

/** What the engine tells the export layer about a client that is entering transmission. */
export interface NbdConnectionInfo {
  /** Server-unique connection id (also in logs as `conn`). */
  id: number;
  /** `unix`, or `host:port` for TCP. */
  clientAddress: string;
  exportName: string;
  /** Whether the export is used read-only by this client (always the export's mode). */
  readOnly: boolean;
  /**
   * Close this client from the export side (block-export-del mode=hard, shutdown).
   * In-flight requests are abandoned; {@link NbdSession.onDisconnect} still runs.
   */
  disconnect(reason: string): void;
}

/** Returned by {@link NbdExportHandle.onConnect}; the engine calls it back once. */
export interface NbdSession {
  /** The client is gone and none of its requests is still running. */
  onDisconnect(): void;
  /**
   * Optional: the handle this connection's requests go to in transmission, instead of the
   * export's (so the backend knows which connection a request comes from). It must answer
   * every property as the export does.
   */
  readonly handle?: NbdExportHandle;
  /**
   * Optional: the socket closed. Requests still running will have their replies dropped;
   * {@link onDisconnect} waits for them, so a backend holding requests should settle them now.
   */
  onClose?(): void;
}

/** Options of {@link NbdExportHandle.writeZeroes}. */
export interface NbdWriteZeroesOptions {
  /** False when the client set NBD_CMD_FLAG_NO_HOLE (keep the range allocated). */
  mayUnmap: boolean;
  /** NBD_CMD_FLAG_FAST_ZERO: fail with errno ENOTSUP instead of falling back to writing. */
  fastZero: boolean;
  fua: boolean;
}

/**
 * Zero ranges inside a READ result: `[offset, offset+length)` absolute, sorted,
 * non-overlapping, inside the request. The engine sends them as OFFSET_HOLE chunks
 * (unless the client set DF or structured replies are off, in which case the engine
 * zero-fills those parts of the buffer itself, so their buffer content is unspecified).
 */
export type NbdZeroRanges = ReadonlyArray<{ offset: number; length: number }>;

/** Completion of NbdExportHandle.submitWrite: nothing on success, else the error. */
export type NbdWriteDone = (err?: unknown) => void;

/**
 * One export as the engine sees it. Properties are read once when a client commits
 * to the export (flags are computed once per connection).
 */
export interface NbdExportHandle {
  /** Canonical name (NBD_INFO_NAME). */
  readonly name: string;
  readonly description?: string;
  /** Size in bytes (< 2^53). */
  readonly size: number;
  readonly readOnly: boolean;
  readonly canFlush: boolean;
  readonly canTrim: boolean;
  readonly canWriteZeroes: boolean;
  /** Only honoured when canWriteZeroes (NBD spec: FAST_ZERO needs WRITE_ZEROES). */
  readonly canFastZero: boolean;
  readonly canCache: boolean;
  /** Decided by the export layer (QSD: server max-connections != 1). */
  readonly multiConn: boolean;
  /** Scheduling hint; QSD never sets it. */
  readonly rotational?: boolean;
  readonly blockSizes: NbdBlockSizes;
  /** Providers of metadata contexts; context ids follow their order (QEMU numbering). */
  readonly metaContexts: readonly NbdMetaContextProvider[];

  /** Called when a client enters transmission; return a DaemonError to refuse it. */
  onConnect(info: NbdConnectionInfo): NbdSession | DaemonError;

  /**
   * Fill `buf` (whose length is the request length) from `offset`. May resolve to
   * zero ranges (see {@link NbdZeroRanges}) to let the engine send holes.
   */
  read(buf: Buffer, offset: number): Promise<NbdZeroRanges | void>;
  /**
   * Optional fast path: fill `buf` synchronously (data already in memory / page
   * cache) and return true, or return false without side effects to make the engine
   * use {@link read}. Must never block on I/O.
   */
  tryReadSync?(buf: Buffer, offset: number): boolean;
  /**
   * Optional fast path: true when the range is known, without blocking, to read as zeroes; the
   * read is then counted as done and the engine answers with a hole chunk (structured replies
   * without DF), as QSD does for zero and unallocated ranges. False (no side effects) otherwise.
   */
  tryReadZeroSync?(offset: number, length: number): boolean;
  /**
   * Optional fast path for large reads: when the export's bytes `[offset, offset+length)` are
   * exactly a range of one open file, hold no hole, and are all in the page cache right now
   * (checked without blocking), that file range, and the read counts as done; else undefined
   * (no side effects). The engine then sends the range with sendfile() if its transport can.
   * The fd is only valid until the engine returns to the event loop. `holes` (the engine may
   * answer with hole chunks): runs known to read as zeroes may be pieces with offset -1, next
   * to at least one piece of file bytes. `lending`: the caller registers ranges that carry
   * `loans` (NbdFileRange.loans); without it such ranges are not returned (the read copies).
   */
  tryReadFileSync?(offset: number, length: number, holes?: boolean, lending?: boolean): NbdFileRange | undefined;
  /** `buf` is only valid until the promise settles: copy it if kept. */
  write(buf: Buffer, offset: number, fua: boolean): Promise<void>;
  /**
   * Optional fast path: start the write and return true, then call `done` exactly once, never
   * before returning (no argument on success, the error otherwise; `buf` is the backend's
   * until then); or return false without side effects to make the engine use {@link write}.
   */
  submitWrite?(buf: Buffer, offset: number, fua: boolean, done: NbdWriteDone): boolean;
  writeZeroes(offset: number, length: number, opts: NbdWriteZeroesOptions): Promise<void>;
  /** Discard (advisory). */
  trim(offset: number, length: number, fua: boolean): Promise<void>;
  flush(): Promise<void>;
  /** Prefetch hint; may be a no-op. */
  cache(offset: number, length: number): Promise<void>;
}

/** A range of an open file ({@link NbdExportHandle.tryReadFileSync}). */
export interface NbdFileRange {
  fd: number;
  /** File offset of the first byte. */
  offset: number;
  /**
   * Pieces (file offset, length) in order when the range is not contiguous in the file; a file
   * offset of -1 is a run of zeroes (only when asked for with `holes`).
   */
  pieces?: ReadonlyArray<{ offset: number; length: number }>;
  /**
   * Set when the file's bytes in the range can come to belong to other guest data (a qcow2 host
   * cluster freed and reused): the sender, which asked with `lending`, registers with
   * `loans.lend()` once it has queued them by reference (see util/page-loans.ts).
   */
  loans?: PageLoans;
}

/** Everything the engine needs from the layer above it. */
export interface NbdBackend {
  /** Exports for NBD_OPT_LIST, in listing order. */
  listExports(): readonly NbdExportSummary[];
  /**
   * Look an export up by the name a client sent (`''` = default export, which QSD
   * does not have). Return a DaemonError to refuse: errno ENOENT -> NBD_REP_ERR_UNKNOWN
   * (use the message `export '<name>' not present` like QSD), ESHUTDOWN ->
   * NBD_REP_ERR_SHUTDOWN, EPERM/EACCES -> NBD_REP_ERR_POLICY. EXPORT_NAME has no error
   * reply, so a refusal there closes the connection.
   */
  openExport(name: string): NbdExportHandle | DaemonError;
}

/**
 * A provider over a fixed list of contexts of one namespace, with the query rules QSD
 * follows: exact names select; `ns:` and any query ending in `:` that is a prefix of
 * context names (e.g. `qemu:dirty-bitmap:`) list them but select nothing.
 */
export class StaticContextProvider implements NbdMetaContextProvider {
  constructor(
    readonly namespace: string,
    private readonly contexts: readonly NbdMetaContext[],
  ) {}

  listContexts(query: string, forSet: boolean): readonly NbdMetaContext[] {
    if (query === '') return this.contexts;
    if (query.endsWith(':')) {
      return forSet ? [] : this.contexts.filter((c) => c.name.startsWith(query));
    }
    return this.contexts.filter((c) => c.name === query);
  }
}
