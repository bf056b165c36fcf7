/**
 * The client end of one NBD socket: connect over Unix or TCP, then read exact byte counts
 * during negotiation (`read`) and hand the stream to a frame parser in transmission
 * (`onReadable`). Bytes come from the socket as Buffers we own, so the FrameReader is never
 * volatile here.
 */
import { connect, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import { NbdError, strerror } from '../../util/errors.js';
import { FrameReader } from '../frame-reader.js';

/** Where the server listens (QAPI SocketAddress, the forms the client supports). */
export type NbdServerAddress =
  | { type: 'unix'; path: string }
  | { type: 'inet'; host: string; port: number };

/** `'/path'` or `'host:port'`: how QEMU names an address in connect errors. */
export function addressText(a: NbdServerAddress): string {
  return a.type === 'unix' ? a.path : `${a.host}:${a.port}`;
}

/** A connection failure before any NBD byte was exchanged (the open-timeout retries these). */
export class NbdConnectError extends NbdError {
  constructor(message: string) {
    super('NBD_CONNECT', 'EIO', message, true);
  }
}

/** The socket closed or failed under a request (requests on it may be retried elsewhere). */
export class NbdConnectionLost extends NbdError {
  constructor(message = 'Connection to the NBD server lost') {
    super('NBD_CONNECTION_LOST', 'EIO', message, true);
  }
}

/** The server broke the protocol: the connection is closed. */
export function serverProtocolError(message: string): NbdError {
  return new NbdError('NBD_SERVER_PROTOCOL', 'EPROTO', message, true);
}

/** Node's certificate verification codes, worded as QEMU (GnuTLS) words the same failure. */
const QEMU_CERT_ERRORS: Record<string, string> = {
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: "The certificate hasn't got a known issuer",
  UNABLE_TO_GET_ISSUER_CERT: "The certificate hasn't got a known issuer",
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "The certificate hasn't got a known issuer",
  SELF_SIGNED_CERT_IN_CHAIN: "The certificate hasn't got a known issuer",
  DEPTH_ZERO_SELF_SIGNED_CERT: "The certificate hasn't got a known issuer",
  CERT_HAS_EXPIRED: 'The certificate has expired',
  CERT_NOT_YET_VALID: 'The certificate is not yet activated',
  CERT_REVOKED: 'The certificate has been revoked',
  CERT_SIGNATURE_FAILURE: 'The certificate is not trusted',
};

/** What a failed client handshake reports: QEMU's text for certificate checks, else OpenSSL's reason. */
function tlsFailureText(err: Error): string {
  const e = err as Error & { code?: unknown; host?: unknown };
  if (e.code === 'ERR_TLS_CERT_ALTNAME_INVALID' && typeof e.host === 'string') {
    return `Certificate does not match the hostname ${e.host}`;
  }
  const known = typeof e.code === 'string' ? QEMU_CERT_ERRORS[e.code] : undefined;
  return known ?? `TLS handshake failed: ${tlsReason(err)}`;
}

/** OpenSSL's reason from a Node TLS error, else its message. */
function tlsReason(err: Error): string {
  const m = /:SSL routines:[^:]*:([^:]+):/.exec(err.message);
  return m?.[1] ?? err.message.trim();
}

/** Open a stream socket to `addr`; rejects with QEMU's `Failed to connect to 'X': reason`. */
export function connectSocket(addr: NbdServerAddress): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s =
      addr.type === 'unix' ? connect({ path: addr.path }) : connect({ host: addr.host, port: addr.port });
    const onError = (err: Error): void => {
      s.destroy();
      reject(new NbdConnectError(`Failed to connect to '${addressText(addr)}': ${strerror(err)}`));
    };
    s.once('error', onError);
    s.once('connect', () => {
      s.off('error', onError);
      s.setNoDelay(true);
      resolve(s);
    });
  });
}

/** A byte stream with exact reads (negotiation) and a push parser hook (transmission). */
export class ClientWire {
  readonly reader = new FrameReader();
  private waiter: { n: number; resolve: () => void; reject: (e: Error) => void } | undefined;
  private failure: Error | undefined;
  /** Called after new bytes arrived, once a transmission parser took over. */
  onReadable: (() => void) | undefined;
  /** Called once when the socket is gone (closed by either side or failed). */
  onClose: ((err: Error) => void) | undefined;

  private readonly onData = (chunk: Buffer): void => {
    this.reader.push(chunk);
    const w = this.waiter;
    if (w && this.reader.length >= w.n) {
      this.waiter = undefined;
      w.resolve();
    }
    this.onReadable?.();
  };
  private readonly onError = (err: Error): void =>
    this.fail(new NbdConnectionLost(`Connection to the NBD server lost: ${strerror(err)}`));
  private readonly onSocketClose = (): void => this.fail(new NbdConnectionLost());

  constructor(private socket: Socket) {
    this.listen(socket);
  }

  private listen(s: Socket): void {
    s.on('data', this.onData);
    s.on('error', this.onError);
    s.on('close', this.onSocketClose);
  }

  /**
   * NBD_OPT_STARTTLS was ACKed: run the TLS handshake over the same socket; from then on every
   * byte goes through TLS. Rejects (and closes) when the handshake fails.
   */
  async startTls(options: ConnectionOptions): Promise<void> {
    if (this.failure) throw this.failure;
    if (this.reader.length > 0) throw serverProtocolError('NBD server sent data after its STARTTLS reply');
    const plain = this.socket;
    plain.off('data', this.onData);
    plain.off('error', this.onError);
    plain.off('close', this.onSocketClose);
    plain.on('error', () => undefined); // surfaces again on the TLS socket
    const t = tlsConnect({ ...options, socket: plain });
    this.socket = t;
    await new Promise<void>((resolve, reject) => {
      const failed = (err: Error): void => {
        t.off('secureConnect', ok);
        t.destroy();
        plain.destroy();
        const e = new NbdError('NBD_TLS', 'EIO', tlsFailureText(err), true);
        this.fail(e);
        reject(e);
      };
      const ok = (): void => {
        t.off('error', failed);
        resolve();
      };
      t.once('secureConnect', ok);
      t.once('error', failed);
    });
    this.listen(t);
  }

  get closed(): boolean {
    return this.failure !== undefined;
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.socket.destroy();
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(err);
    this.onClose?.(err);
  }

  /** Read exactly `n` bytes (a Buffer of our own). */
  async read(n: number): Promise<Buffer> {
    if (this.reader.length < n) {
      if (this.failure) throw this.failure;
      await new Promise<void>((resolve, reject) => {
        this.waiter = { n, resolve, reject };
      });
    }
    return Buffer.from(this.reader.take(n));
  }

  write(b: Buffer): void {
    if (!this.failure) this.socket.write(b);
  }

  /** Write several buffers as one segment where possible. */
  writev(parts: readonly Buffer[]): void {
    if (this.failure) return;
    this.socket.cork();
    for (const p of parts) this.socket.write(p);
    this.socket.uncork();
  }

  /** Close after the queued bytes are sent. */
  end(): void {
    if (!this.failure) this.socket.end();
  }

  /** Close now, failing whatever waits with `err`. */
  destroy(err: Error): void {
    this.fail(err);
  }
}
