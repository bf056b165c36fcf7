/**
 * Extended-header codecs (NBD spec: Request message with NBD_EXTENDED_REQUEST_MAGIC, Extended
 * reply chunk message, NBD_REPLY_TYPE_BLOCK_STATUS_EXT), used once a client negotiated
 * NBD_OPT_EXTENDED_HEADERS. Kept apart from protocol.ts so the compact codecs stay as they are.
 *
 * Server-side replies echo the request's cookie and offset; both travel together as a 16-byte
 * "tag" (the raw request bytes [8..23]) that is copied into reply header bytes [8..23].
 */
import {
  NBD_EXTENDED_REPLY_MAGIC,
  NBD_EXTENDED_REPLY_SIZE,
  NBD_EXTENDED_REQUEST_MAGIC,
  NBD_EXTENDED_REQUEST_SIZE,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
} from './protocol.js';

/** Size of the cookie+offset tag echoed in every extended reply. */
export const EXT_TAG_SIZE = 16;

/** A safe-integer u64 as two big-endian u32 halves (no BigInt). */
function writeU64(b: Buffer, off: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 0x100000000) >>> 0, off);
  b.writeUInt32BE(v >>> 0, off + 4);
}

/** u64 as a JS number, or -1 when above Number.MAX_SAFE_INTEGER (2^53 - 1). */
export function readU64(b: Buffer, off: number): number {
  const hi = b.readUInt32BE(off);
  return hi < 0x200000 ? hi * 0x100000000 + b.readUInt32BE(off + 4) : -1;
}

/** A tag for replies that answer no particular request (bad magic): zero cookie and offset. */
export const ZERO_TAG = Buffer.alloc(EXT_TAG_SIZE);

/** Build a tag from a cookie and an offset (tests, tools). */
export function makeTag(cookie: bigint, offset: bigint): Buffer {
  const t = Buffer.allocUnsafe(EXT_TAG_SIZE);
  t.writeBigUInt64BE(cookie, 0);
  t.writeBigUInt64BE(offset, 8);
  return t;
}

/**
 * Extended request header, 32 bytes. [0..3] NBD_EXTENDED_REQUEST_MAGIC  [4..5] command flags
 * [6..7] type  [8..15] cookie  [16..23] offset  [24..31] payload/effect length (u64)
 * [32..] payload when flags has NBD_CMD_FLAG_PAYLOAD_LEN
 */
export function encodeExtRequest(
  type: number,
  flags: number,
  cookie: Buffer | bigint,
  offset: bigint | number,
  length: bigint | number,
): Buffer {
  const b = Buffer.allocUnsafe(NBD_EXTENDED_REQUEST_SIZE);
  b.writeUInt32BE(NBD_EXTENDED_REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  if (typeof cookie === 'bigint') b.writeBigUInt64BE(cookie, 8);
  else cookie.copy(b, 8, 0, 8);
  b.writeBigUInt64BE(BigInt(offset), 16);
  b.writeBigUInt64BE(BigInt(length), 24);
  return b;
}

/** A decoded extended request header (tests, tools). */
export interface ExtRequest {
  flags: number;
  type: number;
  cookie: Buffer;
  offset: bigint;
  length: bigint;
}

/** Inverse of {@link encodeExtRequest}; `undefined` if short or the magic is wrong. */
export function decodeExtRequest(b: Buffer, off = 0): ExtRequest | undefined {
  if (b.length - off < NBD_EXTENDED_REQUEST_SIZE) return undefined;
  if (b.readUInt32BE(off) !== NBD_EXTENDED_REQUEST_MAGIC) return undefined;
  return {
    flags: b.readUInt16BE(off + 4),
    type: b.readUInt16BE(off + 6),
    cookie: b.subarray(off + 8, off + 16),
    offset: b.readBigUInt64BE(off + 16),
    length: b.readBigUInt64BE(off + 24),
  };
}

/**
 * Extended reply chunk header, 32 bytes. [0..3] NBD_EXTENDED_REPLY_MAGIC  [4..5] flags (DONE)
 * [6..7] chunk type  [8..15] cookie  [16..23] offset of the request  [24..31] payload length
 * `tag` supplies bytes [8..23].
 */
export function writeExtChunkHeader(b: Buffer, off: number, flags: number, type: number, tag: Buffer, length: number): void {
  writeExtChunkHeaderFrom(b, off, flags, type, tag, 0, length);
}

/**
 * {@link writeExtChunkHeader} with the tag read from `src` at `srcOff` (a request header's bytes
 * [8..23] in the socket buffer): four u32 moves, no view or copy call on the READ fast path.
 */
export function writeExtChunkHeaderFrom(
  b: Buffer,
  off: number,
  flags: number,
  type: number,
  src: Buffer,
  srcOff: number,
  length: number,
): void {
  b.writeUInt32BE(NBD_EXTENDED_REPLY_MAGIC, off);
  b.writeUInt16BE(flags, off + 4);
  b.writeUInt16BE(type, off + 6);
  b.writeUInt32BE(src.readUInt32BE(srcOff), off + 8);
  b.writeUInt32BE(src.readUInt32BE(srcOff + 4), off + 12);
  b.writeUInt32BE(src.readUInt32BE(srcOff + 8), off + 16);
  b.writeUInt32BE(src.readUInt32BE(srcOff + 12), off + 20);
  writeU64(b, off + 24, length);
}

/** NONE chunk (always DONE): the extended success reply of every command without data. */
export function encodeExtNone(tag: Buffer): Buffer {
  const b = Buffer.allocUnsafe(NBD_EXTENDED_REPLY_SIZE);
  writeExtChunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, tag, 0);
  return b;
}

/** OFFSET_DATA header plus its offset: 40 bytes, data follows. [0..31] header  [32..39] offset */
export const EXT_DATA_HEADER_SIZE = NBD_EXTENDED_REPLY_SIZE + 8;

export function writeExtOffsetDataHeader(
  b: Buffer,
  off: number,
  flags: number,
  tag: Buffer,
  offset: number,
  dataLength: number,
): void {
  writeExtChunkHeaderFrom(b, off, flags, NBD_REPLY_TYPE_OFFSET_DATA, tag, 0, 8 + dataLength);
  writeU64(b, off + 32, offset);
}

/** OFFSET_HOLE chunk, 44 bytes. [0..31] header (length 12)  [32..39] offset  [40..43] size */
export function encodeExtOffsetHole(flags: number, tag: Buffer, offset: number, size: number): Buffer {
  const b = Buffer.allocUnsafe(NBD_EXTENDED_REPLY_SIZE + 12);
  writeExtChunkHeader(b, 0, flags, NBD_REPLY_TYPE_OFFSET_HOLE, tag, 12);
  writeU64(b, 32, offset);
  b.writeUInt32BE(size >>> 0, 40);
  return b;
}

/**
 * ERROR chunk. [0..31] header (type 0x8001, length 6 + M)  [32..35] error  [36..37] message
 * length M  [38..] message (capped at 1000 bytes, as for structured replies).
 */
export function encodeExtErrorChunk(flags: number, tag: Buffer, error: number, message: string): Buffer {
  let m = Buffer.from(message, 'utf8');
  if (m.length > 1000) m = m.subarray(0, 1000);
  const b = Buffer.allocUnsafe(NBD_EXTENDED_REPLY_SIZE + 6 + m.length);
  writeExtChunkHeader(b, 0, flags, NBD_REPLY_TYPE_ERROR, tag, 6 + m.length);
  b.writeUInt32BE(error >>> 0, 32);
  b.writeUInt16BE(m.length, 36);
  m.copy(b, 38);
  return b;
}

/** One 64-bit extent: length up to Number.MAX_SAFE_INTEGER, 32-bit status (high half zero). */
export interface NbdExtentExt {
  length: number;
  flags: number;
}

/**
 * BLOCK_STATUS_EXT chunk. [0..31] header (type 6, length 8 + 16n)  [32..35] context id
 * [36..39] descriptor count n  then n x ([0..7] extent length, [8..15] status flags)
 */
export function encodeBlockStatusExtChunk(
  flags: number,
  tag: Buffer,
  contextId: number,
  extents: readonly NbdExtentExt[],
): Buffer {
  const n = extents.length;
  const b = Buffer.allocUnsafe(NBD_EXTENDED_REPLY_SIZE + 8 + 16 * n);
  writeExtChunkHeader(b, 0, flags, NBD_REPLY_TYPE_BLOCK_STATUS_EXT, tag, 8 + 16 * n);
  b.writeUInt32BE(contextId >>> 0, 32);
  b.writeUInt32BE(n, 36);
  let o = 40;
  for (const e of extents) {
    writeU64(b, o, e.length);
    b.writeUInt32BE(0, o + 8);
    b.writeUInt32BE(e.flags >>> 0, o + 12);
    o += 16;
  }
  return b;
}

/** A decoded extended reply chunk header (client, tests). Lengths above 2^53 come back as -1. */
export interface ExtChunkHeader {
  flags: number;
  type: number;
  cookie: Buffer;
  offset: number;
  length: number;
}

export function decodeExtChunkHeader(b: Buffer, off = 0): ExtChunkHeader | undefined {
  if (b.length - off < NBD_EXTENDED_REPLY_SIZE || b.readUInt32BE(off) !== NBD_EXTENDED_REPLY_MAGIC) return undefined;
  return {
    flags: b.readUInt16BE(off + 4),
    type: b.readUInt16BE(off + 6),
    cookie: b.subarray(off + 8, off + 16),
    offset: readU64(b, off + 16),
    length: readU64(b, off + 24),
  };
}
