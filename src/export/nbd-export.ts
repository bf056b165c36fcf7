/**
 * One NBD export: adapts a block node (through a permission-holding BlockUser) to the
 * NBD engine's `NbdExportHandle`, and keeps the export's connections, limits and counters.
 */
import type { Logger } from '../util/logger.js';
import { DaemonError, strerror, type Errno } from '../util/errors.js';
import type { BlockExtent, BlockUser } from '../block/types.js';
import { EXTENT_DATA, EXTENT_ZERO } from '../block/types.js';
import type {
  NbdConnectionInfo,
  NbdExportHandle,
  NbdMetaContext,
  NbdWriteDone,
  NbdMetaContextProvider,
  NbdSession,
  NbdWriteZeroesOptions,
  NbdFileRange,
  NbdZeroRanges,
  NbdBlockSizes,
  NbdExtent,
} from '../nbd/backend.js';
import { DEFAULT_BLOCK_SIZES, StaticContextProvider } from '../nbd/backend.js';
import { NBD_STATE_DIRTY, NBD_STATE_HOLE, NBD_STATE_ZERO } from '../nbd/protocol.js';
import type { DirtyBitmap } from '../block/dirty-bitmap.js';
import type { NamedBitmap } from '../block/dirty-bitmap-set.js';

export type MultiConnMode = 'auto' | 'on' | 'off';

/** QEMU's BlockdevOnError, as werror/rerror of an export. */
export type OnErrorPolicy = 'report' | 'ignore' | 'enospc' | 'stop' | 'auto';
/** What a policy did about one failed request (QEMU BlockErrorAction). */
export type ErrorAction = 'ignore' | 'report' | 'stop';
/** QEMU BlockDeviceIoStatus. */
export type IoStatus = 'ok' | 'failed' | 'nospace';

/** The data of a BLOCK_IO_ERROR event (QEMU member names). */
export interface IoErrorEvent {
  device: string;
  'node-name': string;
  operation: 'read' | 'write';
  action: ErrorAction;
  nospace: boolean;
  reason: string;
}

/** QEMU blk_get_error_action: what `policy` does about `errno`. */
export function errorAction(policy: OnErrorPolicy, errno: Errno): ErrorAction {
  switch (policy) {
    case 'enospc':
      return errno === 'ENOSPC' ? 'stop' : 'report';
    case 'stop':
      return 'stop';
    case 'ignore':
      return 'ignore';
    case 'report':
    case 'auto':
      return 'report';
  }
}

/** One client connection of an export, as the export's requests know it. */
interface ConnState {
  readonly id: number;
  /** The socket is gone: its requests are no longer held. */
  closed: boolean;
}

/** A request held by a `stop` policy until the export is resumed. */
interface HeldRequest {
  conn: ConnState | undefined;
  /** Run the request again (under the policy); settles the client's promise. */
  retry(): void;
  /** Give up: the client's promise rejects with `err`. */
  fail(err: DaemonError): void;
}

export interface NbdExportOptions {
  id: string;
  name: string;
  description?: string;
  writable: boolean;
  writethrough: boolean;
  allocationDepth: boolean;
  /** Per-export connection limit (blockd extension); 0 = only the server's limit. */
  maxConnections: number;
  multiConn: MultiConnMode;
  /** Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` (context ids follow this order). */
  bitmaps?: readonly NamedBitmap[];
  /**
   * Error policies (blockd extension). Undefined = none given: errors are reported to the
   * client, and neither BLOCK_IO_ERROR nor io-status changes (QSD's behaviour).
   */
  onError?: { werror: OnErrorPolicy; rerror: OnErrorPolicy };
  /** Sends a BLOCK_IO_ERROR event (rate limiting is the caller's). */
  reportIoError?: (ev: IoErrorEvent) => void;
}

/** Per-export counters (query-block-exports, beyond QSD). */
export interface ExportCounters {
  readOps: number;
  readBytes: number;
  writeOps: number;
  writeBytes: number;
  zeroOps: number;
  trimOps: number;
  flushesRequested: number;
  flushesPerformed: number;
  connectionsTotal: number;
  /** Requests answered with an error (the client saw an NBD error reply). */
  failedOps: number;
}

/** `base:allocation` bits from block-layer extent flags (QEMU: data anywhere in the chain = 0). */
export function baseAllocationFlags(e: BlockExtent): number {
  let f = 0;
  if (!(e.flags & EXTENT_DATA)) f |= NBD_STATE_HOLE;
  if (e.flags & EXTENT_ZERO) f |= NBD_STATE_ZERO;
  return f;
}

/**
 * Convert block extents to NBD extents, merging equal neighbours and clamping to maxExtents,
 * each at most `maxLength` bytes (u32 unless the client has extended headers).
 */
function toNbdExtents(
  extents: readonly BlockExtent[],
  offset: number,
  length: number,
  maxExtents: number,
  flagsOf: (e: BlockExtent) => number,
  maxLength = 0xffffffff,
): NbdExtent[] {
  const out: NbdExtent[] = [];
  const end = offset + length;
  let pos = offset;
  for (const e of extents) {
    if (pos >= end) break;
    const eEnd = Math.min(e.offset + e.length, end);
    if (eEnd <= pos) continue;
    const len = eEnd - pos;
    const flags = flagsOf(e) >>> 0;
    const last = out[out.length - 1];
    if (last && last.flags === flags && last.length + len <= maxLength) last.length += len;
    else {
      if (out.length >= maxExtents) break;
      out.push({ length: Math.min(len, maxLength), flags });
    }
    pos = eEnd;
  }
  if (out.length === 0) out.push({ length: Math.min(length, maxLength), flags: 0 });
  return out;
}

/**
 * `qemu:dirty-bitmap:*` extents: NBD_STATE_DIRTY (1) for dirty granules, 0 for clean ones.
 * Runs are granule-aligned inside the request; anything past the bitmap's size (a bitmap on a
 * smaller backing node) reads as clean.
 */
export function bitmapExtents(
  bits: DirtyBitmap,
  offset: number,
  length: number,
  maxExtents: number,
  maxLength = 0xffffffff,
): NbdExtent[] {
  const out: NbdExtent[] = [];
  const max = Math.max(1, maxExtents);
  for (const e of bits.extents(offset, length, max)) {
    // Compact NBD extent lengths are u32: cut longer runs (the client asks again for the rest).
    out.push({ length: Math.min(e.length, maxLength), flags: e.dirty ? NBD_STATE_DIRTY : 0 });
    if (e.length > maxLength) break;
  }
  if (out.length === 0) out.push({ length: Math.min(length, maxLength), flags: 0 });
  return out;
}

/** Status calls cover at most this much at once (the client asks again for the rest). */
const STATUS_CHUNK = 1 << 30;
/**
 * Extended-header clients (64-bit extents): while the last extent of a status call covers at
 * least half of its window (a long run that may go on), the next window is twice as large, up
 * to this many calls. A fragmented window ends the answer, so the work stays proportional to
 * the range answered; a uniform 8 TiB takes 14 calls.
 */
const WIDE_STATUS_CALLS = 24;

export class NbdExport implements NbdExportHandle {
  readonly id: string;
  readonly name: string;
  readonly description?: string;
  readonly readOnly: boolean;
  readonly canFlush = true;
  readonly canTrim: boolean;
  readonly canWriteZeroes: boolean;
  readonly canFastZero: boolean;
  readonly canCache = true;
  readonly blockSizes: NbdBlockSizes = DEFAULT_BLOCK_SIZES;
  readonly metaContexts: readonly NbdMetaContextProvider[];
  readonly counters: ExportCounters = {
    readOps: 0,
    readBytes: 0,
    writeOps: 0,
    writeBytes: 0,
    zeroOps: 0,
    trimOps: 0,
    flushesRequested: 0,
    flushesPerformed: 0,
    connectionsTotal: 0,
    failedOps: 0,
  };
  /** Set while block-export-del (hard) or shutdown is tearing the export down. */
  shuttingDown = false;
  /** `failed`/`nospace` from the first error that stopped the export until it is resumed. */
  ioStatus: IoStatus = 'ok';
  /** A `stop` policy holds every new data request until {@link resume}. */
  private stopped = false;
  /**
   * Requests held while stopped, in the order they came. Bounded without a limit of its own:
   * a held request stays in flight on its connection, and each connection stops reading when its
   * in-flight window is full, so this holds at most what the clients may have in flight anyway.
   */
  private held: HeldRequest[] = [];

  private readonly connections = new Map<number, NbdConnectionInfo>();
  /**
   * Clients that declared read-only intent (NBD_OPT_READ_ONLY) on a writable export: they do
   * not count against `max-connections`, so a reader cannot lock the writer out.
   */
  private readers = 0;
  /** Something was written (and replied) since the start of the last flush. */
  private dirty = false;
  private flushInFlight: Promise<void> | undefined;
  private readonly log: Logger;
  private drainWaiters: Array<() => void> = [];

  constructor(
    readonly opts: NbdExportOptions,
    readonly user: BlockUser,
    /** The server's limit, consulted for the multi-conn decision (QSD: != 1). */
    private readonly serverMaxConnections: () => number,
    log: Logger,
  ) {
    this.id = opts.id;
    this.name = opts.name;
    if (opts.description !== undefined) this.description = opts.description;
    this.readOnly = !opts.writable;
    this.canTrim = opts.writable;
    this.canWriteZeroes = opts.writable;
    this.canFastZero = opts.writable;
    this.log = log.child({ export: opts.id });
    const base: NbdMetaContext = {
      name: 'base:allocation',
      blockStatus: (o, l, m, w) => this.status(o, l, m, baseAllocationFlags, w),
    };
    const qemu: NbdMetaContext[] = [];
    if (opts.allocationDepth) {
      qemu.push({
        name: 'qemu:allocation-depth',
        blockStatus: (o, l, m, w) => this.status(o, l, m, (e) => e.depth, w),
      });
    }
    for (const bm of opts.bitmaps ?? []) {
      qemu.push({
        name: `qemu:dirty-bitmap:${bm.name}`,
        // In-memory: answer the whole request (no STATUS_CHUNK cap), fewer round trips.
        blockStatus: async (o, l, m, w) => bitmapExtents(bm.bits, o, l, m, w),
      });
    }
    this.metaContexts = [
      new StaticContextProvider('base', [base]),
      new StaticContextProvider('qemu', qemu),
    ];
  }

  get size(): number {
    return this.user.io.size();
  }

  get multiConn(): boolean {
    if (this.opts.multiConn === 'on') return true;
    if (this.opts.multiConn === 'off') return false;
    return this.serverMaxConnections() !== 1 && this.opts.maxConnections !== 1;
  }

  get nodeName(): string {
    return this.user.node.name;
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  onConnect(info: NbdConnectionInfo): NbdSession | DaemonError {
    if (this.shuttingDown) {
      return new DaemonError('EXPORT_SHUTDOWN', `export '${this.name}' is being removed`, {
        errno: 'ESHUTDOWN',
      });
    }
    const reader = info.readOnly && !this.readOnly;
    if (!reader && this.opts.maxConnections > 0 && this.connections.size - this.readers >= this.opts.maxConnections) {
      this.log.warn({ conn: info.id, client: info.clientAddress }, 'export connection limit reached');
      return new DaemonError(
        'EXPORT_BUSY',
        `export '${this.name}' already has ${this.opts.maxConnections} connection(s)`,
        { errno: 'EBUSY' },
      );
    }
    this.connections.set(info.id, info);
    const conn: ConnState = { id: info.id, closed: false };
    if (reader) this.readers++;
    this.counters.connectionsTotal++;
    // Nothing is built for a log line that is off (this is on every client's connect path).
    if (this.log.isLevelEnabled('info')) {
      this.log.info(
        { conn: info.id, client: info.clientAddress, connections: this.connections.size },
        'client connected',
      );
    }
    return {
      handle: new ExportConnection(this, conn),
      onClose: () => {
        conn.closed = true;
        this.dropHeld(conn);
      },
      onDisconnect: () => {
        conn.closed = true;
        this.connections.delete(info.id);
        if (reader) this.readers--;
        if (this.log.isLevelEnabled('info')) {
          this.log.info({ conn: info.id, client: info.clientAddress }, 'client disconnected');
        }
        if (this.connections.size === 0) {
          const waiters = this.drainWaiters;
          this.drainWaiters = [];
          for (const w of waiters) w();
        }
      },
    };
  }

  /** Cut every client off; resolves when all of them are gone. */
  disconnectAll(reason: string): Promise<void> {
    if (this.connections.size === 0) return Promise.resolve();
    const done = new Promise<void>((resolve) => this.drainWaiters.push(resolve));
    for (const c of [...this.connections.values()]) c.disconnect(reason);
    return done;
  }

  tryReadSync(buf: Buffer, offset: number): boolean {
    if (this.stopped) return false;
    // Only reads known to hold no hole: holes go out as OFFSET_HOLE chunks, as QSD sends them
    // for reads of any size (known zeroes: tryReadZeroSync; the rest: read() asks block status).
    if (!this.user.io.isDataSync?.(offset, buf.length)) return false;
    if (!this.user.io.tryReadSync(buf, offset)) return false;
    this.counters.readOps++;
    this.counters.readBytes += buf.length;
    return true;
  }

  tryReadFileSync(offset: number, length: number, holes = false, lending = false): NbdFileRange | undefined {
    if (this.stopped) return undefined;
    // Only ranges known to hold no hole, as tryReadSync (holes go out as OFFSET_HOLE chunks),
    // or with `holes` ranges whose holes are known zeroes, as pieces without file bytes: the
    // drivers check that themselves, so nodes without the path cost one call here.
    const r = this.user.io.fileRangeSync?.(offset, length, holes, lending);
    if (!r) return undefined;
    this.counters.readOps++;
    this.counters.readBytes += length;
    return r;
  }

  tryReadZeroSync(offset: number, length: number): boolean {
    if (this.stopped) return false;
    if (!this.user.io.isZeroSync?.(offset, length)) return false;
    this.counters.readOps++;
    this.counters.readBytes += length;
    return true;
  }

  read(buf: Buffer, offset: number, conn?: ConnState): Promise<NbdZeroRanges | void> {
    this.counters.readOps++;
    this.counters.readBytes += buf.length;
    // No closure unless stopped: this is the per-request path.
    if (this.stopped) return this.hold(conn, () => this.readBody(buf, offset, conn));
    return this.readBody(buf, offset, conn);
  }

  /** One async frame per read (the fast path): the error policy wraps the body in place. */
  private async readBody(buf: Buffer, offset: number, conn: ConnState | undefined): Promise<NbdZeroRanges | void> {
    try {
      const io = this.user.io;
      // Block status only where holes are possible (it costs two lseeks and a promise per read).
      if (io.isDataSync?.(offset, buf.length)) {
        await io.read(buf, offset);
        return;
      }
      const extents = await io.blockStatus(offset, buf.length);
      const zeros: Array<{ offset: number; length: number }> = [];
      let pos = offset;
      const end = offset + buf.length;
      for (const e of extents) {
        const s = Math.max(e.offset, pos);
        const t = Math.min(e.offset + e.length, end);
        if (t <= s) continue;
        if (e.flags & EXTENT_ZERO) {
          const last = zeros[zeros.length - 1];
          if (last && last.offset + last.length === s) last.length += t - s;
          else zeros.push({ offset: s, length: t - s });
        }
        pos = t;
      }
      if (zeros.length === 0) {
        await io.read(buf, offset);
        return;
      }
      // Read only the data parts; the engine sends the zero parts as holes.
      let cur = offset;
      for (const z of [...zeros, { offset: end, length: 0 }]) {
        if (z.offset > cur) await io.read(buf.subarray(cur - offset, z.offset - offset), cur);
        cur = z.offset + z.length;
      }
      return zeros;
    } catch (err) {
      // Ignored: zeroes, never what the reply buffer held before (it may be another client's).
      return this.failed(err, 'read', conn, () => this.readBody(buf, offset, conn), () => void buf.fill(0));
    }
  }

  write(buf: Buffer, offset: number, fua: boolean, conn?: ConnState): Promise<void> {
    this.counters.writeOps++;
    this.counters.writeBytes += buf.length;
    // A held write keeps `buf`: the engine reuses it only once the promise settles.
    if (this.stopped) return this.hold(conn, () => this.writeBody(buf, offset, fua, conn));
    return this.writeBody(buf, offset, fua, conn);
  }

  /**
   * The write fast path (NbdExportHandle.submitWrite): a plain write the node can take without
   * promises (io.submitWrite); false (nothing counted) for everything else, which then goes
   * through write(). A failure gets the same error policy as write()'s, from the callback.
   */
  submitWrite(buf: Buffer, offset: number, fua: boolean, done: NbdWriteDone, conn?: ConnState): boolean {
    if (fua || this.stopped || this.opts.writethrough) return false;
    const io = this.user.io;
    if (
      !io.submitWrite?.(buf, offset, (err) => {
        if (err === undefined) {
          this.dirty = true;
          done();
        } else this.submitFailed(err, buf, offset, conn, done);
      })
    ) {
      return false;
    }
    this.counters.writeOps++;
    this.counters.writeBytes += buf.length;
    return true;
  }

  private submitFailed(err: Error, buf: Buffer, offset: number, conn: ConnState | undefined, done: NbdWriteDone): void {
    let p: Promise<void>;
    try {
      p = Promise.resolve(this.failed(err, 'write', conn, () => this.writeBody(buf, offset, false, conn), NOTHING));
    } catch (e) {
      p = Promise.reject(e);
    }
    p.then(
      () => done(),
      (e: unknown) => done(e),
    );
  }

  private async writeBody(buf: Buffer, offset: number, fua: boolean, conn: ConnState | undefined): Promise<void> {
    const fuaHere = fua && !this.opts.writethrough;
    try {
      await this.user.io.write(buf, offset, { fua: fuaHere });
      if (!fuaHere) this.dirty = true;
      if (this.opts.writethrough) await this.flushNode();
    } catch (err) {
      return this.failed(err, 'write', conn, () => this.writeBody(buf, offset, fua, conn), NOTHING);
    }
  }

  writeZeroes(offset: number, length: number, o: NbdWriteZeroesOptions, conn?: ConnState): Promise<void> {
    this.counters.zeroOps++;
    if (this.stopped) return this.hold(conn, () => this.writeZeroesBody(offset, length, o, conn));
    return this.writeZeroesBody(offset, length, o, conn);
  }

  private async writeZeroesBody(
    offset: number,
    length: number,
    o: NbdWriteZeroesOptions,
    conn: ConnState | undefined,
  ): Promise<void> {
    try {
      await this.user.io.writeZeroes(offset, length, {
        mayUnmap: o.mayUnmap,
        noFallback: o.fastZero,
        fua: o.fua && !this.opts.writethrough,
      });
      if (!o.fua || this.opts.writethrough) this.dirty = true;
      if (this.opts.writethrough) await this.flushNode();
    } catch (err) {
      // FAST_ZERO refused is an answer, not an I/O error: no policy applies.
      if (o.fastZero && err instanceof DaemonError && err.errno === 'ENOTSUP') {
        this.counters.failedOps++;
        throw err;
      }
      return this.failed(err, 'write', conn, () => this.writeZeroesBody(offset, length, o, conn), NOTHING);
    }
  }

  trim(offset: number, length: number, fua: boolean, conn?: ConnState): Promise<void> {
    this.counters.trimOps++;
    if (this.stopped) return this.hold(conn, () => this.trimBody(offset, length, fua, conn));
    return this.trimBody(offset, length, fua, conn);
  }

  private async trimBody(offset: number, length: number, fua: boolean, conn: ConnState | undefined): Promise<void> {
    try {
      await this.user.io.discard(offset, length);
      this.dirty = true;
      if (fua || this.opts.writethrough) await this.flushNode();
    } catch (err) {
      return this.failed(err, 'write', conn, () => this.trimBody(offset, length, fua, conn), NOTHING);
    }
  }

  flush(conn?: ConnState): Promise<void> {
    this.counters.flushesRequested++;
    if (this.stopped) return this.hold(conn, () => this.flushBody(conn));
    return this.flushBody(conn);
  }

  private async flushBody(conn: ConnState | undefined): Promise<void> {
    try {
      await this.flushNode();
    } catch (err) {
      return this.failed(err, 'write', conn, () => this.flushBody(conn), NOTHING);
    }
  }

  // ------------------------------------------------------------------ error policy

  /**
   * A request failed with `err`: apply the export's policy for `operation` (QEMU's device models
   * do this with werror/rerror). report: the client gets the error. ignore: the client is told
   * the request succeeded (`ignored` makes its result). stop: the export stops and the request is
   * held until {@link resume} runs it again through `retry`. Every action but the policy-less
   * report sends BLOCK_IO_ERROR.
   */
  private failed<T>(
    err: unknown,
    operation: 'read' | 'write',
    conn: ConnState | undefined,
    retry: () => Promise<T>,
    ignored: () => T,
  ): Promise<T> | T {
    const policy = this.opts.onError;
    // A client that is gone, or an export being removed, gets no policy: nobody would resume it.
    if (!policy || conn?.closed || this.shuttingDown) {
      this.counters.failedOps++;
      throw err;
    }
    const errno: Errno = err instanceof DaemonError ? err.errno : 'EIO';
    const action = errorAction(operation === 'read' ? policy.rerror : policy.werror, errno);
    if (action === 'stop') {
      // io-status first (QEMU blk_error_action), so a query after the event agrees with it;
      // only the first error of a stop sets it.
      if (this.ioStatus === 'ok') this.ioStatus = errno === 'ENOSPC' ? 'nospace' : 'failed';
      if (!this.stopped) {
        this.stopped = true;
        this.log.warn({ errno, operation }, 'I/O error: export stopped (error policy stop)');
      }
    }
    this.opts.reportIoError?.({
      device: this.id,
      'node-name': this.nodeName,
      operation,
      action,
      nospace: errno === 'ENOSPC',
      reason: strerror({ code: errno }),
    });
    if (action === 'report') {
      this.counters.failedOps++;
      throw err;
    }
    if (action === 'ignore') return ignored();
    return this.hold(conn, retry);
  }

  /** Keep a request until the export is resumed (or the request's client or the export goes). */
  private hold<T>(conn: ConnState | undefined, run: () => Promise<T>): Promise<T> {
    if (conn?.closed || this.shuttingDown) {
      this.counters.failedOps++;
      return Promise.reject(heldError('the export is being removed'));
    }
    return new Promise<T>((resolve, reject) => {
      this.held.push({
        conn,
        retry: () => void run().then(resolve, reject),
        fail: (e) => {
          this.counters.failedOps++;
          reject(e);
        },
      });
    });
  }

  /** Whether a `stop` policy holds this export's requests. */
  get isStopped(): boolean {
    return this.stopped;
  }

  /** How many requests are held now. */
  get heldCount(): number {
    return this.held.length;
  }

  /**
   * `cont` / x-block-export-resume: io-status back to ok, and the held requests run again in
   * the order they came (one that fails again under `stop` stops the export again and is held
   * once more, with every request after it).
   */
  resume(): void {
    this.ioStatus = 'ok';
    if (!this.stopped) return;
    this.stopped = false;
    const held = this.held;
    this.held = [];
    this.log.info({ held: held.length }, 'export resumed');
    for (const h of held) h.retry();
  }

  /** Fail every held request (the export is being removed). */
  failHeld(reason: string): void {
    const held = this.held;
    this.held = [];
    for (const h of held) h.fail(heldError(reason));
  }

  /** The client of `conn` is gone: its held requests fail now (their replies go nowhere). */
  private dropHeld(conn: ConnState): void {
    if (this.held.length === 0) return;
    const keep: HeldRequest[] = [];
    for (const h of this.held) {
      if (h.conn === conn) h.fail(heldError('the client disconnected'));
      else keep.push(h);
    }
    this.held = keep;
  }

  /**
   * Flush elision: when nothing was written (and acknowledged) since the last flush started,
   * a flush only has to wait for a flush already running; otherwise it flushes the node.
   * All connections share one node, so one fsync covers every connection (multi-conn).
   */
  private async flushNode(): Promise<void> {
    if (!this.dirty) {
      if (this.flushInFlight) await this.flushInFlight;
      return;
    }
    this.dirty = false;
    this.counters.flushesPerformed++;
    const p = this.user.io.flush();
    const tracked = p.then(
      () => undefined,
      () => undefined,
    );
    this.flushInFlight = tracked;
    try {
      await p;
    } catch (err) {
      this.dirty = true;
      throw err;
    } finally {
      if (this.flushInFlight === tracked) this.flushInFlight = undefined;
    }
  }

  async cache(): Promise<void> {
    // The page cache is the cache: nothing to prefetch into.
  }

  private async status(
    offset: number,
    length: number,
    maxExtents: number,
    flagsOf: (e: BlockExtent) => number,
    maxExtentLength = 0xffffffff,
  ): Promise<NbdExtent[]> {
    if (maxExtentLength <= 0xffffffff) {
      const len = Math.min(length, STATUS_CHUNK);
      const extents = await this.user.io.blockStatus(offset, len);
      return toNbdExtents(extents, offset, len, maxExtents, flagsOf);
    }
    const end = offset + length;
    const all: BlockExtent[] = [];
    let pos = offset;
    let window = STATUS_CHUNK;
    // Runs of equal NBD flags so far (what the reply will hold after merging).
    let runs = 0;
    let lastFlags = -1;
    for (let i = 0; i < WIDE_STATUS_CALLS && pos < end; i++) {
      const len = Math.min(window, end - pos);
      const ext = await this.user.io.blockStatus(pos, len);
      const first = ext[0];
      if (!first) break;
      for (const e of ext) {
        const f = flagsOf(e) >>> 0;
        if (f !== lastFlags) runs++;
        lastFlags = f;
        all.push(e);
      }
      const last = ext[ext.length - 1]!;
      pos = last.offset + last.length;
      // Fewer bytes than asked, a window that ends fragmented, or more runs than fit: stop here.
      if (pos - first.offset < len || last.length * 2 < len || runs > maxExtents) break;
      window *= 2;
    }
    return toNbdExtents(all, offset, Math.max(pos, offset) - offset || length, maxExtents, flagsOf, maxExtentLength);
  }
}

const NOTHING = (): void => undefined;

function heldError(why: string): DaemonError {
  return new DaemonError('EXPORT_SHUTDOWN', `held request dropped: ${why}`, { errno: 'ESHUTDOWN' });
}

/**
 * One connection's view of an export: every property is the export's, and I/O goes to the
 * export tagged with the connection, so that held requests can be dropped when it closes.
 */
class ExportConnection implements NbdExportHandle {
  constructor(
    private readonly exp: NbdExport,
    private readonly conn: ConnState,
  ) {}

  get name(): string {
    return this.exp.name;
  }
  get description(): string | undefined {
    return this.exp.description;
  }
  get size(): number {
    return this.exp.size;
  }
  get readOnly(): boolean {
    return this.exp.readOnly;
  }
  get canFlush(): boolean {
    return this.exp.canFlush;
  }
  get canTrim(): boolean {
    return this.exp.canTrim;
  }
  get canWriteZeroes(): boolean {
    return this.exp.canWriteZeroes;
  }
  get canFastZero(): boolean {
    return this.exp.canFastZero;
  }
  get canCache(): boolean {
    return this.exp.canCache;
  }
  get multiConn(): boolean {
    return this.exp.multiConn;
  }
  get blockSizes(): NbdBlockSizes {
    return this.exp.blockSizes;
  }
  get metaContexts(): readonly NbdMetaContextProvider[] {
    return this.exp.metaContexts;
  }

  onConnect(info: NbdConnectionInfo): NbdSession | DaemonError {
    return this.exp.onConnect(info);
  }
  tryReadSync(buf: Buffer, offset: number): boolean {
    return this.exp.tryReadSync(buf, offset);
  }
  tryReadFileSync(offset: number, length: number, holes?: boolean, lending?: boolean): NbdFileRange | undefined {
    return this.exp.tryReadFileSync(offset, length, holes, lending);
  }
  tryReadZeroSync(offset: number, length: number): boolean {
    return this.exp.tryReadZeroSync(offset, length);
  }
  read(buf: Buffer, offset: number): Promise<NbdZeroRanges | void> {
    return this.exp.read(buf, offset, this.conn);
  }
  write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    return this.exp.write(buf, offset, fua, this.conn);
  }
  submitWrite(buf: Buffer, offset: number, fua: boolean, done: NbdWriteDone): boolean {
    return this.exp.submitWrite(buf, offset, fua, done, this.conn);
  }
  writeZeroes(offset: number, length: number, o: NbdWriteZeroesOptions): Promise<void> {
    return this.exp.writeZeroes(offset, length, o, this.conn);
  }
  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.exp.trim(offset, length, fua, this.conn);
  }
  flush(): Promise<void> {
    return this.exp.flush(this.conn);
  }
  cache(): Promise<void> {
    return this.exp.cache();
  }
}
