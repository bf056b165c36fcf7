/**
 * One NBD export: adapts a block node (through a permission-holding BlockUser) to the
 * NBD engine's `NbdExportHandle`, and keeps the export's connections, limits and counters.
 */
import type { Logger } from '../util/logger.js';
import { DaemonError } from '../util/errors.js';
import type { BlockExtent, BlockUser } from '../block/types.js';
import { EXTENT_DATA, EXTENT_ZERO } from '../block/types.js';
import type {
  NbdConnectionInfo,
  NbdExportHandle,
  NbdMetaContext,
  NbdMetaContextProvider,
  NbdSession,
  NbdWriteZeroesOptions,
  NbdZeroRanges,
  NbdBlockSizes,
  NbdExtent,
} from '../nbd/backend.js';
import { DEFAULT_BLOCK_SIZES, StaticContextProvider } from '../nbd/backend.js';
import { NBD_STATE_DIRTY, NBD_STATE_HOLE, NBD_STATE_ZERO } from '../nbd/protocol.js';
import type { DirtyBitmap } from '../block/dirty-bitmap.js';
import type { NamedBitmap } from '../block/dirty-bitmap-set.js';

export type MultiConnMode = 'auto' | 'on' | 'off';

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

/** Convert block extents to NBD extents, merging equal neighbours and clamping to maxExtents. */
function toNbdExtents(
  extents: readonly BlockExtent[],
  offset: number,
  length: number,
  maxExtents: number,
  flagsOf: (e: BlockExtent) => number,
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
    if (last && last.flags === flags && last.length + len <= 0xffffffff) last.length += len;
    else {
      if (out.length >= maxExtents) break;
      out.push({ length: Math.min(len, 0xffffffff), flags });
    }
    pos = eEnd;
  }
  if (out.length === 0) out.push({ length: Math.min(length, 0xffffffff), flags: 0 });
  return out;
}

/**
 * `qemu:dirty-bitmap:*` extents: NBD_STATE_DIRTY (1) for dirty granules, 0 for clean ones.
 * Runs are granule-aligned inside the request; anything past the bitmap's size (a bitmap on a
 * smaller backing node) reads as clean.
 */
export function bitmapExtents(bits: DirtyBitmap, offset: number, length: number, maxExtents: number): NbdExtent[] {
  const out: NbdExtent[] = [];
  const max = Math.max(1, maxExtents);
  for (const e of bits.extents(offset, length, max)) {
    // NBD extent lengths are u32: cut longer runs (the client asks again for the rest).
    out.push({ length: Math.min(e.length, 0xffffffff), flags: e.dirty ? NBD_STATE_DIRTY : 0 });
    if (e.length > 0xffffffff) break;
  }
  if (out.length === 0) out.push({ length: Math.min(length, 0xffffffff), flags: 0 });
  return out;
}

/** Status calls cover at most this much at once (the client asks again for the rest). */
const STATUS_CHUNK = 1 << 30;

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
      blockStatus: (o, l, m) => this.status(o, l, m, baseAllocationFlags),
    };
    const qemu: NbdMetaContext[] = [];
    if (opts.allocationDepth) {
      qemu.push({
        name: 'qemu:allocation-depth',
        blockStatus: (o, l, m) => this.status(o, l, m, (e) => e.depth),
      });
    }
    for (const bm of opts.bitmaps ?? []) {
      qemu.push({
        name: `qemu:dirty-bitmap:${bm.name}`,
        // In-memory: answer the whole request (no STATUS_CHUNK cap), fewer round trips.
        blockStatus: async (o, l, m) => bitmapExtents(bm.bits, o, l, m),
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
    if (reader) this.readers++;
    this.counters.connectionsTotal++;
    this.log.info(
      { conn: info.id, client: info.clientAddress, connections: this.connections.size },
      'client connected',
    );
    return {
      onDisconnect: () => {
        this.connections.delete(info.id);
        if (reader) this.readers--;
        this.log.info({ conn: info.id, client: info.clientAddress }, 'client disconnected');
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
    // Only reads known to hold no hole: holes go out as OFFSET_HOLE chunks, as QSD sends them
    // for reads of any size (known zeroes: tryReadZeroSync; the rest: read() asks block status).
    if (!this.user.io.isDataSync?.(offset, buf.length)) return false;
    if (!this.user.io.tryReadSync(buf, offset)) return false;
    this.counters.readOps++;
    this.counters.readBytes += buf.length;
    return true;
  }

  tryReadZeroSync(offset: number, length: number): boolean {
    if (!this.user.io.isZeroSync?.(offset, length)) return false;
    this.counters.readOps++;
    this.counters.readBytes += length;
    return true;
  }

  async read(buf: Buffer, offset: number): Promise<NbdZeroRanges | void> {
    this.counters.readOps++;
    this.counters.readBytes += buf.length;
    // One async frame per read (the fast path): the failure count wraps the body in place.
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
      this.counters.failedOps++;
      throw err;
    }
  }

  async write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    this.counters.writeOps++;
    this.counters.writeBytes += buf.length;
    const fuaHere = fua && !this.opts.writethrough;
    try {
      await this.user.io.write(buf, offset, { fua: fuaHere });
      if (!fuaHere) this.dirty = true;
      if (this.opts.writethrough) await this.flushNode();
    } catch (err) {
      this.counters.failedOps++;
      throw err;
    }
  }

  async writeZeroes(offset: number, length: number, o: NbdWriteZeroesOptions): Promise<void> {
    this.counters.zeroOps++;
    try {
      await this.user.io.writeZeroes(offset, length, {
        mayUnmap: o.mayUnmap,
        noFallback: o.fastZero,
        fua: o.fua && !this.opts.writethrough,
      });
      if (!o.fua || this.opts.writethrough) this.dirty = true;
      if (this.opts.writethrough) await this.flushNode();
    } catch (err) {
      this.counters.failedOps++;
      throw err;
    }
  }

  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    this.counters.trimOps++;
    try {
      await this.user.io.discard(offset, length);
      this.dirty = true;
      if (fua || this.opts.writethrough) await this.flushNode();
    } catch (err) {
      this.counters.failedOps++;
      throw err;
    }
  }

  async flush(): Promise<void> {
    this.counters.flushesRequested++;
    try {
      await this.flushNode();
    } catch (err) {
      this.counters.failedOps++;
      throw err;
    }
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
  ): Promise<NbdExtent[]> {
    const len = Math.min(length, STATUS_CHUNK);
    const extents = await this.user.io.blockStatus(offset, len);
    return toNbdExtents(extents, offset, len, maxExtents, flagsOf);
  }
}
