/**
 * The bits of one dirty bitmap: bit i covers guest bytes [i·gran, (i+1)·gran).
 *
 * Layout: fixed-size leaf chunks of {@link CHUNK_BITS} bits (4 KiB each), allocated lazily, plus
 * a dense per-chunk population count. A chunk whose count is 0 (all clean) or equal to its
 * capacity (all dirty) holds no leaf at all, so both a fresh bitmap and a fully dirty one cost
 * only the index (12 bytes per 32768 bits). A leaf exists only while a chunk is mixed. Searches
 * (next dirty / next clean) skip empty and full chunks through the counts before looking at
 * words; the dirty total is kept up to date on every change.
 *
 * Serialisation follows QEMU: bit i is bit (i mod 8) of byte floor(i / 8), which is both the
 * little-endian u64 word layout hashed by `x-debug-block-dirty-bitmap-sha256` and the qcow2
 * on-disk bitmap data layout (qcow2 spec: Bitmaps extension, "Bitmap data").
 */
import { createHash } from 'node:crypto';
import { endianness } from 'node:os';
import { BlockError } from '../util/errors.js';

/** log2 of the bits per leaf chunk. */
export const CHUNK_SHIFT = 15;
/** Bits per leaf chunk (32768 bits = 4 KiB of leaf). */
export const CHUNK_BITS = 1 << CHUNK_SHIFT;
const CHUNK_WORDS = CHUNK_BITS >>> 5;
/** Bytes of serialised bitmap per chunk. */
export const CHUNK_BYTES = CHUNK_BITS >>> 3;
/** Smallest and largest granularity (QEMU: 512 B .. 2 GiB, power of two). */
export const MIN_GRANULARITY = 512;
export const MAX_GRANULARITY = 2 ** 31;

const LITTLE_ENDIAN = endianness() === 'LE';
/**
 * Most chunks one bitmap may have: 2^26 chunks = 2^41 bits (1 PiB at 512 B, 128 EiB at 64 KiB),
 * an index of 768 MiB. Beyond that the index alone would not fit in memory.
 */
const MAX_CHUNKS = 2 ** 26;

function popcount32(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  x = (x + (x >>> 4)) & 0x0f0f0f0f;
  return Math.imul(x, 0x01010101) >>> 24;
}

/** Index of the lowest set bit of a non-zero 32-bit value. */
function lowestBit(x: number): number {
  return 31 - Math.clz32(x & -x);
}

/** Mask of bits [lo, hi) within one 32-bit word (0 <= lo < hi <= 32). */
function wordMask(lo: number, hi: number): number {
  const upper = hi === 32 ? 0xffffffff : (1 << hi) - 1;
  return (upper & ~((1 << lo) - 1)) >>> 0;
}

/** Whether `g` is a valid granularity (power of two, 512 B .. 2 GiB). */
export function isValidGranularity(g: number): boolean {
  return Number.isInteger(g) && g >= MIN_GRANULARITY && g <= MAX_GRANULARITY && (g & (g - 1)) === 0;
}

/** A run of bitmap state in bytes, clamped to the bitmap's size. */
export interface DirtyExtent {
  offset: number;
  length: number;
  dirty: boolean;
}

export class DirtyBitmap {
  readonly granularity: number;
  private sizeBytes: number;
  private nbits: number;
  private leaves: Array<Uint32Array | undefined>;
  private counts: Uint32Array;
  private total = 0;

  /**
   * @param size guest size in bytes covered by the bitmap
   * @param granularity bytes per bit (power of two, 512 B .. 2 GiB)
   */
  constructor(size: number, granularity: number) {
    if (!isValidGranularity(granularity)) {
      throw new BlockError('BITMAP_GRANULARITY', 'EINVAL', 'Granularity must be power of 2 and at least 512');
    }
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new BlockError('RANGE', 'EINVAL', `invalid bitmap size ${size}`);
    }
    this.granularity = granularity;
    this.sizeBytes = size;
    this.nbits = Math.ceil(size / granularity);
    const nchunks = Math.ceil(this.nbits / CHUNK_BITS);
    if (nchunks > MAX_CHUNKS) {
      throw new BlockError(
        'BITMAP_TOO_LARGE',
        'ENOMEM',
        `Cannot allocate a dirty bitmap of ${this.nbits} bits (granularity ${granularity} is too fine for ${size} bytes)`,
      );
    }
    this.leaves = new Array<Uint32Array | undefined>(nchunks);
    this.counts = new Uint32Array(nchunks);
  }

  /** Guest size covered, in bytes. */
  get size(): number {
    return this.sizeBytes;
  }

  /** Number of bits. */
  get bitCount(): number {
    return this.nbits;
  }

  /** Number of dirty bits. */
  get dirtyBits(): number {
    return this.total;
  }

  /** Dirty bytes as QEMU counts them: dirty bits × granularity (the last bit is not clamped). */
  get dirtyBytes(): number {
    return this.total * this.granularity;
  }

  /** Bytes of memory held by leaves and the index (approximate, for benchmarks). */
  memoryBytes(): number {
    let leaves = 0;
    for (const l of this.leaves) if (l) leaves++;
    return leaves * CHUNK_BYTES + this.counts.byteLength + this.leaves.length * 8;
  }

  private cap(chunk: number): number {
    return Math.min(CHUNK_BITS, this.nbits - chunk * CHUNK_BITS);
  }

  // ------------------------------------------------------------------ bit level

  /** Whether bit `i` is set. */
  getBit(i: number): boolean {
    if (i < 0 || i >= this.nbits) return false;
    const c = Math.floor(i / CHUNK_BITS);
    const n = this.counts[c]!;
    if (n === 0) return false;
    const leaf = this.leaves[c];
    if (!leaf) return true;
    const b = i - c * CHUNK_BITS;
    return ((leaf[b >>> 5]! >>> (b & 31)) & 1) === 1;
  }

  /** Set bits [start, end). */
  setBits(start: number, end: number): void {
    this.changeBits(start, end, true);
  }

  /** Clear bits [start, end). */
  resetBits(start: number, end: number): void {
    this.changeBits(start, end, false);
  }

  private changeBits(start: number, end: number, value: boolean): void {
    start = Math.max(0, start);
    end = Math.min(this.nbits, end);
    if (end <= start) return;
    const first = Math.floor(start / CHUNK_BITS);
    const last = Math.floor((end - 1) / CHUNK_BITS);
    for (let c = first; c <= last; c++) {
      const base = c * CHUNK_BITS;
      const cap = this.cap(c);
      const lo = Math.max(start, base) - base;
      const hi = Math.min(end, base + cap) - base;
      const n = this.counts[c]!;
      if (value ? n === cap : n === 0) continue;
      if (lo === 0 && hi === cap) {
        this.leaves[c] = undefined;
        const next = value ? cap : 0;
        this.total += next - n;
        this.counts[c] = next;
        continue;
      }
      const leaf = this.leafFor(c, n, cap);
      const delta = value ? setWordBits(leaf, lo, hi) : -clearWordBits(leaf, lo, hi);
      const next = n + delta;
      this.counts[c] = next;
      this.total += delta;
      if (next === 0 || next === cap) this.leaves[c] = undefined;
    }
  }

  /** The leaf of a chunk, materialised from its empty/full state when needed. */
  private leafFor(c: number, n: number, cap: number): Uint32Array {
    let leaf = this.leaves[c];
    if (leaf) return leaf;
    leaf = new Uint32Array(CHUNK_WORDS);
    if (n === cap) setWordBits(leaf, 0, cap);
    this.leaves[c] = leaf;
    return leaf;
  }

  /** First set bit in [from, end), or -1. */
  nextDirtyBit(from: number, end: number = this.nbits): number {
    return this.search(from, end, true);
  }

  /** First clear bit in [from, end), or -1. */
  nextCleanBit(from: number, end: number = this.nbits): number {
    return this.search(from, end, false);
  }

  private search(from: number, end: number, dirty: boolean): number {
    from = Math.max(0, from);
    end = Math.min(this.nbits, end);
    if (from >= end) return -1;
    if (dirty ? this.total === 0 : this.total === this.nbits) return -1;
    const lastChunk = Math.floor((end - 1) / CHUNK_BITS);
    for (let c = Math.floor(from / CHUNK_BITS); c <= lastChunk; c++) {
      const n = this.counts[c]!;
      const cap = this.cap(c);
      const base = c * CHUNK_BITS;
      const lo = Math.max(from, base) - base;
      if (dirty ? n === 0 : n === cap) continue;
      const leaf = this.leaves[c];
      if (!leaf) {
        // The whole chunk has the state we look for.
        const r = base + lo;
        return r < end ? r : -1;
      }
      const hiBit = Math.min(end - base, cap);
      for (let w = lo >>> 5; w < CHUNK_WORDS && w * 32 < hiBit; w++) {
        let x = dirty ? leaf[w]! : ~leaf[w]! >>> 0;
        if (w === lo >>> 5) x = (x & ~((1 << (lo & 31)) - 1)) >>> 0;
        if (x === 0) continue;
        const r = base + w * 32 + lowestBit(x);
        return r < end && r - base < cap ? r : -1;
      }
    }
    return -1;
  }

  // ------------------------------------------------------------------ byte level

  /** Mark [offset, offset+length) dirty (every granule the range touches). */
  mark(offset: number, length: number): void {
    if (length <= 0) return;
    const g = this.granularity;
    this.setBits(Math.floor(offset / g), Math.ceil((offset + length) / g));
  }

  /**
   * Clear the granules fully inside [offset, offset+length); a range that reaches the end of
   * the bitmap also clears the partial last granule.
   */
  reset(offset: number, length: number): void {
    if (length <= 0) return;
    const g = this.granularity;
    const endByte = offset + length;
    const end = endByte >= this.sizeBytes ? this.nbits : Math.floor(endByte / g);
    this.resetBits(Math.ceil(offset / g), end);
  }

  /** Whether the granule holding `offset` is dirty. */
  isDirty(offset: number): boolean {
    return this.getBit(Math.floor(offset / this.granularity));
  }

  /** Clear everything. */
  clear(): void {
    this.leaves = new Array<Uint32Array | undefined>(this.leaves.length);
    this.counts.fill(0);
    this.total = 0;
  }

  /** Mark everything dirty. */
  fill(): void {
    this.setBits(0, this.nbits);
  }

  /**
   * Runs of equal state covering [offset, offset+length) (clamped to the size), granule
   * aligned except at the end of the bitmap. At most `maxExtents` runs (the last one may end
   * before the range does).
   */
  extents(offset: number, length: number, maxExtents = Number.MAX_SAFE_INTEGER): DirtyExtent[] {
    const out: DirtyExtent[] = [];
    const end = Math.min(offset + length, this.sizeBytes);
    const g = this.granularity;
    let pos = offset;
    while (pos < end && out.length < maxExtents) {
      const bit = Math.floor(pos / g);
      const dirty = this.getBit(bit);
      const endBit = Math.ceil(end / g);
      const nb = dirty ? this.nextCleanBit(bit + 1, endBit) : this.nextDirtyBit(bit + 1, endBit);
      const runEnd = nb < 0 ? end : Math.min(nb * g, end);
      out.push({ offset: pos, length: runEnd - pos, dirty });
      pos = runEnd;
    }
    return out;
  }

  /** The first dirty run at or after `offset` and before `end`, in bytes; undefined if none. */
  nextDirtyArea(offset: number, end: number = this.sizeBytes): { offset: number; length: number } | undefined {
    const g = this.granularity;
    end = Math.min(end, this.sizeBytes);
    if (offset >= end) return undefined;
    const endBit = Math.ceil(end / g);
    const s = this.nextDirtyBit(Math.floor(offset / g), endBit);
    if (s < 0) return undefined;
    const e = this.nextCleanBit(s + 1, endBit);
    const start = Math.max(offset, s * g);
    const stop = e < 0 ? end : Math.min(end, e * g);
    return { offset: start, length: stop - start };
  }

  // ------------------------------------------------------------------ whole-bitmap operations

  /**
   * OR `src` into this bitmap. Equal granularities merge chunk by chunk; different ones go
   * through src's dirty runs in bytes (a coarser target rounds outward). Sizes must match
   * (checked by the caller, which owns the error text).
   */
  merge(src: DirtyBitmap): void {
    if (src.granularity === this.granularity && src.nbits === this.nbits) {
      for (let c = 0; c < src.counts.length; c++) {
        const n = src.counts[c]!;
        if (n === 0) continue;
        const cap = this.cap(c);
        const leaf = src.leaves[c];
        if (!leaf) {
          this.setBits(c * CHUNK_BITS, c * CHUNK_BITS + cap);
          continue;
        }
        const mine = this.counts[c]!;
        if (mine === cap) continue;
        const dst = this.leafFor(c, mine, cap);
        let count = 0;
        for (let w = 0; w < CHUNK_WORDS; w++) {
          const v = (dst[w]! | leaf[w]!) >>> 0;
          dst[w] = v;
          count += popcount32(v);
        }
        this.total += count - mine;
        this.counts[c] = count;
        if (count === cap) this.leaves[c] = undefined;
      }
      return;
    }
    let pos = 0;
    for (;;) {
      const area = src.nextDirtyArea(pos);
      if (!area) break;
      this.mark(area.offset, area.length);
      pos = area.offset + area.length;
    }
  }

  /** A deep copy (transaction backups). */
  clone(): DirtyBitmap {
    const b = new DirtyBitmap(this.sizeBytes, this.granularity);
    b.copyFrom(this);
    return b;
  }

  /** Replace this bitmap's bits with `src`'s (same size and granularity). */
  copyFrom(src: DirtyBitmap): void {
    if (src.granularity !== this.granularity || src.nbits !== this.nbits) {
      throw new BlockError('BITMAP_MISMATCH', 'EINVAL', 'bitmap geometry differs');
    }
    this.leaves = src.leaves.map((l) => (l ? l.slice() : undefined));
    this.counts = src.counts.slice();
    this.total = src.total;
  }

  /** Follow a node resize: bits beyond the new size are dropped, new bits are clean. */
  resize(size: number): void {
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new BlockError('RANGE', 'EINVAL', `invalid bitmap size ${size}`);
    }
    const nbits = Math.ceil(size / this.granularity);
    const nchunks = Math.ceil(nbits / CHUNK_BITS);
    if (nchunks > MAX_CHUNKS) {
      throw new BlockError('BITMAP_TOO_LARGE', 'ENOMEM', `Cannot grow a dirty bitmap to ${nbits} bits`);
    }
    if (nbits < this.nbits) this.resetBits(nbits, this.nbits);
    const leaves = this.leaves.slice(0, nchunks);
    leaves.length = nchunks;
    const counts = new Uint32Array(nchunks);
    counts.set(this.counts.subarray(0, Math.min(nchunks, this.counts.length)));
    // A last chunk that was full at its old capacity keeps a leaf once it grows.
    const oldLast = this.counts.length - 1;
    this.leaves = leaves;
    this.counts = counts;
    const oldBits = this.nbits;
    this.nbits = nbits;
    this.sizeBytes = size;
    if (nbits > oldBits && oldLast >= 0 && oldLast < nchunks) {
      const oldCap = Math.min(CHUNK_BITS, oldBits - oldLast * CHUNK_BITS);
      if (counts[oldLast] === oldCap && !leaves[oldLast] && oldCap < this.cap(oldLast)) {
        const leaf = new Uint32Array(CHUNK_WORDS);
        setWordBits(leaf, 0, oldCap);
        leaves[oldLast] = leaf;
      }
    }
    // Keep the invariant: a leaf exists only while its chunk is mixed.
    const last = nchunks - 1;
    if (last >= 0 && leaves[last] && (counts[last] === 0 || counts[last] === this.cap(last))) {
      leaves[last] = undefined;
    }
  }

  // ------------------------------------------------------------------ serialisation

  /** Length of the serialised form in bytes: ceil(bits / 64) little-endian u64 words. */
  serializedLength(): number {
    return Math.ceil(this.nbits / 64) * 8;
  }

  /**
   * Serialised bytes [start, start+length) of the bitmap (QEMU layout: bit i = byte i/8,
   * bit i%8). Bytes past the bits are zero.
   */
  serialize(start: number, length: number): Buffer {
    const out = Buffer.alloc(length);
    const bitsEnd = Math.ceil(this.nbits / 8);
    let pos = start;
    while (pos < start + length && pos < bitsEnd) {
      const c = Math.floor(pos / CHUNK_BYTES);
      const within = pos - c * CHUNK_BYTES;
      const n = Math.min(CHUNK_BYTES - within, start + length - pos);
      this.chunkBytes(c).copy(out, pos - start, within, within + n);
      pos += n;
    }
    return out;
  }

  /** Whether serialised bytes [start, start+length) are all zero (no dirty bit there). */
  isSerializedRangeClean(start: number, length: number): boolean {
    const first = start * 8;
    return this.nextDirtyBit(first, first + length * 8) < 0;
  }

  /**
   * Load serialised bytes at byte offset `start` (qcow2 bitmap data). Bits past the bitmap's
   * end are ignored.
   */
  deserialize(start: number, data: Buffer): void {
    let pos = 0;
    while (pos < data.length) {
      const abs = start + pos;
      const c = Math.floor(abs / CHUNK_BYTES);
      if (c >= this.counts.length) break;
      const within = abs - c * CHUNK_BYTES;
      const n = Math.min(CHUNK_BYTES - within, data.length - pos);
      const cap = this.cap(c);
      const bytes = this.chunkBytes(c);
      data.copy(bytes, within, pos, pos + n);
      const leaf = new Uint32Array(CHUNK_WORDS);
      for (let w = 0; w < CHUNK_WORDS; w++) leaf[w] = bytes.readUInt32LE(w * 4);
      // Drop any bits beyond the chunk's capacity.
      if (cap < CHUNK_BITS) clearWordBits(leaf, cap, CHUNK_BITS);
      let count = 0;
      for (let w = 0; w < CHUNK_WORDS; w++) count += popcount32(leaf[w]!);
      this.total += count - this.counts[c]!;
      this.counts[c] = count;
      this.leaves[c] = count === 0 || count === cap ? undefined : leaf;
      pos += n;
    }
  }

  /** A private copy of one chunk's bytes in serialised layout. */
  private chunkBytes(c: number): Buffer {
    const n = this.counts[c]!;
    const out = Buffer.alloc(CHUNK_BYTES);
    if (n === 0) return out;
    const leaf = this.leaves[c];
    if (!leaf) {
      const cap = this.cap(c);
      out.fill(0xff, 0, cap >>> 3);
      if (cap & 7) out[cap >>> 3] = (1 << (cap & 7)) - 1;
      return out;
    }
    if (LITTLE_ENDIAN) {
      Buffer.from(leaf.buffer, leaf.byteOffset, leaf.byteLength).copy(out);
    } else {
      for (let w = 0; w < CHUNK_WORDS; w++) out.writeUInt32LE(leaf[w]!, w * 4);
    }
    return out;
  }

  /** SHA-256 (hex) of the serialised form, as `x-debug-block-dirty-bitmap-sha256` reports it. */
  sha256(): string {
    const h = createHash('sha256');
    const total = this.serializedLength();
    let zero: Buffer | undefined;
    for (let pos = 0; pos < total; pos += CHUNK_BYTES) {
      const c = pos / CHUNK_BYTES;
      const n = Math.min(CHUNK_BYTES, total - pos);
      if (this.counts[c] === 0) {
        zero ??= Buffer.alloc(CHUNK_BYTES);
        h.update(zero.subarray(0, n));
      } else {
        h.update(this.chunkBytes(c).subarray(0, n));
      }
    }
    return h.digest('hex');
  }
}

/** Set bits [lo, hi) of a leaf; returns how many were newly set. */
function setWordBits(leaf: Uint32Array, lo: number, hi: number): number {
  let added = 0;
  for (let w = lo >>> 5; w <= (hi - 1) >>> 5; w++) {
    const m = wordMask(w === lo >>> 5 ? lo & 31 : 0, w === (hi - 1) >>> 5 ? ((hi - 1) & 31) + 1 : 32);
    const old = leaf[w]!;
    added += popcount32(m & ~old);
    leaf[w] = (old | m) >>> 0;
  }
  return added;
}

/** Clear bits [lo, hi) of a leaf; returns how many were cleared. */
function clearWordBits(leaf: Uint32Array, lo: number, hi: number): number {
  let removed = 0;
  for (let w = lo >>> 5; w <= (hi - 1) >>> 5; w++) {
    const m = wordMask(w === lo >>> 5 ? lo & 31 : 0, w === (hi - 1) >>> 5 ? ((hi - 1) & 31) + 1 : 32);
    const old = leaf[w]!;
    removed += popcount32(old & m);
    leaf[w] = (old & ~m) >>> 0;
  }
  return removed;
}
