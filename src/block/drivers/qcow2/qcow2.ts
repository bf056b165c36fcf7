/**
 * `qcow2`: the QEMU copy-on-write format driver over a `file` child, with an optional `backing`
 * child (opened by the graph from the header or linked by name). This file is the driver face:
 * option checks and open (cache sizing, refcounts, dirty-image repair, the overlap map), the
 * persistent bitmaps hooks, the write/zero/discard/resize entry points, flush, close and
 * query-block info. The rest lives in layers below it (see image.ts):
 *   image.ts        geometry, header, storage, corruption guard (overlap checks, events)
 *   cluster-map.ts  L1/L2 map, L2 cache, entry decoding
 *   read.ts         reads (sync fast path, segments, compressed, backing) and block status
 *   allocate.ts     allocation, copy-on-write, L2/L1 updates, metadata write-back, frees
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
import type { BlockDriver, BlockIO, DriverCaps, WriteDone, WriteFlags, ZeroFlags } from '../../types.js';
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
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  corrupt,
  parseHeader,
  readSnapshotTable,
  writeU64,
  buildHeader,
  type BitmapsExt,
} from './format.js';
import { hasZstd, zstdUnavailableMessage } from './compress.js';
import { Refcounts } from './refcount.js';
import { Qcow2BitmapStore, bitmapClusters } from '../../dirty-bitmap-qcow2.js';
import type { LoadedBitmap, NamedBitmap } from '../../dirty-bitmap-set.js';
import { Storage } from './storage.js';
import {
  OL_ACTIVE_L1,
  OL_ACTIVE_L2,
  OL_BITMAP_DIRECTORY,
  OL_INACTIVE_L1,
  OL_INACTIVE_L2,
  OL_MAIN_HEADER,
  OL_REFCOUNT_BLOCK,
  OL_REFCOUNT_TABLE,
  OL_SNAPSHOT_TABLE,
  parseOverlapCheck,
} from './overlap.js';
import { HDR_AUTOCLEAR, HDR_INCOMPATIBLE, type Qcow2Parts } from './image.js';
import { l1EntryOffset, type CachedL2 } from './cluster-map.js';
import { Qcow2Allocator } from './allocate.js';

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

/** What the graph needs to open the backing file recorded in an image. */
export interface BackingRequest {
  /** Path as recorded in the header. */
  recorded: string;
  /** Resolved against the image's directory. */
  filename: string;
  format: string | undefined;
}

export class Qcow2Driver extends Qcow2Allocator implements BlockDriver {
  readonly name = 'qcow2';
  readonly caps: DriverCaps;
  private readonly origFileSize: number;

  private constructor(p: Qcow2Parts) {
    super(p);
    this.origFileSize = p.storage.size();
    this.caps = {
      writeZeroes: p.header.version === 3,
      fua: false,
      discard: p.ctx.options.discard === 'unmap',
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
          skipFree: (idx) => driverRef.d?.held.has(idx) === true,
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
          beforeDirtyEvict: async () => {
            await driverRef.d?.writeMetadata(true);
          },
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
    const d = new Qcow2Driver({ ctx, opts, header: h, l1, storage, refcounts, l2CacheBytes: l2Bytes, writable });
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
        // Never refcount blocks alone: the dirty L2 tables follow them (docs/qcow2.md).
        await this.writeMetadata();
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

  getLength(): number {
    return this.size;
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

  /** The write fast path (BlockDriver.submitWrite): in-place overwrites within one cluster. */
  submitWrite(buf: Buffer, offset: number, done: WriteDone): boolean {
    if (!this.writable || !this.refcounts || this.closed || this.broken) return false;
    const g = Math.floor(offset / this.clusterSize);
    const inOff = offset - g * this.clusterSize;
    if (inOff + buf.length > this.clusterSize) return false;
    return this.submitCluster(g, inOff, buf, done);
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
      // Free the old L1 table now (the header no longer points at it, synced): not counted
      // but unreferenced until the next flush otherwise.
      if (this.pending.length) await this.writeback();
    });
    this.size = size;
    // A longer backing file must not show through the new area.
    const b = this.backing();
    if (b && b.size() > old && this.header.version === 3) {
      await this.writeZeroes(old, Math.min(size, b.size()) - old, {});
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
