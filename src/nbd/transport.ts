/**
 * The byte stream an {@link NbdConnection} runs on. Two implementations: {@link SocketTransport}
 * over a Node net.Socket (always available), and the native one in `native-transport.ts` (the
 * addon's netio, much cheaper per connection). The connection only needs: deliver bytes, write
 * buffers in order with back-pressure, pause/resume reading, close gracefully or at once.
 */
import type { Socket } from 'node:net';
import type { PageBorrower } from '../util/page-loans.js';

/** What a transport reports to its connection. */
export interface TransportSink {
  /**
   * Bytes arrived. When the transport's `volatileReads` is set, `buf` is only valid during the
   * call (it is a shared read buffer): consume or copy it before returning.
   */
  onData(buf: Buffer): void;
  /** Everything written so far has reached the kernel (after a write returned false). */
  onDrain(): void;
  /** The stream is gone (peer closed, error, or destroy()); called once, asynchronously. */
  onClose(): void;
  /** A socket error (logged; onClose follows). */
  onError(message: string): void;
  /**
   * `n` bytes went straight into the target of {@link NbdTransport.readInto} (they come before
   * any bytes of the onData call that may follow).
   */
  onDirectData(n: number): void;
}

export interface NbdTransport {
  /** Reads land in a buffer that is reused after onData returns. */
  readonly volatileReads: boolean;
  readonly destroyed: boolean;
  /** Bytes accepted by write() and not yet handed to the kernel. */
  readonly pendingBytes: number;
  /** Start delivering events to `sink` and start reading. */
  attach(sink: TransportSink): void;
  /**
   * Write `bufs` in order. `done` runs once they are all in the kernel (not on failure).
   * Returns false when the caller should wait for onDrain before writing more.
   */
  write(bufs: readonly Buffer[], done?: () => void): boolean;
  pause(): void;
  resume(): void;
  /** Close once everything written has been sent. */
  end(): void;
  /** Close now; unsent data is dropped. */
  destroy(): void;
  /** `host:port` of a TCP peer, `unix` otherwise (a syscall: ask once, and not for unix listeners). */
  remoteAddress(): string;
  /**
   * Optional: read the next `length` bytes of the stream straight into `buf[offset..]` (a WRITE
   * payload, saving the copy out of a shared read buffer); they are reported by onDirectData.
   * The target stays armed until it is full or the transport closes.
   */
  readInto?(buf: Buffer, offset: number, length: number): void;
  /**
   * Optional: write `bufs`, then `length` bytes of the file `fd` from `offset` (sendfile, no
   * copy in the server), in order with every other write; returns and calls `done` as
   * {@link write}. The caller has just checked the range is in the page cache; `fd` only has to
   * stay open during the call (a segment that waits keeps its own duplicate).
   */
  writeFile?(bufs: readonly Buffer[], fd: number, offset: number, length: number, done?: () => void): boolean;
  /** With {@link writeFile}: reads shorter than this are cheaper copied (0: never use it). */
  readonly fileWriteMin?: number;
  /**
   * With {@link writeFile}: set when the transport can tell how much of its stream the peer has
   * read (a unix socket), so file ranges with `loans` (a qcow2 image's data clusters, whose host
   * clusters can change owners) may be sent by reference; without it they are copied.
   */
  readonly pageBorrower?: PageBorrower;
}

/**
 * A net.Socket as a transport. With `userBuffer`, the socket was built with `onread` (one shared
 * read buffer, see server.ts) and its reads arrive through {@link SocketTransport.onRead}.
 */
/**
 * {@link NbdTransport.write} over a Node stream socket (plain or TLS): several buffers go out
 * corked as one write; `done` runs once the last one is flushed without error.
 */
export function writeBuffers(s: Socket, bufs: readonly Buffer[], done?: () => void): boolean {
  const cb = done === undefined ? undefined : (err?: Error | null) => void (err || done());
  if (bufs.length === 1) return s.write(bufs[0]!, cb);
  s.cork();
  const last = bufs.length - 1;
  for (let i = 0; i < last; i++) s.write(bufs[i]!);
  s.write(bufs[last]!, cb);
  s.uncork();
  return !s.writableNeedDrain;
}

export class SocketTransport implements NbdTransport {
  private sink: TransportSink | undefined;
  private paused = true;

  constructor(
    readonly socket: Socket,
    private readonly userBuffer: boolean,
  ) {}

  get volatileReads(): boolean {
    return this.userBuffer;
  }

  get destroyed(): boolean {
    return this.socket.destroyed;
  }

  get pendingBytes(): number {
    return this.socket.writableLength;
  }

  attach(sink: TransportSink): void {
    this.sink = sink;
    const s = this.socket;
    if (!this.userBuffer) s.on('data', (chunk: Buffer) => sink.onData(chunk));
    s.on('error', (err) => sink.onError(err.message));
    s.on('close', () => sink.onClose());
    s.on('drain', () => sink.onDrain());
    this.resume();
  }

  /** `onread` callback of a userBuffer socket: false stops reading. */
  onRead(n: number, buf: Buffer): boolean {
    this.sink?.onData(buf.subarray(0, n));
    return !this.paused;
  }

  write(bufs: readonly Buffer[], done?: () => void): boolean {
    return writeBuffers(this.socket, bufs, done);
  }

  pause(): void {
    this.paused = true;
    this.socket.pause();
  }

  resume(): void {
    this.paused = false;
    this.socket.resume();
  }

  end(): void {
    this.socket.end(() => this.socket.destroy());
  }

  destroy(): void {
    this.socket.destroy();
  }

  remoteAddress(): string {
    const s = this.socket;
    return s.remoteAddress !== undefined ? `${s.remoteAddress}:${s.remotePort ?? 0}` : 'unix';
  }
}
