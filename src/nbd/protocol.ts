/**
 * NBD wire constants and pure codecs (NBD spec `doc/proto.md`, fixed newstyle).
 *
 * Constants keep the spec's names verbatim so they grep against the spec. Every
 * encoder/decoder works over a caller-supplied `Buffer` with the byte layout in a
 * comment above it; all integers are big-endian. Nothing here does I/O.
 */

// ---------------------------------------------------------------- magics

/** "NBDMAGIC": first 8 bytes of the server greeting. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": greeting bytes 8..15 and the start of every client option. */
export const NBD_OPTS_MAGIC = 0x49484156454f5054n;
/** Start of every option reply. */
export const NBD_REP_MAGIC = 0x0003e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
/** Extended headers (NBD spec: Request message, after NBD_OPT_EXTENDED_HEADERS). */
export const NBD_EXTENDED_REQUEST_MAGIC = 0x21e41c71;
/** Extended headers (NBD spec: Extended reply chunk message). */
export const NBD_EXTENDED_REPLY_MAGIC = 0x6e8a278c;

// ---------------------------------------------------------------- sizes and limits

export const NBD_GREETING_SIZE = 18;
export const NBD_OPTION_HEADER_SIZE = 16;
export const NBD_OPTION_REPLY_HEADER_SIZE = 20;
export const NBD_REQUEST_SIZE = 28;
export const NBD_SIMPLE_REPLY_SIZE = 16;
export const NBD_STRUCTURED_REPLY_HEADER_SIZE = 20;
/** Extended request and extended reply chunk headers are both 32 bytes. */
export const NBD_EXTENDED_REQUEST_SIZE = 32;
export const NBD_EXTENDED_REPLY_SIZE = 32;
/** Bytes of zero padding after the EXPORT_NAME reply unless NO_ZEROES was agreed. */
export const NBD_EXPORT_NAME_PAD = 124;
/** NBD spec: strings MUST be at most 4096 bytes. */
export const NBD_MAX_STRING_SIZE = 4096;
/** Largest READ/WRITE/CACHE payload we accept, like QEMU (NBD_MAX_BUFFER_SIZE). */
export const NBD_MAX_BUFFER_SIZE = 32 * 1024 * 1024;
/** Option payloads above this close the connection (QEMU's limit). */
export const NBD_MAX_OPTION_SIZE = 32 * 1024 * 1024;
/** Extents per BLOCK_STATUS chunk (QEMU: 2^17). */
export const NBD_MAX_BLOCK_STATUS_EXTENTS = 131072;

// ---------------------------------------------------------------- handshake flags

export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// ---------------------------------------------------------------- transmission flags

export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;
export const NBD_FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12;

// ---------------------------------------------------------------- options

export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;
/**
 * Experimental, blockd only (docs/nbd.md): the client declares it will not write. The number
 * is outside the range the NBD spec allocates from, so it cannot clash with a future option.
 */
export const NBD_OPT_READ_ONLY = 0x42440001;

// ---------------------------------------------------------------- option replies

export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = 0x80000001;
export const NBD_REP_ERR_POLICY = 0x80000002;
export const NBD_REP_ERR_INVALID = 0x80000003;
export const NBD_REP_ERR_PLATFORM = 0x80000004;
export const NBD_REP_ERR_TLS_REQD = 0x80000005;
export const NBD_REP_ERR_UNKNOWN = 0x80000006;
export const NBD_REP_ERR_SHUTDOWN = 0x80000007;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = 0x80000008;
export const NBD_REP_ERR_TOO_BIG = 0x80000009;
export const NBD_REP_ERR_EXT_HEADER_REQD = 0x8000000a;

// ---------------------------------------------------------------- NBD_REP_INFO types

export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// ---------------------------------------------------------------- commands

export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;
export const NBD_CMD_RESIZE = 8;

export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;
export const NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5;

// ---------------------------------------------------------------- structured reply chunks

export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6;
export const NBD_REPLY_TYPE_ERROR = 0x8001;
export const NBD_REPLY_TYPE_ERROR_OFFSET = 0x8002;

// ---------------------------------------------------------------- errors

export const NBD_SUCCESS = 0;
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// ---------------------------------------------------------------- base:allocation

export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;
/** `qemu:dirty-bitmap:*` status bit. */
export const NBD_STATE_DIRTY = 1 << 0;

export const NBD_META_NS_BASE = 'base';
export const NBD_CONTEXT_BASE_ALLOCATION = 'base:allocation';

// ---------------------------------------------------------------- name lookups (for logs)

function lookup(table: Record<number, string>): (n: number) => string {
  return (n) => table[n] ?? `<unknown ${n}>`;
}

export const optName = lookup({
  [NBD_OPT_EXPORT_NAME]: 'NBD_OPT_EXPORT_NAME',
  [NBD_OPT_ABORT]: 'NBD_OPT_ABORT',
  [NBD_OPT_LIST]: 'NBD_OPT_LIST',
  [NBD_OPT_PEEK_EXPORT]: 'NBD_OPT_PEEK_EXPORT',
  [NBD_OPT_STARTTLS]: 'NBD_OPT_STARTTLS',
  [NBD_OPT_INFO]: 'NBD_OPT_INFO',
  [NBD_OPT_GO]: 'NBD_OPT_GO',
  [NBD_OPT_STRUCTURED_REPLY]: 'NBD_OPT_STRUCTURED_REPLY',
  [NBD_OPT_LIST_META_CONTEXT]: 'NBD_OPT_LIST_META_CONTEXT',
  [NBD_OPT_SET_META_CONTEXT]: 'NBD_OPT_SET_META_CONTEXT',
  [NBD_OPT_EXTENDED_HEADERS]: 'NBD_OPT_EXTENDED_HEADERS',
  [NBD_OPT_READ_ONLY]: 'NBD_OPT_READ_ONLY',
});

export const repName = lookup({
  [NBD_REP_ACK]: 'NBD_REP_ACK',
  [NBD_REP_SERVER]: 'NBD_REP_SERVER',
  [NBD_REP_INFO]: 'NBD_REP_INFO',
  [NBD_REP_META_CONTEXT]: 'NBD_REP_META_CONTEXT',
  [NBD_REP_ERR_UNSUP]: 'NBD_REP_ERR_UNSUP',
  [NBD_REP_ERR_POLICY]: 'NBD_REP_ERR_POLICY',
  [NBD_REP_ERR_INVALID]: 'NBD_REP_ERR_INVALID',
  [NBD_REP_ERR_PLATFORM]: 'NBD_REP_ERR_PLATFORM',
  [NBD_REP_ERR_TLS_REQD]: 'NBD_REP_ERR_TLS_REQD',
  [NBD_REP_ERR_UNKNOWN]: 'NBD_REP_ERR_UNKNOWN',
  [NBD_REP_ERR_SHUTDOWN]: 'NBD_REP_ERR_SHUTDOWN',
  [NBD_REP_ERR_BLOCK_SIZE_REQD]: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  [NBD_REP_ERR_TOO_BIG]: 'NBD_REP_ERR_TOO_BIG',
  [NBD_REP_ERR_EXT_HEADER_REQD]: 'NBD_REP_ERR_EXT_HEADER_REQD',
});

export const infoName = lookup({
  [NBD_INFO_EXPORT]: 'NBD_INFO_EXPORT',
  [NBD_INFO_NAME]: 'NBD_INFO_NAME',
  [NBD_INFO_DESCRIPTION]: 'NBD_INFO_DESCRIPTION',
  [NBD_INFO_BLOCK_SIZE]: 'NBD_INFO_BLOCK_SIZE',
});

export const cmdName = lookup({
  [NBD_CMD_READ]: 'NBD_CMD_READ',
  [NBD_CMD_WRITE]: 'NBD_CMD_WRITE',
  [NBD_CMD_DISC]: 'NBD_CMD_DISC',
  [NBD_CMD_FLUSH]: 'NBD_CMD_FLUSH',
  [NBD_CMD_TRIM]: 'NBD_CMD_TRIM',
  [NBD_CMD_CACHE]: 'NBD_CMD_CACHE',
  [NBD_CMD_WRITE_ZEROES]: 'NBD_CMD_WRITE_ZEROES',
  [NBD_CMD_BLOCK_STATUS]: 'NBD_CMD_BLOCK_STATUS',
  [NBD_CMD_RESIZE]: 'NBD_CMD_RESIZE',
});

export const replyTypeName = lookup({
  [NBD_REPLY_TYPE_NONE]: 'NBD_REPLY_TYPE_NONE',
  [NBD_REPLY_TYPE_OFFSET_DATA]: 'NBD_REPLY_TYPE_OFFSET_DATA',
  [NBD_REPLY_TYPE_OFFSET_HOLE]: 'NBD_REPLY_TYPE_OFFSET_HOLE',
  [NBD_REPLY_TYPE_BLOCK_STATUS]: 'NBD_REPLY_TYPE_BLOCK_STATUS',
  [NBD_REPLY_TYPE_BLOCK_STATUS_EXT]: 'NBD_REPLY_TYPE_BLOCK_STATUS_EXT',
  [NBD_REPLY_TYPE_ERROR]: 'NBD_REPLY_TYPE_ERROR',
  [NBD_REPLY_TYPE_ERROR_OFFSET]: 'NBD_REPLY_TYPE_ERROR_OFFSET',
});

export const errName = lookup({
  [NBD_SUCCESS]: 'NBD_SUCCESS',
  [NBD_EPERM]: 'NBD_EPERM',
  [NBD_EIO]: 'NBD_EIO',
  [NBD_ENOMEM]: 'NBD_ENOMEM',
  [NBD_EINVAL]: 'NBD_EINVAL',
  [NBD_ENOSPC]: 'NBD_ENOSPC',
  [NBD_EOVERFLOW]: 'NBD_EOVERFLOW',
  [NBD_ENOTSUP]: 'NBD_ENOTSUP',
  [NBD_ESHUTDOWN]: 'NBD_ESHUTDOWN',
});

/** Lower-case command names as QEMU spells them in error messages ("command read"). */
export const CMD_TEXT: Readonly<Record<number, string>> = {
  [NBD_CMD_READ]: 'read',
  [NBD_CMD_WRITE]: 'write',
  [NBD_CMD_DISC]: 'disconnect',
  [NBD_CMD_FLUSH]: 'flush',
  [NBD_CMD_TRIM]: 'trim',
  [NBD_CMD_CACHE]: 'cache',
  [NBD_CMD_WRITE_ZEROES]: 'write zeroes',
  [NBD_CMD_BLOCK_STATUS]: 'block status',
};

// ================================================================ codecs

/** Greeting. [0..7] NBDMAGIC  [8..15] IHAVEOPT  [16..17] handshake flags */
export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(NBD_GREETING_SIZE);
  b.writeBigUInt64BE(NBD_MAGIC, 0);
  b.writeBigUInt64BE(NBD_OPTS_MAGIC, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export interface OptionHeader {
  magic: bigint;
  option: number;
  length: number;
}

/** Option request header. [0..7] IHAVEOPT  [8..11] option  [12..15] payload length */
export function decodeOptionHeader(b: Buffer, off = 0): OptionHeader {
  return {
    magic: b.readBigUInt64BE(off),
    option: b.readUInt32BE(off + 8),
    length: b.readUInt32BE(off + 12),
  };
}

/** Client side of the option header (tests, tools). Same layout as {@link decodeOptionHeader}. */
export function encodeOption(option: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(NBD_OPTION_HEADER_SIZE + payload.length);
  b.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(payload.length, 12);
  payload.copy(b, NBD_OPTION_HEADER_SIZE);
  return b;
}

/**
 * Option reply. [0..7] NBD_REP_MAGIC  [8..11] option (echoed)  [12..15] reply type
 * [16..19] payload length  [20..] payload
 */
const REP_MAGIC_HI = Number(NBD_REP_MAGIC >> 32n);
const REP_MAGIC_LO = Number(NBD_REP_MAGIC & 0xffffffffn);

export function encodeOptionReply(option: number, type: number, payload?: Buffer): Buffer {
  const len = payload?.length ?? 0;
  const b = Buffer.allocUnsafe(NBD_OPTION_REPLY_HEADER_SIZE + len);
  // Two u32 halves of NBD_REP_MAGIC: BigInt writes cost more on the connect path.
  b.writeUInt32BE(REP_MAGIC_HI, 0);
  b.writeUInt32BE(REP_MAGIC_LO, 4);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(len, 16);
  if (payload) payload.copy(b, NBD_OPTION_REPLY_HEADER_SIZE);
  return b;
}

export interface OptionReply {
  option: number;
  type: number;
  payload: Buffer;
}

/** Inverse of {@link encodeOptionReply}; `undefined` if `b` is too short or the magic is wrong. */
export function decodeOptionReply(b: Buffer, off = 0): OptionReply | undefined {
  if (b.length - off < NBD_OPTION_REPLY_HEADER_SIZE) return undefined;
  if (b.readBigUInt64BE(off) !== NBD_REP_MAGIC) return undefined;
  const len = b.readUInt32BE(off + 16);
  if (b.length - off < NBD_OPTION_REPLY_HEADER_SIZE + len) return undefined;
  return {
    option: b.readUInt32BE(off + 8),
    type: b.readUInt32BE(off + 12),
    payload: b.subarray(off + 20, off + 20 + len),
  };
}

/** NBD_REP_SERVER payload. [0..3] name length N  [4..4+N) name  [4+N..] description */
export function encodeRepServer(name: string, description = ''): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(description, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

/** NBD_REP_META_CONTEXT payload. [0..3] context id  [4..] context name */
export function encodeRepMetaContext(id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id >>> 0, 0);
  n.copy(b, 4);
  return b;
}

/** NBD_INFO_EXPORT. [0..1] type=0  [2..9] export size  [10..11] transmission flags */
/** A safe-integer u64 as two big-endian u32 halves (no BigInt). */
function writeU64(b: Buffer, off: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 0x100000000) >>> 0, off);
  b.writeUInt32BE(v >>> 0, off + 4);
}

export function encodeInfoExport(size: number, flags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(NBD_INFO_EXPORT, 0);
  writeU64(b, 2, size);
  b.writeUInt16BE(flags, 10);
  return b;
}

/** NBD_INFO_NAME / NBD_INFO_DESCRIPTION. [0..1] type  [2..] UTF-8 text */
export function encodeInfoString(type: number, text: string): Buffer {
  const t = Buffer.from(text, 'utf8');
  const b = Buffer.allocUnsafe(2 + t.length);
  b.writeUInt16BE(type, 0);
  t.copy(b, 2);
  return b;
}

/** NBD_INFO_BLOCK_SIZE. [0..1] type=3  [2..5] minimum  [6..9] preferred  [10..13] maximum */
export function encodeInfoBlockSize(min: number, pref: number, max: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(min >>> 0, 2);
  b.writeUInt32BE(pref >>> 0, 6);
  b.writeUInt32BE(max >>> 0, 10);
  return b;
}

/**
 * Reply to NBD_OPT_EXPORT_NAME (no magic). [0..7] export size  [8..9] transmission
 * flags  [10..133] zeros, omitted when `noZeroes`
 */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 10 + NBD_EXPORT_NAME_PAD);
  writeU64(b, 0, size);
  b.writeUInt16BE(flags, 8);
  return b;
}

/** Decoded NBD_OPT_INFO / NBD_OPT_GO payload. */
export interface InfoRequest {
  name: string;
  infos: number[];
}

/**
 * NBD_OPT_INFO / NBD_OPT_GO payload. [0..3] name length N  [4..4+N) name
 * [4+N..5+N] request count K  [6+N..] K x u16 info type. Returns an error string
 * (QEMU's wording) when the lengths are inconsistent.
 */
export function decodeInfoRequest(p: Buffer): InfoRequest | { error: string } {
  if (p.length < 6) return { error: 'Inconsistent lengths in option info' };
  const n = p.readUInt32BE(0);
  if (n > NBD_MAX_STRING_SIZE) return { error: `Invalid name length: ${n}` };
  if (n > p.length - 6) return { error: 'Inconsistent lengths in option info' };
  const name = p.toString('utf8', 4, 4 + n);
  const k = p.readUInt16BE(4 + n);
  if (p.length !== 6 + n + 2 * k) return { error: 'Inconsistent lengths in option info' };
  const infos: number[] = [];
  for (let i = 0; i < k; i++) infos.push(p.readUInt16BE(6 + n + 2 * i));
  return { name, infos };
}

/** Client-side encoder matching {@link decodeInfoRequest}. */
export function encodeInfoRequest(name: string, infos: readonly number[] = []): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(6 + n.length + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 6 + n.length + 2 * i));
  return b;
}

export interface MetaContextRequest {
  name: string;
  queries: string[];
}

/**
 * NBD_OPT_LIST/SET_META_CONTEXT payload. [0..3] export name length N  [4..4+N) name
 * [4+N..7+N] query count Q  then Q x ([0..3] query length L, [4..4+L) query).
 * `which` is 'list' or 'set' for the error text.
 */
export function decodeMetaContextRequest(
  p: Buffer,
  which: 'list' | 'set',
): MetaContextRequest | { error: string } {
  const bad = { error: `Inconsistent lengths in option ${which} meta context` };
  if (p.length < 8) return bad;
  const n = p.readUInt32BE(0);
  if (n > NBD_MAX_STRING_SIZE) return { error: `Invalid name length: ${n}` };
  if (n > p.length - 8) return bad;
  const name = p.toString('utf8', 4, 4 + n);
  const q = p.readUInt32BE(4 + n);
  let off = 8 + n;
  const queries: string[] = [];
  for (let i = 0; i < q; i++) {
    if (p.length - off < 4) return bad;
    const l = p.readUInt32BE(off);
    off += 4;
    if (l > p.length - off) return bad;
    if (l > NBD_MAX_STRING_SIZE) return { error: `Invalid query length: ${l}` };
    queries.push(p.toString('utf8', off, off + l));
    off += l;
  }
  if (off !== p.length) return bad;
  return { name, queries };
}

/** Client-side encoder matching {@link decodeMetaContextRequest}. */
export function encodeMetaContextRequest(name: string, queries: readonly string[]): Buffer {
  const parts: Buffer[] = [];
  const n = Buffer.from(name, 'utf8');
  const head = Buffer.allocUnsafe(8 + n.length);
  head.writeUInt32BE(n.length, 0);
  n.copy(head, 4);
  head.writeUInt32BE(queries.length, 4 + n.length);
  parts.push(head);
  for (const q of queries) {
    const qb = Buffer.from(q, 'utf8');
    const l = Buffer.allocUnsafe(4);
    l.writeUInt32BE(qb.length, 0);
    parts.push(l, qb);
  }
  return Buffer.concat(parts);
}

/** A decoded transmission request (compact header). `cookie` is the raw 8 bytes. */
export interface NbdRequest {
  flags: number;
  type: number;
  cookie: Buffer;
  /** u64 offset as a JS number, or -1 when it exceeds Number.MAX_SAFE_INTEGER. */
  offset: number;
  /** The exact u64 offset, for messages. */
  offsetBig: bigint;
  length: number;
}

/**
 * Request header, 28 bytes. [0..3] NBD_REQUEST_MAGIC  [4..5] command flags
 * [6..7] type  [8..15] cookie  [16..23] offset  [24..27] length  [28..] WRITE payload
 * The magic is checked by the caller (see {@link requestMagic}).
 */
export function decodeRequest(b: Buffer, off = 0): NbdRequest {
  const hi = b.readUInt32BE(off + 16);
  const lo = b.readUInt32BE(off + 20);
  // Two 32-bit reads avoid a BigInt on the hot path; 2^53 = hi < 2^21.
  const offset = hi < 0x200000 ? hi * 0x100000000 + lo : -1;
  return {
    flags: b.readUInt16BE(off + 4),
    type: b.readUInt16BE(off + 6),
    cookie: b.subarray(off + 8, off + 16),
    offset,
    offsetBig: offset >= 0 ? BigInt(offset) : b.readBigUInt64BE(off + 16),
    length: b.readUInt32BE(off + 24),
  };
}

export function requestMagic(b: Buffer, off = 0): number {
  return b.readUInt32BE(off);
}

/** Client-side encoder matching {@link decodeRequest}. */
export function encodeRequest(
  type: number,
  flags: number,
  cookie: Buffer | bigint,
  offset: bigint | number,
  length: number,
): Buffer {
  const b = Buffer.allocUnsafe(NBD_REQUEST_SIZE);
  b.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  if (typeof cookie === 'bigint') b.writeBigUInt64BE(cookie, 8);
  else cookie.copy(b, 8, 0, 8);
  b.writeBigUInt64BE(BigInt(offset), 16);
  b.writeUInt32BE(length >>> 0, 24);
  return b;
}

/** Simple reply, 16 bytes. [0..3] NBD_SIMPLE_REPLY_MAGIC  [4..7] error  [8..15] cookie */
export function writeSimpleReply(b: Buffer, off: number, error: number, cookie: Buffer): void {
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, off);
  b.writeUInt32BE(error >>> 0, off + 4);
  cookie.copy(b, off + 8, 0, 8);
}

export function encodeSimpleReply(error: number, cookie: Buffer): Buffer {
  const b = Buffer.allocUnsafe(NBD_SIMPLE_REPLY_SIZE);
  writeSimpleReply(b, 0, error, cookie);
  return b;
}

/**
 * Structured reply chunk header, 20 bytes. [0..3] NBD_STRUCTURED_REPLY_MAGIC
 * [4..5] flags (DONE)  [6..7] chunk type  [8..15] cookie  [16..19] payload length
 */
export function writeChunkHeader(
  b: Buffer,
  off: number,
  flags: number,
  type: number,
  cookie: Buffer,
  length: number,
): void {
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, off);
  b.writeUInt16BE(flags, off + 4);
  b.writeUInt16BE(type, off + 6);
  cookie.copy(b, off + 8, 0, 8);
  b.writeUInt32BE(length >>> 0, off + 16);
}

/**
 * OFFSET_DATA chunk header plus its offset: 28 bytes, data follows.
 * [0..19] chunk header (length = 8 + data)  [20..27] absolute offset
 */
export function writeOffsetDataHeader(
  b: Buffer,
  off: number,
  flags: number,
  cookie: Buffer,
  offset: number,
  dataLength: number,
): void {
  writeChunkHeader(b, off, flags, NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + dataLength);
  b.writeUInt32BE(Math.floor(offset / 0x100000000), off + 20);
  b.writeUInt32BE(offset >>> 0, off + 24);
}

/** OFFSET_HOLE chunk, 32 bytes. [0..19] header (length 12)  [20..27] offset  [28..31] size */
export function encodeOffsetHole(flags: number, cookie: Buffer, offset: number, size: number): Buffer {
  const b = Buffer.allocUnsafe(32);
  writeChunkHeader(b, 0, flags, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12);
  b.writeBigUInt64BE(BigInt(offset), 20);
  b.writeUInt32BE(size >>> 0, 28);
  return b;
}

/** NONE chunk (always DONE), 20 bytes, no payload. */
export function encodeNoneChunk(cookie: Buffer): Buffer {
  const b = Buffer.allocUnsafe(NBD_STRUCTURED_REPLY_HEADER_SIZE);
  writeChunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
  return b;
}

/**
 * ERROR chunk. [0..19] header (type 0x8001, length 6 + M)  [20..23] error
 * [24..25] message length M  [26..] message. Messages are capped at 1000 bytes
 * because the qemu client refuses longer non-data chunks.
 */
export function encodeErrorChunk(flags: number, cookie: Buffer, error: number, message: string): Buffer {
  let m = Buffer.from(message, 'utf8');
  if (m.length > 1000) m = m.subarray(0, 1000);
  const b = Buffer.allocUnsafe(26 + m.length);
  writeChunkHeader(b, 0, flags, NBD_REPLY_TYPE_ERROR, cookie, 6 + m.length);
  b.writeUInt32BE(error >>> 0, 20);
  b.writeUInt16BE(m.length, 24);
  m.copy(b, 26);
  return b;
}

/** One extent of a BLOCK_STATUS reply. */
export interface NbdExtent {
  /** Bytes, > 0, < 2^32 (up to 2^53 - 1 for extended-header clients, see NbdMetaContext). */
  length: number;
  /** Context-defined status bits (u32). */
  flags: number;
}

/**
 * BLOCK_STATUS chunk. [0..19] header (type 5, length 4 + 8n)  [20..23] context id
 * then n x ([0..3] extent length, [4..7] status flags)
 */
export function encodeBlockStatusChunk(
  flags: number,
  cookie: Buffer,
  contextId: number,
  extents: readonly NbdExtent[],
): Buffer {
  const b = Buffer.allocUnsafe(24 + 8 * extents.length);
  writeChunkHeader(b, 0, flags, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, 4 + 8 * extents.length);
  b.writeUInt32BE(contextId >>> 0, 20);
  // A DataView: Buffer#writeUInt32BE per field was a tenth of a whole-image map's server time.
  const dv = new DataView(b.buffer, b.byteOffset, b.length);
  let o = 24;
  for (const e of extents) {
    dv.setUint32(o, e.length >>> 0);
    dv.setUint32(o + 4, e.flags >>> 0);
    o += 8;
  }
  return b;
}

/** A decoded structured chunk header (tests, tools). */
export interface ChunkHeader {
  flags: number;
  type: number;
  cookie: Buffer;
  length: number;
}

export function decodeChunkHeader(b: Buffer, off = 0): ChunkHeader | undefined {
  if (b.length - off < 20 || b.readUInt32BE(off) !== NBD_STRUCTURED_REPLY_MAGIC) return undefined;
  return {
    flags: b.readUInt16BE(off + 4),
    type: b.readUInt16BE(off + 6),
    cookie: b.subarray(off + 8, off + 16),
    length: b.readUInt32BE(off + 16),
  };
}
