/**
 * The output side of an NBD connection: the reply queue written once per event-loop turn (one
 * write, or one gathered copy into a pooled buffer for a small batch), simple and structured
 * reply encoding, sparse READ replies (OFFSET_DATA / OFFSET_HOLE chunks) and error replies.
 *
 * An NbdConnection is one object built in layers, each extending the one below:
 * reply-writer.ts (this) -> dispatch.ts (commands run against the export, in-flight accounting)
 * -> request.ts (request header parsing, validation, WRITE payloads) -> connection.ts (socket
 * lifecycle, handshake, input state machine, flow control, close).
 */
import type { Logger } from '../util/logger.js';
import type { NbdFileRange, NbdZeroRanges } from './backend.js';
import { allocReplyBuffer, isRecyclable, releaseReplyBuffer } from './buffer-pool.js';
import type { NbdTransport } from './transport.js';
import type { PageLoans } from '../util/page-loans.js';
import {
  cmdName,
  encodeErrorChunk,
  encodeOffsetHole,
  NBD_CMD_FLAG_DF,
  NBD_REPLY_FLAG_DONE,
  NBD_SIMPLE_REPLY_SIZE,
  writeOffsetDataHeader,
  writeSimpleReply,
} from './protocol.js';
import {
  EXT_DATA_HEADER_SIZE,
  encodeExtErrorChunk,
  encodeExtNone,
  encodeExtOffsetHole,
  writeExtOffsetDataHeader,
} from './protocol-ext.js';

/** A file piece to send with sendfile (ReplyWriter.flush), after its own buffers, if any. */
interface FileSeg {
  head: Buffer[] | undefined;
  offset: number;
  length: number;
}

/** What flush() sends after the batch: file segments of `fd`, then the `tail` buffers. */
interface FileSegs {
  fd: number;
  segs: FileSeg[];
  tail?: Buffer[];
}

/**
 * Queued reply bytes that are written at once instead of at the end of the event-loop turn. A
 * socket read can carry 16 requests for 256 KiB each: answered in one batch, they need 4 MiB of
 * reply buffers, which the page-cache copy then fills cache-cold; written as they come, one
 * recycled buffer serves them all and stays in the CPU cache.
 */
const EAGER_FLUSH_BYTES = 256 * 1024;

export type ReadState =
  | 'CLIENT_FLAGS'
  | 'OPTION_HEADER'
  | 'OPTION_PAYLOAD'
  | 'OPTION_DRAIN'
  | 'REQUEST'
  | 'WRITE_PAYLOAD'
  | 'WRITE_DRAIN'
  | 'EXT_REQUEST'
  | 'EXT_PAYLOAD'
  | 'EXT_DRAIN'
  | 'DISCONNECTING'
  | 'CLOSED';

/** State of an async READ until its reply is queued. */
export interface ReadCtx {
  cookie: Buffer;
  offset: number;
  length: number;
  flags: number;
  /** Reply buffer: header room + data. */
  buf: Buffer;
  hdr: number;
}

/** A read answered in one data chunk (DF, or simple replies): its holes as zero bytes. */
function zeroHoles(data: Buffer, offset: number, holes: NbdZeroRanges): void {
  const end = offset + data.length;
  for (const h of holes) {
    const s = Math.max(h.offset, offset) - offset;
    const e = Math.min(h.offset + h.length, end) - offset;
    if (e > s) data.fill(0, s, e);
  }
}

export abstract class NbdReplyWriter {
  readonly id: number;
  private readonly baseLog: Logger;
  private childLog: Logger | undefined;
  protected readonly trace: boolean;
  /** Info-level logging is on (checked once: building log arguments costs on the connect path). */
  protected readonly infoOn: boolean;
  protected readonly debugOn: boolean;
  protected state: ReadState = 'CLIENT_FLAGS';
  protected structured = false;
  /**
   * The client negotiated NBD_OPT_EXTENDED_HEADERS (set when transmission starts): every reply
   * is an extended chunk, and the `id` of a request is its 16-byte tag (cookie and offset,
   * protocol-ext.ts) instead of its 8-byte cookie. A connection never mixes the two.
   */
  protected extended = false;
  protected out: Buffer[] = [];
  private outBytes = 0;
  /** Large pooled reply buffers among `out`, recycled once their write completes. */
  protected outRecycle: Buffer[] = [];
  private flushScheduled = false;
  protected writeBlocked = false;
  /** socket.end() was called: nothing more may be written. */
  protected ending = false;

  protected constructor(
    protected readonly socket: NbdTransport,
    id: number,
    log: Logger,
  ) {
    this.id = id;
    this.baseLog = log;
    this.trace = log.isLevelEnabled('trace');
    this.infoOn = log.isLevelEnabled('info');
    this.debugOn = log.isLevelEnabled('debug');
  }

  /** The socket's write side is full: stop reading requests (connection.ts). */
  protected abstract pauseReading(): void;

  /** The per-connection logger, created on first use (a pino child costs a few µs per connect). */
  protected get log(): Logger {
    return (this.childLog ??= this.baseLog.child({ conn: this.id }));
  }

  // ------------------------------------------------------------ replies and output

  protected simple(err: number, cookie: Buffer): Buffer {
    const b = allocReplyBuffer(NBD_SIMPLE_REPLY_SIZE);
    writeSimpleReply(b, 0, err, cookie);
    return b;
  }

  /**
   * Error reply to the request `id` (cookie, or tag with extended headers): an ERROR chunk with
   * DONE when structured (extended: an extended ERROR chunk), else a simple reply.
   */
  protected replyError(id: Buffer, type: number, err: number, msg: string): void {
    if (this.debugOn) {
      this.log.debug({ cmd: type < 0 ? 'invalid' : cmdName(type), err, msg }, 'request failed');
    }
    this.queue(
      this.extended
        ? encodeExtErrorChunk(NBD_REPLY_FLAG_DONE, id, err, msg)
        : this.structured
          ? encodeErrorChunk(NBD_REPLY_FLAG_DONE, id, err, msg)
          : this.simple(err, id),
    );
  }

  /** Success without data: a simple reply (as QSD sends, structured or not), or a NONE chunk. */
  protected replyNone(id: Buffer): void {
    this.queue(this.extended ? encodeExtNone(id) : this.simple(0, id));
  }

  protected logFailure(type: number, err: unknown): void {
    // Log the real cause before it is narrowed to an NBD error.
    this.log.warn({ cmd: cmdName(type), err: err instanceof Error ? err.message : String(err) }, 'NBD request failed');
  }

  protected queue(b: Buffer): void {
    if (this.state === 'CLOSED' || this.ending) return;
    this.out.push(b);
    this.outBytes += b.length;
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      process.nextTick(() => this.flush());
    }
  }

  /** Queue a whole reply buffer that may come from the large pool. */
  protected queueRecyclable(b: Buffer): void {
    if (this.state === 'CLOSED' || this.ending) return;
    this.queue(b);
    if (isRecyclable(b)) this.outRecycle.push(b);
    if (this.outBytes >= EAGER_FLUSH_BYTES) this.flush();
  }

  /**
   * Queue a READ reply whose data is a cached file range: the header now, then the file's bytes
   * sent by the transport with sendfile() (everything queued before goes first, so replies keep
   * their order). The bytes are read from the page cache when they are sent, not now: a write
   * to the same range finishing meanwhile may be seen, which NBD allows (the result of a read
   * overlapping an in-flight write is undefined, and the read is not done until its last byte
   * is received). See native/netio.c, "File segments".
   */
  protected queueFile(hdr: Buffer, range: NbdFileRange, length: number): void {
    if (this.state === 'CLOSED' || this.ending) return;
    this.out.push(hdr);
    this.outBytes += hdr.length;
    const pieces = range.pieces ?? [{ offset: range.offset, length }];
    this.flush({ fd: range.fd, segs: pieces.map((p) => ({ head: undefined, offset: p.offset, length: p.length })) });
    if (range.loans) this.lendPages(range.loans);
  }

  /**
   * A range with `loans` was just queued by reference: register how far this connection's stream
   * goes now, so its lender (qcow2) keeps freed host clusters from reuse until the client has
   * read that far (util/page-loans.ts). Only transports with a pageBorrower are given such
   * ranges (request.ts).
   */
  private lendPages(loans: PageLoans): void {
    loans.lend(this.socket.pageBorrower!);
  }

  /**
   * Queue a READ reply (structured, no DF) over a cached file range with known-zero runs in it
   * (pieces with offset -1): one chunk per piece, OFFSET_DATA with the file's bytes sent as in
   * queueFile, OFFSET_HOLE for the zeroes, DONE on the last; as sendSparseRead frames it, without
   * copying the data.
   */
  protected queueSparseFile(id: Buffer, offset: number, range: NbdFileRange): void {
    if (this.state === 'CLOSED' || this.ending) return;
    const pieces = range.pieces!;
    const segs: FileSeg[] = [];
    // Chunk headers before the first file piece join this turn's batch.
    let lead = true;
    let pend: Buffer[] = [];
    let guest = offset;
    for (let i = 0; i < pieces.length; i++) {
      const p = pieces[i]!;
      const f = i === pieces.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
      const h = p.offset < 0 ? this.holeChunk(f, id, guest, p.length) : this.dataChunkHeader(f, id, guest, p.length);
      if (lead) {
        this.out.push(h);
        this.outBytes += h.length;
      } else pend.push(h);
      if (p.offset >= 0) {
        segs.push({ head: lead ? undefined : pend, offset: p.offset, length: p.length });
        lead = false;
        pend = [];
      }
      guest += p.length;
    }
    this.flush({ fd: range.fd, segs, tail: pend.length > 0 ? pend : undefined });
    if (range.loans) this.lendPages(range.loans);
  }

  /**
   * Write everything queued in this event-loop turn at once; then, with `file`, its segments
   * (each after its own buffers, if any) and the buffers of its tail.
   */
  protected flush(file?: FileSegs): void {
    this.flushScheduled = false;
    const out = this.out;
    if (out.length === 0) return;
    const bytes = this.outBytes;
    let recycle = this.outRecycle;
    this.out = [];
    this.outBytes = 0;
    if (recycle.length > 0) this.outRecycle = [];
    if (this.state === 'CLOSED' || this.ending || this.socket.destroyed) return;
    let merged: Buffer | undefined;
    if (out.length > 1 && bytes <= 256 * 1024) {
      // One write for the whole batch, gathered into a recycled buffer; the originals are free
      // again as soon as they are copied.
      merged = allocReplyBuffer(bytes);
      let pos = 0;
      for (const b of out) pos += b.copy(merged, pos);
      if (recycle.length > 0) for (const b of recycle) releaseReplyBuffer(b);
      recycle = isRecyclable(merged) ? [merged] : [];
    }
    // Called after the last write (so every earlier one) has reached the kernel; on error the
    // buffers are simply left to the GC.
    const done =
      recycle.length === 0
        ? undefined
        : () => {
            for (const b of recycle) releaseReplyBuffer(b);
          };
    const bufs = merged !== undefined ? [merged] : out;
    let ok = true;
    if (file === undefined) ok = this.socket.write(bufs, done);
    else {
      // One queue entry per segment, in order; the batch goes with the first.
      const { fd, segs, tail } = file;
      for (let i = 0; i < segs.length; i++) {
        const sg = segs[i]!;
        const last = i === segs.length - 1 && tail === undefined;
        const before = i === 0 ? (sg.head ? [...bufs, ...sg.head] : bufs) : (sg.head ?? []);
        ok = this.socket.writeFile!(before, fd, sg.offset, sg.length, last ? done : undefined);
      }
      if (tail !== undefined) ok = this.socket.write(tail, done);
    }
    if (!ok && !this.writeBlocked) {
      this.writeBlocked = true;
      this.pauseReading();
    }
  }

  /** Room for the reply header in front of READ data: extended, structured or simple. */
  protected readHeaderSize(): number {
    return this.extended ? EXT_DATA_HEADER_SIZE : this.structured ? 28 : NBD_SIMPLE_REPLY_SIZE;
  }

  protected finishRead(ctx: ReadCtx, holes: NbdZeroRanges | void): void {
    const { cookie, offset, length, flags, buf, hdr } = ctx;
    const data = buf.subarray(hdr);
    const sparse = this.structured && (flags & NBD_CMD_FLAG_DF) === 0;
    if (holes && holes.length > 0) {
      if (!sparse) {
        zeroHoles(data, offset, holes);
      } else {
        this.sendSparseRead(cookie, offset, data, holes);
        // The data chunks are slices of buf, queued in this turn's batch: release it with them.
        if (isRecyclable(buf) && this.state !== 'CLOSED' && !this.ending) this.outRecycle.push(buf);
        if (this.outBytes >= EAGER_FLUSH_BYTES) this.flush();
        return;
      }
    }
    this.writeReadHeader(buf, cookie, offset, length);
    this.queueRecyclable(buf);
  }

  /** The header of a READ answered in one piece (readHeaderSize() bytes at the start of `b`). */
  protected writeReadHeader(b: Buffer, id: Buffer, offset: number, length: number): void {
    if (this.extended) writeExtOffsetDataHeader(b, 0, NBD_REPLY_FLAG_DONE, id, offset, length);
    else if (this.structured) writeOffsetDataHeader(b, 0, NBD_REPLY_FLAG_DONE, id, offset, length);
    else writeSimpleReply(b, 0, 0, id);
  }

  /** An OFFSET_HOLE chunk in the connection's framing (structured or extended). */
  protected holeChunk(flags: number, id: Buffer, offset: number, length: number): Buffer {
    return this.extended ? encodeExtOffsetHole(flags, id, offset, length) : encodeOffsetHole(flags, id, offset, length);
  }

  /** The header of an OFFSET_DATA chunk of `length` data bytes, in the connection's framing. */
  protected dataChunkHeader(flags: number, id: Buffer, offset: number, length: number): Buffer {
    const h = Buffer.allocUnsafe(this.extended ? EXT_DATA_HEADER_SIZE : 28);
    if (this.extended) writeExtOffsetDataHeader(h, 0, flags, id, offset, length);
    else writeOffsetDataHeader(h, 0, flags, id, offset, length);
    return h;
  }

  /**
   * NBD spec: Structured reply chunk types — OFFSET_DATA / OFFSET_HOLE covering the request, in
   * the connection's framing (structured or extended).
   */
  protected sendSparseRead(cookie: Buffer, offset: number, data: Buffer, holes: NbdZeroRanges): void {
    const end = offset + data.length;
    const parts: Array<{ hole: boolean; start: number; len: number }> = [];
    let cur = offset;
    for (const h of holes) {
      const s = Math.max(h.offset, cur);
      const e = Math.min(h.offset + h.length, end);
      if (e <= s) continue;
      if (s > cur) parts.push({ hole: false, start: cur, len: s - cur });
      const last = parts[parts.length - 1];
      if (last && last.hole && last.start + last.len === s) last.len += e - s;
      else parts.push({ hole: true, start: s, len: e - s });
      cur = e;
    }
    if (cur < end) parts.push({ hole: false, start: cur, len: end - cur });
    parts.forEach((part, i) => {
      const f = i === parts.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
      if (part.hole) this.queue(this.holeChunk(f, cookie, part.start, part.len));
      else {
        this.queue(this.dataChunkHeader(f, cookie, part.start, part.len));
        this.queue(data.subarray(part.start - offset, part.start - offset + part.len));
      }
    });
  }

}
