/**
 * Transports and listeners on the addon's netio (native/netio.c): sockets that are plain file
 * descriptors polled on Node's own loop, with one JavaScript callback for all their events. A
 * connection costs no net.Socket, stream state or event emitters, which is most of what a short
 * NBD connection costs in Node. The nbd layer does not load the addon itself: the binding is
 * handed in (NbdServerOptions.netio) by the layer that owns native code.
 */
import type { NbdTransport, TransportSink } from './transport.js';
import type { PageBorrower } from '../util/page-loans.js';

/** The addon's netio functions (see native/netio.c for the contract). */
export interface NetIoBinding {
  netInit(readBuffer: Buffer, callback: (ev: number, id: number, arg: number) => void): void;
  netListenUnix(path: string, backlog: number): number;
  netDup(fd: number): number;
  netListen(fd: number): number;
  netListenerClose(listenerId: number): void;
  netResume(id: number): void;
  netPause(id: number): void;
  netWrite(id: number, bufs: Buffer | readonly Buffer[]): number;
  netPending(id: number): number;
  netClose(id: number, graceful: boolean): void;
  netPeer(id: number): string;
  netOpenCount(): number;
  /** Optional (older addons lack it): see NbdTransport.readInto. */
  netReadInto?(id: number, buf: Buffer, offset: number, length: number): void;
  /** Optional (older addons lack it): see NbdTransport.writeFile. */
  netWriteFile?(id: number, bufs: Buffer | readonly Buffer[], fd: number, offset: number, length: number): number;
  /** File segments so far: [all sent, waited for the socket, read on a thread, hit EOF]. */
  netFileStats?(): number[];
  /** The connection's number for netLoanReturned; -1 when its reading cannot be followed (TCP). */
  netLoanGen?(id: number): number;
  /** Bytes written to the connection so far. */
  netLoanMark?(id: number): number;
  /** The peer has read every byte up to `mark`, or connection `gen` is closed. */
  netLoanReturned?(id: number, gen: number, mark: number): boolean;
}

const NETIO_FUNCTIONS = [
  'netInit',
  'netListenUnix',
  'netDup',
  'netListen',
  'netListenerClose',
  'netResume',
  'netPause',
  'netWrite',
  'netPending',
  'netClose',
  'netPeer',
  'netOpenCount',
] as const;

/** The netio functions of an addon module, or undefined when it lacks any of them. */
export function netIoBindingFrom(mod: unknown): NetIoBinding | undefined {
  if (typeof mod !== 'object' || mod === null) return undefined;
  const m = mod as Record<string, unknown>;
  for (const f of NETIO_FUNCTIONS) if (typeof m[f] !== 'function') return undefined;
  return m as unknown as NetIoBinding;
}

const EV_ACCEPT = 1;
const EV_READ = 2;
const EV_EOF = 3;
const EV_ERROR = 4;
const EV_DRAIN = 5;
const EV_READ_DIRECT = 6;

/** Every native socket reads here; a READ event's bytes are parsed before the callback returns. */
const READ_BUFFER = Buffer.allocUnsafeSlow(256 * 1024);

let bound: NetIoBinding | undefined;
/** Live connections by id (ids are reused once closed). */
const conns: (NativeTransport | undefined)[] = [];
const listeners = new Map<number, NativeListener>();

/**
 * Adaptive polling, as QEMU's iothreads (`poll-max-ns`, default 32 µs): for a window after the
 * last request bytes arrived, the event loop keeps polling the sockets (a pending immediate
 * makes libuv's poll phase non-blocking) instead of sleeping in epoll_wait, so the next request
 * of a client waiting on its reply is picked up without a thread wake-up. Costs CPU only while
 * requests keep coming. The window adapts between an eighth of its ceiling and the ceiling (see
 * PollWindow); `BLOCKD_NBD_POLL_US` sets the ceiling (default 64 µs, 0 turns polling off); see
 * docs/nbd.md.
 */
const POLL_MAX_MS = pollWindowMs(process.env.BLOCKD_NBD_POLL_US);
let lastRead = 0;
let polling = false;
/**
 * Request bytes whose handling wrote at least this much (large read replies sent at once) do
 * not (re)start polling: that client first has to take in the replies, which on two shared
 * cores takes longer than the window, so spinning for its next request only takes CPU from it.
 * Measured on seqread (256 KiB, QD16): polling then cost 15 µs of server CPU per request.
 */
const POLL_SKIP_BYTES = 64 * 1024;
/** Bytes handed to netWrite/netWriteFile so far (only differences are used). */
let written = 0;

/**
 * Reads of at least this many bytes whose range is cached in one file go out with sendfile()
 * (netWriteFile) instead of being copied into a reply buffer; below it the copy is cheaper than
 * the extra syscalls (cachestat, a second send). `BLOCKD_NBD_SENDFILE_MIN` sets it in bytes
 * (0 turns it off); see docs/nbd.md and docs/performance.md for the measurement behind it.
 */
const SENDFILE_MIN = sendfileMinBytes(process.env.BLOCKD_NBD_SENDFILE_MIN);

export function sendfileMinBytes(env: string | undefined): number {
  const n = env === undefined || env === '' ? 64 * 1024 : Number(env);
  return Number.isSafeInteger(n) && n > 0 ? n : 0;
}

/** The polling window's ceiling in ms from `BLOCKD_NBD_POLL_US` (µs; default 64, 0 = off, at most 1 s). */
export function pollWindowMs(env: string | undefined): number {
  const us = env === undefined || env === '' ? 64 : Number(env);
  return Number.isFinite(us) && us > 0 ? Math.min(us, 1_000_000) / 1000 : 0;
}

/**
 * The polling window, adapted (as QEMU adapts its iothreads' polling time) from what the loop
 * saw when requests came:
 * - while it polled: the window works, nothing changes (`hit`);
 * - after it had gone to sleep, within the ceiling since the previous request bytes: a longer
 *   window would have caught them without the wake-up, so the window doubles (up to the
 *   ceiling);
 * - after it had gone to sleep, past the ceiling: no window would have caught them. After
 *   MISSES such wake-ups in a row with no request caught by polling in between (a client that
 *   sends at its own pace, slower than the ceiling), or at once for a gap over four times the
 *   ceiling, polling only burns CPU and the window halves (down to an eighth of the ceiling).
 *   QEMU shrinks at the first such gap; but at queue depth 1 a gap a little past the ceiling is
 *   mostly the wake-up itself (the server's and the client's: 70–100 µs on this machine, against
 *   35 µs when the server polls), and shrinking at once makes the next gap longer again and locks
 *   the connection in the slow mode (p50 82–101 µs in an A/B, docs/performance.md "Ninth pass").
 * It starts at the ceiling (64 µs by default; QEMU's poll-max-ns is 32 µs).
 */
export class PollWindow {
  static readonly MISSES = 8;
  /** The current window in ms. */
  ms: number;
  readonly minMs: number;
  private misses = 0;

  constructor(readonly maxMs: number) {
    this.ms = maxMs;
    this.minMs = maxMs / 8;
  }

  /** Requests arrived while the loop was polling. */
  hit(): void {
    this.misses = 0;
  }

  /** Requests arrived `gapMs` after the previous ones, with the loop asleep (the window had run out). */
  woke(gapMs: number): void {
    if (gapMs <= this.maxMs) {
      if (gapMs > this.ms) this.ms = Math.min(this.maxMs, this.ms * 2);
      this.misses = 0;
    } else if (++this.misses >= PollWindow.MISSES || gapMs > 4 * this.maxMs) {
      this.ms = Math.max(this.minMs, this.ms / 2);
      this.misses = 0;
    }
  }
}

const pollWindow = new PollWindow(POLL_MAX_MS);

function pollTick(): void {
  if (performance.now() - lastRead < pollWindow.ms) setImmediate(pollTick);
  else polling = false;
}

/** (Re)start the polling window from now; `adapt`: requests (not an accept) arrived. */
function armPoll(adapt: boolean): void {
  const now = performance.now();
  if (adapt && lastRead > 0) {
    if (polling) pollWindow.hit();
    else pollWindow.woke(now - lastRead);
  }
  lastRead = now;
  if (!polling) {
    polling = true;
    setImmediate(pollTick);
  }
}

function onEvent(ev: number, id: number, arg: number): void {
  // An exception here would reach napi_fatal_exception: contain it to this connection.
  try {
    switch (ev) {
      case EV_READ: {
        const before = written;
        conns[id]?.deliver(arg);
        if (POLL_MAX_MS > 0 && written - before < POLL_SKIP_BYTES) armPoll(true);
        return;
      }
      case EV_READ_DIRECT:
        conns[id]?.deliverDirect(arg);
        return;
      case EV_ACCEPT: {
        const l = listeners.get(arg);
        if (!l) {
          bound?.netClose(id, false);
          return;
        }
        const t = new NativeTransport(bound!, id);
        conns[id] = t;
        l.onAccept(t);
        // The greeting is out and the client answers it at once: poll for that answer too.
        if (POLL_MAX_MS > 0) armPoll(false);
        return;
      }
      case EV_DRAIN:
        conns[id]?.drained();
        return;
      case EV_EOF:
        conns[id]?.gone(undefined);
        return;
      case EV_ERROR:
        conns[id]?.gone(`socket error (errno ${arg})`);
        return;
    }
  } catch (err) {
    const t = conns[id];
    if (t && ev !== EV_ACCEPT) t.gone(err instanceof Error ? err.message : String(err));
    else if (ev === EV_ACCEPT) bound?.netClose(id, false);
  }
}

function init(b: NetIoBinding): void {
  if (bound === b) return;
  if (bound) throw new Error('netio is already bound to another addon instance');
  b.netInit(READ_BUFFER, onEvent);
  bound = b;
}

/** One accepted socket. */
export class NativeTransport implements NbdTransport, PageBorrower {
  readonly volatileReads = true;
  private sink: TransportSink | undefined;
  private closed = false;
  private closeReported = false;
  private drainWaiters: (() => void)[] = [];
  private waitingDrain = false;
  /** Bytes the netReadInto target still wants (the addon counts the same way). */
  private directLeft = 0;
  readonly readInto: ((buf: Buffer, offset: number, length: number) => void) | undefined;
  readonly writeFile:
    | ((bufs: readonly Buffer[], fd: number, offset: number, length: number, done?: () => void) => boolean)
    | undefined;
  readonly fileWriteMin: number;
  readonly pageBorrower: PageBorrower | undefined;
  private readonly loanGen: number;

  constructor(
    private readonly b: NetIoBinding,
    readonly id: number,
  ) {
    this.readInto = b.netReadInto ? this.armTarget : undefined;
    this.writeFile = b.netWriteFile && SENDFILE_MIN > 0 ? this.sendFile : undefined;
    this.fileWriteMin = SENDFILE_MIN;
    // Unix sockets only: the addon answers -1 for TCP (see netio.c, "Loans").
    this.loanGen = this.writeFile && b.netLoanMark && b.netLoanReturned ? (b.netLoanGen?.(id) ?? -1) : -1;
    this.pageBorrower = this.loanGen >= 0 ? this : undefined;
  }

  loanMark(): number {
    return this.closed ? 0 : this.b.netLoanMark!(this.id);
  }

  /**
   * After end() the addon still sends the queue (a graceful close), so it is asked until it has
   * closed the socket; the connection number tells this one from a later one with the same id.
   */
  loanReturned(mark: number): boolean {
    return this.b.netLoanReturned!(this.id, this.loanGen, mark);
  }

  private sendFile(bufs: readonly Buffer[], fd: number, offset: number, length: number, done?: () => void): boolean {
    if (this.closed) return true;
    written += length;
    return this.settleWrite(this.b.netWriteFile!(this.id, bufs.length === 1 ? bufs[0]! : bufs, fd, offset, length), done);
  }

  private armTarget(buf: Buffer, offset: number, length: number): void {
    if (this.closed) return;
    this.b.netReadInto!(this.id, buf, offset, length);
    this.directLeft = length;
  }

  get destroyed(): boolean {
    return this.closed;
  }

  get pendingBytes(): number {
    return this.closed ? 0 : this.b.netPending(this.id);
  }

  remoteAddress(): string {
    return this.closed ? 'unix' : this.b.netPeer(this.id);
  }

  attach(sink: TransportSink): void {
    this.sink = sink;
    if (!this.closed) this.b.netResume(this.id);
  }

  deliver(n: number): void {
    this.sink?.onData(READ_BUFFER.subarray(0, n));
  }

  /** `n` bytes read: the target's share first, then the rest from the shared buffer. */
  deliverDirect(n: number): void {
    const k = Math.min(n, this.directLeft);
    this.directLeft -= k;
    const sink = this.sink;
    if (!sink) return;
    if (k > 0) sink.onDirectData(k);
    if (n > k && !this.closed) sink.onData(READ_BUFFER.subarray(0, n - k));
  }

  drained(): void {
    this.waitingDrain = false;
    const w = this.drainWaiters;
    if (w.length > 0) {
      this.drainWaiters = [];
      for (const f of w) f();
    }
    this.sink?.onDrain();
  }

  /** Peer closed or the socket failed: close our side and report once. */
  gone(error: string | undefined): void {
    if (error !== undefined) this.sink?.onError(error);
    this.destroy();
  }

  write(bufs: readonly Buffer[], done?: () => void): boolean {
    if (this.closed) return true;
    if (bufs.length === 1) written += bufs[0]!.length;
    else for (const b of bufs) written += b.length;
    return this.settleWrite(this.b.netWrite(this.id, bufs.length === 1 ? bufs[0]! : bufs), done);
  }

  /** A netWrite/netWriteFile result: 1 sent, 0 queued (DRAIN follows), -errno failed. */
  private settleWrite(r: number, done: (() => void) | undefined): boolean {
    if (r === 1) {
      if (done) done();
      return !this.waitingDrain;
    }
    if (r === 0) {
      this.waitingDrain = true;
      if (done) this.drainWaiters.push(done);
      return false;
    }
    this.gone(`write failed (errno ${-r})`);
    return true;
  }

  pause(): void {
    if (!this.closed) this.b.netPause(this.id);
  }

  resume(): void {
    if (!this.closed) this.b.netResume(this.id);
  }

  end(): void {
    if (this.closed) return;
    this.closed = true;
    conns[this.id] = undefined;
    this.b.netClose(this.id, true);
    this.reportClose();
  }

  destroy(): void {
    if (this.closed) return;
    this.closed = true;
    conns[this.id] = undefined;
    this.b.netClose(this.id, false);
    this.reportClose();
  }

  private reportClose(): void {
    if (this.closeReported) return;
    this.closeReported = true;
    this.drainWaiters = [];
    // Asynchronously, like a socket's 'close' event: callers finish what they were doing first.
    process.nextTick(() => this.sink?.onClose());
  }
}

/** A listening socket whose clients become {@link NativeTransport}s. */
export class NativeListener {
  private readonly id: number;
  private open = true;

  /** Accept on the listening socket `fd` (owned from now on: closed by close()). */
  constructor(
    private readonly b: NetIoBinding,
    fd: number,
    readonly onAccept: (t: NativeTransport) => void,
  ) {
    init(b);
    this.id = b.netListen(fd);
    listeners.set(this.id, this);
  }

  close(): void {
    if (!this.open) return;
    this.open = false;
    listeners.delete(this.id);
    this.b.netListenerClose(this.id);
  }
}

/** Bind and listen on a unix socket path; returns the listening fd (throws with `code`). */
export function listenUnixFd(b: NetIoBinding, path: string): number {
  init(b);
  return b.netListenUnix(path, 511);
}
