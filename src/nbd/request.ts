/**
 * NBD request parsing: the 28-byte request header decoded straight from the socket buffer,
 * the synchronous READ fast path (served from memory without a promise), validation against
 * one {@link CMD_RULES} record per command in QSD's order and texts, and WRITE payloads
 * (taken as a view, gathered into a pooled buffer, or drained when refused). Valid requests
 * go to dispatch.ts.
 */
import {
  CMD_TEXT,
  cmdName,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_MAX_BUFFER_SIZE,
  NBD_REPLY_FLAG_DONE,
  NBD_REQUEST_MAGIC,
  NBD_REQUEST_SIZE,
} from './protocol.js';
import { allocReplyBuffer } from './buffer-pool.js';
import { FrameReader } from './frame-reader.js';
import { NbdDispatcher } from './dispatch.js';

/** Per-command validation record (NBD spec: Request types). */
export interface CmdRule {
  /** Carries a payload of `length` bytes (drained when the request is refused). */
  payload: boolean;
  /** Refused on read-only exports. */
  mutates: boolean;
  /** Length bounded by NBD_MAX_BUFFER_SIZE (QEMU: READ, WRITE, CACHE). */
  bounded: boolean;
  /** Offset/length checked against the export size. */
  ranged: boolean;
  /** Flags accepted besides FUA (DF for READ is added only with structured replies). */
  flags: number;
}

const UNKNOWN_RULE: CmdRule = { payload: false, mutates: false, bounded: false, ranged: true, flags: 0 };

export const CMD_RULES: Readonly<Record<number, CmdRule>> = {
  [NBD_CMD_READ]: { payload: false, mutates: false, bounded: true, ranged: true, flags: NBD_CMD_FLAG_DF },
  [NBD_CMD_WRITE]: { payload: true, mutates: true, bounded: true, ranged: true, flags: 0 },
  [NBD_CMD_FLUSH]: { payload: false, mutates: false, bounded: false, ranged: false, flags: 0 },
  [NBD_CMD_TRIM]: { payload: false, mutates: true, bounded: false, ranged: true, flags: 0 },
  [NBD_CMD_CACHE]: { payload: false, mutates: false, bounded: true, ranged: true, flags: 0 },
  [NBD_CMD_WRITE_ZEROES]: {
    payload: false,
    mutates: true,
    bounded: false,
    ranged: true,
    flags: NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
  },
  [NBD_CMD_BLOCK_STATUS]: {
    payload: false,
    mutates: false,
    bounded: false,
    ranged: true,
    flags: NBD_CMD_FLAG_REQ_ONE,
  },
};

export const EMPTY = Buffer.alloc(0);
export const ZERO_COOKIE = Buffer.alloc(8);
/** QSD's text for a write-type request on a read-only export. */
export const READ_ONLY_TEXT = 'Export is read-only';

export abstract class NbdRequestParser extends NbdDispatcher {
  protected readonly reader = new FrameReader();
  // export properties used by validation (set when the handshake reaches transmission)
  protected readOnly = true;
  /** NBD error for a write-type request while read-only: EINVAL (QSD), EPERM after NBD_OPT_READ_ONLY. */
  protected readOnlyError = NBD_EINVAL;
  protected size = 0;
  protected hasSyncRead = false;
  /** Reads of at least this size may go out as a file range (sendfile); Infinity: never. */
  protected fileReadMin = Infinity;

  // WRITE payload being received / drained
  protected wCookie: Buffer = ZERO_COOKIE;
  protected wFlags = 0;
  protected wOffset = 0;
  protected wBuf: Buffer = EMPTY;
  protected wFilled = 0;
  protected wRemaining = 0;
  protected wError: { err: number; msg: string } | undefined;
  /** The client sent NBD_CMD_DISC: close as soon as every reply is out. */
  protected disconnectOnDisc = false;

  /** DISC received: close once nothing is in flight (connection.ts). */
  protected abstract maybeFinishDisconnect(): void;
  /** Flush queued replies, then close gracefully (connection.ts). */
  protected abstract endAfterFlush(): void;

  // ------------------------------------------------------------ transmission

  /**
   * The synchronous answers to a READ (`id`: the cookie, or the tag with extended headers):
   * known zeroes as one hole chunk (structured replies without DF, as QSD replies), a cached
   * file range with sendfile, page-cache data copied now. null when the reply is queued (the
   * request header, `headerSize` bytes, is then consumed); otherwise the reply buffer the
   * async read should fill (a copy that would have blocked), or undefined. Only in-range,
   * valid requests are tried; everything else is left to validation.
   */
  protected syncRead(id: Buffer, flags: number, offset: number, length: number, headerSize: number): Buffer | null | undefined {
    if (
      !this.hasSyncRead ||
      offset < 0 ||
      length <= 0 ||
      length > NBD_MAX_BUFFER_SIZE ||
      offset + length > this.size ||
      (flags & ~(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF)) !== 0 ||
      (!this.structured && (flags & NBD_CMD_FLAG_DF) !== 0)
    ) {
      return undefined;
    }
    const exp = this.exp!;
    const sparse = this.structured && (flags & NBD_CMD_FLAG_DF) === 0;
    if (sparse && exp.tryReadZeroSync?.(offset, length)) {
      this.queue(this.holeChunk(NBD_REPLY_FLAG_DONE, id, offset, length));
      this.reader.consume(headerSize);
      return null;
    }
    const hdr = this.readHeaderSize();
    if (length >= this.fileReadMin) {
      // Large and cached in one file: the header now, the data with sendfile (no copy); with
      // known-zero runs in it (qcow2), one chunk per piece, holes as OFFSET_HOLE chunks.
      // Ranges whose host clusters can change owners (qcow2) go by reference only on a stream
      // whose reading can be followed (a unix socket); TCP copies them (util/page-loans.ts).
      const range = exp.tryReadFileSync!(offset, length, sparse, this.socket.pageBorrower !== undefined);
      if (range?.pieces?.some((p) => p.offset < 0)) {
        this.reader.consume(headerSize);
        this.queueSparseFile(id, offset, range);
        return null;
      }
      if (range !== undefined) {
        const h = allocReplyBuffer(hdr);
        this.writeReadHeader(h, id, offset, length);
        this.reader.consume(headerSize);
        this.queueFile(h, range, length);
        return null;
      }
    }
    const out = allocReplyBuffer(hdr + length);
    if (exp.tryReadSync!(out.subarray(hdr), offset)) {
      this.writeReadHeader(out, id, offset, length);
      this.reader.consume(headerSize);
      this.queueRecyclable(out);
      return null;
    }
    return out; // not in memory: the async read fills the same buffer
  }

  /**
   * A request header without the request magic (`id`: the zero cookie or tag): like QSD, an
   * EINVAL error reply, then the connection closes once it is sent.
   */
  protected badMagic(magic: number, headerSize: number, id: Buffer, what: string): void {
    this.log.warn({ magic: `0x${magic.toString(16)}` }, what);
    this.reader.consume(headerSize);
    this.replyError(id, -1, NBD_EINVAL, `invalid magic (got 0x${magic.toString(16)})`);
    this.state = 'DISCONNECTING';
    this.endAfterFlush();
  }

  /** NBD_CMD_DISC: close once every reply is out. */
  protected onDisc(headerSize: number): void {
    this.reader.consume(headerSize);
    if (this.infoOn) this.log.info('client sent NBD_CMD_DISC');
    this.state = 'DISCONNECTING';
    this.disconnectOnDisc = true;
    this.maybeFinishDisconnect();
    // Still open: requests in flight. Stop reading until they are answered and it closes.
    if (this.state === 'DISCONNECTING' && !this.ending) this.socket.pause();
  }

  protected onRequestHeader(b: Buffer, p: number): void {
    const r = this.reader;
    const magic = b.readUInt32BE(p);
    if (magic !== NBD_REQUEST_MAGIC) {
      this.badMagic(magic, NBD_REQUEST_SIZE, ZERO_COOKIE, 'invalid NBD request magic');
      return;
    }
    const flags = b.readUInt16BE(p + 4);
    const type = b.readUInt16BE(p + 6);
    const hi = b.readUInt32BE(p + 16);
    const lo = b.readUInt32BE(p + 20);
    const length = b.readUInt32BE(p + 24);
    // The cookie is echoed verbatim; a view into the socket chunk is enough.
    const cookie = b.subarray(p + 8, p + 16);
    const offset = hi < 0x200000 ? hi * 0x100000000 + lo : -1;

    // Hot path: an in-range, valid READ served from memory without a promise.
    let readBuf: Buffer | undefined;
    if (type === NBD_CMD_READ) {
      const r0 = this.syncRead(cookie, flags, offset, length, NBD_REQUEST_SIZE);
      if (r0 === null) return;
      readBuf = r0;
    }

    if (type === NBD_CMD_DISC) {
      if (this.trace) this.log.trace({ cmd: cmdName(type), flags, offset, length }, 'request');
      this.onDisc(NBD_REQUEST_SIZE);
      return;
    }
    const cookieCopy = Buffer.from(cookie);
    r.consume(NBD_REQUEST_SIZE);
    if (this.trace) {
      this.log.trace({ cmd: cmdName(type), flags, offset: offset < 0 ? 'huge' : offset, length }, 'request');
    }
    const offsetText = () =>
      offset >= 0 ? String(offset) : b.readBigUInt64BE(p + 16).toString(); // b still valid here

    const rule = CMD_RULES[type] ?? UNKNOWN_RULE;
    const err = this.validate(type, rule, flags, offset, offsetText, length);
    if (err !== undefined) {
      const code = err === READ_ONLY_TEXT ? this.readOnlyError : NBD_EINVAL;
      if (type === NBD_CMD_WRITE) this.refuseWrite(cookieCopy, length, err, code);
      else this.replyError(cookieCopy, type, code, err);
      return;
    }
    switch (type) {
      case NBD_CMD_READ:
        this.startRead(cookieCopy, flags, offset, length, readBuf);
        return;
      case NBD_CMD_WRITE:
        this.receiveWrite(cookieCopy, flags, offset, length);
        return;
      default:
        this.startOther(cookieCopy, type, flags, offset, length);
    }
  }

  /** QSD's validation order and texts; returns the error message or undefined. */
  protected validate(
    type: number,
    rule: CmdRule,
    flags: number,
    offset: number,
    offsetText: () => string,
    length: number,
  ): string | undefined {
    if (rule.bounded && length > NBD_MAX_BUFFER_SIZE) {
      return `len (${length} ) is larger than max len (${NBD_MAX_BUFFER_SIZE})`;
    }
    if (rule.mutates && this.readOnly) return READ_ONLY_TEXT;
    if (rule.ranged && (offset < 0 || offset + length > this.size)) {
      return `operation past EOF; From: ${offsetText()}, Len: ${length}, Size: ${this.size}`;
    }
    let valid = NBD_CMD_FLAG_FUA | rule.flags;
    if (type === NBD_CMD_READ && !this.structured) valid &= ~NBD_CMD_FLAG_DF;
    if (type === NBD_CMD_WRITE_ZEROES && !this.exp!.canFastZero) valid &= ~NBD_CMD_FLAG_FAST_ZERO;
    if ((flags & ~valid) !== 0) {
      return `unsupported flags for command ${CMD_TEXT[type] ?? '<unknown>'} (got 0x${(flags & ~valid).toString(16)})`;
    }
    if (CMD_RULES[type] === undefined) return `invalid request type (${type}) received`;
    const exp = this.exp!;
    if (type === NBD_CMD_TRIM && !exp.canTrim) return 'discard not supported';
    if (type === NBD_CMD_WRITE_ZEROES && !exp.canWriteZeroes) return 'write zeroes not supported';
    if (type === NBD_CMD_FLUSH && !exp.canFlush) return 'flush not supported';
    if (type === NBD_CMD_BLOCK_STATUS) {
      if (length === 0) return 'need non-zero length';
      if (this.contexts.length === 0) return 'CMD_BLOCK_STATUS not negotiated';
    }
    return undefined;
  }

  // ---------------------------------------------------------------- WRITE

  protected receiveWrite(cookie: Buffer, flags: number, offset: number, length: number): void {
    const r = this.reader;
    if (r.length >= length && (length === 0 || (!r.volatile && r.contiguous(length)))) {
      // Whole payload in one socket chunk: write straight from a view of it.
      this.startWrite(cookie, flags, offset, length === 0 ? EMPTY : r.take(length));
      return;
    }
    // Payload spread over socket chunks: gather it into a pooled buffer (a fresh ArrayBuffer per
    // large write costs page faults, and the external-memory growth triggers full GCs).
    const buf = allocReplyBuffer(length);
    if (r.length >= length) {
      r.copyOut(buf, 0, length);
      this.startWrite(cookie, flags, offset, buf);
      return;
    }
    this.wCookie = cookie;
    this.wFlags = flags;
    this.wOffset = offset;
    this.wBuf = buf;
    this.wFilled = 0;
    this.state = 'WRITE_PAYLOAD';
  }

  /** NBD spec: always consume a refused WRITE's payload, then reply. */
  protected refuseWrite(cookie: Buffer, length: number, msg: string, err = NBD_EINVAL): void {
    this.wCookie = cookie;
    this.wRemaining = length;
    this.wError = { err, msg };
    this.state = 'WRITE_DRAIN';
  }

}
