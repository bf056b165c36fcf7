/**
 * One NBD client connection: drives the {@link Handshake} from socket bytes, then
 * runs transmission. Requests are pipelined: every request is decoded straight from
 * the socket buffer, validated against {@link CMD_RULES}, and started at once; replies
 * are queued and written once per event-loop turn (one write or one corked writev).
 * Reading pauses while the in-flight window (count or bytes) is full or the socket's
 * write side needs draining.
 *
 * This file is the connection face: socket lifecycle, handshake, the input state machine,
 * flow control and close. The request path lives in layers below it (one object, each file
 * extending the next): request.ts (header parsing, validation, WRITE payloads) -> dispatch.ts
 * (commands against the export backend) -> reply-writer.ts (reply encoding and output queue).
 */
import type { Logger } from '../util/logger.js';
import type { NbdBackend } from './backend.js';
import type { NbdTransport, TransportSink } from './transport.js';
import { Handshake, type HandshakeStep } from './handshake.js';
import {
  NBD_OPTS_MAGIC,
  NBD_REQUEST_SIZE,
  NBD_CMD_WRITE,
  NBD_EINVAL,
  NBD_EPERM,
  NBD_EXTENDED_REQUEST_SIZE,
  NBD_FLAG_BLOCK_STATUS_PAYLOAD,
  optName,
} from './protocol.js';
import { EMPTY } from './request.js';
import { NbdExtRequestParser } from './request-ext.js';
import { StartTlsTransport, type NbdTlsServerConfig, type StartTlsResult } from './tls.js';

export { CMD_RULES } from './request.js';
export { normalizeExtents } from './dispatch.js';

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
  /** TLS is required (the transport must be a {@link StartTlsTransport}). */
  tls?: NbdTlsServerConfig | undefined;
}

const OPTS_MAGIC_HI = Number(NBD_OPTS_MAGIC >> 32n);
/**
 * A WRITE payload with at least this much still to come is read straight into its buffer when
 * the transport can (NbdTransport.readInto): below it the copy costs less than the extra call.
 */
const DIRECT_PAYLOAD_MIN = 16 * 1024;
const OPTS_MAGIC_LO = Number(NBD_OPTS_MAGIC & 0xffffffffn);

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

export class NbdConnection extends NbdExtRequestParser implements TransportSink {
  readonly clientAddress: string;
  private readonly backend: NbdBackend;
  private readonly hs: Handshake;
  private readonly maxInFlight: number;
  private readonly maxInFlightBytes: number;

  // option being received
  private optNum = 0;
  private optLen = 0;
  private optRemaining = 0;

  private readingPaused = false;
  /** The rest of the current WRITE payload goes straight into wBuf (transport readInto). */
  private directArmed = false;
  private pumping = false;
  private finalized = false;
  private resolveClosed: (() => void) | undefined;
  private closedPromise: Promise<void> | undefined;
  private readonly onClosed: (() => void) | undefined;
  private readonly tls: NbdTlsServerConfig | undefined;
  /** Between the STARTTLS ACK and the end of the TLS handshake (for logging its failure). */
  private tlsHandshaking = false;

  /** Resolves once the socket is closed and every request has settled (made on first use). */
  get closed(): Promise<void> {
    if (!this.closedPromise) {
      this.closedPromise = this.finalized
        ? Promise.resolve()
        : new Promise<void>((r) => (this.resolveClosed = r));
    }
    return this.closedPromise;
  }

  constructor(socket: NbdTransport, opts: NbdConnectionOptions) {
    super(socket, opts.id, opts.log);
    this.clientAddress = opts.clientAddress;
    this.backend = opts.backend;
    this.onClosed = opts.onClosed;
    this.tls = opts.tls;
    this.reader.volatile = socket.volatileReads;
    this.maxInFlight = Math.max(1, opts.maxInFlight ?? 64);
    this.maxInFlightBytes = Math.max(1, opts.maxInFlightBytes ?? 64 * 1024 * 1024);
    this.hs = new Handshake(this.backend, {
      id: this.id,
      clientAddress: this.clientAddress,
      disconnect: (reason: string) => this.disconnect(reason),
    }, opts.tls !== undefined);
    const timeout = opts.handshakeTimeoutMs ?? 10_000;
    if (timeout > 0) {
      HANDSHAKE_DEADLINES.add(this, timeout);
    }
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

  /** TransportSink: `n` more bytes of the WRITE payload landed in wBuf (armed in pumpLoop). */
  onDirectData(n: number): void {
    if (this.state !== 'WRITE_PAYLOAD' || !this.directArmed) return;
    this.wFilled += n;
    if (this.wFilled < this.wBuf.length) return;
    this.directArmed = false;
    this.state = 'REQUEST';
    this.startWrite(this.wCookie, this.wFlags, this.wOffset, this.wBuf);
    // Nothing buffered now; this checks the in-flight window (onData follows if more came).
    this.pump();
  }

  /** TransportSink: the write side has room again. */
  onDrain(): void {
    if (!this.writeBlocked) return;
    this.writeBlocked = false;
    this.maybeResume();
  }

  /** TransportSink. */
  onError(message: string): void {
    if (this.tlsHandshaking) return; // reported by the TLS upgrade's result
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
          if (this.wFilled < this.wBuf.length) {
            const rest = this.wBuf.length - this.wFilled;
            const into = this.socket.readInto;
            if (into !== undefined && !this.directArmed && rest >= DIRECT_PAYLOAD_MIN) {
              into.call(this.socket, this.wBuf, this.wFilled, rest);
              this.directArmed = true;
            }
            return;
          }
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
        case 'EXT_REQUEST': {
          // Extended headers (request-ext.ts): chosen once, when transmission starts.
          if (this.overWindow()) {
            this.pauseReading();
            return;
          }
          if (!r.ensure(NBD_EXTENDED_REQUEST_SIZE)) return;
          this.onExtRequestHeader(r.buf, r.pos);
          break;
        }
        case 'EXT_PAYLOAD':
        case 'EXT_DRAIN':
          if (!this.pumpExtPayload()) return;
          break;
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
    if (step.startTls === true) {
      this.beginTls();
      return;
    }
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
        this.exp = neg.session.handle ?? neg.exp;
        this.session = neg.session;
        // Extended headers imply structured replies (DF is valid, reads may be sparse).
        this.structured = neg.structured || neg.extended;
        this.extended = neg.extended;
        this.statusPayload = (neg.flags & NBD_FLAG_BLOCK_STATUS_PAYLOAD) !== 0;
        this.contexts = neg.contexts;
        this.readOnly = neg.readOnly;
        this.readOnlyError = neg.readOnlyIntent && !neg.exp.readOnly ? NBD_EPERM : NBD_EINVAL;
        this.size = neg.exp.size;
        this.hasSyncRead = typeof neg.exp.tryReadSync === 'function';
        // sendfile for large cached reads: only where the transport can (native sockets) and the
        // export can name a file range (a raw export straight over a file node).
        const fileMin = this.socket.fileWriteMin ?? 0;
        this.fileReadMin =
          this.hasSyncRead && this.socket.writeFile && fileMin > 0 && typeof this.exp.tryReadFileSync === 'function'
            ? fileMin
            : Infinity;
        this.state = neg.extended ? 'EXT_REQUEST' : 'REQUEST';
        if (!this.infoOn) return;
        this.log.info(
          {
            client: this.clientAddress,
            export: neg.exp.name,
            structured: neg.structured,
            extended: neg.extended,
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

  /**
   * NBD_OPT_STARTTLS was ACKed (the ACK is written in clear): run the TLS handshake on the
   * same socket. Option haggling resumes, encrypted, once the peer is accepted; a failed
   * handshake or a refused peer closes only this connection.
   */
  private beginTls(): void {
    const t = this.socket;
    if (this.tls === undefined || !(t instanceof StartTlsTransport)) {
      this.closeNow('TLS requested on a transport that cannot do it');
      return;
    }
    this.state = 'OPTION_HEADER';
    if (this.reader.length > 0) {
      // The client must wait for the ACK; what it sent early cannot be handed to TLS.
      this.closeNow('client sent data before the TLS handshake');
      return;
    }
    this.tlsHandshaking = true;
    t.startTls(this.tls, (r: StartTlsResult) => {
      this.tlsHandshaking = false;
      if (r.ok) {
        if (this.infoOn) {
          this.log.info({ peer: r.peer, protocol: r.protocol, cipher: r.cipher }, 'NBD TLS session established');
        }
        return;
      }
      // QSD: "option negotiation failed: TLS handshake failed: ..." / "... authz check ... denied".
      this.log.warn({ client: this.clientAddress, reason: r.reason }, 'NBD TLS negotiation failed');
      this.state = 'DISCONNECTING';
      this.reader.clear();
    });
  }

  private overWindow(): boolean {
    return (
      this.writeBlocked ||
      this.inFlight >= this.maxInFlight ||
      (this.inFlight > 0 && this.inFlightBytes >= this.maxInFlightBytes)
    );
  }

  protected pauseReading(): void {
    if (this.readingPaused) return;
    this.readingPaused = true;
    this.socket.pause();
  }

  protected maybeResume(): void {
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

  protected maybeFinishDisconnect(): void {
    if (this.inFlight > 0) return;
    this.endAfterFlush();
  }

  /** Flush queued replies, then close gracefully. */
  protected endAfterFlush(): void {
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
  protected closeNow(reason: string): void {
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
      if (this.inFlight > 0) this.session?.onClose?.();
      this.directArmed = false;
    }
    if (this.inFlight === 0) this.finalize();
  }

  protected finalize(): void {
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
