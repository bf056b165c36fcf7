/**
 * The ringbuf/memory chardev's buffer and the two text forms of `ringbuf-read`/`-write`
 * (qapi/char.json DataFormat): QEMU's lenient base64 (GLib's decoder behind a character
 * check) and the way QEMU's JSON writer turns raw bytes into a string.
 */
import { QmpError } from '../util/errors.js';

/** QEMU's default ringbuf size (chardev/char-ringbuf.c). */
export const RINGBUF_DEFAULT_SIZE = 65536;

/**
 * Whether QEMU takes `size` as a ringbuf size: it checks `size & (size - 1)` on the value
 * as a 64-bit unsigned number, so 0 and negative powers of two (2^63 as unsigned) pass too.
 */
export function ringbufSizeValid(size: number | bigint): boolean {
  const u = BigInt.asUintN(64, BigInt(size));
  return (u & BigInt.asUintN(64, u - 1n)) === 0n;
}

/**
 * A byte ring of `capacity` bytes: writes past the capacity drop the oldest bytes, reads
 * consume from the oldest. Memory follows what is stored, not the capacity, so a huge
 * capacity (QEMU allocates it up front and aborts when it cannot) costs nothing, and a
 * zero capacity keeps nothing (QEMU writes through a NULL buffer there).
 */
export class RingBuffer {
  private chunks: Buffer[] = [];
  /** Bytes of chunks[0] already consumed or dropped. */
  private head = 0;
  private stored = 0;

  constructor(readonly capacity: number) {}

  /** Bytes waiting to be read. */
  get count(): number {
    return this.stored;
  }

  write(data: Buffer): void {
    if (data.length === 0) return;
    let d = data;
    if (d.length >= this.capacity) {
      // Only the newest `capacity` bytes survive.
      d = Buffer.from(d.subarray(d.length - this.capacity));
      this.chunks = [];
      this.head = 0;
      this.stored = 0;
      if (d.length === 0) return;
    } else {
      d = Buffer.from(d);
    }
    this.chunks.push(d);
    this.stored += d.length;
    this.drop(this.stored - this.capacity);
  }

  /** Take up to `max` of the oldest bytes. */
  read(max: number): Buffer {
    const n = Math.min(max, this.stored);
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const c = this.chunks[0] as Buffer;
      const take = Math.min(c.length - this.head, n - off);
      c.copy(out, off, this.head, this.head + take);
      off += take;
      this.advance(take);
    }
    return out;
  }

  private drop(n: number): void {
    let left = n;
    while (left > 0) {
      const c = this.chunks[0] as Buffer;
      const take = Math.min(c.length - this.head, left);
      this.advance(take);
      left -= take;
    }
  }

  private advance(n: number): void {
    this.head += n;
    this.stored -= n;
    const c = this.chunks[0];
    if (c !== undefined && this.head >= c.length) {
      this.chunks.shift();
      this.head = 0;
    }
  }
}

/** RFC 4648 alphabet value of each byte, -1 for bytes GLib's decoder skips. '=' counts as 0. */
const B64_RANK: Int8Array = (() => {
  const t = new Int8Array(256).fill(-1);
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
  for (let i = 0; i < alphabet.length; i++) t[alphabet.charCodeAt(i)] = i;
  t[0x3d] = 0;
  return t;
})();

/** What QEMU lets through to the decoder: the alphabet, '=' and newline. */
const B64_ALLOWED = /^[A-Za-z0-9+/=\n]*$/;

/**
 * `ringbuf-write` with `format: base64`. QEMU first refuses any character outside the
 * alphabet, '=' and '\n', then decodes like GLib: every complete group of four counts
 * (a '=' as a zero digit that also drops the byte it would end), newlines are skipped and
 * an incomplete last group yields nothing.
 */
export function decodeBase64Lenient(text: string): Buffer {
  if (text.includes('\0')) text = text.slice(0, text.indexOf('\0'));
  if (!B64_ALLOWED.test(text)) throw new QmpError('Base64 data contains invalid characters');
  const out: number[] = [];
  let acc = 0;
  let digits = 0;
  let prev = 0;
  let last = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    const rank = B64_RANK[c] ?? -1;
    if (rank < 0) continue;
    prev = last;
    last = c;
    acc = ((acc << 6) | rank) & 0xffffff;
    digits++;
    if (digits === 4) {
      out.push(acc >> 16);
      if (prev !== 0x3d) out.push((acc >> 8) & 0xff);
      if (last !== 0x3d) out.push(acc & 0xff);
      digits = 0;
    }
  }
  return Buffer.from(out);
}

/** Smallest code point of an n-byte sequence (n = 2..6); shorter encodings are overlong. */
const MIN_CP = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];

/**
 * The string QEMU's JSON writer makes of `ringbuf-read`'s bytes (utf8 format): the bytes
 * end at the first NUL (they are a C string), each valid sequence is its code point, and
 * each invalid one becomes U+FFFD. Invalid: a stray continuation byte or 0xFE/0xFF (one
 * byte), a sequence cut short (its lead and the continuation bytes present), and complete
 * sequences that are overlong (except C0 80, U+0000), surrogates, noncharacters or beyond
 * U+10FFFF. QEMU's own FIXME in char-ringbuf.c says as much: no attempt is made to keep
 * characters whole across reads.
 */
export function decodeUtf8AsQemu(bytes: Buffer): string {
  let out = '';
  let i = 0;
  const end = bytes.indexOf(0) < 0 ? bytes.length : bytes.indexOf(0);
  while (i < end) {
    const b = bytes[i] as number;
    i++;
    if (b < 0x80) {
      out += String.fromCharCode(b);
      continue;
    }
    if (b >= 0xfe || (b & 0x40) === 0) {
      out += '\ufffd';
      continue;
    }
    let len = 0;
    let mask = 0x80;
    while (b & mask) {
      len++;
      mask >>= 1;
    }
    let cp = b & (mask - 1);
    let ok = true;
    for (let k = 1; k < len; k++) {
      const c = i < end ? (bytes[i] as number) : 0;
      if ((c & 0xc0) !== 0x80) {
        ok = false;
        break;
      }
      i++;
      cp = cp * 64 + (c & 0x3f);
    }
    if (
      !ok ||
      cp > 0x10ffff ||
      (cp >= 0xfdd0 && cp <= 0xfdef) ||
      (cp & 0xfffe) === 0xfffe ||
      (cp >= 0xd800 && cp <= 0xdfff) ||
      (cp < (MIN_CP[len - 2] as number) && !(cp === 0 && len === 2))
    ) {
      out += '\ufffd';
      continue;
    }
    out += String.fromCodePoint(cp);
  }
  return out;
}
