/**
 * NBD listener: accepts clients on a Unix socket, TCP host:port or an inherited fd and
 * runs one {@link NbdConnection} per client.
 *
 * `maxConnections` works like QSD's `max-connections`: clients over the limit are
 * not refused, they wait. QEMU stops polling the listening socket so they sit in the
 * kernel backlog; Node cannot stop accepting, so we accept them and park the socket
 * unread (no greeting) until a slot frees. Seen from the client it is the same: the
 * connect succeeds and the greeting arrives when another client leaves.
 */
import net from 'node:net';
import type { Logger } from '../util/logger.js';
import { DaemonError } from '../util/errors.js';
import { bindPathFor, publishSocket, unlinkStaleSocket } from '../util/socket-path.js';
import type { NbdBackend } from './backend.js';
import { NbdConnection } from './connection.js';
import { NativeListener, listenUnixFd, type NativeTransport, type NetIoBinding } from './native-transport.js';
import { SocketTransport, type NbdTransport } from './transport.js';
import { StartTlsTransport, type NbdTlsServerConfig } from './tls.js';

/** Where to listen (QAPI SocketAddress shapes, camelCase). */
export type NbdListenAddress =
  | { type: 'unix'; path: string }
  | { type: 'inet'; host: string; port: number | string }
  | { type: 'fd'; fd: number };

export interface NbdServerOptions {
  backend: NbdBackend;
  log: Logger;
  /** Server-wide client limit; 0 = unlimited. Clients over it are queued, not refused. */
  maxConnections?: number;
  /** Handshake deadline per client, ms; 0 = none. Default 10 s like QSD. */
  handshakeTimeoutMs?: number;
  /** Per-connection in-flight request window (default 64). */
  maxInFlight?: number;
  /** Per-connection in-flight data bytes before reading pauses (default 64 MiB). */
  maxInFlightBytes?: number;
  /**
   * Called with the fd of each accepted unix-socket client (when Node exposes it), e.g. to enlarge
   * its send buffer; errors are ignored.
   */
  tuneUnixSocket?: (fd: number) => void;
  /**
   * The addon's socket layer: when given, clients are served on native sockets (far cheaper per
   * connection than net.Socket); without it, or with BLOCKD_NET=node, on net.Socket.
   */
  netio?: NetIoBinding | undefined;
  /**
   * TLS required of every client (NBD_OPT_STARTTLS, FORCEDTLS mode). Such a server accepts on
   * net.Socket (the TLS layer needs a Node stream): no native sockets, no shared read buffer.
   */
  tls?: NbdTlsServerConfig | undefined;
}

/**
 * Every accepted socket reads into this one buffer (net.Socket `onread`): a read callback parses
 * what arrived and copies out any partial frame before it returns, so the buffer is free again
 * for the next read of any socket. The default path allocates a fresh 64 KiB ArrayBuffer per
 * read, which under large WRITEs makes V8 run a full mark-compact every few dozen MiB.
 */
const READ_BUFFER = Buffer.allocUnsafeSlow(256 * 1024);

/** Where a socket's reads go once its connection exists. */
interface ReadTarget {
  transport: SocketTransport | undefined;
}

/** The parts of Node's listening handle we replace (internal, so checked at run time). */
interface ListenHandle {
  onconnection?: unknown;
}
interface ClientHandle {
  setNoDelay?: (on: boolean) => unknown;
  fd?: number;
}

function ignoreError(): void {
  /* the connection logs socket errors; queued sockets have nobody else to */
}

/** The bound address: `{type:'unix', path}` or `{type:'inet', host, port}` with the real port. */
export type NbdBoundAddress = { type: 'unix'; path: string } | { type: 'inet'; host: string; port: number } | { type: 'fd'; fd: number };

export class NbdServer {
  private readonly log: Logger;
  private server: net.Server | undefined;
  private native: NativeListener | undefined;
  private readonly active = new Set<NbdConnection>();
  private readonly waiting: NbdTransport[] = [];
  /** Clients accepted while the daemon is still starting (see {@link hold}). */
  private readonly held: NbdTransport[] = [];
  private holding = false;
  private nextId = 1;
  private closing = false;
  private unixPath: string | undefined;
  private bound: NbdBoundAddress | undefined;

  private readonly infoOn: boolean;

  constructor(private readonly opts: NbdServerOptions) {
    this.log = opts.log.child({ component: 'nbd' });
    this.infoOn = this.log.isLevelEnabled('info');
  }

  /** Number of clients being served (not counting queued ones). */
  get connectionCount(): number {
    return this.active.size;
  }

  /** Number of clients waiting for a slot. */
  get queuedCount(): number {
    return this.waiting.length;
  }

  get address(): NbdBoundAddress | undefined {
    return this.bound;
  }

  /** Live connections (for the export layer's `query-block-exports`-style reports). */
  connections(): readonly NbdConnection[] {
    return [...this.active];
  }

  /** Start listening. Rejects with a DaemonError (errno from the OS) on failure. */
  async listen(addr: NbdListenAddress): Promise<NbdBoundAddress> {
    if (this.server || this.native) throw new DaemonError('NBD_SERVER_RUNNING', 'NBD server already running');
    const netio = process.env['BLOCKD_NET'] === 'node' || this.opts.tls ? undefined : this.opts.netio;
    if (netio) return this.listenNative(netio, addr);
    return this.listenNode(addr);
  }

  /** On the addon's sockets: unix and fd natively; TCP bound by Node, then taken over. */
  private async listenNative(netio: NetIoBinding, addr: NbdListenAddress): Promise<NbdBoundAddress> {
    const accept = (t: NativeTransport): void => this.onTransport(t);
    if (addr.type === 'unix') {
      unlinkStaleSocket(addr.path); // a stale socket file: QEMU replaces it
      const bound = bindPathFor(addr.path);
      let fd: number;
      try {
        fd = listenUnixFd(netio, bound);
        publishSocket(bound, addr.path);
      } catch (err) {
        throw listenError(err);
      }
      try {
        this.native = new NativeListener(netio, fd, accept);
      } catch (err) {
        unlinkStaleSocket(addr.path);
        throw listenError(err);
      }
      this.unixPath = addr.path;
      this.bound = { type: 'unix', path: addr.path };
    } else if (addr.type === 'fd') {
      try {
        this.native = new NativeListener(netio, addr.fd, accept);
      } catch (err) {
        throw listenError(err);
      }
      this.bound = { type: 'fd', fd: addr.fd };
    } else {
      // Node resolves and binds the address (QEMU's inet forms); its socket is then duplicated
      // and Node's listener closed, so only the native one accepts.
      const bound = await this.listenNode(addr);
      const server = this.server!;
      const fd = (server as unknown as { _handle?: { fd?: number } | null })._handle?.fd;
      if (typeof fd === 'number' && fd >= 0) {
        try {
          const dup = netio.netDup(fd);
          this.native = new NativeListener(netio, dup, accept);
          this.server = undefined;
          // Clients Node accepted before the switch are still served (through 'connection').
          server.close();
        } catch (err) {
          this.log.warn({ err: err instanceof Error ? err.message : String(err) }, 'NBD: native listener failed, using net.Server');
        }
      }
      return bound;
    }
    this.log.info({ address: this.bound }, 'NBD server listening');
    return this.bound;
  }

  private async listenNode(addr: NbdListenAddress): Promise<NbdBoundAddress> {
    const server = net.createServer({ pauseOnConnect: true, noDelay: true }, (s) => this.onSocket(s));
    server.on('error', (err) => this.log.error({ err: err.message }, 'NBD listener error'));
    if (addr.type === 'unix') unlinkStaleSocket(addr.path); // a stale socket file: QEMU replaces it
    const unixBound = addr.type === 'unix' ? bindPathFor(addr.path) : undefined;
    await new Promise<void>((resolve, reject) => {
      const onErr = (err: NodeJS.ErrnoException) => {
        server.off('listening', onOk);
        reject(listenError(err));
      };
      const onOk = () => {
        server.off('error', onErr);
        if (addr.type === 'unix' && unixBound !== undefined) {
          try {
            publishSocket(unixBound, addr.path);
          } catch (err) {
            server.close();
            reject(listenError(err));
            return;
          }
        }
        resolve();
      };
      server.once('error', onErr);
      server.once('listening', onOk);
      if (addr.type === 'unix') server.listen(unixBound ?? addr.path);
      else if (addr.type === 'fd') server.listen({ fd: addr.fd });
      else server.listen(Number(addr.port), addr.host);
    });
    this.server = server;
    if (!this.opts.tls) this.takeOverAccept(server, addr.type === 'unix');
    if (addr.type === 'unix') {
      this.unixPath = addr.path;
      this.bound = { type: 'unix', path: addr.path };
    } else if (addr.type === 'fd') {
      this.bound = { type: 'fd', fd: addr.fd };
    } else {
      const a = server.address() as net.AddressInfo;
      this.bound = { type: 'inet', host: a.address, port: a.port };
    }
    this.log.info({ address: this.bound }, 'NBD server listening');
    return this.bound;
  }

  /**
   * Build the client sockets ourselves, with `onread` (one reused read buffer), instead of
   * letting net.Server build them with a fresh buffer per read. This needs the listening handle's
   * `onconnection` hook, which Node does not document: when it is not there, clients arrive
   * through the ordinary 'connection' event and read as usual.
   */
  private takeOverAccept(server: net.Server, unix: boolean): void {
    const handle = (server as unknown as { _handle?: ListenHandle | null })._handle;
    if (!handle || typeof handle.onconnection !== 'function') return;
    const tune = unix ? this.opts.tuneUnixSocket : undefined;
    handle.onconnection = (err: number, clientHandle: ClientHandle | undefined) => {
      if (err || !clientHandle) {
        this.log.warn({ errno: err }, 'NBD accept failed');
        return;
      }
      if (tune && typeof clientHandle.fd === 'number' && clientHandle.fd >= 0) {
        try {
          tune(clientHandle.fd);
        } catch {
          /* an untuned socket still works */
        }
      }
      const target: ReadTarget = { transport: undefined };
      let s: net.Socket;
      try {
        if (typeof clientHandle.setNoDelay === 'function') clientHandle.setNoDelay(true);
        s = new net.Socket({
          handle: clientHandle,
          allowHalfOpen: false,
          pauseOnCreate: true,
          readable: true,
          writable: true,
          onread: {
            buffer: READ_BUFFER,
            callback: (n: number, buf: Uint8Array) =>
              target.transport ? target.transport.onRead(n, buf as Buffer) : false,
          },
        } as net.SocketConstructorOpts);
      } catch (e) {
        this.log.error({ err: e instanceof Error ? e.message : String(e) }, 'NBD accept failed');
        return;
      }
      const t = new SocketTransport(s, true);
      target.transport = t;
      this.onTransport(t);
    };
  }

  private get limit(): number {
    return this.opts.maxConnections ?? 0;
  }

  /** A client from net.Server's 'connection' event (the fallback path). */
  private onSocket(s: net.Socket): void {
    this.onTransport(this.opts.tls ? new StartTlsTransport(s) : new SocketTransport(s, false));
  }

  private onTransport(t: NbdTransport): void {
    if (this.closing) {
      t.destroy();
      return;
    }
    if (this.holding) {
      park(this.held, t);
      return;
    }
    if (this.limit > 0 && this.active.size >= this.limit) {
      this.log.debug({ queued: this.waiting.length + 1 }, 'NBD connection limit reached, client queued');
      park(this.waiting, t);
      return;
    }
    this.startConnection(t);
  }

  /**
   * Accept clients but leave them unread (no greeting) until {@link release}: the daemon
   * holds the server while the rest of its command line (exports) is still being set up,
   * as QSD does by not running its main loop before then.
   */
  hold(): void {
    this.holding = true;
  }

  /** Serve the clients held so far, in arrival order, and new ones at once. */
  release(): void {
    if (!this.holding) return;
    this.holding = false;
    for (const t of this.held.splice(0)) {
      if (!t.destroyed) this.onTransport(t);
    }
  }

  /** Remove our unix socket file, synchronously (process exit before a clean close). */
  unlinkSocketFile(): void {
    if (this.unixPath !== undefined) unlinkStaleSocket(this.unixPath);
  }

  private startConnection(t: NbdTransport): void {
    const id = this.nextId++;
    // A unix peer has no address; asking the socket for one costs a syscall per connect.
    const clientAddress = this.bound?.type !== 'unix' ? t.remoteAddress() : 'unix';
    const o = this.opts;
    const conn: NbdConnection = new NbdConnection(t, {
      id,
      backend: o.backend,
      log: this.log,
      clientAddress,
      handshakeTimeoutMs: o.handshakeTimeoutMs,
      maxInFlight: o.maxInFlight,
      maxInFlightBytes: o.maxInFlightBytes,
      tls: o.tls,
      onClosed: () => {
        this.active.delete(conn);
        if (this.waiting.length > 0) this.admitWaiting();
      },
    });
    this.active.add(conn);
    if (this.infoOn) this.log.info({ conn: id, client: clientAddress }, 'NBD client connected');
    conn.start();
  }

  private admitWaiting(): void {
    while (!this.closing && this.waiting.length > 0 && (this.limit === 0 || this.active.size < this.limit)) {
      const s = this.waiting.shift()!;
      if (s.destroyed) continue;
      this.startConnection(s);
    }
  }

  /** Change the limit at runtime; raising it admits queued clients. */
  setMaxConnections(n: number): void {
    this.opts.maxConnections = n;
    this.admitWaiting();
  }

  /** Stop listening and drop every client (in-flight requests are abandoned). */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const server = this.server;
    this.server = undefined;
    this.native?.close();
    this.native = undefined;
    for (const s of this.waiting.splice(0)) s.destroy();
    for (const s of this.held.splice(0)) s.destroy();
    const conns = [...this.active];
    for (const c of conns) c.disconnect('NBD server stopping');
    if (server) await new Promise<void>((r) => server.close(() => r()));
    if (this.unixPath) unlinkStaleSocket(this.unixPath);
    await Promise.all(conns.map((c) => c.closed));
    this.log.info('NBD server stopped');
  }
}

/** Queue a client unread; a net.Socket that closes meanwhile leaves the queue. */
function park(queue: NbdTransport[], t: NbdTransport): void {
  queue.push(t);
  const socket = t instanceof SocketTransport ? t.socket : t instanceof StartTlsTransport ? t.plain : undefined;
  if (socket !== undefined) {
    // The connection adds its own error listener once the client is admitted.
    socket.on('error', ignoreError);
    socket.once('close', () => {
      const i = queue.indexOf(t);
      if (i >= 0) queue.splice(i, 1);
    });
  }
}

function listenError(err: unknown): DaemonError {
  const e = err as NodeJS.ErrnoException;
  return new DaemonError('NBD_LISTEN', `Failed to bind socket: ${e.message}`, {
    errno: e.code === 'EADDRINUSE' ? 'EBUSY' : 'EINVAL',
    cause: err,
  });
}
