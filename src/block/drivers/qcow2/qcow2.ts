/**
 * `qcow2`: the QEMU copy-on-write format driver over a `file` child, with an optional `backing`
 * child (opened by the graph from the header or linked by name).
 *
 * Concurrency: reads and in-place writes to allocated clusters run without locks. Allocating
 * writes take a per-guest-cluster lock (so two writes to one new cluster are serialised, writes
 * to different clusters are not) and the metadata mutex only around the in-memory metadata
 * change; guest data is never written under the metadata mutex.
 *
 * Crash safety (digest §7): data is written before the L2 entry that points at it; L2/L1 entries
 * reach the disk only after the refcount increments they depend on (refblocks written + synced,
 * unless lazy refcounts with the dirty bit set); clusters whose last reference goes away are
 * freed only after that change is on disk (frees are deferred to the next metadata write-back).
 */
import { dirname, isAbsolute, resolve as resolvePath } from 'node:path';
import { BlockError } from '../../../util/errors.js';
import {
  EXTENT_ALLOCATED,
  EXTENT_DATA,
  EXTENT_ZERO,
  type BlockDriver,
  type BlockExtent,
  type BlockIO,
  type DriverCaps,
  type WriteFlags,
  type ZeroFlags,
} from '../../types.js';
import {
  BASE_MEMBERS,
  optBool,
  optError,
  optSize,
  qemuJson,
  rejectUnknown,
  type DriverOpenContext,
  type Options,
} from '../common.js';
import {
  AUTOCLEAR_BITMAPS,
  AUTOCLEAR_KNOWN,
  COMPAT_LAZY_REFCOUNTS,
  HEADER_PROBE,
  HI_COMPRESSED,
  HI_COPIED,
  HI_OFFSET_MASK,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  L1_HI_RESERVED,
  L1_LO_RESERVED,
  L2_HI_RESERVED,
  L2_LO_RESERVED,
  LO_OFFSET_MASK,
  LO_ZERO_FLAG,
  MAX_L1_SIZE,
  corrupt,
  parseHeader,
  readSnapshotTable,
  writeU64,
  buildHeader,
  type BitmapsExt,
  type Qcow2Header,
  type SnapshotInfo,
} from './format.js';
import { compressedDesc, decompressCluster, hasZstd, zstdUnavailableMessage } from './compress.js';
import { Refcounts } from './refcount.js';
import { Qcow2BitmapStore, bitmapClusters } from '../../dirty-bitmap-qcow2.js';
import type { LoadedBitmap, NamedBitmap } from '../../dirty-bitmap-set.js';
import { KeyedLocks, Mutex, Storage } from './storage.js';
import {
  MetadataMap,
  OL_ACTIVE_L1,
  OL_ACTIVE_L2,
  OL_BITMAP_DIRECTORY,
  OL_INACTIVE_L1,
  OL_INACTIVE_L2,
  OL_MAIN_HEADER,
  OL_REFCOUNT_BLOCK,
  OL_REFCOUNT_TABLE,
  OL_SNAPSHOT_TABLE,
  overlapName,
  parseOverlapCheck,
} from './overlap.js';

const QCOW2_MEMBERS = [
  ...BASE_MEMBERS,
  'file',
  'backing',
  'lazy-refcounts',
  'pass-discard-request',
  'pass-discard-snapshot',
  'pass-discard-other',
  'overlap-check',
  'cache-size',
  'l2-cache-size',
  'l2-cache-entry-size',
  'refcount-cache-size',
  'cache-clean-interval',
  'encrypt',
  'data-file',
];

/** QEMU's default maximum L2 cache (Linux): 32 MiB, or less when that covers the whole disk. */
const DEFAULT_L2_CACHE_MAX = 32 * 1024 * 1024;

/** How one guest range maps (a run of clusters or subclusters of one kind). */
type Seg =
  | { kind: 'data'; guest: number; length: number; host: number }
  | { kind: 'zero'; guest: number; length: number }
  | { kind: 'unalloc'; guest: number; length: number }
  | { kind: 'compressed'; guest: number; length: number; cluster: number; hi: number; lo: number };

/** Header offsets of the version 3 feature bit fields. */
const HDR_INCOMPATIBLE = 72;
const HDR_AUTOCLEAR = 88;

/** Kinds of a standard (8-byte) L2 entry, for the fast paths. */
const K_UNALLOC = 0;
const K_DATA = 1;
const K_ZERO = 2;
const K_COMPRESSED = 3;
/** An entry kindOf() rejects (kindsOf() marks it; kindOf() raises the error when it is used). */
const K_CORRUPT = 4;

/** Block status covers at most this many clusters per call (the caller asks again for the rest). */
const STATUS_MAX_CLUSTERS = 1 << 20;

interface CachedL2 {
  offset: number;
  buf: Buffer;
  dirty: boolean;
  /** LRU stamp (driver's use clock at the last access). */
  used: number;
  /**
   * Status kind of every entry (standard L2: K_DATA, K_ZERO, K_UNALLOC or K_CORRUPT), built on
   * the first block status call, kept current by setEntry.
   */
  kinds?: Uint8Array | undefined;
}

/** A decoded L2 entry. */
interface Entry {
  hi: number;
  lo: number;
  bitmap: number; // low 32 bits: alloc; high 32 bits in `zeroBits`
  zeroBits: number;
  type: 'unalloc' | 'normal' | 'zero-plain' | 'zero-alloc' | 'compressed';
  host: number;
  copied: boolean;
}

/** What the graph needs to open the backing file recorded in an image. */
export interface BackingRequest {
  /** Path as recorded in the header. */
  recorded: string;
  /** Resolved against the image's directory. */
  filename: string;
  format: string | undefined;
}

interface PendingFree {
  cluster: number;
  discard: boolean;
}

export class Qcow2Driver implements BlockDriver {
  readonly name = 'qcow2';
  readonly caps: DriverCaps;
  readonly header: Qcow2Header;
  readonly clusterSize: number;
  private readonly clusterBits: number;
  private readonly extL2: boolean;
  private readonly entrySize: number;
  private readonly l2Entries: number;
  private readonly subclusterSize: number;
  private readonly storage: Storage;
  private readonly refcounts: Refcounts | undefined;
  private l1: Buffer;
  private readonly l2Cache = new Map<number, CachedL2>();
  private readonly l2Loading = new Map<number, Promise<CachedL2>>();
  private readonly l2Capacity: number;
  private readonly meta = new Mutex();
  private readonly clusterLocks = new KeyedLocks();
  private pending: PendingFree[] = [];
  private readonly decompressed = new Map<number, Promise<Buffer>>();
  private lazy: boolean;
  private dirtyBitSet: boolean;
  private size: number;
  private closed = false;
  private readonly origFileSize: number;
  private readonly passDiscardRequest: boolean;
  /** Internal snapshots (read at open; never changed by blockd) and the table's length. */
  private snapshots: SnapshotInfo[] = [];
  private snapshotTableBytes = 0;
  /** Metadata kinds checked before writes (overlap-check), and where metadata lives. */
  private readonly olMask: number;
  private readonly ol: MetadataMap;
  /**
   * Set when a write would have hit metadata: the image is marked corrupt and the node refuses
   * all further I/O (QEMU detaches the driver: "No medium found").
   */
  private broken = false;

  private constructor(
    private readonly ctx: DriverOpenContext,
    private readonly opts: Options,
    header: Qcow2Header,
    l1: Buffer,
    storage: Storage,
    refcounts: Refcounts | undefined,
    l2CacheBytes: number,
    readonly writable: boolean,
  ) {
    this.header = header;
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.extL2 = (header.incompatible & INCOMPAT_EXTL2) !== 0n;
    this.entrySize = this.extL2 ? 16 : 8;
    this.l2Entries = this.clusterSize / this.entrySize;
    this.subclusterSize = this.clusterSize / 32;
    this.storage = storage;
    this.refcounts = refcounts;
    this.l1 = l1;
    this.size = header.size;
    this.origFileSize = storage.size();
    this.l2Capacity = Math.max(2, Math.floor(l2CacheBytes / this.clusterSize));
    this.olMask = writable ? parseOverlapCheck(opts['overlap-check']) : 0;
    this.ol = new MetadataMap(this.clusterSize);
    const lazyOpt = optBool(opts, 'lazy-refcounts');
    this.lazy = writable && (lazyOpt ?? (header.compatible & COMPAT_LAZY_REFCOUNTS) !== 0n);
    this.dirtyBitSet = (header.incompatible & INCOMPAT_DIRTY) !== 0n;
    this.passDiscardRequest = optBool(opts, 'pass-discard-request') ?? ctx.options.discard === 'unmap';
    this.caps = {
      writeZeroes: header.version === 3,
      fua: false,
      discard: ctx.options.discard === 'unmap',
      blockStatus: true,
      resize: true,
      readSync: true,
      zeroInit: false,
    };
  }

  // ---- open ---------------------------------------------------------------------------------

  static async open(ctx: DriverOpenContext, opts: Options): Promise<Qcow2Driver> {
    rejectUnknown(opts, QCOW2_MEMBERS);
    if (opts['encrypt'] !== undefined) throw optError("Option 'encrypt' is not supported by blockd");
    if (opts['data-file'] !== undefined) throw optError("Option 'data-file' is not supported by blockd");
    for (const k of ['pass-discard-request', 'pass-discard-snapshot', 'pass-discard-other']) optBool(opts, k);
    parseOverlapCheck(opts['overlap-check']);
    const cacheSize = optSize(opts, 'cache-size', 'int');
    const l2CacheSize = optSize(opts, 'l2-cache-size', 'int');
    const refcountCacheSize = optSize(opts, 'refcount-cache-size', 'int');
    optSize(opts, 'l2-cache-entry-size', 'int');
    optSize(opts, 'cache-clean-interval', 'int');
    if (cacheSize !== undefined && l2CacheSize !== undefined && refcountCacheSize !== undefined) {
      throw optError("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time");
    }
    if (cacheSize !== undefined && l2CacheSize !== undefined && l2CacheSize > cacheSize) {
      throw optError('l2-cache-size may not exceed cache-size');
    }

    const fileIO = (): BlockIO => ctx.childIO('file');
    const fileSize = fileIO().size();
    const probe = Buffer.alloc(Math.min(HEADER_PROBE, fileSize));
    if (probe.length > 0) await fileIO().read(probe, 0);
    if (probe.length < 72 || probe.readUInt32BE(0) !== 0x514649fb) {
      throw optError('Image is not in qcow2 format');
    }
    const bits = probe.readUInt32BE(20);
    if (bits < 9 || bits > 21) throw optError(`Unsupported cluster size: 2^${bits}`);
    const cs = 2 ** bits;
    const storage = new Storage(fileIO, cs);
    const c0 = Buffer.alloc(Math.min(cs, fileSize));
    await storage.read(c0, 0);
    const h = parseHeader(c0, fileSize);
    if (h.compressionType === 1 && !hasZstd()) {
      ctx.log.warn(zstdUnavailableMessage() ?? 'zstd compressed clusters cannot be read');
    }

    const writable = !ctx.readOnly;
    if (writable) {
      if ((h.incompatible & INCOMPAT_CORRUPT) !== 0n) {
        throw optError('qcow2: Image is corrupt; cannot be opened read/write');
      }
    }

    const l1 = Buffer.alloc(h.l1Size * 8);
    if (l1.length) await storage.read(l1, h.l1TableOffset);

    // Cache sizing, QEMU's rules: by default enough L2 to cover the disk, capped at 32 MiB;
    // refcount cache a quarter of the L2 cache, at least 4 clusters.
    const l2Entries = cs / ((h.incompatible & INCOMPAT_EXTL2) !== 0n ? 16 : 8);
    const coverAll = Math.ceil(h.size / (cs * l2Entries)) * cs;
    let l2Bytes: number;
    let rcBytes: number;
    if (l2CacheSize !== undefined) {
      l2Bytes = l2CacheSize;
      rcBytes = refcountCacheSize ?? (cacheSize !== undefined ? cacheSize - l2CacheSize : Math.max(4 * cs, l2Bytes / 4));
    } else if (cacheSize !== undefined) {
      rcBytes = refcountCacheSize ?? Math.max(4 * cs, cacheSize / 4);
      l2Bytes = Math.max(2 * cs, cacheSize - rcBytes);
    } else {
      l2Bytes = Math.min(DEFAULT_L2_CACHE_MAX, Math.max(coverAll, 2 * cs));
      rcBytes = refcountCacheSize ?? Math.max(4 * cs, l2Bytes / 4);
    }

    let refcounts: Refcounts | undefined;
    const driverRef: { d?: Qcow2Driver } = {};
    if (writable) {
      const table = await Refcounts.readTable(storage, h.refcountTableOffset, h.refcountTableClusters, cs);
      refcounts = new Refcounts(
        {
          storage,
          writeReftablePointer: async (offset, clusters) => {
            const b = Buffer.alloc(12);
            writeU64(b, 0, offset);
            b.writeUInt32BE(clusters, 8);
            await storage.write(b, 48);
            await storage.flush();
            if (driverRef.d) {
              driverRef.d.header.refcountTableOffset = offset;
              driverRef.d.header.refcountTableClusters = clusters;
            }
          },
          checkWrite: (offset, length, own) => driverRef.d?.checkOverlap(offset, length, own),
          metadataChanged: (kind, offset, bytes, added) => {
            if (added) driverRef.d?.ol.add(offset, bytes, kind);
            else driverRef.d?.ol.remove(offset, bytes, kind);
          },
        },
        bits,
        h.refcountOrder,
        table,
        h.refcountTableOffset,
        h.refcountTableClusters,
        Math.max(4, Math.floor(rcBytes / cs)),
      );
    }
    const d = new Qcow2Driver(ctx, opts, h, l1, storage, refcounts, l2Bytes, writable);
    driverRef.d = d;
    if (h.nbSnapshots > 0) {
      const st = await readSnapshotTable((b, o) => storage.read(b, o), h.snapshotsOffset, h.nbSnapshots, cs);
      d.snapshots = st.snapshots;
      d.snapshotTableBytes = st.bytes;
    }
    if (writable) {
      await d.prepareWritable();
      await d.buildOverlapMap();
    }
    return d;
  }

  /** Where metadata lives now (read-write open, after any repair). */
  private async buildOverlapMap(): Promise<void> {
    const h = this.header;
    const cs = this.clusterSize;
    const ol = this.ol;
    ol.add(0, cs, OL_MAIN_HEADER);
    if (h.l1Size > 0) ol.add(h.l1TableOffset, h.l1Size * 8, OL_ACTIVE_L1);
    ol.add(h.refcountTableOffset, h.refcountTableClusters * cs, OL_REFCOUNT_TABLE);
    for (const off of this.refcounts?.table ?? []) if (off !== 0) ol.add(off, cs, OL_REFCOUNT_BLOCK);
    for (let i = 0; i < h.l1Size; i++) {
      const off = l1EntryOffset(this.l1, i, cs);
      if (off > 0) ol.add(off, cs, OL_ACTIVE_L2);
    }
    if (h.nbSnapshots > 0) {
      ol.add(h.snapshotsOffset, this.snapshotTableBytes, OL_SNAPSHOT_TABLE);
      for (const sn of this.snapshots) {
        if (sn.l1Size === 0) continue;
        ol.add(sn.l1TableOffset, sn.l1Size * 8, OL_INACTIVE_L1);
        if ((this.olMask & OL_INACTIVE_L2) === 0) continue;
        // Snapshot tables never change while we are open: read them once.
        const l1 = Buffer.alloc(sn.l1Size * 8);
        await this.storage.read(l1, sn.l1TableOffset);
        for (let i = 0; i < sn.l1Size; i++) {
          const off = l1EntryOffset(l1, i, cs);
          if (off > 0) ol.add(off, cs, OL_INACTIVE_L2);
        }
      }
    }
    this.bitmapDirInMap = undefined;
    this.syncBitmapDirectory();
  }

  /** The bitmap directory as last recorded in the overlap map. */
  private bitmapDirInMap: { offset: number; bytes: number } | undefined;

  /** Follow the header's bitmap directory (the bitmap code moves it on store/remove). */
  private syncBitmapDirectory(): void {
    const b = this.header.bitmaps;
    const cur = this.bitmapDirInMap;
    if (cur && b && cur.offset === b.directoryOffset && cur.bytes === b.directorySize) return;
    if (cur) this.ol.remove(cur.offset, cur.bytes, OL_BITMAP_DIRECTORY);
    this.bitmapDirInMap = b ? { offset: b.directoryOffset, bytes: b.directorySize } : undefined;
    if (b) this.ol.add(b.directoryOffset, b.directorySize, OL_BITMAP_DIRECTORY);
  }

  /**
   * Overlap check before writing `[offset, offset+length)` of the image file, which rewrites
   * metadata of kinds `own` (0 for guest data and new clusters). On an overlap: mark the image
   * corrupt and throw EIO (QEMU's qcow2_pre_write_overlap_check).
   */
  checkOverlap(offset: number, length: number, own: number): void {
    if (this.broken) throw this.noMedium();
    const mask = this.olMask & ~own;
    if (mask === 0) return;
    // The header check is by offset, not by cluster (QEMU: any write below the first cluster end).
    let hit = offset < this.clusterSize ? mask & OL_MAIN_HEADER : 0;
    if (hit === 0) hit = this.ol.check(offset, length, mask);
    if (hit !== 0) throw this.signalCorruption(offset, length, `Preventing invalid write on metadata (overlaps with ${overlapName(hit)})`);
  }

  /**
   * Fatal corruption: log it, emit BLOCK_IMAGE_CORRUPTED (once), set the corrupt bit in the
   * header (in the background; nothing else is written afterwards) and stop all I/O.
   */
  private signalCorruption(offset: number | undefined, size: number | undefined, msg: string): BlockError {
    if (!this.broken) {
      this.broken = true;
      this.ctx.log.error(
        { offset, size },
        `qcow2: Marking image as corrupt: ${msg}; further corruption events will be suppressed`,
      );
      this.corruptionEvent(msg, true, offset, size);
      if (this.header.version === 3) {
        this.header.incompatible |= INCOMPAT_CORRUPT;
        this.corruptMarked = this.writeHeaderU64(HDR_INCOMPATIBLE, this.header.incompatible).catch(
          (err: unknown) => this.ctx.log.error({ err }, 'qcow2: could not set the corrupt bit'),
        );
      }
    }
    return corruptError(msg);
  }

  /** BLOCK_IMAGE_CORRUPTED; QEMU leaves offset and size out when it is not about one write. */
  private corruptionEvent(msg: string, fatal: boolean, offset?: number, size?: number): void {
    this.ctx.emitEvent?.('BLOCK_IMAGE_CORRUPTED', {
      device: '',
      msg,
      ...(offset !== undefined && { offset }),
      'node-name': this.ctx.nodeName,
      fatal,
      ...(size !== undefined && { size }),
    });
  }

  /** The header write of signalCorruption() (close waits for it). */
  private corruptMarked: Promise<void> | undefined;

  private noMedium(): BlockError {
    return new BlockError('NO_MEDIUM', 'EINVAL', 'No medium found');
  }

  /** Guest data (or a new cluster's contents) to the file, after the overlap check. */
  private writeData(buf: Buffer, offset: number): Promise<void> {
    try {
      this.checkOverlap(offset, buf.length, 0);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.storage.write(buf, offset);
  }

  /** One 64-bit header field (feature bits), written and flushed. */
  private async writeHeaderU64(at: number, v: bigint): Promise<void> {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(v, 0);
    await this.storage.write(b, at);
    await this.storage.flush();
  }

  /** Read-write open: repair a dirty image, clear unknown autoclear bits. */
  private async prepareWritable(): Promise<void> {
    const h = this.header;
    if ((h.incompatible & INCOMPAT_DIRTY) !== 0n) {
      try {
        await this.rebuildRefcounts();
      } catch (err) {
        throw optError(`Could not repair dirty image: ${err instanceof Error ? err.message : String(err)}`);
      }
    }
    if (h.version === 3 && (h.autoclear & ~AUTOCLEAR_KNOWN) !== 0n) {
      h.autoclear &= AUTOCLEAR_KNOWN;
      await this.writeHeaderU64(HDR_AUTOCLEAR, h.autoclear);
    }
  }

  /**
   * Dirty image (lazy refcounts, not closed cleanly): count every reference from the metadata
   * and write a fresh refcount structure after the last used cluster (self-describing, like a
   * table growth), switch the header to it, then clear the dirty bit. The old table and blocks
   * simply become free clusters.
   */
  private async rebuildRefcounts(): Promise<void> {
    const h = this.header;
    const cs = this.clusterSize;
    const rc = this.refcounts;
    if (!rc) return;
    let n = Math.ceil(this.storage.size() / cs);
    const counts = new Map<number, number>();
    const ref = (c: number): void => {
      counts.set(c, (counts.get(c) ?? 0) + 1);
      if (c + 1 > n) n = c + 1;
    };
    const refRange = (offset: number, bytes: number): void => {
      for (let i = 0; i < Math.ceil(bytes / cs); i++) ref(offset / cs + i);
    };
    // One L1 table, its L2 tables and their clusters (a shared L2 table counts once per L1,
    // as each L1 reaches it: that is how snapshots raise refcounts).
    const walkL1 = async (l1: Buffer, entries: number): Promise<void> => {
      for (let i = 0; i < entries; i++) {
        const off = l1EntryOffset(l1, i, cs);
        if (off < 0) throw corrupt(`Invalid L1 entry ${i}`);
        if (off === 0) continue;
        ref(off / cs);
        const t: CachedL2 = { offset: off, buf: Buffer.alloc(cs), dirty: false, used: 0 };
        await this.storage.read(t.buf, off);
        for (let j = 0; j < this.l2Entries; j++) for (const c of this.refsOf(this.decode(t, j))) ref(c);
      }
    };
    ref(0);
    refRange(h.l1TableOffset, h.l1Size * 8);
    await walkL1(this.l1, h.l1Size);
    // Internal snapshots: the table, each snapshot's L1 table and what it reaches.
    if (h.nbSnapshots > 0) {
      refRange(h.snapshotsOffset, this.snapshotTableBytes);
      for (const s of this.snapshots) {
        refRange(s.l1TableOffset, s.l1Size * 8);
        const l1 = Buffer.alloc(s.l1Size * 8);
        await this.storage.read(l1, s.l1TableOffset);
        await walkL1(l1, s.l1Size);
      }
    }
    // Persistent bitmaps (only a consistent extension: an inconsistent one is dropped at load).
    if (h.bitmaps && (h.autoclear & AUTOCLEAR_BITMAPS) !== 0n) {
      for (const c of await bitmapClusters((b, o) => this.storage.read(b, o), h.bitmaps, cs)) ref(c);
    }
    const max = rc.order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** rc.order) - 1;
    for (const v of counts.values()) if (v > max) throw corrupt('refcount overflow');
    // New structure at cluster n: `blocks` refcount blocks, then the table.
    const perBlock = rc.perBlock;
    let blocks = 1;
    let tableClusters = 1;
    for (;;) {
      const end = n + blocks + tableClusters;
      const needBlocks = Math.ceil(end / perBlock);
      const needTable = Math.ceil((needBlocks * 8) / cs);
      if (needBlocks === blocks && needTable === tableClusters) break;
      blocks = Math.max(blocks, needBlocks);
      tableClusters = Math.max(tableClusters, needTable);
    }
    const base = n;
    for (let i = 0; i < blocks + tableClusters; i++) ref(base + i);
    const blockBuf = Buffer.alloc(blocks * cs);
    const width = 2 ** rc.order;
    for (const [c, v] of counts) {
      const blk = blockBuf.subarray(Math.floor(c / perBlock) * cs, Math.floor(c / perBlock) * cs + cs);
      setCount(blk, c % perBlock, v, width);
    }
    const table = Buffer.alloc(tableClusters * cs);
    for (let b = 0; b < blocks; b++) writeU64(table, b * 8, (base + b) * cs);
    await this.storage.write(blockBuf, base * cs);
    await this.storage.write(table, (base + blocks) * cs);
    await this.storage.flush();
    const ptr = Buffer.alloc(12);
    writeU64(ptr, 0, (base + blocks) * cs);
    ptr.writeUInt32BE(tableClusters, 8);
    await this.storage.write(ptr, 48);
    await this.storage.flush();
    h.refcountTableOffset = (base + blocks) * cs;
    h.refcountTableClusters = tableClusters;
    h.incompatible &= ~INCOMPAT_DIRTY;
    await this.writeHeaderU64(HDR_INCOMPATIBLE, h.incompatible);
    this.dirtyBitSet = false;
    rc.replaceTable(table, h.refcountTableOffset, tableClusters);
    this.ctx.log.warn('qcow2: repaired the refcounts of a dirty image');
  }

  // ---- info for the graph ---------------------------------------------------------------------

  /** The backing file recorded in the header (undefined = none). */
  backingRequest(): BackingRequest | undefined {
    const rec = this.header.backingFile;
    if (rec === undefined || rec === '') return undefined;
    let filename = rec;
    const base = this.ctx.childDriver('file').describeFilename();
    if (!isAbsolute(rec) && !base.startsWith('json:') && !rec.includes(':')) {
      filename = resolvePath(dirname(base), rec);
    }
    return { recorded: rec, filename, format: this.header.backingFormat };
  }

  /** The bitmaps extension (for the persistent bitmaps code), or undefined. */
  bitmapsExtension(): (BitmapsExt & { consistent: boolean }) | undefined {
    const b = this.header.bitmaps;
    if (!b) return undefined;
    return { ...b, consistent: (this.header.autoclear & 1n) !== 0n };
  }

  // ---- persistent dirty bitmaps (format code in block/dirty-bitmap-qcow2.ts) ------------------

  private bitmapStore: Qcow2BitmapStore | undefined;

  private bitmaps(): Qcow2BitmapStore {
    this.bitmapStore ??= new Qcow2BitmapStore({
      nodeName: this.ctx.nodeName,
      header: this.header,
      clusterSize: this.clusterSize,
      writable: this.writable,
      imageSize: () => this.size,
      fileSize: () => this.storage.size(),
      read: (b, o) => this.storage.read(b, o),
      write: (b, o) => {
        this.checkOverlap(o, b.length, OL_BITMAP_DIRECTORY);
        return this.storage.write(b, o);
      },
      flush: () => this.storage.flush(),
      alloc: (n) => this.allocClusters(n),
      free: async (o) => {
        await this.refcounts?.update(o / this.clusterSize, -1);
      },
      syncRefcounts: async () => {
        await this.refcounts?.writeDirty();
        await this.storage.flush();
      },
      writeHeader: async () => {
        await this.storage.write(buildHeader(this.header), 0);
        await this.storage.flush();
      },
    });
    return this.bitmapStore;
  }

  /** PersistentBitmapDriver: vet `block-dirty-bitmap-add persistent=true`. */
  canStoreBitmap(name: string, _granularity: number): void {
    this.bitmaps().canStore(name, this.header.bitmaps?.nbBitmaps ?? 0);
  }

  /** PersistentBitmapDriver: read the bitmap directory at open (read-write: mark in_use). */
  loadBitmaps(): Promise<LoadedBitmap[]> {
    return this.meta.run(async () => {
      try {
        return await this.bitmaps().load();
      } finally {
        this.syncBitmapDirectory();
      }
    });
  }

  /** PersistentBitmapDriver: drop a removed persistent bitmap from the image now. */
  removeStoredBitmap(name: string): Promise<void> {
    if (this.closed || this.broken) return Promise.resolve();
    return this.meta.run(async () => {
      try {
        await this.bitmaps().removeStored(name);
      } finally {
        this.syncBitmapDirectory();
      }
    });
  }

  /** PersistentBitmapDriver: store the persistent bitmaps (clean close, before close()). */
  storeBitmaps(list: readonly NamedBitmap[]): Promise<void> {
    if (this.closed || this.broken) return Promise.resolve();
    return this.meta.run(async () => {
      await this.writeback();
      try {
        await this.bitmaps().store(list);
      } finally {
        this.syncBitmapDirectory();
      }
    });
  }

  private backing(): BlockIO | undefined {
    if (this.ctx.hasChild && !this.ctx.hasChild('backing')) return undefined;
    try {
      return this.ctx.childIO('backing');
    } catch {
      return undefined;
    }
  }

  getLength(): number {
    return this.size;
  }

  // ---- L1 / L2 --------------------------------------------------------------------------------

  private l1Entry(i: number): { offset: number; copied: boolean } {
    if (i * 8 + 8 > this.l1.length) return { offset: 0, copied: false };
    const hi = this.l1.readUInt32BE(i * 8);
    const lo = this.l1.readUInt32BE(i * 8 + 4);
    if ((hi & L1_HI_RESERVED) !== 0 || (lo & L1_LO_RESERVED) !== 0) {
      throw this.corruption(`L1 entry ${i} has reserved bits set`);
    }
    const offset = (hi & HI_OFFSET_MASK) * 0x100000000 + ((lo & LO_OFFSET_MASK) >>> 0);
    if (offset % this.clusterSize !== 0) {
      throw this.corruption(`L2 table offset ${cHex(offset)} unaligned (L1 index: ${cHex(i)})`);
    }
    return { offset, copied: (hi & HI_COPIED) !== 0 };
  }

  /** Host offset of the L2 table of L1 entry `i` (0 = none); same checks as l1Entry(). */
  private l1Offset(i: number): number {
    const at = i * 8;
    if (at + 8 > this.l1.length) return 0;
    const hi = this.l1.readUInt32BE(at);
    const lo = this.l1.readUInt32BE(at + 4);
    if (hi === 0 && lo === 0) return 0;
    return this.l1Entry(i).offset;
  }

  /**
   * Synchronous L2 lookup: the cached table of L1 index `l1i`, `undefined` when the L1 entry is
   * empty (all clusters unallocated), `null` when the table is not in the cache.
   */
  private cachedL2(l1i: number): CachedL2 | undefined | null {
    const off = this.l1Offset(l1i);
    if (off === 0) return undefined;
    const t = this.l2Cache.get(off);
    if (t === undefined) return null;
    if (this.mru !== t) this.touch(t);
    return t;
  }

  /** Host offset and COPIED flag of the last entry kindOf() classified as K_DATA. */
  private hostOut = 0;
  private copiedOut = false;

  /**
   * Kind of standard L2 entry `i` of `t` (K_*), with decode()'s checks; for K_DATA the host
   * offset of the cluster is left in `hostOut` (no allocation on the hot paths).
   */
  private kindOf(t: CachedL2, i: number): number {
    const buf = t.buf;
    const at = i * 8;
    const hi = buf.readUInt32BE(at);
    const lo = buf.readUInt32BE(at + 4);
    if (hi === 0 && lo === 0) return K_UNALLOC;
    if ((hi & HI_COMPRESSED) !== 0) {
      if ((hi & HI_COPIED) !== 0) throw this.corruption('Compressed cluster has the COPIED flag set');
      return K_COMPRESSED;
    }
    if ((hi & L2_HI_RESERVED) !== 0 || (lo & L2_LO_RESERVED) !== 0) {
      throw this.corruption(`L2 entry at 0x${(t.offset + at).toString(16)} has reserved bits set`);
    }
    const loOff = (lo & LO_OFFSET_MASK) >>> 0;
    const hiOff = hi & HI_OFFSET_MASK;
    if ((loOff & (this.clusterSize - 1)) !== 0) {
      throw this.corruption(unalignedClusterMsg(hiOff * 0x100000000 + loOff, t.offset, i));
    }
    if ((lo & LO_ZERO_FLAG) !== 0) {
      if (this.header.version === 2) throw this.corruption(zeroInV2Msg(t.offset, i));
      return K_ZERO;
    }
    if (hiOff === 0 && loOff === 0) return K_UNALLOC;
    this.hostOut = hiOff * 0x100000000 + loOff;
    this.copiedOut = (hi & HI_COPIED) !== 0;
    return K_DATA;
  }

  /** Entry kinds of a whole table, cached on it (block status walks these, not the entries). */
  private kindsOf(t: CachedL2): Uint8Array {
    if (t.kinds) return t.kinds;
    const k = new Uint8Array(this.l2Entries);
    const buf = t.buf;
    for (let i = 0; i < k.length; i++) {
      const at = i * 8;
      // Most entries of a sparse image are zero: no need to decode those.
      if (buf[at] === 0 && buf.readUInt32BE(at) === 0 && buf.readUInt32BE(at + 4) === 0) continue;
      k[i] = this.statusKind(t, i);
    }
    t.kinds = k;
    return k;
  }

  /** Kind for block status (compressed clusters are data; K_CORRUPT for a bad entry). */
  private statusKind(t: CachedL2, i: number): number {
    // Classifying a whole table must not signal corruption for entries nobody asked about:
    // statusRuns() decodes a K_CORRUPT entry again (loudly) when a request covers it.
    this.quietCorruption = true;
    try {
      const k = this.kindOf(t, i);
      return k === K_COMPRESSED ? K_DATA : k;
    } catch {
      return K_CORRUPT;
    } finally {
      this.quietCorruption = false;
    }
  }

  /** Set while statusKind() classifies entries (see there). */
  private quietCorruption = false;
  /** A non-fatal BLOCK_IMAGE_CORRUPTED was emitted (read-only image): no more of them. */
  private signaledNonFatal = false;

  /**
   * Corrupt metadata met by a request: like QEMU's qcow2_signal_corruption(), fatal on a
   * writable image (corrupt bit, event, no more I/O), a one-time non-fatal event on a read-only
   * one. The request fails with EIO either way.
   */
  private corruption(msg: string): BlockError {
    if (this.quietCorruption) return corruptError(msg);
    if (this.writable && this.refcounts) return this.signalCorruption(undefined, undefined, msg);
    if (!this.signaledNonFatal) {
      this.signaledNonFatal = true;
      this.ctx.log.error(`qcow2: Image is corrupt: ${msg}; further non-fatal corruption events will be suppressed`);
      this.corruptionEvent(msg, false);
    }
    return corruptError(msg);
  }

  /** The most recently touched table (a repeated hit on it needs no new stamp). */
  private mru: CachedL2 | undefined;
  private useClock = 0;

  /**
   * Mark `t` used now (and make it the cached copy of its offset). LRU order is kept with
   * stamps, not by re-inserting into the Map: delete+set on every hit makes V8 rebuild the
   * Map's backing store over and over, which showed up as old-space GC on the read path.
   */
  private touch(t: CachedL2): void {
    t.used = ++this.useClock;
    this.mru = t;
    if (this.l2Cache.get(t.offset) !== t) this.l2Cache.set(t.offset, t);
  }

  /** Over capacity: drop the least recently used clean tables (down to 7/8 of the capacity). */
  private evictClean(): void {
    if (this.l2Cache.size <= this.l2Capacity) return;
    const target = this.l2Capacity - Math.floor(this.l2Capacity / 8);
    const clean = [...this.l2Cache.values()].filter((t) => !t.dirty).sort((a, b) => a.used - b.used);
    for (const t of clean) {
      if (this.l2Cache.size <= target) break;
      this.l2Cache.delete(t.offset);
      if (this.mru === t) this.mru = undefined;
    }
  }

  /** The L2 table at `offset` (cached; concurrent misses share one read). */
  private async loadL2(offset: number): Promise<CachedL2> {
    const hit = this.l2Cache.get(offset);
    if (hit) {
      this.touch(hit);
      return hit;
    }
    let p = this.l2Loading.get(offset);
    if (!p) {
      p = (async () => {
        const buf = Buffer.alloc(this.clusterSize);
        await this.storage.read(buf, offset);
        const t: CachedL2 = { offset, buf, dirty: false, used: ++this.useClock };
        const again = this.l2Cache.get(offset);
        if (again) return again;
        this.l2Cache.set(offset, t);
        this.mru = t;
        this.evictClean();
        return t;
      })();
      this.l2Loading.set(offset, p);
      p.finally(() => this.l2Loading.delete(offset)).catch(() => undefined);
    }
    return p;
  }

  private decode(t: CachedL2 | undefined, idx: number): Entry {
    if (!t) return { hi: 0, lo: 0, bitmap: 0, zeroBits: 0, type: 'unalloc', host: 0, copied: false };
    const at = idx * this.entrySize;
    const hi = t.buf.readUInt32BE(at);
    const lo = t.buf.readUInt32BE(at + 4);
    const bitmap = this.extL2 ? t.buf.readUInt32BE(at + 12) : 0;
    const zeroBits = this.extL2 ? t.buf.readUInt32BE(at + 8) : 0;
    const copied = (hi & HI_COPIED) !== 0;
    if ((hi & HI_COMPRESSED) !== 0) {
      if (copied) throw this.corruption('Compressed cluster has the COPIED flag set');
      if (this.extL2 && (bitmap !== 0 || zeroBits !== 0)) {
        throw this.corruption('Compressed cluster has a non-zero subcluster bitmap');
      }
      return { hi, lo, bitmap, zeroBits, type: 'compressed', host: 0, copied: false };
    }
    if ((hi & L2_HI_RESERVED) !== 0 || (lo & L2_LO_RESERVED) !== 0) {
      throw this.corruption(`L2 entry at 0x${(t.offset + at).toString(16)} has reserved bits set`);
    }
    const host = (hi & HI_OFFSET_MASK) * 0x100000000 + ((lo & LO_OFFSET_MASK) >>> 0);
    if (host % this.clusterSize !== 0) throw this.corruption(unalignedClusterMsg(host, t.offset, idx));
    const zero = !this.extL2 && (lo & LO_ZERO_FLAG) !== 0;
    if (zero && this.header.version === 2) throw this.corruption(zeroInV2Msg(t.offset, idx));
    if (this.extL2) {
      if (host !== 0 && (bitmap & zeroBits) !== 0) throw this.corruption('Invalid subcluster bitmap');
      if (host === 0 && bitmap !== 0) throw this.corruption('Subcluster allocated in an unallocated cluster');
    }
    let type: Entry['type'];
    if (zero) type = host !== 0 ? 'zero-alloc' : 'zero-plain';
    else type = host !== 0 ? 'normal' : 'unalloc';
    return { hi, lo, bitmap, zeroBits, type, host, copied };
  }

  /** L2 table of L1 index `l1i` for reading (undefined = unallocated). */
  private async l2Read(l1i: number): Promise<CachedL2 | undefined> {
    const e = this.l1Entry(l1i);
    if (e.offset === 0) return undefined;
    return this.loadL2(e.offset);
  }

  /** Map [guest, guest+length) into segments (both inside the disk). */
  private async segments(guest: number, length: number): Promise<Seg[]> {
    const out: Seg[] = [];
    const cs = this.clusterSize;
    const push = (s: Seg): void => {
      const last = out[out.length - 1];
      if (last && last.kind === s.kind && last.guest + last.length === s.guest) {
        if (last.kind === 'data' && s.kind === 'data') {
          if (last.host + last.length === s.host) {
            last.length += s.length;
            return;
          }
        } else if (last.kind !== 'compressed') {
          last.length += s.length;
          return;
        }
      }
      out.push(s);
    };
    let pos = guest;
    const end = guest + length;
    while (pos < end) {
      const g = Math.floor(pos / cs);
      const l1i = Math.floor(g / this.l2Entries);
      const t = await this.l2Read(l1i);
      const tableEnd = Math.min(end, (l1i + 1) * this.l2Entries * cs);
      while (pos < tableEnd) {
        const gc = Math.floor(pos / cs);
        const inOff = pos - gc * cs;
        const n = Math.min(cs - inOff, tableEnd - pos);
        const e = this.decode(t, gc % this.l2Entries);
        if (e.type === 'compressed') {
          push({ kind: 'compressed', guest: pos, length: n, cluster: gc, hi: e.hi, lo: e.lo });
        } else if (!this.extL2) {
          if (e.type === 'normal') push({ kind: 'data', guest: pos, length: n, host: e.host + inOff });
          else if (e.type === 'unalloc') push({ kind: 'unalloc', guest: pos, length: n });
          else push({ kind: 'zero', guest: pos, length: n });
        } else {
          // Per subcluster.
          const sc = this.subclusterSize;
          let p = inOff;
          while (p < inOff + n) {
            const x = Math.floor(p / sc);
            const m = Math.min((x + 1) * sc, inOff + n) - p;
            const bit = 2 ** x;
            const alloc = Math.floor(e.bitmap / bit) % 2 === 1;
            const zero = Math.floor(e.zeroBits / bit) % 2 === 1;
            const gp = gc * cs + p;
            if (alloc) push({ kind: 'data', guest: gp, length: m, host: e.host + p });
            else if (zero) push({ kind: 'zero', guest: gp, length: m });
            else push({ kind: 'unalloc', guest: gp, length: m });
            p += m;
          }
        }
        pos += n;
      }
    }
    return out;
  }

  // ---- read -----------------------------------------------------------------------------------

  /**
   * Synchronous read when every L2 table involved is cached and the range holds only data
   * clusters (read with the file child's own sync path, contiguous host clusters in one call)
   * and zero or unallocated clusters (without a backing file). False = use read().
   */
  tryReadSync(buf: Buffer, offset: number): boolean {
    if (this.extL2 || this.closed || this.broken) return false;
    const cs = this.clusterSize;
    const span = this.l2Entries * cs;
    const end = offset + buf.length;
    let file: BlockIO | undefined;
    let backingKnown = false;
    let pos = offset;
    // The pending run of contiguous host data: buffer index, host offset, length.
    let runAt = 0;
    let runHost = -1;
    let runLen = 0;
    while (pos < end) {
      const l1i = Math.floor(pos / span);
      const t = this.cachedL2(l1i);
      if (t === null) return false;
      const tEnd = Math.min(end, (l1i + 1) * span);
      if (t === undefined) {
        if (!backingKnown) {
          if (this.backing() !== undefined) return false;
          backingKnown = true;
        }
        zeroFill(buf, pos - offset, tEnd - offset);
        pos = tEnd;
        continue;
      }
      while (pos < tEnd) {
        const g = Math.floor(pos / cs);
        const inOff = pos - g * cs;
        const n = Math.min(cs - inOff, tEnd - pos);
        const k = this.kindOf(t, g % this.l2Entries);
        if (k === K_DATA) {
          const h = this.hostOut + inOff;
          if (runHost >= 0 && runHost + runLen === h) {
            runLen += n;
          } else {
            if (runHost >= 0) {
              file ??= this.ctx.childIO('file');
              if (!file.tryReadSync(buf.subarray(runAt, runAt + runLen), runHost)) return false;
            }
            runAt = pos - offset;
            runHost = h;
            runLen = n;
          }
        } else if (k === K_ZERO) {
          zeroFill(buf, pos - offset, pos - offset + n);
        } else if (k === K_UNALLOC) {
          if (!backingKnown) {
            if (this.backing() !== undefined) return false;
            backingKnown = true;
          }
          zeroFill(buf, pos - offset, pos - offset + n);
        } else {
          return false;
        }
        pos += n;
      }
    }
    if (runHost >= 0) {
      file ??= this.ctx.childIO('file');
      const part = runLen === buf.length ? buf : buf.subarray(runAt, runAt + runLen);
      if (!file.tryReadSync(part, runHost)) return false;
    }
    return true;
  }

  /** True when the range is all data clusters whose L2 tables are cached (no block status needed). */
  isDataSync(offset: number, length: number): boolean {
    if (this.extL2 || this.closed) return false;
    const cs = this.clusterSize;
    const end = offset + length;
    for (let g = Math.floor(offset / cs); g * cs < end; g++) {
      const t = this.cachedL2(Math.floor(g / this.l2Entries));
      if (!t) return false;
      if (this.kindOf(t, g % this.l2Entries) !== K_DATA) return false;
    }
    return true;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    // Page-cache hits on cached metadata need no promise chain at all.
    if (this.tryReadSync(buf, offset)) return;
    if (this.broken) throw this.noMedium();
    const segs = await this.segments(offset, buf.length);
    await Promise.all(segs.map((s) => this.readSeg(s, buf.subarray(s.guest - offset, s.guest - offset + s.length))));
  }

  private async readSeg(s: Seg, out: Buffer): Promise<void> {
    switch (s.kind) {
      case 'data':
        return this.storage.read(out, s.host);
      case 'zero':
        out.fill(0);
        return;
      case 'unalloc':
        return this.readBacking(out, s.guest);
      case 'compressed': {
        const data = await this.decompress(s.cluster, s.hi, s.lo);
        const inOff = s.guest - s.cluster * this.clusterSize;
        data.copy(out, 0, inOff, inOff + s.length);
      }
    }
  }

  /** Read from the backing chain; past its end (or without one) the data is zero. */
  private async readBacking(out: Buffer, guest: number): Promise<void> {
    const b = this.backing();
    const bsize = b ? b.size() : 0;
    const n = Math.max(0, Math.min(out.length, bsize - guest));
    if (n < out.length) out.fill(0, n);
    if (n > 0 && b) await b.read(out.subarray(0, n), guest);
  }

  private decompress(cluster: number, hi: number, lo: number): Promise<Buffer> {
    const key = cluster;
    const hit = this.decompressed.get(key);
    if (hit) return hit;
    const p = (async () => {
      const d = compressedDesc(hi, lo, this.clusterBits);
      const src = Buffer.alloc(Math.min(d.length, this.clusterSize * 2 + 512));
      await this.storage.read(src, d.offset);
      const out = Buffer.alloc(this.clusterSize);
      await decompressCluster(src, out, this.header.compressionType);
      return out;
    })();
    this.decompressed.set(key, p);
    p.catch(() => this.decompressed.delete(key));
    while (this.decompressed.size > 8) {
      const first = this.decompressed.keys().next().value as number;
      this.decompressed.delete(first);
    }
    return p;
  }

  // ---- block status ---------------------------------------------------------------------------

  /** Extended L2: one L2 table's worth of segments per call. */
  private statusSegsExt(offset: number, length: number): Promise<Seg[]> {
    const span = this.l2Entries * this.clusterSize;
    const end = Math.min(offset + length, (Math.floor(offset / span) + 1) * span);
    return this.segments(offset, end - offset);
  }

  /**
   * Standard L2: walk the tables (cached ones without a promise) and build extents of one kind
   * in one pass over the whole request (up to STATUS_MAX_CLUSTERS clusters), merging neighbours.
   * Unallocated runs get `unallocFlags` and depth 0 (the caller resolves them in the backing chain).
   */
  private async statusRuns(offset: number, length: number, unallocFlags: number): Promise<BlockExtent[]> {
    const cs = this.clusterSize;
    const span = this.l2Entries * cs;
    const end = Math.min(offset + length, (Math.floor(offset / cs) + STATUS_MAX_CLUSTERS) * cs);
    const out: BlockExtent[] = [];
    let runKind = -1;
    let runStart = offset;
    const emit = (kind: number, start: number, stop: number): void => {
      const len = stop - start;
      if (kind === K_DATA) out.push({ offset: start, length: len, flags: EXTENT_DATA | EXTENT_ALLOCATED, depth: 1 });
      else if (kind === K_ZERO) out.push({ offset: start, length: len, flags: EXTENT_ZERO | EXTENT_ALLOCATED, depth: 1 });
      else out.push({ offset: start, length: len, flags: unallocFlags, depth: 0 });
    };
    let pos = offset;
    while (pos < end) {
      const l1i = Math.floor(pos / span);
      const tEnd = Math.min(end, (l1i + 1) * span);
      let t = this.cachedL2(l1i);
      if (t === null) t = await this.l2Read(l1i);
      if (t === undefined) {
        if (runKind !== K_UNALLOC) {
          if (runKind >= 0) emit(runKind, runStart, pos);
          runKind = K_UNALLOC;
          runStart = pos;
        }
        pos = tEnd;
        continue;
      }
      const first = Math.floor(pos / cs);
      const last = Math.ceil(tEnd / cs);
      const base = l1i * this.l2Entries;
      const kinds = this.kindsOf(t);
      const stop = last - base;
      let i = first - base;
      while (i < stop) {
        const k = kinds[i] as number;
        if (k === K_CORRUPT) this.kindOf(t, i); // throws the corruption error
        let j = i + 1;
        while (j < stop && kinds[j] === k) j++;
        if (k !== runKind) {
          const at = Math.max((base + i) * cs, offset);
          if (runKind >= 0) emit(runKind, runStart, at);
          runKind = k;
          runStart = at;
        }
        i = j;
      }
      pos = tEnd;
    }
    if (runKind >= 0 && runStart < end) emit(runKind, runStart, end);
    return out;
  }

  async blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    if (this.broken) throw this.noMedium();
    const b = this.backing();
    if (!this.extL2 && !b) return this.statusRuns(offset, length, EXTENT_ZERO);
    let segs: Seg[];
    if (this.extL2) {
      segs = await this.statusSegsExt(offset, length);
    } else {
      segs = [];
      for (const e of await this.statusRuns(offset, length, 0)) {
        if (e.depth === 0) segs.push({ kind: 'unalloc', guest: e.offset, length: e.length });
        else if (e.flags & EXTENT_ZERO) segs.push({ kind: 'zero', guest: e.offset, length: e.length });
        else segs.push({ kind: 'data', guest: e.offset, length: e.length, host: 0 });
      }
    }
    const out: BlockExtent[] = [];
    const bsize = b ? b.size() : 0;
    for (const s of segs) {
      if (s.kind === 'data' || s.kind === 'compressed') {
        out.push({ offset: s.guest, length: s.length, flags: EXTENT_DATA | EXTENT_ALLOCATED, depth: 1 });
      } else if (s.kind === 'zero') {
        out.push({ offset: s.guest, length: s.length, flags: EXTENT_ZERO | EXTENT_ALLOCATED, depth: 1 });
      } else {
        let pos = s.guest;
        const sEnd = s.guest + s.length;
        if (b && pos < bsize) {
          const bEnd = Math.min(sEnd, bsize);
          while (pos < bEnd) {
            const ext = await b.blockStatus(pos, bEnd - pos);
            if (ext.length === 0) break;
            for (const e of ext) {
              out.push({ offset: e.offset, length: e.length, flags: e.flags, depth: e.depth > 0 ? e.depth + 1 : 0 });
              pos = e.offset + e.length;
            }
          }
          // Return what we have: the caller asks again for the rest.
          if (pos < sEnd) {
            // Past the backing file's end QEMU reports zeroes "allocated" in the backing layer.
            if (pos >= bsize) out.push({ offset: pos, length: sEnd - pos, flags: EXTENT_ZERO | EXTENT_ALLOCATED, depth: 2 });
            break;
          }
        } else if (b) {
          out.push({ offset: pos, length: sEnd - pos, flags: EXTENT_ZERO | EXTENT_ALLOCATED, depth: 2 });
        } else {
          out.push({ offset: pos, length: sEnd - pos, flags: EXTENT_ZERO, depth: 0 });
        }
      }
    }
    return out;
  }

  // ---- write ----------------------------------------------------------------------------------

  private checkWritable(): void {
    if (!this.writable || !this.refcounts) {
      throw new BlockError('READ_ONLY', 'EPERM', `Node '${this.ctx.nodeName}' is read-only`);
    }
    if (this.closed) throw new BlockError('CLOSED', 'EIO', `Node '${this.ctx.nodeName}' is closed`);
    if (this.broken) throw this.noMedium();
  }

  write(buf: Buffer, offset: number, _flags: WriteFlags): Promise<void> {
    try {
      this.checkWritable();
    } catch (err) {
      return Promise.reject(err);
    }
    const g = Math.floor(offset / this.clusterSize);
    const inOff = offset - g * this.clusterSize;
    if (inOff + buf.length <= this.clusterSize) return this.writeCluster(g, inOff, buf);
    return this.writeMany(buf, offset);
  }

  private async writeMany(buf: Buffer, offset: number): Promise<void> {
    const cs = this.clusterSize;
    const tasks: Promise<void>[] = [];
    let pos = 0;
    while (pos < buf.length) {
      const guest = offset + pos;
      const g = Math.floor(guest / cs);
      const inOff = guest - g * cs;
      const n = Math.min(cs - inOff, buf.length - pos);
      tasks.push(this.writeCluster(g, inOff, buf.subarray(pos, pos + n)));
      pos += n;
    }
    await Promise.all(tasks);
  }

  private async lookup(g: number): Promise<Entry> {
    const t = await this.l2Read(Math.floor(g / this.l2Entries));
    return this.decode(t, g % this.l2Entries);
  }

  /** Whether a write into this cluster can go straight to its host cluster. */
  private inPlace(e: Entry): boolean {
    return e.type === 'normal' && e.copied && (!this.extL2 || e.bitmap === 0xffffffff);
  }

  /** Never throws synchronously (callers collect these promises). */
  private writeCluster(g: number, inOff: number, data: Buffer): Promise<void> {
    if (!this.extL2) {
      // Overwrite of an owned data cluster whose L2 table is cached: straight to the file.
      try {
        const t = this.cachedL2(Math.floor(g / this.l2Entries));
        if (t && this.kindOf(t, g % this.l2Entries) === K_DATA && this.copiedOut) {
          // A corrupt L2 entry may point into metadata: one map lookup (host is cluster-aligned).
          if (this.olMask !== 0 && this.ol.at(this.hostOut / this.clusterSize, this.olMask) !== 0) {
            return this.writeData(data, this.hostOut + inOff);
          }
          return this.storage.write(data, this.hostOut + inOff);
        }
      } catch (err) {
        return Promise.reject(err);
      }
    }
    return this.writeClusterSlow(g, inOff, data);
  }

  private async writeClusterSlow(g: number, inOff: number, data: Buffer): Promise<void> {
    const l1i = Math.floor(g / this.l2Entries);
    // Decode and issue an in-place write in one synchronous step: a discard that drops the
    // mapping in between would otherwise not see this write (see writeback's barrier).
    const t0 = await this.l2Read(l1i);
    const e = this.decode(t0, g % this.l2Entries);
    if (this.inPlace(e)) return this.writeData(data, e.host + inOff);
    await this.clusterLocks.run(g, async () => {
      const t1 = await this.l2Read(l1i);
      const cur = this.decode(t1, g % this.l2Entries);
      if (this.inPlace(cur)) {
        await this.writeData(data, cur.host + inOff);
        return;
      }
      const cs = this.clusterSize;
      // Reuse the host cluster when we own it (zero-alloc, or a partly allocated ext-L2 cluster).
      const reuse = (cur.type === 'zero-alloc' || cur.type === 'normal') && cur.copied;
      let host: number;
      let fresh = false;
      if (reuse) {
        host = cur.host;
      } else {
        host = await this.meta.run(async () => {
          const h = await this.allocClusters(1);
          fresh = this.storage.claimZero(h, cs);
          return h;
        });
      }
      // A cluster that reads as zeroes around the new data needs no copy-on-write: the guest
      // view was zero (zero cluster, or unallocated without a backing file) and the new host
      // cluster lies in never-written sparse space.
      const zeroView =
        cur.type === 'zero-plain' || cur.type === 'zero-alloc' || (cur.type === 'unalloc' && !this.backing());
      if (fresh && zeroView) {
        this.checkOverlap(host, cs, 0);
        await this.storage.ensureSize(host + cs);
        await this.storage.write(data, host + inOff);
      } else {
        let full: Buffer;
        if (inOff === 0 && data.length === cs) {
          full = data;
        } else {
          full = Buffer.alloc(cs);
          if (cur.type !== 'zero-alloc' && cur.type !== 'zero-plain') await this.readCluster(g, full);
          data.copy(full, inOff);
        }
        await this.writeData(full, host);
      }
      await this.meta.run(async () => {
        await this.setEntry(g, host, reuse ? undefined : cur, 'data');
      });
    });
  }

  /** Read the guest view of a whole cluster (the part inside the disk; zero beyond). */
  private async readCluster(g: number, out: Buffer): Promise<void> {
    const start = g * this.clusterSize;
    const n = Math.min(this.clusterSize, this.size - start);
    if (n < out.length) out.fill(0, Math.max(0, n));
    if (n > 0) await this.read(out.subarray(0, n), start);
  }

  private async allocClusters(n: number): Promise<number> {
    const rc = this.refcounts;
    if (!rc) throw new BlockError('READ_ONLY', 'EPERM', 'image is read-only');
    return rc.alloc(n);
  }

  /** Clusters an entry holds references to (for freeing). */
  private refsOf(e: Entry): number[] {
    if (e.type === 'normal' || e.type === 'zero-alloc') return [e.host / this.clusterSize];
    if (e.type === 'compressed') {
      const d = compressedDesc(e.hi, e.lo, this.clusterBits);
      const first = Math.floor(d.offset / this.clusterSize);
      const last = Math.floor((d.offset + d.length - 1) / this.clusterSize);
      const out: number[] = [];
      for (let c = first; c <= last; c++) out.push(c);
      return out;
    }
    return [];
  }

  /**
   * Under the metadata mutex: point guest cluster `g` at `host` (data), or make it zero/unallocated.
   * `old` (the entry being replaced) has its references freed after the change is on disk.
   */
  private async setEntry(
    g: number,
    host: number,
    old: Entry | undefined,
    mode: 'data' | 'zero-plain' | 'zero-alloc' | 'unalloc',
    discard = false,
  ): Promise<void> {
    const t = await this.l2Write(Math.floor(g / this.l2Entries));
    const at = (g % this.l2Entries) * this.entrySize;
    const current = this.decode(t, g % this.l2Entries);
    if (old) {
      for (const c of this.refsOf(current)) this.pending.push({ cluster: c, discard });
    }
    let hi = 0;
    let lo = 0;
    let alloc = 0;
    let zeros = 0;
    const setHost = (): void => {
      hi = (Math.floor(host / 0x100000000) & HI_OFFSET_MASK) | HI_COPIED;
      lo = host >>> 0;
    };
    if (mode === 'data') {
      setHost();
      alloc = 0xffffffff;
    } else if (mode === 'zero-alloc') {
      setHost();
      if (this.extL2) zeros = 0xffffffff;
      else lo |= LO_ZERO_FLAG;
    } else if (mode === 'zero-plain') {
      if (this.extL2) zeros = 0xffffffff;
      else lo = LO_ZERO_FLAG;
    }
    t.buf.writeUInt32BE(hi >>> 0, at);
    t.buf.writeUInt32BE(lo >>> 0, at + 4);
    if (this.extL2) {
      t.buf.writeUInt32BE(zeros >>> 0, at + 8);
      t.buf.writeUInt32BE(alloc >>> 0, at + 12);
    }
    if (t.kinds) t.kinds[g % this.l2Entries] = this.statusKind(t, g % this.l2Entries);
    t.dirty = true;
    // A reader may have evicted the (then clean) table meanwhile: this copy is the current one.
    this.touch(t);
    await this.maybeWriteback();
  }

  /** Under the metadata mutex: a private, cached L2 table for L1 index `l1i`. */
  private async l2Write(l1i: number): Promise<CachedL2> {
    if (l1i >= this.header.l1Size) throw this.corruption('L1 index out of range');
    const e = this.l1Entry(l1i);
    if (e.offset !== 0 && e.copied) {
      const t = await this.loadL2(e.offset);
      this.touch(t);
      return t;
    }
    const newOff = await this.allocClusters(1);
    const buf = Buffer.alloc(this.clusterSize);
    if (e.offset !== 0) {
      const old = await this.loadL2(e.offset);
      old.buf.copy(buf);
    }
    await this.syncRefcounts();
    this.checkOverlap(newOff, this.clusterSize, 0);
    await this.storage.write(buf, newOff);
    const t: CachedL2 = { offset: newOff, buf, dirty: false, used: ++this.useClock };
    this.l2Cache.set(newOff, t);
    await this.writeL1Entry(l1i, newOff);
    this.ol.add(newOff, this.clusterSize, OL_ACTIVE_L2);
    if (e.offset !== 0) {
      this.ol.remove(e.offset, this.clusterSize, OL_ACTIVE_L2);
      this.l2Cache.delete(e.offset);
      this.pending.push({ cluster: e.offset / this.clusterSize, discard: false });
    }
    this.evictClean();
    return t;
  }

  private async writeL1Entry(l1i: number, offset: number): Promise<void> {
    await this.markDirtyIfLazy();
    const b = Buffer.alloc(8);
    if (offset !== 0) {
      b.writeUInt32BE(((Math.floor(offset / 0x100000000) & HI_OFFSET_MASK) | HI_COPIED) >>> 0, 0);
      b.writeUInt32BE(offset >>> 0, 4);
    }
    this.checkOverlap(this.header.l1TableOffset + l1i * 8, 8, OL_ACTIVE_L1);
    await this.storage.write(b, this.header.l1TableOffset + l1i * 8);
    b.copy(this.l1, l1i * 8);
  }

  /** Refcount increments reach the disk before metadata that depends on them. */
  private async syncRefcounts(): Promise<void> {
    const rc = this.refcounts;
    if (!rc) return;
    if (await rc.writeDirty()) {
      if (!this.lazy) await this.storage.flush();
    }
  }

  private async markDirtyIfLazy(): Promise<void> {
    if (!this.lazy || this.dirtyBitSet || this.header.version !== 3) return;
    this.header.incompatible |= INCOMPAT_DIRTY;
    await this.writeHeaderU64(HDR_INCOMPATIBLE, this.header.incompatible);
    this.dirtyBitSet = true;
  }

  private dirtyL2Count(): number {
    let n = 0;
    for (const t of this.l2Cache.values()) if (t.dirty) n++;
    return n;
  }

  private async maybeWriteback(): Promise<void> {
    if (this.l2Cache.size > this.l2Capacity && this.dirtyL2Count() > this.l2Capacity / 2) {
      await this.writeback();
    }
    this.evictClean();
  }

  /**
   * Under the metadata mutex: refcount blocks, then L2 tables, then deferred frees.
   * The caller syncs afterwards (flush) when it needs durability.
   */
  private async writeback(): Promise<void> {
    const dirty = [...this.l2Cache.values()].filter((t) => t.dirty);
    await this.syncRefcounts();
    if (dirty.length) await this.markDirtyIfLazy();
    for (const t of dirty) {
      this.checkOverlap(t.offset, this.clusterSize, OL_ACTIVE_L2);
      await this.storage.write(t.buf, t.offset);
      t.dirty = false;
    }
    if (this.pending.length) {
      // Overwrites issued while the old mappings were live may still be in flight: they must
      // land before their host clusters can be reallocated.
      await this.storage.ioBarrier();
      await this.storage.flush();
      const frees = this.pending;
      this.pending = [];
      const rc = this.refcounts;
      if (rc) {
        for (const f of frees) {
          const left = await rc.update(f.cluster, -1);
          if (left === 0 && f.discard && this.passDiscardRequest) {
            await this.storage.discard(f.cluster * this.clusterSize, this.clusterSize).catch(() => undefined);
          }
        }
        await rc.writeDirty();
      }
    }
  }

  async flush(): Promise<void> {
    if (this.broken) return;
    if (this.writable && this.refcounts && !this.closed) {
      await this.meta.run(() => this.writeback());
    }
    await this.storage.flush();
  }

  // ---- zeroes and discard ---------------------------------------------------------------------

  async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    this.checkWritable();
    if (this.header.version !== 3) {
      throw new BlockError('NOT_SUPPORTED', 'ENOTSUP', 'qcow2 v2 images have no zero clusters');
    }
    await this.clearRange(offset, length, async (g, cur) => {
      if (flags.mayUnmap || !cur.copied || cur.type === 'compressed' || cur.type === 'unalloc' ||
          cur.type === 'zero-plain') {
        const hasRefs = this.refsOf(cur).length > 0;
        await this.setEntry(g, 0, hasRefs ? cur : undefined, 'zero-plain', true);
      } else {
        await this.setEntry(g, cur.host, undefined, 'zero-alloc');
      }
    }, true);
  }

  async discard(offset: number, length: number): Promise<void> {
    this.checkWritable();
    const hasBacking = this.backing() !== undefined;
    await this.clearRange(offset, length, async (g, cur) => {
      const allocated = cur.type === 'normal' || cur.type === 'zero-alloc' || cur.type === 'compressed';
      const hasRefs = this.refsOf(cur).length > 0;
      if (hasBacking || allocated) {
        if (this.header.version >= 3) await this.setEntry(g, 0, hasRefs ? cur : undefined, 'zero-plain', true);
        else await this.setEntry(g, 0, hasRefs ? cur : undefined, 'unalloc', true);
      }
    }, false);
  }

  /**
   * Apply `fn` to every whole cluster of the range (under its cluster lock and the metadata
   * mutex); partial head/tail clusters are written as zero bytes when `zeroPartial`, ignored
   * otherwise (discard). The range end at the disk end counts as a cluster end.
   */
  private async clearRange(
    offset: number,
    length: number,
    fn: (g: number, cur: Entry) => Promise<void>,
    zeroPartial: boolean,
  ): Promise<void> {
    const cs = this.clusterSize;
    const end = offset + length;
    let pos = offset;
    const tasks: Promise<void>[] = [];
    while (pos < end) {
      const g = Math.floor(pos / cs);
      const cStart = g * cs;
      const cEnd = Math.min(cStart + cs, this.size);
      const n = Math.min(cEnd, end) - pos;
      if (pos === cStart && pos + n === cEnd) {
        tasks.push(
          this.clusterLocks.run(g, async () => {
            await this.meta.run(async () => fn(g, await this.lookup(g)));
          }),
        );
      } else if (zeroPartial) {
        tasks.push(this.writeCluster(g, pos - cStart, Buffer.alloc(n)));
      }
      pos += n;
    }
    await Promise.all(tasks);
  }

  // ---- resize ---------------------------------------------------------------------------------

  async truncate(size: number): Promise<void> {
    this.checkWritable();
    if (size % 512 !== 0) {
      throw new BlockError('BAD_SIZE', 'EINVAL', 'The new size must be a multiple of 512');
    }
    if (this.header.nbSnapshots > 0) {
      throw new BlockError('NOT_SUPPORTED', 'ENOTSUP', "Can't resize an image which has snapshots");
    }
    const old = this.size;
    if (size === old) return;
    const cs = this.clusterSize;
    const needL1 = Math.ceil(size / (cs * this.l2Entries));
    if (size < old) {
      // Free every cluster past the new end (whole clusters only), then L2 tables wholly past it.
      const firstFree = Math.ceil(size / cs) * cs;
      if (size % cs !== 0) {
        // Zero the tail of the last cluster so that growing again reads zeroes there.
        const g = Math.floor(size / cs);
        const tailLen = Math.min((g + 1) * cs, old) - size;
        if (tailLen > 0 && this.header.version === 3) await this.writeCluster(g, size - g * cs, Buffer.alloc(tailLen));
      }
      if (firstFree < old) {
        await this.clearRange(firstFree, old - firstFree, async (g, cur) => {
          if (this.refsOf(cur).length > 0 || cur.type !== 'unalloc') {
            await this.setEntry(g, 0, cur, 'unalloc', true);
          }
        }, false);
      }
      await this.meta.run(async () => {
        await this.writeback();
        for (let i = needL1; i < this.header.l1Size; i++) {
          const e = this.l1Entry(i);
          if (e.offset === 0) continue;
          await this.writeL1Entry(i, 0);
          this.ol.remove(e.offset, cs, OL_ACTIVE_L2);
          this.l2Cache.delete(e.offset);
          this.pending.push({ cluster: e.offset / cs, discard: true });
        }
        await this.writeSize(size);
        await this.writeback();
      });
      this.size = size;
      return;
    }
    await this.meta.run(async () => {
      if (needL1 > this.header.l1Size) await this.growL1(needL1);
      await this.writeSize(size);
    });
    this.size = size;
    // A longer backing file must not show through the new area.
    const b = this.backing();
    if (b && b.size() > old && this.header.version === 3) {
      await this.writeZeroes(old, Math.min(size, b.size()) - old, {});
    }
  }

  private async writeSize(size: number): Promise<void> {
    await this.syncRefcounts();
    const b = Buffer.alloc(8);
    writeU64(b, 0, size);
    await this.storage.write(b, 24);
    await this.storage.flush();
    this.header.size = size;
  }

  private async growL1(need: number): Promise<void> {
    const cs = this.clusterSize;
    // QEMU grows the L1 table by about 1.5x.
    let entries = Math.max(need, Math.floor((this.header.l1Size * 3) / 2));
    if (entries * 8 > MAX_L1_SIZE) entries = need;
    if (entries * 8 > MAX_L1_SIZE) throw new BlockError('BAD_SIZE', 'EFBIG', 'Image size too big for qcow2 L1 table');
    const clusters = Math.ceil((entries * 8) / cs);
    const newOff = await this.allocClusters(clusters);
    const buf = Buffer.alloc(clusters * cs);
    this.l1.copy(buf);
    await this.syncRefcounts();
    await this.markDirtyIfLazy();
    this.checkOverlap(newOff, buf.length, 0);
    await this.storage.write(buf, newOff);
    await this.storage.flush();
    const hdr = Buffer.alloc(12);
    hdr.writeUInt32BE(entries, 0);
    writeU64(hdr, 4, newOff);
    await this.storage.write(hdr, 36);
    await this.storage.flush();
    const oldOff = this.header.l1TableOffset;
    const oldClusters = Math.ceil((this.header.l1Size * 8) / cs);
    this.ol.remove(oldOff, this.header.l1Size * 8, OL_ACTIVE_L1);
    this.ol.add(newOff, entries * 8, OL_ACTIVE_L1);
    this.header.l1TableOffset = newOff;
    this.header.l1Size = entries;
    this.l1 = buf.subarray(0, entries * 8);
    if (oldOff !== 0) {
      for (let i = 0; i < oldClusters; i++) this.pending.push({ cluster: oldOff / cs + i, discard: true });
    }
  }

  // ---- close / info ---------------------------------------------------------------------------

  async close(): Promise<void> {
    if (this.closed) return;
    if (this.broken) {
      // Nothing more is written to a corrupt image (QEMU has detached the driver by now).
      await this.corruptMarked;
      this.closed = true;
      return;
    }
    if (this.writable && this.refcounts) {
      await this.meta.run(async () => {
        await this.writeback();
        await this.storage.flush();
        const rc = this.refcounts;
        if (rc) {
          // Drop the sparse growth past the last used cluster.
          const used = Math.max(this.origFileSize, (rc.highestAllocated + 1) * this.clusterSize);
          if (this.storage.size() > used) await this.storage.truncate(used).catch(() => undefined);
        }
        if (this.dirtyBitSet) {
          this.header.incompatible &= ~INCOMPAT_DIRTY;
          await this.writeHeaderU64(HDR_INCOMPATIBLE, this.header.incompatible);
          this.dirtyBitSet = false;
        }
      });
    }
    this.closed = true;
  }

  describeFilename(): string {
    const f = this.ctx.childDriver('file');
    return f.describeFilename();
  }

  jsonOptions(): Record<string, unknown> {
    const f = this.ctx.childDriver('file');
    return { driver: 'qcow2', file: f.jsonOptions?.() ?? f.describeFilename() };
  }

  /** `json:{...}` is only needed when the file child has no plain name. */
  describeJson(): string {
    return `json:${qemuJson(this.jsonOptions())}`;
  }

  async queryImage(): Promise<Record<string, unknown>> {
    const child = this.ctx.childDriver('file');
    const sub = (await child.queryImage?.()) ?? {};
    const h = this.header;
    const out: Record<string, unknown> = {
      'cluster-size': this.clusterSize,
      'format-specific': {
        type: 'qcow2',
        data:
          h.version === 2
            ? { compat: '0.10', 'compression-type': h.compressionType === 1 ? 'zstd' : 'zlib', 'refcount-bits': 16 }
            : {
                compat: '1.1',
                'compression-type': h.compressionType === 1 ? 'zstd' : 'zlib',
                'lazy-refcounts': (h.compatible & COMPAT_LAZY_REFCOUNTS) !== 0n,
                ...(this.bitmapStore?.formatInfo() ? { bitmaps: this.bitmapStore.formatInfo() } : {}),
                'refcount-bits': 2 ** h.refcountOrder,
                corrupt: (h.incompatible & INCOMPAT_CORRUPT) !== 0n,
                'extended-l2': this.extL2,
              },
      },
      'actual-size': sub['actual-size'],
      'dirty-flag': false,
    };
    const br = this.backingRequest();
    if (br) {
      out['backing-filename'] = br.recorded;
      out['full-backing-filename'] = br.filename;
      if (br.format !== undefined) out['backing-filename-format'] = br.format;
    }
    return out;
  }
}

function corruptError(msg: string): BlockError {
  return new BlockError('QCOW2_CORRUPT', 'EIO', `qcow2: ${msg}`);
}

/** C's %#x: 0x-prefixed hex, but plain 0 for zero (QEMU's messages are printed that way). */
function cHex(v: number): string {
  return v === 0 ? '0' : `0x${v.toString(16)}`;
}

/** QEMU's text for a data cluster offset that is not cluster aligned. */
function unalignedClusterMsg(host: number, l2Offset: number, index: number): string {
  return `Cluster allocation offset ${cHex(host)} unaligned (L2 offset: ${cHex(l2Offset)}, L2 index: ${cHex(index)})`;
}

/** QEMU's text for a zero-flagged entry in a version 2 image. */
function zeroInV2Msg(l2Offset: number, index: number): string {
  return `Zero cluster entry found in pre-v3 image (L2 offset: ${cHex(l2Offset)}, L2 index: ${cHex(index)})`;
}

const typedFill = Uint8Array.prototype.fill;

/** Zero `buf[start, end)` (the typed-array builtin: Buffer#fill's argument handling costs more). */
function zeroFill(buf: Buffer, start: number, end: number): void {
  typedFill.call(buf, 0, start, end);
}

/**
 * Host offset of the L2 table in entry `i` of an L1 table buffer: 0 = none, -1 = reserved bits
 * set or unaligned. (Snapshot L1 tables may carry stale COPIED bits: ignored.)
 */
function l1EntryOffset(l1: Buffer, i: number, cs: number): number {
  const hi = l1.readUInt32BE(i * 8);
  const lo = l1.readUInt32BE(i * 8 + 4);
  if ((hi & L1_HI_RESERVED) !== 0 || (lo & L1_LO_RESERVED) !== 0) return -1;
  const off = (hi & HI_OFFSET_MASK) * 0x100000000 + ((lo & LO_OFFSET_MASK) >>> 0);
  return off % cs === 0 ? off : -1;
}

/** Set refcount entry `i` of one refcount block to `v` (widths 1..64 bits). */
function setCount(buf: Buffer, i: number, v: number, width: number): void {
  if (width === 64) writeU64(buf, i * 8, v);
  else if (width === 32) buf.writeUInt32BE(v, i * 4);
  else if (width === 16) buf.writeUInt16BE(v, i * 2);
  else if (width === 8) buf[i] = v;
  else {
    const perByte = 8 / width;
    const idx = Math.floor(i / perByte);
    const shift = (i % perByte) * width;
    buf[idx] = ((buf[idx] ?? 0) & ~(((1 << width) - 1) << shift)) | (v << shift);
  }
}
