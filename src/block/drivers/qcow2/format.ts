/**
 * qcow2 on-disk layout: constants, header parsing (with every field checked against the file
 * and QEMU's limits, because an image is untrusted input) and header serialisation.
 *
 * Spec: QEMU docs/interop/qcow2.txt; digest in /work/shared/reference/qcow2.md §1-§5.
 */
import { BlockError } from '../../../util/errors.js';

export const QCOW_MAGIC = 0x514649fb;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** QEMU's limits on metadata table sizes (qcow2.h). */
export const MAX_L1_SIZE = 32 * 1024 * 1024;
export const MAX_REFTABLE_SIZE = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
export const MAX_BACKING_FILE_NAME = 1023;
export const V2_HEADER_LENGTH = 72;
export const V3_HEADER_LENGTH = 112;

// Feature bits (spec: "Header", incompatible/compatible/autoclear features).
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;
export const AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;

// Header extension types.
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

/** L1/L2/reftable entry bits, split into the high and low 32-bit halves of the u64. */
export const HI_COPIED = 0x80000000;
export const HI_COMPRESSED = 0x40000000;
/** Offset bits 9..55: high half bits 0..23, low half bits 9..31. */
export const HI_OFFSET_MASK = 0x00ffffff;
export const LO_OFFSET_MASK = 0xfffffe00;
/** Reserved bits of an L1 entry: 0x7f000000000001ff. */
export const L1_HI_RESERVED = 0x7f000000;
export const L1_LO_RESERVED = 0x1ff;
/** Reserved bits of a standard L2 entry: 0x3f000000000001fe. */
export const L2_HI_RESERVED = 0x3f000000;
export const L2_LO_RESERVED = 0x1fe;
export const LO_ZERO_FLAG = 1;

export interface FeatureName {
  type: number;
  bit: number;
  name: string;
}

export interface BitmapsExt {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

export interface UnknownExt {
  type: number;
  data: Buffer;
}

/** A parsed header. Offsets are plain numbers (checked to be safe integers). */
export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Header bytes past 112 that we do not know (kept verbatim). */
  extraFields: Buffer;
  backingFile?: string;
  backingFormat?: string;
  featureNames: FeatureName[];
  bitmaps?: BitmapsExt;
  dataFile?: string;
  hasCryptoExt: boolean;
  unknownExts: UnknownExt[];
}

export function corrupt(msg: string): BlockError {
  return new BlockError('QCOW2_INVALID', 'EINVAL', msg);
}

/** Read a u64 as a number, refusing values above 2^53. */
export function u64(buf: Buffer, off: number, what: string): number {
  const hi = buf.readUInt32BE(off);
  const lo = buf.readUInt32BE(off + 4);
  if (hi >= 0x200000) throw corrupt(`Image ${what} is too large`);
  return hi * 0x100000000 + lo;
}

export function writeU64(buf: Buffer, off: number, v: number): void {
  buf.writeUInt32BE(Math.floor(v / 0x100000000) >>> 0, off);
  buf.writeUInt32BE(v >>> 0, off + 4);
}

function isAligned(v: number, cs: number): boolean {
  return v % cs === 0;
}

const FEATURE_DEFAULT_NAMES: readonly FeatureName[] = [
  { type: 0, bit: 0, name: 'dirty bit' },
  { type: 0, bit: 1, name: 'corrupt bit' },
  { type: 0, bit: 2, name: 'external data file' },
  { type: 0, bit: 3, name: 'compression type' },
  { type: 0, bit: 4, name: 'extended L2 entries' },
  { type: 1, bit: 0, name: 'lazy refcounts' },
  { type: 2, bit: 0, name: 'bitmaps' },
  { type: 2, bit: 1, name: 'raw external data' },
];

/** Bytes needed before the cluster size is known. */
export const HEADER_PROBE = 112;

/** Whether `buf` starts with the qcow2 magic (format probing). */
export function isQcow2(buf: Buffer): boolean {
  return buf.length >= 4 && buf.readUInt32BE(0) === QCOW_MAGIC;
}

/**
 * Parse and validate cluster 0. `cluster0` holds the first min(cluster size, file size) bytes of
 * the file (the caller reads HEADER_PROBE bytes first to learn the cluster size).
 */
export function parseHeader(cluster0: Buffer, fileSize: number): Qcow2Header {
  if (cluster0.length < V2_HEADER_LENGTH) throw corrupt('Image is not in qcow2 format');
  if (cluster0.readUInt32BE(0) !== QCOW_MAGIC) throw corrupt('Image is not in qcow2 format');
  const version = cluster0.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw corrupt(`Unsupported qcow2 version ${version}`);
  const clusterBits = cluster0.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw corrupt(`Unsupported cluster size: 2^${clusterBits}`);
  }
  const cs = 2 ** clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(cluster0, 8, 'backing file offset'),
    backingFileSize: cluster0.readUInt32BE(16),
    clusterBits,
    size: u64(cluster0, 24, 'size'),
    cryptMethod: cluster0.readUInt32BE(32),
    l1Size: cluster0.readUInt32BE(36),
    l1TableOffset: u64(cluster0, 40, 'L1 table offset'),
    refcountTableOffset: u64(cluster0, 48, 'reference count table offset'),
    refcountTableClusters: cluster0.readUInt32BE(56),
    nbSnapshots: cluster0.readUInt32BE(60),
    snapshotsOffset: u64(cluster0, 64, 'snapshot table offset'),
    incompatible: 0n,
    compatible: 0n,
    autoclear: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: 0,
    extraFields: Buffer.alloc(0),
    featureNames: [],
    hasCryptoExt: false,
    unknownExts: [],
  };
  if (version === 3) {
    if (cluster0.length < 104) throw corrupt('qcow2 header exceeds cluster size');
    h.incompatible = cluster0.readBigUInt64BE(72);
    h.compatible = cluster0.readBigUInt64BE(80);
    h.autoclear = cluster0.readBigUInt64BE(88);
    h.refcountOrder = cluster0.readUInt32BE(96);
    h.headerLength = cluster0.readUInt32BE(100);
    if (h.headerLength < 104) throw corrupt('qcow2 header too short');
    if (h.headerLength > cs || h.headerLength > cluster0.length) {
      throw corrupt('qcow2 header exceeds cluster size');
    }
    if (h.headerLength > 104) h.compressionType = cluster0.readUInt8(104);
    if (h.headerLength > V3_HEADER_LENGTH) {
      h.extraFields = Buffer.from(cluster0.subarray(V3_HEADER_LENGTH, h.headerLength));
    }
  }
  if (h.refcountOrder > 6) throw corrupt('Reference count entry width too large; may not exceed 64 bits');

  // Extensions live between the header and the backing file name (or the end of cluster 0).
  const extEnd = h.backingFileOffset !== 0 ? h.backingFileOffset : cs;
  if (h.backingFileOffset !== 0) {
    if (h.backingFileOffset > cs || h.backingFileSize > MAX_BACKING_FILE_NAME ||
        h.backingFileSize > cs - h.backingFileOffset) {
      throw corrupt('Backing file name too long');
    }
    if (h.backingFileOffset + h.backingFileSize > cluster0.length) {
      throw corrupt('Backing file name extends past the end of the image');
    }
  }
  parseExtensions(h, cluster0, h.headerLength, Math.min(extEnd, cluster0.length));
  if (h.backingFileOffset !== 0 && h.backingFileSize > 0) {
    h.backingFile = cluster0.toString('utf8', h.backingFileOffset, h.backingFileOffset + h.backingFileSize);
  }

  // Feature checks, QEMU's order and texts.
  const unknown = h.incompatible & ~INCOMPAT_KNOWN;
  if (unknown !== 0n) {
    throw new BlockError('NOT_SUPPORTED', 'ENOTSUP', `Unsupported qcow2 feature(s): ${featureText(h, 0, unknown)}`);
  }
  if (((h.incompatible & INCOMPAT_COMPRESSION) !== 0n) !== (h.compressionType !== 0)) {
    throw corrupt(
      h.compressionType !== 0
        ? 'Compression type incompatible feature bit must be set for a non-zlib compression type'
        : 'Compression type incompatible feature bit must not be set for zlib compression',
    );
  }
  if (h.compressionType > 1) throw corrupt(`Unknown compression type '${h.compressionType}'`);
  if ((h.incompatible & INCOMPAT_EXTL2) !== 0n && clusterBits < 14) {
    throw corrupt('The cluster size of an image with extended L2 entries must be at least 16 KiB');
  }
  if (h.cryptMethod !== 0 || h.hasCryptoExt) {
    throw new BlockError('NOT_SUPPORTED', 'ENOTSUP', 'Encrypted qcow2 images are not supported by blockd');
  }
  if ((h.incompatible & INCOMPAT_DATA_FILE) !== 0n || h.dataFile !== undefined) {
    throw new BlockError('NOT_SUPPORTED', 'ENOTSUP', 'qcow2 images with an external data file are not supported by blockd');
  }

  // Tables: aligned and bounded (QEMU's validate_table_offset plus the file size).
  const checkTable = (offset: number, entries: number, entryLen: number, max: number, what: string): void => {
    const bytes = entries * entryLen;
    if (bytes > max) throw corrupt(`${what} too large`);
    if (!isAligned(offset, cs)) throw corrupt(`Invalid ${what.toLowerCase()} offset`);
    if (offset + bytes > Number.MAX_SAFE_INTEGER) throw corrupt(`Invalid ${what.toLowerCase()} offset`);
  };
  if (h.refcountTableClusters === 0) throw corrupt('Image does not contain a reference count table');
  checkTable(h.refcountTableOffset, h.refcountTableClusters, cs, MAX_REFTABLE_SIZE, 'Reference count table');
  if (h.refcountTableOffset + h.refcountTableClusters * cs > fileSize + cs) {
    throw corrupt('Reference count table exceeds the end of the image file');
  }
  if (h.nbSnapshots > MAX_SNAPSHOTS) throw corrupt('Too many snapshots');
  if (h.nbSnapshots > 0) {
    checkTable(h.snapshotsOffset, h.nbSnapshots, 40, 64 * 1024 * 1024, 'Snapshot table');
  }
  checkTable(h.l1TableOffset, h.l1Size, 8, MAX_L1_SIZE, 'Active L1 table');
  if (h.l1Size > 0 && h.l1TableOffset === 0) throw corrupt('Invalid L1 table offset');
  if (h.l1Size > 0 && h.l1TableOffset + h.l1Size * 8 > fileSize) {
    throw corrupt('Active L1 table exceeds the end of the image file');
  }
  const l2Entries = cs / ((h.incompatible & INCOMPAT_EXTL2) !== 0n ? 16 : 8);
  const needL1 = Math.ceil(h.size / (cs * l2Entries));
  if (h.l1Size < needL1) throw corrupt('L1 table is too small');
  if (h.size > Number.MAX_SAFE_INTEGER - cs) throw corrupt('Image is too big');
  return h;
}

function featureText(h: Qcow2Header, type: number, mask: bigint): string {
  const names: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    if ((mask & (1n << BigInt(bit))) === 0n) continue;
    const f = h.featureNames.find((x) => x.type === type && x.bit === bit);
    names.push(f ? f.name : `Unknown incompatible feature: ${(1n << BigInt(bit)).toString(16)}`);
  }
  return names.join(', ');
}

function parseExtensions(h: Qcow2Header, c0: Buffer, start: number, end: number): void {
  if (h.version === 2) start = V2_HEADER_LENGTH;
  let pos = start;
  const seen = new Set<number>();
  while (pos + 8 <= end) {
    const type = c0.readUInt32BE(pos);
    const len = c0.readUInt32BE(pos + 4);
    pos += 8;
    if (type === EXT_END) return;
    if (len > end - pos) throw corrupt('Invalid header extension (too large)');
    const data = c0.subarray(pos, pos + len);
    pos += Math.ceil(len / 8) * 8;
    if (seen.has(type)) throw corrupt(`Duplicate header extension 0x${type.toString(16)}`);
    seen.add(type);
    switch (type) {
      case EXT_BACKING_FORMAT:
        if (len >= 16) throw corrupt('Invalid backing file format extension');
        h.backingFormat = data.toString('utf8');
        break;
      case EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= len; i += 48) {
          const raw = data.subarray(i + 2, i + 48);
          const nul = raw.indexOf(0);
          h.featureNames.push({
            type: data.readUInt8(i),
            bit: data.readUInt8(i + 1),
            name: raw.toString('utf8', 0, nul < 0 ? 46 : nul),
          });
        }
        break;
      case EXT_BITMAPS: {
        if (len !== 24) throw corrupt('bitmaps_ext: Invalid extension length');
        if (data.readUInt32BE(4) !== 0) throw corrupt('bitmaps_ext: Reserved field is not zero');
        h.bitmaps = {
          nbBitmaps: data.readUInt32BE(0),
          directorySize: u64(data, 8, 'bitmap directory size'),
          directoryOffset: u64(data, 16, 'bitmap directory offset'),
        };
        break;
      }
      case EXT_CRYPTO:
        h.hasCryptoExt = true;
        break;
      case EXT_DATA_FILE:
        h.dataFile = data.toString('utf8');
        break;
      default:
        h.unknownExts.push({ type, data: Buffer.from(data) });
    }
  }
}

/**
 * Build cluster 0 (header, extensions in QEMU's order, end marker, backing file name). Sets
 * `backingFileOffset`/`backingFileSize`/`headerLength` in `h`. Throws when it does not fit.
 */
export function buildHeader(h: Qcow2Header): Buffer {
  const cs = 2 ** h.clusterBits;
  const exts: Buffer[] = [];
  const ext = (type: number, data: Buffer): void => {
    const padded = Buffer.alloc(8 + Math.ceil(data.length / 8) * 8);
    padded.writeUInt32BE(type, 0);
    padded.writeUInt32BE(data.length, 4);
    data.copy(padded, 8);
    exts.push(padded);
  };
  if (h.backingFormat !== undefined) ext(EXT_BACKING_FORMAT, Buffer.from(h.backingFormat));
  if (h.version === 3 && cs > 4096) {
    const names = h.featureNames.length ? h.featureNames : FEATURE_DEFAULT_NAMES;
    const t = Buffer.alloc(names.length * 48);
    names.forEach((f, i) => {
      t.writeUInt8(f.type, i * 48);
      t.writeUInt8(f.bit, i * 48 + 1);
      t.write(f.name.slice(0, 46), i * 48 + 2, 'utf8');
    });
    ext(EXT_FEATURE_TABLE, t);
  }
  if (h.bitmaps) {
    const b = Buffer.alloc(24);
    b.writeUInt32BE(h.bitmaps.nbBitmaps, 0);
    writeU64(b, 8, h.bitmaps.directorySize);
    writeU64(b, 16, h.bitmaps.directoryOffset);
    ext(EXT_BITMAPS, b);
  }
  for (const u of h.unknownExts) ext(u.type, u.data);
  ext(EXT_END, Buffer.alloc(0));

  const headerLength = h.version === 2 ? V2_HEADER_LENGTH : V3_HEADER_LENGTH + h.extraFields.length;
  const extBytes = Buffer.concat(exts);
  const backing = h.backingFile !== undefined ? Buffer.from(h.backingFile) : Buffer.alloc(0);
  const total = headerLength + extBytes.length + backing.length;
  if (total > cs) throw corrupt('Header extensions and backing file name do not fit into the first cluster');
  const out = Buffer.alloc(total);
  out.writeUInt32BE(QCOW_MAGIC, 0);
  out.writeUInt32BE(h.version, 4);
  h.backingFileOffset = backing.length ? headerLength + extBytes.length : 0;
  h.backingFileSize = backing.length;
  h.headerLength = headerLength;
  writeU64(out, 8, h.backingFileOffset);
  out.writeUInt32BE(h.backingFileSize, 16);
  out.writeUInt32BE(h.clusterBits, 20);
  writeU64(out, 24, h.size);
  out.writeUInt32BE(h.cryptMethod, 32);
  out.writeUInt32BE(h.l1Size, 36);
  writeU64(out, 40, h.l1TableOffset);
  writeU64(out, 48, h.refcountTableOffset);
  out.writeUInt32BE(h.refcountTableClusters, 56);
  out.writeUInt32BE(h.nbSnapshots, 60);
  writeU64(out, 64, h.snapshotsOffset);
  if (h.version === 3) {
    out.writeBigUInt64BE(h.incompatible, 72);
    out.writeBigUInt64BE(h.compatible, 80);
    out.writeBigUInt64BE(h.autoclear, 88);
    out.writeUInt32BE(h.refcountOrder, 96);
    out.writeUInt32BE(headerLength, 100);
    out.writeUInt8(h.compressionType, 104);
    h.extraFields.copy(out, V3_HEADER_LENGTH);
  }
  extBytes.copy(out, headerLength);
  backing.copy(out, headerLength + extBytes.length);
  return out;
}

/** A fresh header with QEMU's defaults; tables are filled in by the creator. */
export function newHeader(init: {
  version: 2 | 3;
  clusterBits: number;
  size: number;
  refcountOrder: number;
  lazyRefcounts: boolean;
  extendedL2: boolean;
  backingFile?: string;
  backingFormat?: string;
}): Qcow2Header {
  return {
    version: init.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: init.clusterBits,
    size: init.size,
    cryptMethod: 0,
    l1Size: 0,
    l1TableOffset: 0,
    refcountTableOffset: 0,
    refcountTableClusters: 0,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatible: init.extendedL2 ? INCOMPAT_EXTL2 : 0n,
    compatible: init.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
    autoclear: 0n,
    refcountOrder: init.refcountOrder,
    headerLength: init.version === 2 ? V2_HEADER_LENGTH : V3_HEADER_LENGTH,
    compressionType: 0,
    extraFields: Buffer.alloc(0),
    ...(init.backingFile !== undefined ? { backingFile: init.backingFile } : {}),
    ...(init.backingFormat !== undefined ? { backingFormat: init.backingFormat } : {}),
    featureNames: [],
    hasCryptoExt: false,
    unknownExts: [],
  };
}

/** One internal snapshot, as far as a writer needs it (the table itself is never rewritten). */
export interface SnapshotInfo {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
}

/** QEMU's limits: extra data per snapshot entry, whole snapshot table. */
export const MAX_SNAPSHOT_EXTRA = 1024;
export const MAX_SNAPSHOT_TABLE = 1024 * MAX_SNAPSHOTS;

/** The fixed part of one snapshot table entry, checked (see {@link snapshotEntryAt}). */
export interface SnapshotEntryHead {
  l1TableOffset: number;
  l1Size: number;
  idLen: number;
  nameLen: number;
  extra: number;
  /** Whole entry length in bytes, padding included. */
  len: number;
  /** Where the id starts (the name follows it). */
  idAt: number;
}

/**
 * Decode the fixed part of the entry at `pos` (the caller makes sure `buf` holds its first 40
 * bytes) and check QEMU's extra-data limit. The caller then makes sure the whole entry (`len`)
 * is there and calls {@link checkSnapshotL1}: QEMU's order of checks.
 */
export function snapshotEntryHead(buf: Buffer, pos: number): SnapshotEntryHead {
  const l1TableOffset = u64(buf, pos, 'snapshot L1 table offset');
  const l1Size = buf.readUInt32BE(pos + 8);
  const idLen = buf.readUInt16BE(pos + 12);
  const nameLen = buf.readUInt16BE(pos + 14);
  const extra = buf.readUInt32BE(pos + 36);
  if (extra > MAX_SNAPSHOT_EXTRA) throw corrupt('Too much extra metadata in snapshot table entry');
  const len = Math.ceil((40 + extra + idLen + nameLen) / 8) * 8;
  return { l1TableOffset, l1Size, idLen, nameLen, extra, len, idAt: pos + 40 + extra };
}

/** A snapshot's L1 table must be cluster aligned and within QEMU's L1 size limit. */
export function checkSnapshotL1(h: SnapshotEntryHead, cs: number): void {
  if (h.l1TableOffset % cs !== 0) throw corrupt('Snapshot L1 table offset invalid');
  if (h.l1Size * 8 > MAX_L1_SIZE) throw corrupt('Snapshot L1 table too large');
}

/**
 * Read and check the snapshot table (`nb` entries at `offset`); returns the entries and the
 * table's length in bytes.
 *
 * Entry: [0..7] L1 offset  [8..11] L1 entries  [12..13] id length  [14..15] name length
 * [16..35] dates, VM clock, VM state size  [36..39] extra data length, then extra, id, name,
 * padding to 8.
 */
export async function readSnapshotTable(
  read: (buf: Buffer, offset: number) => Promise<void>,
  offset: number,
  nb: number,
  cs: number,
): Promise<{ snapshots: SnapshotInfo[]; bytes: number }> {
  const snapshots: SnapshotInfo[] = [];
  if (nb === 0) return { snapshots, bytes: 0 };
  let buf = Buffer.alloc(0);
  // Make sure buf covers table bytes [0, n).
  const need = async (n: number): Promise<void> => {
    if (n <= buf.length) return;
    if (n > MAX_SNAPSHOT_TABLE) throw corrupt('Snapshot table too large');
    const next = Buffer.alloc(Math.min(MAX_SNAPSHOT_TABLE, Math.max(n, buf.length * 2, 4096)));
    buf.copy(next);
    await read(next.subarray(buf.length), offset + buf.length);
    buf = next;
  };
  let pos = 0;
  for (let i = 0; i < nb; i++) {
    await need(pos + 40);
    const h = snapshotEntryHead(buf, pos);
    await need(pos + h.len);
    checkSnapshotL1(h, cs);
    const { l1TableOffset, l1Size, idLen, nameLen, len, idAt } = h;
    snapshots.push({
      l1TableOffset,
      l1Size,
      id: buf.toString('utf8', idAt, idAt + idLen),
      name: buf.toString('utf8', idAt + idLen, idAt + idLen + nameLen),
    });
    pos += len;
  }
  return { snapshots, bytes: pos };
}
