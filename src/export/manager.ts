/**
 * The export registry: owns the NBD server and every block export, implements the NBD
 * engine's `NbdBackend` on top of them, and carries QSD's rules for adding and removing
 * exports (ids, names, permissions, safe/hard removal, BLOCK_EXPORT_DELETED).
 */
import type { Logger } from '../util/logger.js';
import type { EventBus } from '../util/events.js';
import { DaemonError, QmpError } from '../util/errors.js';
import type { BlockGraph } from '../block/graph.js';
import type { BlockNode, BlockUser } from '../block/types.js';
import { CHECK_ALLOW_RO, bitmapsOf, findInChain, type NamedBitmap } from '../block/dirty-bitmap-set.js';
import type { NbdBackend, NbdExportHandle, NbdExportSummary } from '../nbd/backend.js';
import { NbdServer, type NbdBoundAddress, type NbdListenAddress } from '../nbd/server.js';
import { strerror } from '../util/errors.js';
import { existsSync } from 'node:fs';
import { dirname } from 'node:path';
import {
  NbdExport,
  type IoErrorEvent,
  type IoStatus,
  type MultiConnMode,
  type OnErrorPolicy,
} from './nbd-export.js';
import { EventThrottle } from '../util/event-throttle.js';
import { nativeAddon, nativeOps } from '../block/native.js';
import { netIoBindingFrom } from '../nbd/native-transport.js';
import { drainThrottleNodes } from '../block/drivers/throttle.js';
import type { NbdTlsServerConfig } from '../nbd/tls.js';
import { nbdServerTls, type TlsCredsMaterial } from './nbd-tls.js';

/** QSD 7.2.22 (Debian) and upstream >= 9.1 default. */
export const DEFAULT_MAX_CONNECTIONS = 100;
/** NBD_MAX_STRING_SIZE. */
const MAX_STRING = 4096;

export interface NbdServerStartOptions {
  addr: NbdListenAddress;
  maxConnections?: number;
  handshakeMaxSeconds?: number;
  tlsCreds?: string;
  tlsAuthz?: string;
}

export interface ExportAddOptions {
  type: string;
  id: string;
  nodeName: string;
  writable?: boolean;
  writethrough?: boolean;
  /** nbd */
  name?: string;
  description?: string;
  allocationDepth?: boolean;
  bitmaps?: ReadonlyArray<string | { node: string; name: string }>;
  maxConnections?: number;
  multiConn?: MultiConnMode;
  /** Error policies (blockd extension); giving either enables BLOCK_IO_ERROR and io-status. */
  werror?: OnErrorPolicy;
  rerror?: OnErrorPolicy;
}

/** What query-block-exports reports for one export. */
export interface ExportInfo {
  id: string;
  type: 'nbd';
  'node-name': string;
  'shutting-down': boolean;
  name: string;
  writable: boolean;
  'multi-conn': boolean;
  'max-connections': number;
  connections: number;
  werror: OnErrorPolicy;
  rerror: OnErrorPolicy;
  'io-status': IoStatus;
  statistics: {
    'rd-operations': number;
    'rd-bytes': number;
    'wr-operations': number;
    'wr-bytes': number;
    'zero-operations': number;
    'trim-operations': number;
    'flush-requested': number;
    'flush-performed': number;
    'connections-total': number;
    'failed-operations': number;
  };
}

/** Well-formed ids: a letter, then letters, digits, '-', '.', '_' (QEMU id_wellformed). */
export function idWellFormed(id: string): boolean {
  return /^[A-Za-z][A-Za-z0-9._-]*$/.test(id);
}

/**
 * What the object `id` named by `tls-creds` is. Answered by the object registry (qmp/objects.ts),
 * wired in by Services, so that this layer does not import qmp/.
 */
export type TlsCredsResolver = (
  id: string,
) =>
  | { kind: 'missing' }
  | { kind: 'not-tls-creds' }
  | { kind: 'tls-creds'; endpoint: 'client' | 'server'; material: TlsCredsMaterial };

/**
 * `tls-authz`: may authz object `id` let `identity` in? undefined = yes, `'denied'` = no, else
 * why the check failed (object missing or not an authz object). Answered by qmp/objects.ts.
 */
export type AuthzResolver = (id: string, identity: string) => string | undefined;

export class ExportManager implements NbdBackend {
  /** Resolves `tls-creds` ids; without it every id is unknown. */
  tlsCredsLookup: TlsCredsResolver | undefined;
  /** Checks `tls-authz` identities; without it every authz id is unknown. */
  authzLookup: AuthzResolver | undefined;
  private server: NbdServer | undefined;
  private serverMax = DEFAULT_MAX_CONNECTIONS;
  private bound: NbdBoundAddress | undefined;
  /** Every export by id, in creation order (query lists newest first, like QSD). */
  private readonly exports = new Map<string, NbdExport>();
  /** Per export id: users that keep the nodes of its exported bitmaps alive. */
  private readonly bitmapHolders = new Map<string, BlockUser[]>();
  /** Start-up gate: NBD clients wait unread until {@link releaseClients}. */
  private holding = false;
  /**
   * BLOCK_IO_ERROR rate limit per export (QEMU limits it per device to one a second since 9.2;
   * action stop, exempt in later releases, is never delayed).
   */
  private readonly ioErrorThrottle = new EventThrottle<IoErrorEvent>((ev) => this.emitIoError(ev));

  readonly log: Logger;

  /** `baseLog` carries no `component`: this manager logs as `export`, its NBD server as `nbd`. */
  constructor(
    readonly graph: BlockGraph,
    readonly events: EventBus,
    private readonly baseLog: Logger,
  ) {
    this.log = baseLog.child({ component: 'export' });
  }

  /**
   * Hold NBD clients (accepted, not greeted) until {@link releaseClients}: while the command
   * line is processed, a client must not see a server whose exports are not all added yet.
   */
  holdClients(): void {
    this.holding = true;
    this.server?.hold();
  }

  releaseClients(): void {
    this.holding = false;
    this.server?.release();
  }

  /** Remove the NBD server's unix socket file, synchronously (process exit). */
  unlinkSocketFile(): void {
    this.server?.unlinkSocketFile();
  }

  get serverRunning(): boolean {
    return this.server !== undefined;
  }

  /** NBD clients connected to the server now, negotiating ones included. */
  get serverClientCount(): number {
    return this.server?.connectionCount ?? 0;
  }

  /** Where the NBD server listens (with the real port for port 0), if it runs. */
  get serverAddress(): NbdBoundAddress | undefined {
    return this.server ? this.bound : undefined;
  }

  // ------------------------------------------------------------------ NbdBackend

  listExports(): readonly NbdExportSummary[] {
    const out: NbdExportSummary[] = [];
    for (const e of this.exports.values()) {
      if (e.shuttingDown) continue;
      out.push(e.description === undefined ? { name: e.name } : { name: e.name, description: e.description });
    }
    return out;
  }

  openExport(name: string): NbdExportHandle | DaemonError {
    for (const e of this.exports.values()) {
      if (e.name !== name) continue;
      if (e.shuttingDown) {
        return new DaemonError('EXPORT_SHUTDOWN', `export '${name}' is being removed`, { errno: 'ESHUTDOWN' });
      }
      return e;
    }
    return new DaemonError('EXPORT_NOT_FOUND', `export '${name}' not present`, { errno: 'ENOENT' });
  }

  // ------------------------------------------------------------------ server

  async startServer(opts: NbdServerStartOptions): Promise<void> {
    if (this.server) throw new QmpError('NBD server already running');
    const maxConnections = opts.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
    // QSD resolves the credentials after binding, so a bind error wins: keep the outcome.
    const tls = opts.tlsCreds === undefined ? undefined : this.serverTls(opts.tlsCreds, opts.tlsAuthz);
    const tlsConfig = tls instanceof QmpError ? undefined : tls;
    const server = new NbdServer({
      backend: this,
      maxConnections,
      handshakeTimeoutMs: (opts.handshakeMaxSeconds ?? 10) * 1000,
      log: this.baseLog,
      // A 4 MiB send buffer holds a batch of large READ replies at once (the default ~208 KiB
      // splits every 256 KiB reply over several writability wake-ups).
      tuneUnixSocket: (fd) => nativeOps().setSendBuffer?.(fd, 4 * 1024 * 1024),
      // TLS runs on Node streams; the native socket layer serves plaintext servers only.
      netio: tlsConfig === undefined ? netIoBindingFrom(nativeAddon()) : undefined,
      tls: tlsConfig,
    });
    if (this.holding) server.hold();
    try {
      this.bound = await server.listen(opts.addr);
    } catch (err) {
      throw new QmpError(bindErrorText(opts.addr, err));
    }
    if (tls instanceof QmpError) {
      this.bound = undefined;
      await server.close();
      throw tls;
    }
    this.server = server;
    this.serverMax = maxConnections;
    this.log.info({ addr: opts.addr, maxConnections, tls: opts.tlsCreds !== undefined }, 'NBD server started');
  }

  /**
   * The server's TLS settings from `tls-creds` (and `tls-authz`), or QSD's error. The
   * credentials are taken now: a later object-del does not affect the running server (QEMU
   * holds a reference); the authz object is looked up per client, as QEMU does.
   */
  private serverTls(id: string, authzId: string | undefined): NbdTlsServerConfig | QmpError {
    const c = this.tlsCredsLookup?.(id) ?? { kind: 'missing' as const };
    if (c.kind === 'missing') return new QmpError(`No TLS credentials with id '${id}'`);
    if (c.kind === 'not-tls-creds') return new QmpError(`Object with id '${id}' is not TLS credentials`);
    if (c.endpoint !== 'server') return new QmpError('Expected TLS credentials for a server endpoint');
    const check =
      authzId === undefined
        ? undefined
        : (identity: string) =>
            this.authzLookup ? this.authzLookup(authzId, identity) : `Cannot find QAuthZ object ID ${authzId}`;
    return nbdServerTls(c.material, check);
  }

  /** nbd-server-stop: hard-delete every NBD export (events before the reply), close the listener. */
  async stopServer(): Promise<void> {
    const server = this.server;
    if (!server) throw new QmpError('NBD server not running');
    await this.deleteAll();
    this.server = undefined;
    this.bound = undefined;
    await server.close();
    this.log.info('NBD server stopped');
  }

  /** Shutdown: every export deleted (one event each), then the server closed. */
  async closeAll(): Promise<void> {
    await this.deleteAll();
    this.ioErrorThrottle.close();
    const server = this.server;
    this.server = undefined;
    if (server) await server.close();
  }

  private async deleteAll(): Promise<void> {
    // Oldest first, as QSD (quit, signals, nbd-server-stop: BLOCK_EXPORT_DELETED in that order).
    const all = [...this.exports.values()];
    await Promise.all(all.map((e) => this.removeNow(e, 'server shutting down')));
  }

  // ------------------------------------------------------------------ exports

  addExport(o: ExportAddOptions): void {
    if (o.type !== 'nbd') {
      throw new QmpError(`Export type '${o.type}' is not supported by blockd`);
    }
    if (!idWellFormed(o.id)) throw new QmpError('Invalid block export id');
    if (this.exports.has(o.id)) throw new QmpError(`Block export id '${o.id}' is already in use`);
    const node = this.graph.get(o.nodeName);
    if (!node) throw new QmpError(`Cannot find device='' nor node-name='${o.nodeName}'`);
    const writable = o.writable ?? false;
    if (writable && node.readOnly) throw new QmpError('Cannot export read-only node as writable');
    if (!this.server) throw new QmpError('NBD server not running');
    const name = o.name ?? o.nodeName;
    if (Buffer.byteLength(name) > MAX_STRING) throw new QmpError(`export name '${name}' too long`);
    if (o.description !== undefined && Buffer.byteLength(o.description) > MAX_STRING) {
      throw new QmpError(`description '${o.description}' too long`);
    }
    for (const e of this.exports.values()) {
      if (e.name === name) throw new QmpError(`NBD server already has export named '${name}'`);
    }
    const holders: BlockNode[] = [];
    const bitmaps = this.resolveBitmaps(node, o.bitmaps ?? [], writable, holders);
    const user: BlockUser = node.attach({
      name: 'an unnamed block device',
      role: 'root',
      kind: 'backend',
      perm: { consistentRead: true, write: writable },
      shared: { consistentRead: true, write: true, writeUnchanged: true, resize: false },
    });
    const exp = new NbdExport(
      {
        id: o.id,
        name,
        ...(o.description === undefined ? {} : { description: o.description }),
        writable,
        writethrough: o.writethrough ?? false,
        allocationDepth: o.allocationDepth ?? false,
        maxConnections: o.maxConnections ?? 0,
        multiConn: o.multiConn ?? 'auto',
        bitmaps,
        ...(o.werror === undefined && o.rerror === undefined
          ? {}
          : { onError: { werror: o.werror ?? 'report', rerror: o.rerror ?? 'report' } }),
        reportIoError: (ev) => {
          if (ev.action === 'stop') this.emitIoError(ev);
          else this.ioErrorThrottle.push(ev.device, ev);
        },
      },
      user,
      () => this.serverMax,
      this.log,
    );
    // Busy only once the export exists: a refused export leaves its bitmaps as they were.
    for (const b of bitmaps) b.setBusy(true);
    // Nodes holding exported bitmaps stay until the export is gone (QSD 7.2 aborts on that
    // blockdev-del; blockd answers `Node X is in use`). The user takes no permissions.
    const held = holders
      .filter((h, i) => h !== node && holders.indexOf(h) === i)
      .map((h) =>
        h.attach({
          name: 'an unnamed block device',
          role: 'root',
          kind: 'backend',
          perm: {},
          shared: { consistentRead: true, write: true, writeUnchanged: true, resize: true },
        }),
      );
    if (held.length) this.bitmapHolders.set(o.id, held);
    this.exports.set(o.id, exp);
    this.log.info({ export: o.id, name, node: o.nodeName, writable }, 'export added');
  }

  private emitIoError(ev: IoErrorEvent): void {
    this.events.emit('BLOCK_IO_ERROR', { ...ev });
  }

  /**
   * x-block-export-resume: let an export stopped by its error policy go on (its held requests
   * are retried) and reset its io-status. A no-op for an export that is not stopped.
   */
  resumeExport(id: string): void {
    const exp = this.exports.get(id);
    if (!exp || exp.shuttingDown) throw new QmpError(`Export '${id}' is not found`);
    exp.resume();
  }

  /** `cont`: {@link resumeExport} for every export, oldest first. */
  resumeAll(): void {
    for (const e of this.exports.values()) if (!e.shuttingDown) e.resume();
  }

  /**
   * block-export-del. safe: refused while clients are connected. hard: clients are cut off;
   * the reply goes first and BLOCK_EXPORT_DELETED follows once they are gone (QSD).
   */
  async deleteExport(id: string, mode: 'safe' | 'hard' = 'safe'): Promise<void> {
    const exp = this.exports.get(id);
    if (!exp || exp.shuttingDown) throw new QmpError(`Export '${id}' is not found`);
    if (exp.connectionCount > 0) {
      if (mode === 'safe') throw new QmpError(`export '${id}' still in use`);
      exp.shuttingDown = true;
      void this.removeNow(exp, 'export deleted');
      return;
    }
    await this.removeNow(exp, 'export deleted');
  }

  private async removeNow(exp: NbdExport, reason: string): Promise<void> {
    exp.shuttingDown = true;
    // Held requests fail now (their clients are cut off next), and a rate-limited
    // BLOCK_IO_ERROR still pending goes out before BLOCK_EXPORT_DELETED.
    exp.failHeld('the export is being removed');
    this.ioErrorThrottle.flush(exp.id);
    // QEMU drains the export's node: requests waiting in a throttle filter below go now, so that
    // the clients' connections can close without waiting for the limits.
    const undrain = drainThrottleNodes(exp.user.node);
    try {
      await exp.disconnectAll(reason);
    } finally {
      undrain();
    }
    if (this.exports.get(exp.id) !== exp) return;
    exp.user.detach();
    for (const b of exp.opts.bitmaps ?? []) b.setBusy(false);
    for (const u of this.bitmapHolders.get(exp.id) ?? []) u.detach();
    this.bitmapHolders.delete(exp.id);
    this.exports.delete(exp.id);
    this.log.info({ export: exp.id }, 'export deleted');
    this.events.emit('BLOCK_EXPORT_DELETED', { id: exp.id });
  }

  /**
   * The bitmaps an NBD export offers as `qemu:dirty-bitmap:NAME` (QSD 7.2 rules, qmp.md §4.3):
   * a plain name is searched on the node and down its backing/filter chain, `{node, name}` names
   * any node. A busy or inconsistent bitmap is refused. A read-only export refuses an enabled
   * bitmap found by plain name on a writable node (7.2 does not apply this to `{node, name}`).
   */
  private resolveBitmaps(
    node: BlockNode,
    specs: ReadonlyArray<string | { node: string; name: string }>,
    writable: boolean,
    holders: BlockNode[],
  ): NamedBitmap[] {
    const out: NamedBitmap[] = [];
    for (const spec of specs) {
      let bm: NamedBitmap;
      if (typeof spec === 'string') {
        const found = findInChain(node, spec);
        if (!found) throw new QmpError(`Bitmap '${spec}' is not found`);
        bm = found.bitmap;
        holders.push(found.node);
        bm.check(CHECK_ALLOW_RO);
        if (!writable && !found.node.readOnly && bm.recording) {
          throw new QmpError(`Enabled bitmap '${spec}' incompatible with readonly export`);
        }
      } else {
        const holder = this.graph.get(spec.node);
        if (!holder) throw new QmpError(`Node '${spec.node}' not found`);
        bm = bitmapsOf(holder).find(spec.name);
        holders.push(holder);
        bm.check(CHECK_ALLOW_RO);
      }
      out.push(bm);
    }
    return out;
  }

  query(): ExportInfo[] {
    return [...this.exports.values()].reverse().map((e) => ({
      id: e.id,
      type: 'nbd' as const,
      'node-name': e.nodeName,
      'shutting-down': e.shuttingDown,
      name: e.name,
      writable: !e.readOnly,
      'multi-conn': e.multiConn,
      'max-connections': e.opts.maxConnections,
      connections: e.connectionCount,
      werror: shownPolicy(e.opts.onError?.werror),
      rerror: shownPolicy(e.opts.onError?.rerror),
      'io-status': e.ioStatus,
      statistics: {
        'rd-operations': e.counters.readOps,
        'rd-bytes': e.counters.readBytes,
        'wr-operations': e.counters.writeOps,
        'wr-bytes': e.counters.writeBytes,
        'zero-operations': e.counters.zeroOps,
        'trim-operations': e.counters.trimOps,
        'flush-requested': e.counters.flushesRequested,
        'flush-performed': e.counters.flushesPerformed,
        'connections-total': e.counters.connectionsTotal,
        'failed-operations': e.counters.failedOps,
      },
    }));
  }
}

/** The policy query-block-exports shows: `auto` and "none given" act as `report`. */
function shownPolicy(p: OnErrorPolicy | undefined): OnErrorPolicy {
  return p === undefined || p === 'auto' ? 'report' : p;
}

/** QEMU's wording for a listen failure. */
function bindErrorText(addr: NbdListenAddress, err: unknown): string {
  const cause = (err as { cause?: unknown }).cause ?? err;
  if (addr.type === 'unix') {
    // libuv reports EACCES for a socket path in a missing directory; QEMU reports ENOENT.
    const why = existsSync(dirname(addr.path)) ? strerror(cause) : strerror({ code: 'ENOENT' });
    return `Failed to bind socket to ${addr.path}: ${why}`;
  }
  if (addr.type === 'inet') return `Failed to bind socket: ${strerror(cause)}`;
  return `Failed to use socket fd ${addr.fd}: ${strerror(cause)}`;
}
