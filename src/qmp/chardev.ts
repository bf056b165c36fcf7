/**
 * QSD's socket chardev for QMP monitors: unix/TCP server or client, inherited fd,
 * `wait=on`, WebSocket, one client at a time (QSD) or `multi-client=on` (blockd).
 */
import net from 'node:net';
import http from 'node:http';
import { unlinkSync } from 'node:fs';
import { bindPathFor, publishSocket, unlinkStaleSocket } from '../util/socket-path.js';
import { WebSocketServer, type WebSocket } from 'ws';
import type { Logger } from '../util/logger.js';
import { CliError, strerror } from '../util/errors.js';
import type { QmpPeer } from './monitor.js';

/** Where a socket chardev listens or connects. */
export type ChardevSocketAddress =
  | { type: 'unix'; path: string; abstract?: boolean; tight?: boolean }
  | { type: 'inet'; host: string; port: string; ipv4?: boolean; ipv6?: boolean; to?: number }
  | { type: 'fd'; str: string };

/** A `--chardev socket,...` (the CLI parses QemuOpts text into this). */
export interface ChardevSocketOptions {
  id: string;
  backend?: 'socket';
  addr: ChardevSocketAddress;
  /** Listen (true) or connect out during startup (false, QEMU's default). */
  server: boolean;
  /** Server only: startup waits for the first client. */
  wait: boolean;
  websocket: boolean;
  /** blockd extension: every client gets its own session at once. */
  multiClient: boolean;
  nodelay?: boolean;
  reconnect?: number;
}

/** `--chardev stdio,id=X`. */
export interface ChardevStdioOptions {
  id: string;
  backend: 'stdio';
}

export type ChardevOptions = ChardevSocketOptions | ChardevStdioOptions;

export interface ChardevOpenOptions {
  /** Called before blocking for the first client (`wait=on`) with QEMU's address text. */
  onWaiting?: (address: string) => void;
}

/** Largest WebSocket message accepted (each frame carries part of the JSON stream). */
export const WS_MAX_PAYLOAD = 16 * 1024 * 1024;

/** QEMU's description of the chardev address, as in `disconnected:unix:P,server=on`. */
export function chardevAddressText(o: ChardevSocketOptions): string {
  const a = o.addr;
  const srv = o.server ? ',server=on' : '';
  if (a.type === 'unix') return `disconnected:unix:${a.path}${srv}`;
  if (a.type === 'inet') return `disconnected:tcp:${a.host}:${a.port}${srv}`;
  return `disconnected:fd:${a.str}${srv}`;
}

function socketPeer(sock: net.Socket | NodeJS.ReadWriteStream, description: string, out?: NodeJS.WritableStream): QmpPeer {
  const input = sock;
  const output = (out ?? sock) as NodeJS.WritableStream & { writableNeedDrain?: boolean; destroyed?: boolean };
  let closed = false;
  const closeCbs: Array<() => void> = [];
  const fireClose = (): void => {
    if (closed) return;
    closed = true;
    for (const cb of closeCbs) cb();
  };
  input.on('close', fireClose);
  input.on('end', () => {
    // Half-close from the client: QSD keeps nothing of a gone client either.
    if (sock instanceof net.Socket) sock.end();
    fireClose();
  });
  input.on('error', () => fireClose());
  if (out !== undefined) out.on('error', () => undefined);
  return {
    description,
    write: (text) => (closed ? true : output.write(text)),
    drained: () =>
      closed || output.writableNeedDrain !== true
        ? Promise.resolve()
        : new Promise((resolve) => {
            const done = (): void => {
              output.removeListener('drain', done);
              resolve();
            };
            output.on('drain', done);
            closeCbs.push(done);
          }),
    pause: () => input.pause(),
    resume: () => input.resume(),
    close: () => {
      if (sock instanceof net.Socket) sock.destroy();
      fireClose();
    },
    onData: (cb) => input.on('data', (d: Buffer | string) => cb(typeof d === 'string' ? Buffer.from(d) : d)),
    onClose: (cb) => {
      if (closed) cb();
      else closeCbs.push(cb);
    },
  };
}

function wsPeer(ws: WebSocket, description: string): QmpPeer {
  let closed = false;
  const closeCbs: Array<() => void> = [];
  const fireClose = (): void => {
    if (closed) return;
    closed = true;
    for (const cb of closeCbs) cb();
  };
  ws.on('close', fireClose);
  ws.on('error', fireClose);
  return {
    description,
    write: (text) => {
      if (closed) return true;
      ws.send(text);
      return ws.bufferedAmount < 1024 * 1024;
    },
    drained: async () => {
      while (!closed && ws.bufferedAmount >= 1024 * 1024) {
        await new Promise((r) => setTimeout(r, 5));
      }
    },
    pause: () => ws.pause(),
    resume: () => ws.resume(),
    close: () => {
      ws.terminate();
      fireClose();
    },
    onData: (cb) =>
      ws.on('message', (data: Buffer | ArrayBuffer | Buffer[]) => {
        if (Array.isArray(data)) cb(Buffer.concat(data));
        else cb(Buffer.isBuffer(data) ? data : Buffer.from(data));
      }),
    onClose: (cb) => {
      if (closed) cb();
      else closeCbs.push(cb);
    },
  };
}

/** Receives each client that may start a session now. */
export type PeerHandler = (peer: QmpPeer) => void;

/**
 * A chardev owns its listening socket (or its one connection) and hands clients to the
 * monitor attached to it. Without multi-client, a second client waits (no greeting, not
 * read) until the first one leaves, like QSD.
 */
export class Chardev {
  private server: net.Server | undefined;
  private httpServer: http.Server | undefined;
  private wss: WebSocketServer | undefined;
  private handler: PeerHandler | undefined;
  private readonly waiting: QmpPeer[] = [];
  private readonly live = new Set<QmpPeer>();
  private active: QmpPeer | undefined;
  private createdPath: string | undefined;
  private closed = false;
  /** While held, clients are accepted but not handed to the monitor (start-up gate). */
  private held = false;
  private readonly log: Logger;
  /** Resolves on the first client (used by wait=on). */
  private firstClient: (() => void) | undefined;

  constructor(
    readonly options: ChardevOptions,
    log: Logger,
  ) {
    this.log = log.child({ component: 'chardev', chardev: options.id });
  }

  get id(): string {
    return this.options.id;
  }

  /** The bound TCP port (server, inet), e.g. after asking for port 0. */
  get port(): number | undefined {
    const a = (this.httpServer ?? this.server)?.address();
    return typeof a === 'object' && a !== null ? a.port : undefined;
  }

  /** Listen, connect or wrap stdio. Rejects with a CliError worded like QSD. */
  async open(opts: ChardevOpenOptions = {}): Promise<void> {
    const o = this.options;
    if (o.backend === 'stdio') {
      this.accept(socketPeer(process.stdin, 'stdio', process.stdout));
      return;
    }
    if (!o.server) {
      await this.connectOut(o);
      return;
    }
    await this.listen(o);
    if (o.wait) {
      const first = new Promise<void>((resolve) => {
        this.firstClient = resolve;
      });
      if (this.live.size === 0 && this.waiting.length === 0) {
        opts.onWaiting?.(chardevAddressText(o));
        await first;
      }
    }
  }

  private async connectOut(o: ChardevSocketOptions): Promise<void> {
    const a = o.addr;
    if (a.type === 'fd') {
      const fd = Number(a.str);
      const sock = new net.Socket({ fd, readable: true, writable: true });
      this.accept(socketPeer(sock, `fd:${fd}`));
      return;
    }
    const target = a.type === 'unix' ? a.path : `${a.host}:${a.port}`;
    const sock = await new Promise<net.Socket>((resolve, reject) => {
      const s =
        a.type === 'unix' ? net.connect({ path: a.path }) : net.connect({ host: a.host, port: Number(a.port) });
      s.once('connect', () => {
        s.removeAllListeners('error');
        resolve(s);
      });
      s.once('error', (err) => reject(new CliError(`Failed to connect to '${target}': ${strerror(err)}`, 'CHARDEV')));
    });
    if (o.nodelay === true) sock.setNoDelay(true);
    this.accept(socketPeer(sock, `client:${target}`));
  }

  private async listen(o: ChardevSocketOptions): Promise<void> {
    const a = o.addr;
    const onConn = (sock: net.Socket): void => {
      if (o.nodelay === true) sock.setNoDelay(true);
      sock.on('error', () => undefined);
      this.accept(socketPeer(sock, sock.remoteAddress ?? 'unix'));
    };
    let target: net.Server;
    if (o.websocket) {
      this.httpServer = http.createServer((_req, res) => {
        res.writeHead(426).end();
      });
      this.wss = new WebSocketServer({ server: this.httpServer, maxPayload: WS_MAX_PAYLOAD });
      this.wss.on('connection', (ws, req) => {
        this.accept(wsPeer(ws, `ws:${req.socket.remoteAddress ?? 'unix'}`));
      });
      this.wss.on('error', () => undefined);
      target = this.httpServer;
    } else {
      this.server = net.createServer({ pauseOnConnect: true }, onConn);
      target = this.server;
    }
    target.on('error', (err) => this.log.warn({ err }, 'chardev listener error'));
    const where = a.type === 'unix' ? a.path : a.type === 'inet' ? `${a.host}:${a.port}` : `fd ${a.str}`;
    await new Promise<void>((resolve, reject) => {
      const fail = (err: Error): void =>
        reject(new CliError(`Failed to bind socket to ${where}: ${strerror(err)}`, 'CHARDEV'));
      target.once('error', fail);
      const done = (): void => {
        target.removeListener('error', fail);
        resolve();
      };
      if (a.type === 'unix') {
        unlinkStaleSocket(a.path);
        const bound = bindPathFor(a.path);
        target.listen({ path: bound }, () => {
          try {
            publishSocket(bound, a.path);
          } catch (err) {
            target.close();
            fail(err as Error);
            return;
          }
          this.createdPath = a.path;
          done();
        });
      } else if (a.type === 'inet') {
        target.listen({ host: a.host, port: Number(a.port) }, done);
      } else {
        target.listen({ fd: Number(a.str) }, done);
      }
    });
    this.log.info({ address: where }, 'chardev listening');
  }

  private accept(peer: QmpPeer): void {
    if (this.closed) {
      peer.close();
      return;
    }
    this.live.add(peer);
    peer.onClose(() => {
      this.live.delete(peer);
      const i = this.waiting.indexOf(peer);
      if (i >= 0) this.waiting.splice(i, 1);
      if (this.active === peer) {
        this.active = undefined;
        this.startNext();
      }
    });
    peer.pause();
    this.waiting.push(peer);
    this.firstClient?.();
    this.firstClient = undefined;
    this.startNext();
  }

  private startNext(): void {
    if (this.handler === undefined || this.closed || this.held) return;
    const multi = this.options.backend !== 'stdio' && this.options.multiClient;
    while (this.waiting.length > 0 && (multi || this.active === undefined)) {
      const peer = this.waiting.shift() as QmpPeer;
      if (!multi) this.active = peer;
      this.handler(peer);
      peer.resume();
    }
  }

  /** Attach the consumer of this chardev's clients (the monitor). */
  setHandler(handler: PeerHandler): void {
    this.handler = handler;
    this.startNext();
  }

  /**
   * Keep clients waiting (connected, unread, no greeting) until {@link release}: the daemon
   * holds its monitors while the command line is still being processed, as QSD answers
   * nothing before its main loop runs.
   */
  hold(): void {
    this.held = true;
  }

  /** Hand waiting clients to the monitor from now on. */
  release(): void {
    this.held = false;
    this.startNext();
  }

  /** Remove the unix socket file we created, synchronously (exit paths that cannot wait). */
  unlinkSocketFile(): void {
    if (this.createdPath === undefined) return;
    try {
      unlinkSync(this.createdPath);
    } catch {
      // already gone
    }
    this.createdPath = undefined;
  }

  /** The bound TCP address family (server, inet): 'IPv4' or 'IPv6'. */
  get family(): string | undefined {
    const a = (this.httpServer ?? this.server)?.address();
    return typeof a === 'object' && a !== null ? a.family : undefined;
  }

  /** A client is connected (QOM's `connected`). */
  get connected(): boolean {
    return this.live.size > 0;
  }

  get attached(): boolean {
    return this.handler !== undefined;
  }

  /** Close every client and the listener; remove the unix socket file we created. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const p of [...this.live]) p.close();
    this.wss?.close();
    const srv = this.httpServer ?? this.server;
    if (srv !== undefined) {
      await new Promise<void>((resolve) => srv.close(() => resolve()));
    }
    this.unlinkSocketFile();
  }
}
