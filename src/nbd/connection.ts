/**
 * One NBD client connection: drives the {@link Handshake} from socket bytes, then
 * runs transmission. Requests are pipelined: every request is decoded straight from
 * the socket buffer, validated against {@link CMD_RULES}, and started at once; replies
 * are queued and written once per event-loop turn (one write or one corked writev).
 * Reading pauses while the in-flight window (count or bytes) is full or the socket's
 * write side needs draining.
 */
import type { Logger } from '../util/logger.js';
import type { NbdBackend, NbdExtent, NbdExportHandle, NbdSession, NbdZeroRanges } from './backend.js';
import { allocReplyBuffer, isRecyclable, releaseReplyBuffer } from './buffer-pool.js';
import { nbdErrorOf } from './errors.js';
import { FrameReader } from './frame-reader.js';
import type { NbdTransport, TransportSink } from './transport.js';
import { Handshake, type HandshakeStep, type SelectedContext } from './handshake.js';
import {
  CMD_TEXT,
  cmdName,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeNoneChunk,
  encodeOffsetHole,
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
  NBD_MAX_BLOCK_STATUS_EXTENTS,
  NBD_MAX_BUFFER_SIZE,
  NBD_OPTS_MAGIC,
  NBD_REPLY_FLAG_DONE,
  NBD_REQUEST_MAGIC,
  NBD_REQUEST_SIZE,
  NBD_SIMPLE_REPLY_SIZE,
  optName,
  writeChunkHeader,
  writeOffsetDataHeader,
  writeSimpleReply,
} from './protocol.js';

/** Per-command validation record (NBD spec: Request types). */
interface CmdRule {
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

export interface NbdConnectionOptions {
  id: number;
  backend: NbdBackend;
  log: Logger;
  /** `unix` or `host:port`. */
  clientAddress: string;
  /** Close clients that have not reached transmission after this long; 0 = never. QSD: 10 s. */
  handshakeTimeoutMs?: number;
  /** Requests processed at once before reading pauses (QSD: 16). */
  maxInFlight?: number;
  /** Bytes of READ/WRITE data in flight before reading pauses (one request always fits). */
  maxInFlightBytes?: number;
  /** Called once the socket is closed and every request has settled (like `closed`, sooner). */
  onClosed?: () => void;
}

type ReadState =
  | 'CLIENT_FLAGS'
  | 'OPTION_HEADER'
  | 'OPTION_PAYLOAD'
  | 'OPTION_DRAIN'
  | 'REQUEST'
  | 'WRITE_PAYLOAD'
  | 'WRITE_DRAIN'
  | 'DISCONNECTING'
  | 'CLOSED';

const EMPTY = Buffer.alloc(0);
const OPTS_MAGIC_HI = Number(NBD_OPTS_MAGIC >> 32n);
const OPTS_MAGIC_LO = Number(NBD_OPTS_MAGIC & 0xffffffffn);
const ZERO_COOKIE = Buffer.alloc(8);

/** State of an async READ until its reply is queued. */
interface ReadCtx {
  cookie: Buffer;
  offset: number;
  length: number;
  flags: number;
  /** Reply buffer: header room + data. */
  buf: Buffer;
  hdr: number;
}

/**
 * Handshake deadlines of every connection, watched by one timer: a setTimeout per connection
 * costs a timer-list insert and removal on the connect path. Entries are kept in insertion
 * order; the timer is armed for the earliest deadline.
 */
class DeadlineSet {
  private readonly items = new Map<NbdConnection, number>();
  private timer: NodeJS.Timeout | undefined;
  private armedFor = Infinity;

  add(c: NbdConnection, ms: number): void {
    const at = Date.now() + ms;
    this.items.set(c, at);
    // A timer armed for an earlier deadline re-arms for the rest when it fires.
    if (at < this.armedFor) this.arm(at);
  }

  /** The timer is left running when the set empties: clients often come one after another. */
  delete(c: NbdConnection): void {
    this.items.delete(c);
  }

  private arm(at: number): void {
    if (this.timer) clearTimeout(this.timer);
    this.armedFor = at;
    this.timer = setTimeout(() => this.fire(), Math.max(0, at - Date.now()));
    this.timer.unref();
  }

  private fire(): void {
    this.timer = undefined;
    this.armedFor = Infinity;
    const now = Date.now();
    let next = Infinity;
    for (const [c, at] of [...this.items]) {
      if (at <= now) {
        this.items.delete(c);
        c.handshakeExpired();
      } else if (at < next) {
        next = at;
      }
    }
    if (next < Infinity) this.arm(next);
  }
}

const HANDSHAKE_DEADLINES = new DeadlineSet();

export class NbdConnection implements TransportSink {
  readonly id: number;
  readonly clientAddress: string;
  private readonly baseLog: Logger;
  private childLog: Logger | undefined;
  private readonly trace: boolean;
  /** Info-level logging is on (checked once: building log arguments costs on the connect path). */
  private readonly infoOn: boolean;
  private readonly debugOn: boolean;
  private readonly backend: NbdBackend;
  private readonly hs: Handshake;
  private readonly reader = new FrameReader();
  private state: ReadState = 'CLIENT_FLAGS';
  private readonly maxInFlight: number;
  private readonly maxInFlightBytes: number;

  // option being received
  private optNum = 0;
  private optLen = 0;
  private optRemaining = 0;

  // transmission
  private exp: NbdExportHandle | undefined;
  private session: NbdSession | undefined;
  private structured = false;
  private contexts: SelectedContext[] = [];
  private readOnly = true;
  private size = 0;
  private hasSyncRead = false;

  // WRITE payload being received / drained
  private wCookie: Buffer = ZERO_COOKIE;
  private wFlags = 0;
  private wOffset = 0;
  private wBuf: Buffer = EMPTY;
  private wFilled = 0;
  private wRemaining = 0;
  private wError: { err: number; msg: string } | undefined;

  private inFlight = 0;
  private inFlightBytes = 0;
  private out: Buffer[] = [];
  private outBytes = 0;
  /** Large pooled reply buffers among `out`, recycled once their write completes. */
  private outRecycle: Buffer[] = [];
  private flushScheduled = false;
  private writeBlocked = false;
  private readingPaused = false;
  private pumping = false;
  private finalized = false;
  /** socket.end() was called: nothing more may be written. */
  private ending = false;
  /** The client sent NBD_CMD_DISC: close as soon as every reply is out. */
  private disconnectOnDisc = false;
  private resolveClosed: (() => void) | undefined;
  private closedPromise: Promise<void> | undefined;
  private readonly onClosed: (() => void) | undefined;

  /** Resolves once the socket is closed and every request has settled (made on first use). */
  get closed(): Promise<void> {
    if (!this.closedPromise) {
      this.closedPromise = this.finalized
        ? Promise.resolve()
        : new Promise<void>((r) => (this.resolveClosed = r));
    }
    return this.closedPromise;
  }

  constructor(
    private readonly socket: NbdTransport,
    opts: NbdConnectionOptions,
  ) {
    this.id = opts.id;
    this.clientAddress = opts.clientAddress;
    this.backend = opts.backend;
    this.onClosed = opts.onClosed;
    this.reader.volatile = socket.volatileReads;
    this.baseLog = opts.log;
    this.trace = opts.log.isLevelEnabled('trace');
    this.infoOn = opts.log.isLevelEnabled('info');
    this.debugOn = opts.log.isLevelEnabled('debug');
    this.maxInFlight = Math.max(1, opts.maxInFlight ?? 64);
    this.maxInFlightBytes = Math.max(1, opts.maxInFlightBytes ?? 64 * 1024 * 1024);
    this.hs = new Handshake(this.backend, {
      id: this.id,
      clientAddress: this.clientAddress,
      disconnect: (reason: string) => this.disconnect(reason),
    });
    const timeout = opts.handshakeTimeoutMs ?? 10_000;
    if (timeout > 0) {
      HANDSHAKE_DEADLINES.add(this, timeout);
    }
  }

  /** The per-connection logger, created on first use (a pino child costs a few µs per connect). */
  private get log(): Logger {
    return (this.childLog ??= this.baseLog.child({ conn: this.id }));
  }

  /** Send the greeting and start reading. */
  start(): void {
    // Greeting first, so the client works on it while we finish setting up.
    this.queue(this.hs.greeting());
    this.flush();
    this.socket.attach(this);
  }

  /**
   * TransportSink: bytes arrived. With a volatile read buffer everything is parsed now and a
   * partial frame is copied out before returning, since the buffer is refilled by the next read.
   */
  onData(buf: Buffer): void {
    const r = this.reader;
    r.push(buf);
    this.pump();
    if (r.volatile) r.own();
  }

  /** TransportSink: the write side has room again. */
  onDrain(): void {
    if (!this.writeBlocked) return;
    this.writeBlocked = false;
    this.maybeResume();
  }

  /** TransportSink. */
  onError(message: string): void {
    if (this.debugOn) this.log.debug({ err: message }, 'socket error');
  }

  private stopHandshakeTimer(): void {
    HANDSHAKE_DEADLINES.delete(this);
  }

  /** The handshake deadline passed (HANDSHAKE_DEADLINES, which has already dropped it). */
  handshakeExpired(): void {
    this.log.warn({ client: this.clientAddress }, 'NBD handshake timed out');
    this.socket.destroy();
  }

  /** Close the connection now (export removed, server stopping). */
  disconnect(reason: string): void {
    if (this.state === 'CLOSED') return;
    if (this.infoOn) this.log.info({ reason }, 'disconnecting NBD client');
    this.socket.destroy();
  }

  get exportName(): string | undefined {
    return this.exp?.name;
  }

  // ------------------------------------------------------------ input state machine

  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    try {
      this.pumpLoop();
    } catch (err) {
      // Nothing a client sends may crash the daemon.
      this.log.error({ err }, 'internal error handling NBD input');
      this.socket.destroy();
    } finally {
      this.pumping = false;
    }
  }

  private pumpLoop(): void {
    const r = this.reader;
    for (;;) {
      switch (this.state) {
        case 'CLIENT_FLAGS': {
          if (!r.ensure(4)) return;
          const flags = r.buf.readUInt32BE(r.pos);
          r.consume(4);
          this.applyStep(this.hs.onClientFlags(flags));
          break;
        }
        case 'OPTION_HEADER': {
          if (!r.ensure(16)) return;
          const b = r.buf;
          const p = r.pos;
          const magicOk = b.readUInt32BE(p) === OPTS_MAGIC_HI && b.readUInt32BE(p + 4) === OPTS_MAGIC_LO;
          const magic = magicOk ? 0n : b.readBigUInt64BE(p);
          this.optNum = b.readUInt32BE(p + 8);
          this.optLen = b.readUInt32BE(p + 12);
          r.consume(16);
          if (!magicOk) {
            this.closeNow(`bad option magic 0x${magic.toString(16)}`);
            return;
          }
          if (this.debugOn) this.log.debug({ option: optName(this.optNum), length: this.optLen }, 'NBD option');
          const mode = this.hs.payloadMode(this.optNum, this.optLen);
          if (mode === 'close') {
            this.closeNow(`option ${optName(this.optNum)} refused (length ${this.optLen})`);
            return;
          }
          this.optRemaining = this.optLen;
          this.state = mode === 'buffer' ? 'OPTION_PAYLOAD' : 'OPTION_DRAIN';
          break;
        }
        case 'OPTION_PAYLOAD': {
          if (!r.ensure(this.optLen)) return;
          const payload = r.take(this.optLen);
          this.applyStep(this.hs.onOption(this.optNum, this.optLen, payload));
          break;
        }
        case 'OPTION_DRAIN': {
          this.optRemaining -= r.skip(this.optRemaining);
          if (this.optRemaining > 0) return;
          this.applyStep(this.hs.onOption(this.optNum, this.optLen, undefined));
          break;
        }
        case 'REQUEST': {
          if (this.overWindow()) {
            this.pauseReading();
            return;
          }
          if (!r.ensure(NBD_REQUEST_SIZE)) return;
          this.onRequestHeader(r.buf, r.pos);
          break;
        }
        case 'WRITE_PAYLOAD': {
          const n = r.copyOut(this.wBuf, this.wFilled, this.wBuf.length - this.wFilled);
          this.wFilled += n;
          if (this.wFilled < this.wBuf.length) return;
          this.state = 'REQUEST';
          this.startWrite(this.wCookie, this.wFlags, this.wOffset, this.wBuf);
          break;
        }
        case 'WRITE_DRAIN': {
          this.wRemaining -= r.skip(this.wRemaining);
          if (this.wRemaining > 0) return;
          this.state = 'REQUEST';
          const e = this.wError!;
          this.wError = undefined;
          this.replyError(this.wCookie, NBD_CMD_WRITE, e.err, e.msg);
          break;
        }
        case 'DISCONNECTING':
        case 'CLOSED':
          r.clear();
          return;
      }
    }
  }

  private applyStep(step: HandshakeStep): void {
    for (const b of step.out) this.queue(b);
    // Handshake replies go out at once (the client waits for them); bookkeeping comes after.
    this.flush();
    switch (step.state) {
      case 'OPTIONS':
        this.state = 'OPTION_HEADER';
        return;
      case 'CLOSED':
        if (this.infoOn) this.log.info({ reason: step.reason }, 'NBD client closed during handshake');
        this.endAfterFlush();
        return;
      case 'TRANSMISSION': {
        const neg = step.negotiated!;
        this.stopHandshakeTimer();
        this.exp = neg.exp;
        this.session = neg.session;
        this.structured = neg.structured;
        this.contexts = neg.contexts;
        this.readOnly = neg.exp.readOnly;
        this.size = neg.exp.size;
        this.hasSyncRead = typeof neg.exp.tryReadSync === 'function';
        this.state = 'REQUEST';
        if (!this.infoOn) return;
        this.log.info(
          {
            client: this.clientAddress,
            export: neg.exp.name,
            structured: neg.structured,
            flags: `0x${neg.flags.toString(16)}`,
            contexts: neg.contexts.map((c) => c.context.name),
          },
          'NBD client entered transmission',
        );
        return;
      }
      default:
        return;
    }
  }

  // ------------------------------------------------------------ transmission

  private onRequestHeader(b: Buffer, p: number): void {
    const r = this.reader;
    const magic = b.readUInt32BE(p);
    if (magic !== NBD_REQUEST_MAGIC) {
      // Like QSD: report EINVAL with a zero cookie, then drop the connection.
      this.log.warn({ magic: `0x${magic.toString(16)}` }, 'invalid NBD request magic');
      r.consume(NBD_REQUEST_SIZE);
      this.replyError(ZERO_COOKIE, -1, NBD_EINVAL, `invalid magic (got 0x${magic.toString(16)})`);
      this.state = 'DISCONNECTING';
      this.endAfterFlush();
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
    if (
      type === NBD_CMD_READ &&
      this.hasSyncRead &&
      offset >= 0 &&
      length > 0 &&
      length <= NBD_MAX_BUFFER_SIZE &&
      offset + length <= this.size &&
      (flags & ~(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF)) === 0 &&
      (this.structured || (flags & NBD_CMD_FLAG_DF) === 0)
    ) {
      const hdr = this.structured ? 28 : NBD_SIMPLE_REPLY_SIZE;
      const out = allocReplyBuffer(hdr + length);
      if (this.exp!.tryReadSync!(out.subarray(hdr), offset)) {
        if (this.structured) writeOffsetDataHeader(out, 0, NBD_REPLY_FLAG_DONE, cookie, offset, length);
        else writeSimpleReply(out, 0, 0, cookie);
        r.consume(NBD_REQUEST_SIZE);
        this.queueRecyclable(out);
        return;
      }
      readBuf = out; // not in memory: the async read fills the same buffer
    }

    if (type === NBD_CMD_DISC) {
      r.consume(NBD_REQUEST_SIZE);
      if (this.trace) this.log.trace({ cmd: cmdName(type), flags, offset, length }, 'request');
      if (this.infoOn) this.log.info('client sent NBD_CMD_DISC');
      this.state = 'DISCONNECTING';
      this.disconnectOnDisc = true;
      this.maybeFinishDisconnect();
      // Still open: requests in flight. Stop reading until they are answered and it closes.
      if (this.state === 'DISCONNECTING' && !this.ending) this.socket.pause();
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
      if (type === NBD_CMD_WRITE) this.refuseWrite(cookieCopy, length, err);
      else this.replyError(cookieCopy, type, NBD_EINVAL, err);
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
  private validate(
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
    if (rule.mutates && this.readOnly) return 'Export is read-only';
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

  private overWindow(): boolean {
    return (
      this.writeBlocked ||
      this.inFlight >= this.maxInFlight ||
      (this.inFlight > 0 && this.inFlightBytes >= this.maxInFlightBytes)
    );
  }

  private pauseReading(): void {
    if (this.readingPaused) return;
    this.readingPaused = true;
    this.socket.pause();
  }

  private maybeResume(): void {
    if (this.state === 'CLOSED') return;
    if (this.state === 'DISCONNECTING') {
      this.maybeFinishDisconnect();
      return;
    }
    if (!this.readingPaused || this.overWindow()) return;
    this.readingPaused = false;
    this.socket.resume();
    this.pump();
  }

  private begin(bytes: number): void {
    this.inFlight++;
    this.inFlightBytes += bytes;
  }

  private settle(bytes: number): void {
    this.inFlight--;
    this.inFlightBytes -= bytes;
    if (this.state === 'CLOSED') {
      if (this.inFlight === 0) this.finalize();
      return;
    }
    this.maybeResume();
  }

  // ---------------------------------------------------------------- READ

  private startRead(cookie: Buffer, flags: number, offset: number, length: number, reuse?: Buffer): void {
    if (length === 0) {
      // QSD: a NONE chunk (structured) or an empty simple reply.
      this.queue(this.structured ? encodeNoneChunk(cookie) : this.simple(0, cookie));
      return;
    }
    const hdr = this.structured ? 28 : NBD_SIMPLE_REPLY_SIZE;
    const buf = reuse ?? allocReplyBuffer(hdr + length);
    const ctx: ReadCtx = { cookie, offset, length, flags, buf, hdr };
    this.begin(length);
    let p: Promise<NbdZeroRanges | void>;
    try {
      p = this.exp!.read(buf.subarray(hdr), offset);
    } catch (err) {
      p = Promise.reject(err);
    }
    p.then(
      (holes) => {
        this.finishRead(ctx, holes);
        this.settle(length);
      },
      (err: unknown) => {
        this.logFailure(NBD_CMD_READ, err);
        this.replyError(cookie, NBD_CMD_READ, nbdErrorOf(err, NBD_CMD_READ, flags), 'reading from file failed');
        this.settle(length);
      },
    );
  }

  private finishRead(ctx: ReadCtx, holes: NbdZeroRanges | void): void {
    const { cookie, offset, length, flags, buf, hdr } = ctx;
    const data = buf.subarray(hdr);
    const sparse = this.structured && (flags & NBD_CMD_FLAG_DF) === 0;
    if (holes && holes.length > 0) {
      if (!sparse) {
        for (const h of holes) {
          const s = Math.max(h.offset, offset) - offset;
          const e = Math.min(h.offset + h.length, offset + length) - offset;
          if (e > s) data.fill(0, s, e);
        }
      } else {
        this.sendSparseRead(cookie, offset, data, holes);
        // The data chunks are slices of buf, queued in this turn's batch: release it with them.
        if (isRecyclable(buf) && this.state !== 'CLOSED' && !this.ending) this.outRecycle.push(buf);
        return;
      }
    }
    if (this.structured) writeOffsetDataHeader(buf, 0, NBD_REPLY_FLAG_DONE, cookie, offset, length);
    else writeSimpleReply(buf, 0, 0, cookie);
    this.queueRecyclable(buf);
  }

  /** NBD spec: Structured reply chunk types — OFFSET_DATA / OFFSET_HOLE covering the request. */
  private sendSparseRead(cookie: Buffer, offset: number, data: Buffer, holes: NbdZeroRanges): void {
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
      if (part.hole) {
        this.queue(encodeOffsetHole(f, cookie, part.start, part.len));
      } else {
        const h = Buffer.allocUnsafe(28);
        writeOffsetDataHeader(h, 0, f, cookie, part.start, part.len);
        this.queue(h);
        this.queue(data.subarray(part.start - offset, part.start - offset + part.len));
      }
    });
  }

  // ---------------------------------------------------------------- WRITE

  private receiveWrite(cookie: Buffer, flags: number, offset: number, length: number): void {
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
  private refuseWrite(cookie: Buffer, length: number, msg: string): void {
    this.wCookie = cookie;
    this.wRemaining = length;
    this.wError = { err: NBD_EINVAL, msg };
    this.state = 'WRITE_DRAIN';
  }

  private startWrite(cookie: Buffer, flags: number, offset: number, data: Buffer): void {
    if (data.length === 0) {
      this.queue(this.simple(0, cookie));
      return;
    }
    this.run(
      cookie,
      NBD_CMD_WRITE,
      flags,
      data.length,
      () => this.exp!.write(data, offset, (flags & NBD_CMD_FLAG_FUA) !== 0),
      // The backend is done with the payload once the write settled: recycle large ones.
      isRecyclable(data) ? data : undefined,
    );
  }

  // ---------------------------------------------------------------- others

  private startOther(cookie: Buffer, type: number, flags: number, offset: number, length: number): void {
    const exp = this.exp!;
    const fua = (flags & NBD_CMD_FLAG_FUA) !== 0;
    switch (type) {
      case NBD_CMD_FLUSH:
        this.run(cookie, type, flags, 0, () => exp.flush());
        return;
      case NBD_CMD_TRIM:
        if (length === 0) return void this.queue(this.simple(0, cookie));
        this.run(cookie, type, flags, 0, () => exp.trim(offset, length, fua));
        return;
      case NBD_CMD_CACHE:
        this.run(cookie, type, flags, 0, () => (exp.canCache ? exp.cache(offset, length) : Promise.resolve()));
        return;
      case NBD_CMD_WRITE_ZEROES:
        if (length === 0) return void this.queue(this.simple(0, cookie));
        this.run(cookie, type, flags, 0, () =>
          exp.writeZeroes(offset, length, {
            mayUnmap: (flags & NBD_CMD_FLAG_NO_HOLE) === 0,
            fastZero: (flags & NBD_CMD_FLAG_FAST_ZERO) !== 0,
            fua,
          }),
        );
        return;
      case NBD_CMD_BLOCK_STATUS:
        this.startBlockStatus(cookie, flags, offset, length);
        return;
    }
  }

  /** Run a command whose success reply carries no data (a simple reply, as QSD sends). */
  private run(
    cookie: Buffer,
    type: number,
    flags: number,
    bytes: number,
    op: () => Promise<void>,
    recycle?: Buffer,
  ): void {
    this.begin(bytes);
    let p: Promise<void>;
    try {
      p = op();
    } catch (err) {
      p = Promise.reject(err);
    }
    p.then(
      () => {
        if (recycle) releaseReplyBuffer(recycle);
        this.queue(this.simple(0, cookie));
        this.settle(bytes);
      },
      (err: unknown) => {
        if (recycle) releaseReplyBuffer(recycle);
        this.logFailure(type, err);
        this.replyError(cookie, type, nbdErrorOf(err, type, flags), FAIL_TEXT[type] ?? 'request failed');
        this.settle(bytes);
      },
    );
  }

  private startBlockStatus(cookie: Buffer, flags: number, offset: number, length: number): void {
    const reqOne = (flags & NBD_CMD_FLAG_REQ_ONE) !== 0;
    const max = reqOne ? 1 : NBD_MAX_BLOCK_STATUS_EXTENTS;
    const ctxs = this.contexts;
    this.begin(0);
    let p: Promise<NbdExtent[][]>;
    try {
      p = Promise.all(ctxs.map((c) => c.context.blockStatus(offset, length, max)));
    } catch (err) {
      p = Promise.reject(err);
    }
    p.then(
      (lists) => {
        const chunks: Buffer[] = [];
        for (let i = 0; i < ctxs.length; i++) {
          const ext = normalizeExtents(lists[i] ?? [], length, max);
          if (ext.length === 0) throw new Error(`context '${ctxs[i]!.context.name}' returned no extents`);
          const f = i === ctxs.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
          chunks.push(encodeBlockStatusChunk(f, cookie, ctxs[i]!.id, ext));
        }
        for (const c of chunks) this.queue(c);
      },
    )
      .catch((err: unknown) => {
        this.logFailure(NBD_CMD_BLOCK_STATUS, err);
        this.replyError(
          cookie,
          NBD_CMD_BLOCK_STATUS,
          nbdErrorOf(err, NBD_CMD_BLOCK_STATUS, flags),
          "can't get block status",
        );
      })
      .finally(() => this.settle(0));
  }

  // ------------------------------------------------------------ replies and output

  private simple(err: number, cookie: Buffer): Buffer {
    const b = allocReplyBuffer(NBD_SIMPLE_REPLY_SIZE);
    writeSimpleReply(b, 0, err, cookie);
    return b;
  }

  /** Error reply: an ERROR chunk with DONE when structured, else a simple reply. */
  private replyError(cookie: Buffer, type: number, err: number, msg: string): void {
    if (this.debugOn) {
      this.log.debug({ cmd: type < 0 ? 'invalid' : cmdName(type), err, msg }, 'request failed');
    }
    this.queue(this.structured ? encodeErrorChunk(NBD_REPLY_FLAG_DONE, cookie, err, msg) : this.simple(err, cookie));
  }

  private logFailure(type: number, err: unknown): void {
    // Log the real cause before it is narrowed to an NBD error.
    this.log.warn({ cmd: cmdName(type), err: err instanceof Error ? err.message : String(err) }, 'NBD request failed');
  }

  private queue(b: Buffer): void {
    if (this.state === 'CLOSED' || this.ending) return;
    this.out.push(b);
    this.outBytes += b.length;
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      process.nextTick(() => this.flush());
    }
  }

  /** Queue a whole reply buffer that may come from the large pool. */
  private queueRecyclable(b: Buffer): void {
    if (this.state === 'CLOSED' || this.ending) return;
    this.queue(b);
    if (isRecyclable(b)) this.outRecycle.push(b);
  }

  /** Write everything queued in this event-loop turn at once. */
  private flush(): void {
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
    const ok = this.socket.write(merged !== undefined ? [merged] : out, done);
    if (!ok && !this.writeBlocked) {
      this.writeBlocked = true;
      this.pauseReading();
    }
  }

  private maybeFinishDisconnect(): void {
    if (this.inFlight > 0) return;
    this.endAfterFlush();
  }

  /** Flush queued replies, then close gracefully. */
  private endAfterFlush(): void {
    if (this.state === 'CLOSED' || this.ending) return;
    this.state = 'DISCONNECTING';
    this.reader.clear();
    this.stopHandshakeTimer();
    this.flush();
    this.ending = true;
    if (this.disconnectOnDisc && this.socket.pendingBytes === 0) {
      // Everything is in the kernel and the client has said goodbye: close now, like QEMU,
      // instead of a shutdown round through the stream machinery.
      this.socket.destroy();
      return;
    }
    this.socket.end();
  }

  /** Close without flushing (protocol violation). */
  private closeNow(reason: string): void {
    this.log.warn({ reason }, 'closing NBD connection');
    this.state = 'DISCONNECTING';
    this.reader.clear();
    this.flush();
    this.socket.destroy();
  }

  /** TransportSink: the socket is gone. */
  onClose(): void {
    this.stopHandshakeTimer();
    if (this.state !== 'CLOSED') {
      this.state = 'CLOSED';
      this.reader.clear();
      this.out = [];
      this.wBuf = EMPTY;
    }
    if (this.inFlight === 0) this.finalize();
  }

  private finalize(): void {
    if (this.finalized) return;
    this.finalized = true;
    if (this.infoOn) this.log.info({ client: this.clientAddress, export: this.exp?.name }, 'NBD client disconnected');
    try {
      this.session?.onDisconnect();
    } catch (err) {
      this.log.error({ err }, 'onDisconnect failed');
    }
    this.resolveClosed?.();
    this.onClosed?.();
  }
}

const FAIL_TEXT: Record<number, string> = {
  [NBD_CMD_WRITE]: 'writing to file failed',
  [NBD_CMD_WRITE_ZEROES]: 'writing to file failed',
  [NBD_CMD_FLUSH]: 'flush failed',
  [NBD_CMD_TRIM]: 'discard failed',
  [NBD_CMD_CACHE]: 'caching data failed',
};

/**
 * Make backend extents wire-safe: drop empty ones, merge equal neighbours, never
 * run past the request (QEMU never does), at most `max`.
 */
export function normalizeExtents(ext: readonly NbdExtent[], length: number, max: number): NbdExtent[] {
  const out: NbdExtent[] = [];
  let total = 0;
  for (const e of ext) {
    if (total >= length) break;
    if (!(e.length > 0)) continue;
    const len = Math.min(e.length, length - total, 0xffffffff);
    const last = out[out.length - 1];
    if (last && last.flags === e.flags && last.length + len <= 0xffffffff) last.length += len;
    else {
      if (out.length >= max) break;
      out.push({ length: len, flags: e.flags >>> 0 });
    }
    total += len;
  }
  return out;
}
