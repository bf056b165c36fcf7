/**
 * NBD over TLS, server side (NBD spec: TLS support, FORCEDTLS mode). A TLS-configured server
 * serves its clients on a {@link StartTlsTransport}: a net.Socket transport that, after the
 * handshake has ACKed NBD_OPT_STARTTLS, is upgraded in place to a `tls.TLSSocket` over the
 * same socket. The connection keeps talking to the same transport object; it only sees
 * decrypted bytes again once the TLS handshake succeeded and the peer was authorized.
 *
 * The credentials arrive as plain Node TLS server options (built by the export layer from the
 * `tls-creds-*` objects); this module never reads credential files. Servers without TLS never
 * build one of these: their fast paths (native sockets, shared read buffer) are untouched.
 */
import net from 'node:net';
import tls from 'node:tls';
import { writeBuffers, type NbdTransport, type TransportSink } from './transport.js';

/** Who the peer proved to be during the TLS handshake. */
export interface NbdTlsPeer {
  /**
   * Subject of the client's x509 certificate in QEMU's format (GnuTLS `gnutls_x509_crt_get_dn`:
   * the RDNs in certificate order, comma separated, e.g. `C=GB,O=Example,CN=client`).
   */
  dname?: string;
  /** The PSK identity (username) the client used. */
  pskIdentity?: string;
}

/** TLS settings of an NBD server; every connection builds its TLS state from them. */
export interface NbdTlsServerConfig {
  /**
   * Options of the Node TLS server each upgrade runs with: certificates, `requestCert` /
   * `rejectUnauthorized`, versions, ciphers. Not modified; `pskCallback` is set from
   * {@link pskKey}.
   */
  serverOptions: tls.TlsOptions;
  /** PSK credentials: the key for a client's identity, or undefined to fail its handshake. */
  pskKey?: (identity: string) => Buffer | undefined;
  /** Decide on a peer after a successful handshake: why it is refused, or undefined. */
  authorize?: (peer: NbdTlsPeer) => string | undefined;
}

/**
 * GnuTLS's distinguished name text from Node's (`C=GB\nO=Example\nCN=client`, the same RDN
 * order). Node escapes special characters RFC 2253 style, as GnuTLS does.
 */
export function gnutlsDname(nodeSubject: string): string {
  return nodeSubject.split('\n').filter((l) => l.length > 0).join(',');
}

/** OpenSSL's reason from a Node TLS error (`...:SSL routines:func:wrong version number:...`). */
export function tlsErrorText(err: Error): string {
  const m = /:SSL routines:[^:]*:([^:]+):/.exec(err.message);
  return m?.[1] ?? err.message.trim();
}

/** How an upgrade ends: undefined on success, else why the connection must close. */
export type StartTlsResult =
  | { ok: true; peer: NbdTlsPeer; protocol: string; cipher: string }   | { ok: false; reason: string; handshake: boolean };

/**
 * A net.Socket transport that can switch to TLS once. Before the switch it behaves like
 * SocketTransport (without the shared read buffer); after it, every read and write goes
 * through the TLSSocket.
 */
export class StartTlsTransport implements NbdTransport {
  readonly volatileReads = false;
  private stream: net.Socket;
  private sink: TransportSink | undefined;
  /** The connection asked for no input (flow control). */
  private paused = true;
  /** Input held back until the TLS handshake and the authorization are done. */
  private gated = false;
  private upgraded = false;

  private readonly onDataL = (chunk: Buffer): void => this.sink?.onData(chunk);
  private readonly onErrorL = (err: Error): void => this.sink?.onError(err.message);
  private readonly onCloseL = (): void => this.reportClose();
  private closeReported = false;
  private readonly onDrainL = (): void => this.sink?.onDrain();

  constructor(readonly plain: net.Socket) {
    this.stream = plain;
  }

  get destroyed(): boolean {
    return this.stream.destroyed;
  }

  get pendingBytes(): number {
    return this.stream.writableLength;
  }

  attach(sink: TransportSink): void {
    this.sink = sink;
    this.listen(this.stream);
    this.resume();
  }

  /** TransportSink.onClose, once: the plain socket, the TLS socket or a failed upgrade report it. */
  private reportClose(): void {
    if (this.closeReported) return;
    this.closeReported = true;
    this.sink?.onClose();
  }

  private listen(s: net.Socket): void {
    s.on('data', this.onDataL);
    s.on('error', this.onErrorL);
    s.on('close', this.onCloseL);
    s.on('drain', this.onDrainL);
  }

  private unlisten(s: net.Socket): void {
    s.off('data', this.onDataL);
    s.off('error', this.onErrorL);
    s.off('close', this.onCloseL);
    s.off('drain', this.onDrainL);
  }

  /**
   * Start the TLS handshake on the socket (the STARTTLS ACK has been written to it). `done`
   * runs once: after the handshake and `authorize` accepted the peer (input flows again), or
   * with the reason the connection must close (the transport is then destroyed; onClose
   * follows). Bytes the client sent before the handshake (it must wait for the ACK) are an
   * error: they cannot be handed to the TLS layer.
   */
  startTls(cfg: NbdTlsServerConfig, done: (r: StartTlsResult) => void): void {
    if (this.upgraded) throw new Error('TLS already started');
    this.upgraded = true;
    this.gated = true;
    const plain = this.plain;
    if (plain.readableLength > 0) {
      done({ ok: false, reason: 'client sent data before the TLS handshake', handshake: true });
      plain.destroy();
      return;
    }
    // Until the handshake is over, the TLS socket is Node's alone; a failure closes everything
    // and is reported here.
    this.unlisten(plain);
    // Errors of the raw socket surface (again) on the TLS socket.
    plain.on('error', () => {});
    let pskIdentity: string | undefined;
    const opts: tls.TlsOptions = { ...cfg.serverOptions };
    const pskKey = cfg.pskKey;
    if (pskKey !== undefined) {
      opts.pskCallback = (_s: tls.TLSSocket, identity: string): Buffer | null => {
        pskIdentity = identity;
        return pskKey(identity) ?? null;
      };
    }
    // A tls.Server that never listens: handing it the socket through 'connection' is Node's
    // way to run a server handshake with client-certificate verification (`authorized`,
    // `rejectUnauthorized`), which a bare server-side TLSSocket does not do.
    const server = tls.createServer(opts);
    let settled = false;
    const finish = (r: StartTlsResult, ts: tls.TLSSocket): void => {
      if (settled) return;
      settled = true;
      server.removeAllListeners();
      done(r);
      if (!r.ok) {
        ts.destroy();
        plain.destroy();
        process.nextTick(() => this.reportClose());
      }
    };
    server.on('tlsClientError', (err: Error, ts: tls.TLSSocket) => {
      // A certificate that does not verify: Node closes the socket, the error says "hang up".
      const rejected = ts.authorizationError as unknown;
      const why = rejected ? `client certificate rejected: ${String(rejected)}` : tlsErrorText(err);
      finish({ ok: false, reason: `TLS handshake failed: ${why}`, handshake: true }, ts);
    });
    server.on('secureConnection', (ts: tls.TLSSocket) => this.onSecure(ts, cfg, pskIdentity, finish));
    // Node wraps the socket at once; with no 'data' listener the TLS socket reads only what
    // the handshake needs (and buffers a little application data) until the peer is accepted.
    server.emit('connection', plain);
  }

  private onSecure(
    ts: tls.TLSSocket,
    cfg: NbdTlsServerConfig,
    pskIdentity: string | undefined,
    finish: (r: StartTlsResult, ts: tls.TLSSocket) => void,
  ): void {
    const peer: NbdTlsPeer = {};
    const cert = ts.getPeerX509Certificate();
    if (cert !== undefined) peer.dname = gnutlsDname(cert.subject);
    if (pskIdentity !== undefined) peer.pskIdentity = pskIdentity;
    const o = cfg.serverOptions;
    if (o.requestCert === true && o.rejectUnauthorized !== false && !ts.authorized) {
      // Node destroys such a socket itself (no 'secureConnection'); kept as a safety net.
      const why = String((ts.authorizationError as unknown) ?? 'certificate not verified');
      finish({ ok: false, reason: `TLS handshake failed: ${why}`, handshake: true }, ts);
      return;
    }
    const refused = cfg.authorize?.(peer);
    if (refused !== undefined) {
      finish({ ok: false, reason: refused, handshake: false }, ts);
      return;
    }
    this.stream = ts;
    this.gated = false;
    this.listen(ts);
    if (this.paused) ts.pause();
    finish({ ok: true, peer, protocol: ts.getProtocol() ?? '?', cipher: ts.getCipher().name }, ts);
  }

  write(bufs: readonly Buffer[], done?: () => void): boolean {
    return writeBuffers(this.stream, bufs, done);
  }

  pause(): void {
    this.paused = true;
    this.stream.pause();
  }

  resume(): void {
    this.paused = false;
    if (!this.gated) this.stream.resume();
  }

  end(): void {
    const s = this.stream;
    s.end(() => s.destroy());
  }

  destroy(): void {
    this.stream.destroy();
    if (this.stream !== this.plain) this.plain.destroy();
  }

  remoteAddress(): string {
    const s = this.plain;
    return s.remoteAddress !== undefined ? `${s.remoteAddress}:${s.remotePort ?? 0}` : 'unix';
  }
}
