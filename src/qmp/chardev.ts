/**
 * QSD's chardevs: the backends a QMP monitor (or nothing) sits on. `socket` (unix/TCP server
 * or client, inherited fd, `wait=on`, WebSocket, one client at a time as QSD or
 * `multi-client=on`), `stdio`, `ringbuf`/`memory` (a byte ring read and written by
 * `ringbuf-read`/`-write`), `null`, `file` (output to a file, input from another) and `pipe`
 * (FIFOs `PATH.in`/`PATH.out`, or `PATH` both ways). The rest of QEMU's backends are not
 * built into blockd (docs/chardev.md).
 */
import net from 'node:net';
import http from 'node:http';
import { closeSync, createReadStream, createWriteStream, existsSync, fstatSync, openSync, unlinkSync, constants } from 'node:fs';
import { dirname } from 'node:path';
import { bindPathFor, publishSocket, unlinkStaleSocket } from '../util/socket-path.js';
import { WebSocketServer, type WebSocket } from 'ws';
import type { Logger } from '../util/logger.js';
import { CliError, strerror } from '../util/errors.js';
import type { QmpPeer } from './monitor.js';
import { RingBuffer } from './ringbuf.js';

/** Where a socket chardev listens or connects. */
export type ChardevSocketAddress =
  | { type: 'unix'; path: string; abstract?: boolean; tight?: boolean }
  | { type: 'inet'; host: string; port: string; ipv4?: boolean; ipv6?: boolean; to?: number }
  | { type: 'fd'; str: string };

/** A socket chardev (`--chardev socket,...` or chardev-add `socket`). */
export interface ChardevSocketOptions {
  id: string;
  backend?: 'socket';
  addr: ChardevSocketAddress;
  /** Listen (true) or connect out (false). */
  server: boolean;
  /** Server only: opening waits for the first client. */
  wait: boolean;
  websocket: boolean;
  /** blockd extension: every client gets its own session at once. */
  multiClient: boolean;
  nodelay?: boolean;
  reconnect?: number;
}

/** `stdio`: the process's stdin/stdout (one such chardev at a time, as QEMU). */
export interface ChardevStdioOptions {
  id: string;
  backend: 'stdio';
}

/** `ringbuf` (or its old name `memory`): `size` bytes, a power of two (QEMU's check). */
export interface ChardevRingbufOptions {
  id: string;
  backend: 'ringbuf' | 'memory';
  size: number;
}

/** `null`: output is dropped, there is never input. */
export interface ChardevNullOptions {
  id: string;
  backend: 'null';
}

/** `file`: output to `out` (created; truncated unless `append`), input from `in` if given. */
export interface ChardevFileOptions {
  id: string;
  backend: 'file';
  out: string;
  in?: string;
  append: boolean;
}

/** `pipe`: `device.in` and `device.out`, or else `device` for both (all opened read-write). */
export interface ChardevPipeOptions {
  id: string;
  backend: 'pipe';
  device: string;
}

export type ChardevOptions =
  | ChardevSocketOptions
  | ChardevStdioOptions
  | ChardevRingbufOptions
  | ChardevNullOptions
  | ChardevFileOptions
  | ChardevPipeOptions;

/** The backend name of a chardev's options (`socket` when unsaid). */
export function chardevBackend(o: ChardevOptions): NonNullable<ChardevOptions['backend']> {
  return o.backend ?? 'socket';
}

function isSocket(o: ChardevOptions): o is ChardevSocketOptions {
  return o.backend === undefined || o.backend === 'socket';
}

export interface ChardevOpenOptions {
  /** Called before blocking for the first client (`wait=on`) with QEMU's address text. */
  onWaiting?: (address: string) => void;
}

/** Largest WebSocket message accepted (each frame carries part of the JSON stream). */
export const WS_MAX_PAYLOAD = 16 * 1024 * 1024;

type Output = NodeJS.WritableStream & { writableNeedDrain?: boolean };

/**
 * A peer over byte streams. `input` undefined: nothing ever arrives (file without `in`).
 * `destroy` closes the streams; without it (stdio) close only stops reading.
 */
function streamPeer(
  input: NodeJS.ReadableStream | undefined,
  output: Output,
  description: string,
  destroy: (() => void) | undefined,
): QmpPeer {
  let closed = false;
  const closeCbs: Array<() => void> = [];
  const fireClose = (): void => {
    if (closed) return;
    closed = true;
    for (const cb of closeCbs) cb();
  };
  if (input !== undefined) {
    input.on('close', fireClose);
    input.on('end', () => {
      // Half-close from the client: QSD keeps nothing of a gone client either.
      if (input instanceof net.Socket) input.end();
      fireClose();
    });
    input.on('error', () => fireClose());
  }
  if ((output as unknown) !== input) output.on('error', () => undefined);
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
    pause: () => input?.pause(),
    resume: () => input?.resume(),
    close: () => {
      if (destroy !== undefined) destroy();
      else input?.pause();
      fireClose();
    },
    onData: (cb) => input?.on('data', (d: Buffer | string) => cb(typeof d === 'string' ? Buffer.from(d) : d)),
    onClose: (cb) => {
      if (closed) cb();
      else closeCbs.push(cb);
    },
  };
}

function socketPeer(sock: net.Socket, description: string): QmpPeer {
  return streamPeer(sock, sock, description, () => sock.destroy());
}

/** A peer whose output goes to `sink` and that never sends anything (ringbuf, null). */
function sinkPeer(sink: (data: Buffer) => void, description: string): QmpPeer {
  let closed = false;
  const closeCbs: Array<() => void> = [];
  return {
    description,
    write: (text) => {
      if (!closed) sink(Buffer.from(text));
      return true;
    },
    drained: () => Promise.resolve(),
    pause: () => undefined,
    resume: () => undefined,
    close: () => {
      if (closed) return;
      closed = true;
      for (const cb of closeCbs) cb();
    },
    onData: () => undefined,
    onClose: (cb) => {
      if (closed) cb();
      else closeCbs.push(cb);
    },
  };
}

function openOrFail(path: string, flags: number): number {
  try {
    return openSync(path, flags, 0o666);
  } catch (err) {
    throw new CliError(`Could not open '${path}': ${strerror(err)}`, 'CHARDEV');
  }
}

/** FIFOs and sockets go through libuv's non-blocking pipes; files through fs streams. */
function isStreamFd(fd: number): boolean {
  const st = fstatSync(fd);
  return st.isFIFO() || st.isSocket();
}

/**
 * The streams of a file or pipe chardev over its fds (`inFd === outFd`: one fd both ways).
 * Each stream owns (and closes) its fd, except a reader sharing the writer's fd.
 */
function fdPeer(inFd: number | undefined, outFd: number, description: string): QmpPeer {
  const destroyers: Array<() => void> = [];
  const sockOf = (fd: number, readable: boolean, writable: boolean): net.Socket => {
    const sock = new net.Socket({ fd, readable, writable });
    destroyers.push(() => sock.destroy());
    return sock;
  };
  let input: NodeJS.ReadableStream | undefined;
  let output: Output;
  if (inFd === outFd && isStreamFd(outFd)) {
    const sock = sockOf(outFd, true, true);
    input = sock;
    output = sock;
  } else {
    if (inFd !== undefined) {
      if (isStreamFd(inFd)) {
        input = sockOf(inFd, true, false);
      } else {
        const rs = createReadStream('', { fd: inFd, autoClose: inFd !== outFd });
        destroyers.push(() => rs.destroy());
        input = rs;
      }
    }
    if (inFd !== outFd && isStreamFd(outFd)) {
      output = sockOf(outFd, false, true);
    } else {
      const ws = createWriteStream('', { fd: outFd });
      destroyers.push(() => ws.end());
      output = ws;
    }
  }
  let done = false;
  return streamPeer(input, output, description, () => {
    if (done) return;
    done = true;
    for (const d of destroyers) d();
  });
}

/** The chardev that owns stdin/stdout now (QEMU allows one). */
let stdioOwner: Chardev | undefined;

/** `host:port` as getnameinfo prints it, IPv6 in brackets. */
function hostPort(host: string | undefined, port: number | undefined): string {
  const h = host ?? '';
  return `${h.includes(':') ? `[${h}]` : h}:${port ?? 0}`;
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
  /** QEMU's `filename` while this peer is the connected one (sockets). */
  private readonly peerNames = new Map<QmpPeer, string>();
  private active: QmpPeer | undefined;
  private createdPath: string | undefined;
  private closed = false;
  /** While held, clients are accepted but not handed to the monitor (start-up gate). */
  private held = false;
  private readonly log: Logger;
  /** Resolves on the first client (used by wait=on). */
  private firstClient: (() => void) | undefined;
  /** The byte ring of a ringbuf/memory chardev. */
  private ringBuffer: RingBuffer | undefined;
  /** Client with `reconnect`: the pending retry. */
  private retry: NodeJS.Timeout | undefined;

  constructor(
    readonly options: ChardevOptions,
    log: Logger,
  ) {
    this.log = log.child({ component: 'chardev', chardev: options.id });
  }

  get id(): string {
    return this.options.id;
  }

  /** The backend name, as `query-chardev-backends` lists it. */
  get backend(): NonNullable<ChardevOptions['backend']> {
    return chardevBackend(this.options);
  }

  /** The bound TCP port (server, inet), e.g. after asking for port 0. */
  get port(): number | undefined {
    const a = (this.httpServer ?? this.server)?.address();
    return typeof a === 'object' && a !== null ? a.port : undefined;
  }

  /** The ring of a ringbuf/memory chardev (undefined for other backends). */
  get ring(): RingBuffer | undefined {
    return this.ringBuffer;
  }

  /**
   * `query-chardev`'s filename, as QEMU builds it: the backend name, or for a socket its
   * address, `disconnected:` before a client is there, `,server=on` when listening, and
   * for TCP both ends (`tcp:L:P,server=on <-> R:Q`).
   */
  get filename(): string {
    const o = this.options;
    if (!isSocket(o)) return o.backend;
    const current = this.active ?? this.waiting[0];
    const name = current === undefined ? undefined : this.peerNames.get(current);
    if (name !== undefined) return name;
    const a = o.addr;
    const srv = o.server ? ',server=on' : '';
    if (a.type === 'unix') return `disconnected:unix:${a.path}${srv}`;
    if (a.type === 'inet') {
      const bound = (this.httpServer ?? this.server)?.address();
      if (typeof bound === 'object' && bound !== null) return `disconnected:tcp:${bound.address}:${bound.port}${srv}`;
      return `disconnected:tcp:${a.host}:${a.port}${srv}`;
    }
    return `disconnected:fd:${a.str}${srv}`;
  }

  /** QEMU's filename of a connected socket chardev. */
  private connectedName(sock: net.Socket): string {
    const o = this.options as ChardevSocketOptions;
    const srv = o.server ? ',server=on' : '';
    if (sock.remoteFamily === 'IPv4' || sock.remoteFamily === 'IPv6') {
      const proto = o.websocket ? 'websocket' : 'tcp';
      return `${proto}:${hostPort(sock.localAddress, sock.localPort)}${srv} <-> ${hostPort(sock.remoteAddress, sock.remotePort)}`;
    }
    // A unix client's own end has no name (QEMU prints "unix:").
    return `unix:${o.server && o.addr.type === 'unix' ? o.addr.path : ''}${srv}`;
  }

  /** Open the backend. Rejects with a CliError worded like QSD. */
  async open(opts: ChardevOpenOptions = {}): Promise<void> {
    const o = this.options;
    switch (o.backend) {
      case 'stdio':
        if (stdioOwner !== undefined) {
          throw new CliError('cannot use stdio by multiple character devices', 'CHARDEV');
        }
        stdioOwner = this;
        this.accept(streamPeer(process.stdin, process.stdout, 'stdio', undefined));
        return;
      case 'ringbuf':
      case 'memory': {
        const ring = new RingBuffer(o.size);
        this.ringBuffer = ring;
        this.accept(sinkPeer((d) => ring.write(d), o.backend));
        return;
      }
      case 'null':
        this.accept(sinkPeer(() => undefined, 'null'));
        return;
      case 'file': {
        const flags = constants.O_WRONLY | constants.O_CREAT | (o.append ? constants.O_APPEND : constants.O_TRUNC);
        const out = openOrFail(o.out, flags);
        let inFd: number | undefined;
        if (o.in !== undefined) {
          try {
            inFd = openOrFail(o.in, constants.O_RDONLY);
          } catch (err) {
            closeSync(out);
            throw err;
          }
        }
        this.accept(fdPeer(inFd, out, `file:${o.out}`));
        return;
      }
      case 'pipe': {
        let inFd: number;
        let outFd: number;
        try {
          inFd = openSync(`${o.device}.in`, constants.O_RDWR);
        } catch {
          inFd = -1;
        }
        try {
          outFd = openSync(`${o.device}.out`, constants.O_RDWR);
        } catch {
          outFd = -1;
        }
        if (inFd < 0 || outFd < 0) {
          if (inFd >= 0) closeSync(inFd);
          if (outFd >= 0) closeSync(outFd);
          inFd = outFd = openOrFail(o.device, constants.O_RDWR);
        }
        this.accept(fdPeer(inFd, outFd, `pipe:${o.device}`));
        return;
      }
      default:
        break;
    }
    if (!o.server) {
      if (o.reconnect !== undefined && o.reconnect > 0) {
        // QEMU connects in the background and keeps trying every `reconnect` seconds.
        this.connectInBackground(o);
        return;
      }
      await this.connectOut(o);
      return;
    }
    await this.listen(o);
    if (o.wait) {
      const first = new Promise<void>((resolve) => {
        this.firstClient = resolve;
      });
      if (this.live.size === 0 && this.waiting.length === 0) {
        opts.onWaiting?.(this.filename);
        await first;
      }
    }
  }

  private connectInBackground(o: ChardevSocketOptions): void {
    const attempt = (): void => {
      this.retry = undefined;
      if (this.closed) return;
      this.connectOut(o, () => schedule()).catch((err: unknown) => {
        this.log.info({ err }, 'chardev connection failed, will retry');
        schedule();
      });
    };
    const schedule = (): void => {
      if (this.closed || this.retry !== undefined) return;
      this.retry = setTimeout(attempt, (o.reconnect ?? 1) * 1000);
      this.retry.unref();
    };
    attempt();
  }

  private async connectOut(o: ChardevSocketOptions, onGone?: () => void): Promise<void> {
    const a = o.addr;
    let sock: net.Socket;
    let description: string;
    if (a.type === 'fd') {
      const fd = Number(a.str);
      sock = new net.Socket({ fd, readable: true, writable: true });
      description = `fd:${fd}`;
    } else {
      const target = a.type === 'unix' ? a.path : `${a.host}:${a.port}`;
      sock = await new Promise<net.Socket>((resolve, reject) => {
        const s =
          a.type === 'unix' ? net.connect({ path: a.path }) : net.connect({ host: a.host, port: Number(a.port) });
        s.once('connect', () => {
          s.removeAllListeners('error');
          resolve(s);
        });
        s.once('error', (err) => reject(new CliError(`Failed to connect to '${target}': ${strerror(err)}`, 'CHARDEV')));
      });
      description = `client:${target}`;
    }
    if (o.nodelay === true) sock.setNoDelay(true);
    const peer = socketPeer(sock, description);
    this.peerNames.set(peer, this.connectedName(sock));
    if (onGone !== undefined) peer.onClose(onGone);
    this.accept(peer);
  }

  private async listen(o: ChardevSocketOptions): Promise<void> {
    const a = o.addr;
    const onConn = (sock: net.Socket): void => {
      if (o.nodelay === true) sock.setNoDelay(true);
      sock.on('error', () => undefined);
      const peer = socketPeer(sock, sock.remoteAddress ?? 'unix');
      this.peerNames.set(peer, this.connectedName(sock));
      this.accept(peer);
    };
    let target: net.Server;
    if (o.websocket) {
      this.httpServer = http.createServer((_req, res) => {
        res.writeHead(426).end();
      });
      this.wss = new WebSocketServer({ server: this.httpServer, maxPayload: WS_MAX_PAYLOAD });
      this.wss.on('connection', (ws, req) => {
        const peer = wsPeer(ws, `ws:${req.socket.remoteAddress ?? 'unix'}`);
        this.peerNames.set(peer, this.connectedName(req.socket));
        this.accept(peer);
      });
      this.wss.on('error', () => undefined);
      target = this.httpServer;
    } else {
      this.server = net.createServer({ pauseOnConnect: true }, onConn);
      target = this.server;
    }
    let listening = false;
    target.on('error', (err) => {
      if (listening) this.log.warn({ err }, 'chardev listener error');
    });
    const where = a.type === 'unix' ? a.path : a.type === 'inet' ? `${a.host}:${a.port}` : `fd ${a.str}`;
    await new Promise<void>((resolve, reject) => {
      const fail = (err: Error): void => {
        // libuv reports EACCES for a socket path in a missing directory; QEMU reports ENOENT.
        const missingDir = a.type === 'unix' && !existsSync(dirname(a.path));
        const why = strerror(missingDir ? { code: 'ENOENT' } : err);
        // QEMU's inet listener tries each resolved address and reports the last failure so.
        const text = a.type === 'inet' ? `Failed to find an available port: ${why}` : `Failed to bind socket to ${where}: ${why}`;
        reject(new CliError(text, 'CHARDEV'));
      };
      target.once('error', fail);
      const done = (): void => {
        listening = true;
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
      this.peerNames.delete(peer);
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
    const o = this.options;
    const multi = isSocket(o) && o.multiClient;
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
    if (this.retry !== undefined) clearTimeout(this.retry);
    if (stdioOwner === this) stdioOwner = undefined;
    for (const p of [...this.live]) p.close();
    this.wss?.close();
    const srv = this.httpServer ?? this.server;
    if (srv !== undefined) {
      await new Promise<void>((resolve) => srv.close(() => resolve()));
    }
    this.unlinkSocketFile();
  }
}
