/**
 * Persistent dirty bitmaps in qcow2 images (qcow2 spec: "Bitmaps extension"; digest §9).
 *
 * Lifecycle, as QEMU:
 * - open: read and check the bitmap directory (untrusted input: every offset and size is
 *   checked). A bitmap marked `in_use` was not stored cleanly and comes back inconsistent.
 *   On a read-write open every loaded bitmap is marked `in_use` in place (autoclear bit 0
 *   cleared around the directory update), so a crash leaves them inconsistent.
 * - runtime: bits live in memory (dirty-bitmap-set.ts).
 * - clean close: bitmaps are written to new clusters (data, then tables, then a new directory),
 *   refcounts are synced, the header is pointed at the new directory with autoclear bit 0 set,
 *   then the old clusters are freed. Inconsistent bitmaps keep their old entry (still in_use)
 *   so that they can be removed later.
 */
import { BlockError } from '../util/errors.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import type { LoadedBitmap, NamedBitmap } from './dirty-bitmap-set.js';
import type { Qcow2Header } from './drivers/qcow2/format.js';

/** Directory entry flags. */
const BME_IN_USE = 1;
const BME_AUTO = 2;
const BME_RESERVED = ~(BME_IN_USE | BME_AUTO) >>> 0;
/** QEMU limits. */
export const QCOW2_MAX_BITMAPS = 65535;
const MAX_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS;
const MAX_TABLE_SIZE = 0x8000000;
const MAX_NAME = 1023;
/** Bitmap table entry masks (u64 split in hi/lo 32-bit halves). */
const TE_HI_RESERVED = 0xff000000;
const TE_LO_RESERVED = 0x1fe;
const TE_LO_OFFSET = 0xfffffe00;
const TE_ALL_ONES = 1;
const AUTOCLEAR_BITMAPS = 1n;
const ENTRY_FIXED = 24;

/** What the qcow2 driver lends to this module. */
export interface Qcow2BitmapHost {
  readonly nodeName: string;
  readonly header: Qcow2Header;
  readonly clusterSize: number;
  readonly writable: boolean;
  imageSize(): number;
  fileSize(): number;
  read(buf: Buffer, offset: number): Promise<void>;
  write(buf: Buffer, offset: number): Promise<void>;
  flush(): Promise<void>;
  /** Allocate `n` contiguous clusters (refcount 1, in the refcount cache); returns the offset. */
  alloc(n: number): Promise<number>;
  /** Drop one reference to the cluster at `offset`. */
  free(offset: number): Promise<void>;
  /** Write cached refcount changes and sync them. */
  syncRefcounts(): Promise<void>;
  /** Rewrite the header cluster from `header` and sync. */
  writeHeader(): Promise<void>;
}

interface DirEntry {
  tableOffset: number;
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  name: string;
  extraDataSize: number;
  /** Table entries as [hi, lo] pairs, when the table was readable. */
  table?: Array<[number, number]>;
}

function broken(): BlockError {
  return new BlockError('BITMAP_CORRUPT', 'EINVAL', 'Broken bitmap directory');
}

function constraints(name: string): BlockError {
  return new BlockError('BITMAP_CORRUPT', 'EINVAL', `Bitmap '${name}' doesn't satisfy the constraints`);
}

function unreadable(name: string): BlockError {
  return new BlockError('BITMAP_CORRUPT', 'EINVAL', `Could not read bitmap '${name}' from image: Invalid argument`);
}

function u64(buf: Buffer, off: number): number {
  const v = buf.readBigUInt64BE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw broken();
  return Number(v);
}

/** Bitmap table entries needed for `size` bytes at `granularity` with clusters of `cs`. */
export function bitmapTableSize(size: number, granularity: number, cs: number): number {
  return Math.ceil(Math.ceil(Math.ceil(size / granularity) / 8) / cs);
}

/** Serialised directory entry length (24 + extra + name, padded to 8). */
function entryLength(nameBytes: number, extra: number): number {
  return Math.ceil((ENTRY_FIXED + extra + nameBytes) / 8) * 8;
}

export class Qcow2BitmapStore {
  private entries: DirEntry[] = [];
  /** load() ran to the end: only then may store() rewrite the image. */
  private loaded = false;

  constructor(private readonly host: Qcow2BitmapHost) {}

  /** For `format-specific.data.bitmaps` of query output / qemu-img info. */
  formatInfo(): Array<{ flags: string[]; name: string; granularity: number }> | undefined {
    if (this.entries.length === 0) return undefined;
    return this.entries.map((e) => ({
      flags: [...(e.flags & BME_IN_USE ? ['in-use'] : []), ...(e.flags & BME_AUTO ? ['auto'] : [])],
      name: e.name,
      granularity: 2 ** e.granularityBits,
    }));
  }

  /** `block-dirty-bitmap-add persistent=true` checks (QEMU's texts). */
  canStore(name: string, pendingPersistent: number): void {
    const prefix = `Can't make bitmap '${name}' persistent in '${this.host.nodeName}': `;
    if (this.host.header.version !== 3) {
      throw new BlockError('BITMAP_STORE', 'ENOTSUP', `${prefix}Cannot store dirty bitmaps in qcow2 v2 files`);
    }
    if (pendingPersistent >= QCOW2_MAX_BITMAPS) {
      throw new BlockError('BITMAP_STORE', 'ENOSPC', `${prefix}Maximum number of persistent bitmaps is already reached`);
    }
  }

  /** Read the directory (and, read-write, mark every loaded bitmap in_use). */
  async load(): Promise<LoadedBitmap[]> {
    const h = this.host.header;
    const ext = h.bitmaps;
    this.entries = [];
    if (!ext) {
      if (h.version === 3 && (h.autoclear & AUTOCLEAR_BITMAPS) !== 0n && this.host.writable) {
        // The bit without the extension means nothing; clear it so other tools agree.
        h.autoclear &= ~AUTOCLEAR_BITMAPS;
        await this.host.writeHeader();
      }
      this.loaded = true;
      return [];
    }
    if (ext.nbBitmaps > QCOW2_MAX_BITMAPS) {
      throw new BlockError(
        'BITMAP_CORRUPT',
        'EINVAL',
        `bitmaps_ext: Image has ${ext.nbBitmaps} bitmaps, exceeding the QEMU supported maximum of ${QCOW2_MAX_BITMAPS}`,
      );
    }
    if (ext.nbBitmaps === 0) {
      throw new BlockError('BITMAP_CORRUPT', 'EINVAL', 'found bitmaps extension with zero bitmaps');
    }
    if (ext.directorySize > MAX_DIRECTORY_SIZE) {
      throw new BlockError(
        'BITMAP_CORRUPT',
        'EINVAL',
        `bitmaps_ext: bitmap directory size (${ext.directorySize}) exceeds the maximum supported size (${MAX_DIRECTORY_SIZE})`,
      );
    }
    if (ext.directoryOffset % this.host.clusterSize !== 0 || ext.directoryOffset === 0) {
      throw new BlockError('BITMAP_CORRUPT', 'EINVAL', 'bitmaps_ext: invalid bitmap directory offset');
    }
    if (ext.directoryOffset + ext.directorySize > this.host.fileSize()) throw broken();

    const consistent = (h.autoclear & AUTOCLEAR_BITMAPS) !== 0n;
    if (!consistent && this.host.writable) {
      // A program that does not know bitmaps wrote the image: their clusters cannot be trusted.
      // Drop the extension (the clusters leak; `qemu-img check -r` reclaims them), as QEMU does.
      delete h.bitmaps;
      await this.host.writeHeader();
      this.loaded = true;
      return [];
    }

    const dir = Buffer.alloc(ext.directorySize);
    await this.host.read(dir, ext.directoryOffset);
    const entries = parseDirectory(dir, ext.nbBitmaps);
    const size = this.host.imageSize();
    const cs = this.host.clusterSize;
    for (const e of entries) {
      const gran = 2 ** e.granularityBits;
      const bad =
        e.tableOffset === 0 ||
        e.tableOffset % cs !== 0 ||
        e.tableSize === 0 ||
        e.tableSize > MAX_TABLE_SIZE ||
        (e.flags & BME_RESERVED) !== 0 ||
        e.type !== 1 ||
        e.granularityBits < 9 ||
        e.granularityBits > 31 ||
        e.extraDataSize !== 0 ||
        e.tableOffset + e.tableSize * 8 > this.host.fileSize() ||
        e.tableSize !== bitmapTableSize(size, gran, cs);
      if (bad) throw constraints(e.name);
      e.table = await this.readTable(e);
    }
    this.entries = entries;

    const out: LoadedBitmap[] = entries.map((e) => {
      const inconsistent = !consistent || (e.flags & BME_IN_USE) !== 0;
      return {
        name: e.name,
        granularity: 2 ** e.granularityBits,
        enabled: !inconsistent && (e.flags & BME_AUTO) !== 0,
        inconsistent,
        readonly: !this.host.writable,
        load: (into: DirtyBitmap) => this.readData(e, into),
      };
    });
    if (this.host.writable && entries.some((e) => !(e.flags & BME_IN_USE))) {
      await this.markInUse(ext.directoryOffset, ext.directorySize);
    }
    this.loaded = true;
    return out;
  }

  private async readTable(e: DirEntry): Promise<Array<[number, number]>> {
    const buf = Buffer.alloc(e.tableSize * 8);
    await this.host.read(buf, e.tableOffset);
    const cs = this.host.clusterSize;
    const fileSize = this.host.fileSize();
    const out: Array<[number, number]> = [];
    for (let i = 0; i < e.tableSize; i++) {
      const hi = buf.readUInt32BE(i * 8);
      const lo = buf.readUInt32BE(i * 8 + 4);
      const off = hi * 2 ** 32 + ((lo & TE_LO_OFFSET) >>> 0);
      if (hi & TE_HI_RESERVED || lo & TE_LO_RESERVED) throw unreadable(e.name);
      if (off !== 0 && (lo & TE_ALL_ONES || off % cs !== 0 || off + cs > fileSize)) throw unreadable(e.name);
      out.push([hi, lo]);
    }
    return out;
  }

  private async readData(e: DirEntry, into: DirtyBitmap): Promise<void> {
    const cs = this.host.clusterSize;
    const table = e.table ?? [];
    const ones = Buffer.alloc(cs, 0xff);
    const buf = Buffer.alloc(cs);
    for (let t = 0; t < table.length; t++) {
      const [hi, lo] = table[t]!;
      const off = hi * 2 ** 32 + ((lo & TE_LO_OFFSET) >>> 0);
      if (off === 0) {
        if (lo & TE_ALL_ONES) into.deserialize(t * cs, ones);
        continue;
      }
      await this.host.read(buf, off);
      into.deserialize(t * cs, buf);
    }
  }

  /** QEMU's in-place update: autoclear bit off, directory with in_use, autoclear bit on. */
  private async markInUse(dirOffset: number, dirSize: number): Promise<void> {
    const h = this.host.header;
    h.autoclear &= ~AUTOCLEAR_BITMAPS;
    await this.host.writeHeader();
    for (const e of this.entries) e.flags |= BME_IN_USE;
    const dir = buildDirectory(this.entries);
    if (dir.length !== dirSize) throw broken();
    await this.host.write(dir, dirOffset);
    await this.host.flush();
    h.autoclear |= AUTOCLEAR_BITMAPS;
    await this.host.writeHeader();
  }

  /**
   * Store the node's persistent bitmaps (clean close). Inconsistent ones keep their old entry;
   * bitmaps no longer in the list are dropped from the image.
   */
  async store(bitmaps: readonly NamedBitmap[]): Promise<void> {
    if (!this.loaded || !this.host.writable) return;
    const h = this.host.header;
    if (h.version !== 3) return;
    const cs = this.host.clusterSize;
    const size = this.host.imageSize();
    const old = this.entries;
    const oldExt = h.bitmaps;
    if (bitmaps.length === 0 && !oldExt) return;

    const next: DirEntry[] = [];
    const kept = new Set<DirEntry>();
    for (const bm of bitmaps) {
      if (bm.inconsistent) {
        const prev = old.find((e) => e.name === bm.name);
        if (prev) {
          next.push(prev);
          kept.add(prev);
        }
        continue;
      }
      if (bm.bits.size !== size) bm.bits.resize(size);
      const tableSize = bitmapTableSize(size, bm.granularity, cs);
      const table: Array<[number, number]> = [];
      for (let t = 0; t < tableSize; t++) {
        if (bm.bits.isSerializedRangeClean(t * cs, cs)) {
          table.push([0, 0]);
          continue;
        }
        const off = await this.host.alloc(1);
        await this.host.write(bm.bits.serialize(t * cs, cs), off);
        table.push([Math.floor(off / 2 ** 32), off % 2 ** 32]);
      }
      const tableBuf = Buffer.alloc(Math.ceil((tableSize * 8) / cs) * cs);
      table.forEach(([hi, lo], i) => {
        tableBuf.writeUInt32BE(hi, i * 8);
        tableBuf.writeUInt32BE(lo >>> 0, i * 8 + 4);
      });
      const tableOffset = await this.host.alloc(tableBuf.length / cs);
      await this.host.write(tableBuf, tableOffset);
      next.push({
        tableOffset,
        tableSize,
        flags: bm.recording ? BME_AUTO : 0,
        type: 1,
        granularityBits: Math.log2(bm.granularity),
        name: bm.name,
        extraDataSize: 0,
        table,
      });
    }

    if (next.length > 0) {
      const dir = buildDirectory(next);
      const dirOffset = await this.host.alloc(Math.ceil(dir.length / cs));
      await this.host.write(dir, dirOffset);
      await this.host.syncRefcounts();
      await this.host.flush();
      h.bitmaps = { nbBitmaps: next.length, directorySize: dir.length, directoryOffset: dirOffset };
      h.autoclear |= AUTOCLEAR_BITMAPS;
    } else {
      delete h.bitmaps;
      h.autoclear &= ~AUTOCLEAR_BITMAPS;
    }
    await this.host.writeHeader();

    // The header no longer points at the old structures: release them.
    if (oldExt) {
      for (let c = 0; c < Math.ceil(oldExt.directorySize / cs); c++) {
        await this.host.free(oldExt.directoryOffset + c * cs);
      }
    }
    for (const e of old) {
      if (kept.has(e)) continue;
      await this.freeEntry(e);
    }
    await this.host.syncRefcounts();
    this.entries = next;
  }

  /**
   * `block-dirty-bitmap-remove` of a persistent bitmap: drop its entry from the image at once
   * (a new directory in new clusters, then the header, then the old clusters are freed). The
   * other entries keep their flags (in_use while open).
   */
  async removeStored(name: string): Promise<void> {
    if (!this.loaded || !this.host.writable) return;
    const victim = this.entries.find((e) => e.name === name);
    const oldExt = this.host.header.bitmaps;
    if (!victim || !oldExt) return;
    const h = this.host.header;
    const cs = this.host.clusterSize;
    const rest = this.entries.filter((e) => e !== victim);
    if (rest.length > 0) {
      const dir = buildDirectory(rest);
      const dirOffset = await this.host.alloc(Math.ceil(dir.length / cs));
      await this.host.write(dir, dirOffset);
      await this.host.syncRefcounts();
      h.bitmaps = { nbBitmaps: rest.length, directorySize: dir.length, directoryOffset: dirOffset };
    } else {
      delete h.bitmaps;
      h.autoclear &= ~AUTOCLEAR_BITMAPS;
    }
    await this.host.writeHeader();
    for (let c = 0; c < Math.ceil(oldExt.directorySize / cs); c++) {
      await this.host.free(oldExt.directoryOffset + c * cs);
    }
    await this.freeEntry(victim);
    await this.host.syncRefcounts();
    this.entries = rest;
  }

  private async freeEntry(e: DirEntry): Promise<void> {
    const cs = this.host.clusterSize;
    for (const [hi, lo] of e.table ?? []) {
      const off = hi * 2 ** 32 + ((lo & TE_LO_OFFSET) >>> 0);
      if (off !== 0) await this.host.free(off);
    }
    if (e.table) {
      for (let c = 0; c < Math.ceil((e.tableSize * 8) / cs); c++) await this.host.free(e.tableOffset + c * cs);
    }
  }
}

// [0..7] bitmap_table_offset  [8..11] bitmap_table_size  [12..15] flags  [16] type
// [17] granularity_bits  [18..19] name_size  [20..23] extra_data_size  [24..] extra, name, pad
function parseDirectory(dir: Buffer, nb: number): DirEntry[] {
  const out: DirEntry[] = [];
  const names = new Set<string>();
  let pos = 0;
  while (pos < dir.length) {
    if (dir.length - pos < ENTRY_FIXED) throw broken();
    const nameSize = dir.readUInt16BE(pos + 18);
    const extra = dir.readUInt32BE(pos + 20);
    const len = entryLength(nameSize, extra);
    if (len > dir.length - pos) throw broken();
    const nameStart = pos + ENTRY_FIXED + extra;
    const name = dir.toString('utf8', nameStart, nameStart + nameSize);
    const e: DirEntry = {
      tableOffset: u64(dir, pos),
      tableSize: dir.readUInt32BE(pos + 8),
      flags: dir.readUInt32BE(pos + 12),
      type: dir.readUInt8(pos + 16),
      granularityBits: dir.readUInt8(pos + 17),
      name,
      extraDataSize: extra,
    };
    if (nameSize === 0 || nameSize > MAX_NAME) throw constraints(name);
    if (names.has(name)) throw broken();
    names.add(name);
    out.push(e);
    pos += len;
  }
  if (out.length !== nb) throw broken();
  return out;
}

function buildDirectory(entries: readonly DirEntry[]): Buffer {
  const parts = entries.map((e) => {
    const name = Buffer.from(e.name, 'utf8');
    const b = Buffer.alloc(entryLength(name.length, 0));
    b.writeBigUInt64BE(BigInt(e.tableOffset), 0);
    b.writeUInt32BE(e.tableSize, 8);
    b.writeUInt32BE(e.flags >>> 0, 12);
    b.writeUInt8(e.type, 16);
    b.writeUInt8(e.granularityBits, 17);
    b.writeUInt16BE(name.length, 18);
    b.writeUInt32BE(0, 20);
    name.copy(b, ENTRY_FIXED);
    return b;
  });
  return Buffer.concat(parts);
}

/**
 * Host clusters the bitmaps extension references (directory, bitmap tables, bitmap data), for
 * refcount rebuilds. Checks what it follows (aligned, in range); throws on a broken directory.
 */
export async function bitmapClusters(
  read: (buf: Buffer, offset: number) => Promise<void>,
  ext: { nbBitmaps: number; directorySize: number; directoryOffset: number },
  cs: number,
): Promise<number[]> {
  const out: number[] = [];
  if (ext.directorySize > MAX_DIRECTORY_SIZE || ext.nbBitmaps > QCOW2_MAX_BITMAPS) throw broken();
  if (ext.directoryOffset === 0 || ext.directoryOffset % cs !== 0) throw broken();
  for (let c = 0; c < Math.ceil(ext.directorySize / cs); c++) out.push(ext.directoryOffset / cs + c);
  const dir = Buffer.alloc(ext.directorySize);
  await read(dir, ext.directoryOffset);
  for (const e of parseDirectory(dir, ext.nbBitmaps)) {
    if (e.tableOffset === 0 || e.tableOffset % cs !== 0 || e.tableSize > MAX_TABLE_SIZE) throw constraints(e.name);
    const bytes = e.tableSize * 8;
    for (let c = 0; c < Math.ceil(bytes / cs); c++) out.push(e.tableOffset / cs + c);
    const table = Buffer.alloc(bytes);
    await read(table, e.tableOffset);
    for (let i = 0; i < e.tableSize; i++) {
      const hi = table.readUInt32BE(i * 8);
      const lo = table.readUInt32BE(i * 8 + 4);
      if (hi & TE_HI_RESERVED || lo & TE_LO_RESERVED) throw unreadable(e.name);
      const off = hi * 2 ** 32 + ((lo & TE_LO_OFFSET) >>> 0);
      if (off === 0) continue;
      if (off % cs !== 0) throw unreadable(e.name);
      out.push(off / cs);
    }
  }
  return out;
}
