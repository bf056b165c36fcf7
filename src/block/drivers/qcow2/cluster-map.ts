/**
 * The qcow2 cluster map: the active L1 table, the L2 tables and their LRU cache, and the
 * decoding of L2 entries into what a guest range is (data, zero, unallocated, compressed), with
 * QEMU's corruption checks on every entry a request meets. Nothing here allocates or writes:
 * allocate.ts changes the map, read.ts walks it for reads and block status.
 */
import {
  HI_COMPRESSED,
  HI_COPIED,
  HI_OFFSET_MASK,
  L1_HI_RESERVED,
  L1_LO_RESERVED,
  L2_HI_RESERVED,
  L2_LO_RESERVED,
  LO_OFFSET_MASK,
  LO_ZERO_FLAG,
} from './format.js';
import { compressedDesc } from './compress.js';
import { Qcow2Image, type Qcow2Parts } from './image.js';

/** How one guest range maps (a run of clusters or subclusters of one kind). */
export type Seg =
  | { kind: 'data'; guest: number; length: number; host: number }
  | { kind: 'zero'; guest: number; length: number }
  | { kind: 'unalloc'; guest: number; length: number }
  | { kind: 'compressed'; guest: number; length: number; cluster: number; hi: number; lo: number };

/** Kinds of a standard (8-byte) L2 entry, for the fast paths. */
export const K_UNALLOC = 0;
export const K_DATA = 1;
export const K_ZERO = 2;
export const K_COMPRESSED = 3;
/** An entry kindOf() rejects (kindsOf() marks it; kindOf() raises the error when it is used). */
export const K_CORRUPT = 4;

export interface CachedL2 {
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
export interface Entry {
  hi: number;
  lo: number;
  bitmap: number; // low 32 bits: alloc; high 32 bits in `zeroBits`
  zeroBits: number;
  type: 'unalloc' | 'normal' | 'zero-plain' | 'zero-alloc' | 'compressed';
  host: number;
  copied: boolean;
}

export abstract class Qcow2ClusterMap extends Qcow2Image {
  protected l1: Buffer;
  protected readonly l2Cache = new Map<number, CachedL2>();
  protected readonly l2Loading = new Map<number, Promise<CachedL2>>();
  protected readonly l2Capacity: number;

  protected constructor(p: Qcow2Parts) {
    super(p);
    this.l1 = p.l1;
    this.l2Capacity = Math.max(2, Math.floor(p.l2CacheBytes / this.clusterSize));
  }

  protected l1Entry(i: number): { offset: number; copied: boolean } {
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
  protected l1Offset(i: number): number {
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
  protected cachedL2(l1i: number): CachedL2 | undefined | null {
    const off = this.l1Offset(l1i);
    if (off === 0) return undefined;
    const t = this.l2Cache.get(off);
    if (t === undefined) return null;
    if (this.mru !== t) this.touch(t);
    return t;
  }

  /** Host offset and COPIED flag of the last entry kindOf() classified as K_DATA. */
  protected hostOut = 0;
  protected copiedOut = false;

  /**
   * Kind of standard L2 entry `i` of `t` (K_*), with decode()'s checks; for K_DATA the host
   * offset of the cluster is left in `hostOut` (no allocation on the hot paths).
   */
  protected kindOf(t: CachedL2, i: number): number {
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
  protected kindsOf(t: CachedL2): Uint8Array {
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
  protected statusKind(t: CachedL2, i: number): number {
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

  /** The most recently touched table (a repeated hit on it needs no new stamp). */
  protected mru: CachedL2 | undefined;
  protected useClock = 0;

  /**
   * Mark `t` used now (and make it the cached copy of its offset). LRU order is kept with
   * stamps, not by re-inserting into the Map: delete+set on every hit makes V8 rebuild the
   * Map's backing store over and over, which showed up as old-space GC on the read path.
   */
  protected touch(t: CachedL2): void {
    t.used = ++this.useClock;
    this.mru = t;
    if (this.l2Cache.get(t.offset) !== t) this.l2Cache.set(t.offset, t);
  }

  /** Over capacity: drop the least recently used clean tables (down to 7/8 of the capacity). */
  protected evictClean(): void {
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
  protected async loadL2(offset: number): Promise<CachedL2> {
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

  protected decode(t: CachedL2 | undefined, idx: number): Entry {
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
  protected async l2Read(l1i: number): Promise<CachedL2 | undefined> {
    const e = this.l1Entry(l1i);
    if (e.offset === 0) return undefined;
    return this.loadL2(e.offset);
  }

  /** Map [guest, guest+length) into segments (both inside the disk). */
  protected async segments(guest: number, length: number): Promise<Seg[]> {
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

  protected async lookup(g: number): Promise<Entry> {
    const t = await this.l2Read(Math.floor(g / this.l2Entries));
    return this.decode(t, g % this.l2Entries);
  }

  /** Clusters an entry holds references to (for freeing). */
  protected refsOf(e: Entry): number[] {
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

/**
 * Host offset of the L2 table in entry `i` of an L1 table buffer: 0 = none, -1 = reserved bits
 * set or unaligned. (Snapshot L1 tables may carry stale COPIED bits: ignored.)
 */
export function l1EntryOffset(l1: Buffer, i: number, cs: number): number {
  const hi = l1.readUInt32BE(i * 8);
  const lo = l1.readUInt32BE(i * 8 + 4);
  if ((hi & L1_HI_RESERVED) !== 0 || (lo & L1_LO_RESERVED) !== 0) return -1;
  const off = (hi & HI_OFFSET_MASK) * 0x100000000 + ((lo & LO_OFFSET_MASK) >>> 0);
  return off % cs === 0 ? off : -1;
}
