import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { CHUNK_BITS, DirtyBitmap, isValidGranularity } from '../../../src/block/dirty-bitmap.js';

/** A deliberately simple reference: one boolean per bit. */
class NaiveBitmap {
  bits: boolean[];
  constructor(
    public size: number,
    public gran: number,
  ) {
    this.bits = new Array<boolean>(Math.ceil(size / gran)).fill(false);
  }
  set(s: number, e: number, v: boolean): void {
    for (let i = Math.max(0, s); i < Math.min(e, this.bits.length); i++) this.bits[i] = v;
  }
  count(): number {
    return this.bits.filter(Boolean).length;
  }
  next(from: number, v: boolean): number {
    for (let i = Math.max(0, from); i < this.bits.length; i++) if (this.bits[i] === v) return i;
    return -1;
  }
  bytes(): Buffer {
    const out = Buffer.alloc(Math.ceil(this.bits.length / 64) * 8);
    this.bits.forEach((b, i) => {
      if (b) out[i >>> 3]! |= 1 << (i & 7);
    });
    return out;
  }
}

/** Deterministic PRNG so failures reproduce. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

describe('DirtyBitmap', () => {
  it('accepts only powers of two between 512 B and 2 GiB as granularity', () => {
    expect(isValidGranularity(512)).toBe(true);
    expect(isValidGranularity(2 ** 31)).toBe(true);
    expect(isValidGranularity(256)).toBe(false);
    expect(isValidGranularity(3 * 1024)).toBe(false);
    expect(isValidGranularity(2 ** 32)).toBe(false);
    expect(() => new DirtyBitmap(1 << 20, 1000)).toThrow('Granularity must be power of 2 and at least 512');
  });

  it('refuses a bitmap whose index would not fit in memory instead of crashing', () => {
    expect(() => new DirtyBitmap(2 ** 53 - 1, 512)).toThrow(/Cannot allocate a dirty bitmap/);
    expect(new DirtyBitmap(2 ** 45, 512).dirtyBits).toBe(0);
  });

  it('marks every granule a byte range touches and counts dirty bytes as bits times granularity', () => {
    const b = new DirtyBitmap(100352, 65536);
    b.mark(100351, 1);
    b.mark(0, 1);
    expect(b.dirtyBits).toBe(2);
    expect(b.dirtyBytes).toBe(131072);
  });

  it('reports extents aligned to the granularity and clamped to the size', () => {
    const b = new DirtyBitmap(100352, 4096);
    b.mark(0, 1);
    b.mark(8192, 512);
    b.mark(70000, 100);
    b.mark(100351, 1);
    expect(b.extents(0, 100352)).toEqual([
      { offset: 0, length: 4096, dirty: true },
      { offset: 4096, length: 4096, dirty: false },
      { offset: 8192, length: 4096, dirty: true },
      { offset: 12288, length: 57344, dirty: false },
      { offset: 69632, length: 4096, dirty: true },
      { offset: 73728, length: 24576, dirty: false },
      { offset: 98304, length: 2048, dirty: true },
    ]);
  });

  it('stops after maxExtents runs', () => {
    const b = new DirtyBitmap(1 << 20, 512);
    for (let i = 0; i < 100; i += 2) b.setBits(i, i + 1);
    expect(b.extents(0, 1 << 20, 3)).toHaveLength(3);
  });

  it('clears only whole granules on reset, and the partial tail granule at the end', () => {
    const b = new DirtyBitmap(10000, 4096);
    b.fill();
    b.reset(100, 5000);
    expect(b.dirtyBits).toBe(3);
    b.reset(4096, 10000 - 4096);
    expect(b.dirtyBits).toBe(1);
  });

  it('hashes an empty bitmap like qemu-storage-daemon (100352 bytes at 64 KiB)', () => {
    const b = new DirtyBitmap(100352, 65536);
    expect(b.sha256()).toBe('af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc');
  });

  it('hashes written ranges like qemu-storage-daemon', () => {
    // The same writes as a qemu-io session against QSD 7.2 on a 100000-byte null-co node.
    const marks: [number, number][] = [
      [0, 1],
      [70000, 100],
      [100351, 1],
      [8192, 512],
    ];
    const sums: Record<number, string> = {
      65536: '35be322d094f9d154a8aba4733b8497f180353bd7ae7b0a15f90b586b549f28b',
      512: '5cbd68e6c93d01a02002cb8153d5924602330dcb8ca368b95f6d44cba85fb656',
      4096: '1c120601f56664588047b396f764a2dc7c31084e8c868d6a998e6b6a2e99ff86',
    };
    for (const [g, sum] of Object.entries(sums)) {
      const b = new DirtyBitmap(100352, Number(g));
      for (const [o, l] of marks) b.mark(o, l);
      expect(b.sha256()).toBe(sum);
    }
  });

  it('merges bitmaps of different granularities like qemu-storage-daemon', () => {
    const src = new DirtyBitmap(100352, 512);
    for (const [o, l] of [
      [0, 1],
      [70000, 100],
      [100351, 1],
      [8192, 512],
    ] as const)
      src.mark(o, l);
    const coarse = new DirtyBitmap(100352, 1 << 20);
    coarse.merge(src);
    expect(coarse.sha256()).toBe('7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8');
    expect(coarse.dirtyBytes).toBe(1 << 20);
  });

  it('keeps no leaf for chunks that are all clean or all dirty', () => {
    const b = new DirtyBitmap(2 ** 40, 65536);
    const empty = b.memoryBytes();
    expect(empty).toBeLessThan(16 * 1024);
    b.fill();
    expect(b.memoryBytes()).toBe(empty);
    expect(b.dirtyBytes).toBe(2 ** 40);
    b.reset(0, 65536);
    expect(b.memoryBytes()).toBe(empty + CHUNK_BITS / 8);
  });

  it('finds the next dirty and next clean bit across empty and full chunks', () => {
    const b = new DirtyBitmap(CHUNK_BITS * 512 * 8, 512);
    b.setBits(CHUNK_BITS * 3 + 17, CHUNK_BITS * 7);
    expect(b.nextDirtyBit(0)).toBe(CHUNK_BITS * 3 + 17);
    expect(b.nextCleanBit(CHUNK_BITS * 3 + 17)).toBe(CHUNK_BITS * 7);
    expect(b.nextDirtyBit(CHUNK_BITS * 7)).toBe(-1);
    expect(b.nextCleanBit(0)).toBe(0);
  });

  it('serialises and deserialises to the same bits', () => {
    const b = new DirtyBitmap(3 * CHUNK_BITS * 512 + 4096, 512);
    b.setBits(5, 40000);
    b.setBits(CHUNK_BITS * 3, CHUNK_BITS * 3 + 3);
    const bytes = b.serialize(0, b.serializedLength());
    const c = new DirtyBitmap(b.size, 512);
    c.deserialize(0, bytes);
    expect(c.dirtyBits).toBe(b.dirtyBits);
    expect(c.sha256()).toBe(b.sha256());
    expect(c.isSerializedRangeClean(CHUNK_BITS / 8, 4096)).toBe(false);
    expect(c.isSerializedRangeClean(2 * (CHUNK_BITS / 8), 4096)).toBe(true);
  });

  it('follows a resize: bits past the new end go, new bits are clean', () => {
    const b = new DirtyBitmap(CHUNK_BITS * 512 + 512 * 10, 512);
    b.fill();
    b.resize(CHUNK_BITS * 512 + 512 * 5);
    expect(b.dirtyBits).toBe(CHUNK_BITS + 5);
    b.resize(CHUNK_BITS * 512 + 512 * 20);
    expect(b.dirtyBits).toBe(CHUNK_BITS + 5);
    expect(b.nextCleanBit(0)).toBe(CHUNK_BITS + 5);
    b.resize(512);
    expect(b.dirtyBits).toBe(1);
  });

  it('matches a naive bit array under random set, reset, merge and search operations', () => {
    const r = rng(12345);
    for (let round = 0; round < 12; round++) {
      const gran = 512;
      const nbits = Math.floor(r() * CHUNK_BITS * 4) + 1;
      const size = nbits * gran - Math.floor(r() * gran);
      const b = new DirtyBitmap(size, gran);
      const n = new NaiveBitmap(size, gran);
      for (let op = 0; op < 300; op++) {
        const kind = r();
        const s = Math.floor(r() * (nbits + 10)) - 5;
        const len = r() < 0.2 ? Math.floor(r() * CHUNK_BITS * 2) : Math.floor(r() * 200);
        if (kind < 0.45) {
          b.setBits(s, s + len);
          n.set(s, s + len, true);
        } else if (kind < 0.8) {
          b.resetBits(s, s + len);
          n.set(s, s + len, false);
        } else if (kind < 0.9) {
          const other = new DirtyBitmap(size, gran);
          const o2 = new NaiveBitmap(size, gran);
          const a = Math.floor(r() * nbits);
          other.setBits(a, a + len);
          o2.set(a, a + len, true);
          b.merge(other);
          n.bits = n.bits.map((v, i) => v || o2.bits[i]!);
        } else {
          const from = Math.floor(r() * nbits);
          expect(b.nextDirtyBit(from)).toBe(n.next(from, true));
          expect(b.nextCleanBit(from)).toBe(n.next(from, false));
        }
        if (op % 25 === 0) expect(b.dirtyBits).toBe(n.count());
      }
      expect(b.dirtyBits).toBe(n.count());
      const bytes = n.bytes();
      expect(b.serialize(0, b.serializedLength()).equals(bytes)).toBe(true);
      expect(b.sha256()).toBe(createHash('sha256').update(bytes).digest('hex'));
      const probe = Math.floor(r() * nbits);
      expect(b.getBit(probe)).toBe(n.bits[probe]);
    }
  });

  it('matches a naive bit array when merging across granularities', () => {
    const r = rng(777);
    for (let round = 0; round < 10; round++) {
      const size = Math.floor(r() * 4 * 1024 * 1024) + 1;
      const gs = [512, 1024, 4096, 65536];
      const gSrc = gs[Math.floor(r() * gs.length)]!;
      const gDst = gs[Math.floor(r() * gs.length)]!;
      const src = new DirtyBitmap(size, gSrc);
      const ranges: [number, number][] = [];
      for (let i = 0; i < 20; i++) {
        const o = Math.floor(r() * size);
        const l = Math.floor(r() * 100000) + 1;
        src.mark(o, l);
        ranges.push([o, l]);
      }
      const dst = new DirtyBitmap(size, gDst);
      dst.merge(src);
      const ref = new NaiveBitmap(size, gDst);
      // What src remembers (granule-rounded) marked into dst's granularity.
      for (const e of src.extents(0, size)) {
        if (e.dirty) ref.set(Math.floor(e.offset / gDst), Math.ceil((e.offset + e.length) / gDst), true);
      }
      expect(dst.dirtyBits).toBe(ref.count());
      expect(dst.serialize(0, dst.serializedLength()).equals(ref.bytes())).toBe(true);
    }
  });
});
