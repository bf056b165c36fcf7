/**
 * Chardevs and the monitors attached to them (`--chardev` + `--monitor`), and the chardev
 * registry the `chardev-*`, `query-chardev*` and `ringbuf-*` commands work on (the
 * manager registers itself as `services.chardevs` when it is built).
 */
import type { Logger } from '../util/logger.js';
import { CliError, DaemonError } from '../util/errors.js';
import type { Services } from './services.js';
import type { Dispatcher } from './dispatcher.js';
import { Chardev, type ChardevOptions, type ChardevOpenOptions } from './chardev.js';
import { MonitorSession, type MonitorOptions } from './monitor.js';
import type { QomChardev } from './qom.js';

export class MonitorManager {
  private readonly chardevs = new Map<string, Chardev>();
  private readonly sessions = new Set<MonitorSession>();
  private readonly log: Logger;
  /** Start-up gate: while set, every chardev keeps its clients waiting (see {@link hold}). */
  private holding = false;

  constructor(
    private readonly services: Services,
    private readonly dispatcher: Dispatcher,
    log: Logger,
  ) {
    this.log = log.child({ component: 'monitors' });
    services.chardevs = this;
  }

  /** Refuse `stdio` chardevs (set under --daemonize, as QSD: no stdio left to use). */
  daemonized = false;

  /**
   * Create and open a chardev. A taken id is chardev-add's error; the others are CliErrors
   * worded like QSD (chardev-add prefixes them with `Failed to add chardev 'ID': `).
   */
  async addChardev(options: ChardevOptions, open: ChardevOpenOptions = {}): Promise<Chardev> {
    if (this.chardevs.has(options.id)) {
      throw new DaemonError('CHARDEV_EXISTS', `Chardev with id '${options.id}' already exists`);
    }
    if (options.backend === 'stdio' && this.daemonized) {
      throw new CliError('cannot use stdio with -daemonize', 'CHARDEV');
    }
    const c = new Chardev(options, this.log);
    if (this.holding) c.hold();
    this.chardevs.set(options.id, c);
    try {
      await c.open(open);
    } catch (err) {
      this.chardevs.delete(options.id);
      await c.close();
      throw err;
    }
    return c;
  }

  /**
   * Hold every monitor until {@link release}: clients may connect (the socket exists, as
   * with QSD) but get no greeting and are not read, so the first thing a client sees is the
   * complete start-up state. Chardevs added while holding are held too.
   */
  hold(): void {
    this.holding = true;
    for (const c of this.chardevs.values()) c.hold();
  }

  /** Greet waiting clients and serve new ones from now on. */
  release(): void {
    this.holding = false;
    for (const c of this.chardevs.values()) c.release();
  }

  /** Remove the unix socket files of every chardev, synchronously (process exit). */
  unlinkSocketFiles(): void {
    for (const c of this.chardevs.values()) c.unlinkSocketFile();
  }

  /** Every chardev as the QOM tree shows it (`/chardevs/ID`). */
  qomChardevs(): QomChardev[] {
    return [...this.chardevs.values()].map((c): QomChardev => {
      const o = c.options;
      if (o.backend !== undefined && o.backend !== 'socket') return { id: o.id, qomType: `chardev-${o.backend}` };
      const a = o.addr;
      const addr =
        a.type === 'unix'
          ? { path: a.path, type: 'unix' }
          : a.type === 'inet'
            ? inetAddr(a.host, c.port ?? a.port, c.family)
            : { str: a.str, type: 'fd' };
      return { id: o.id, qomType: 'chardev-socket', connected: c.connected, addr };
    });
  }

  chardev(id: string): Chardev | undefined {
    return this.chardevs.get(id);
  }

  /** Every chardev, oldest first (QSD lists them in its hash table's order). */
  list(): Chardev[] {
    return [...this.chardevs.values()];
  }

  /** chardev-remove: close a chardev no monitor uses. */
  async removeChardev(id: string): Promise<void> {
    const c = this.chardevs.get(id);
    if (c === undefined) throw new DaemonError('CHARDEV_NOT_FOUND', `Chardev '${id}' not found`);
    if (c.attached) throw new DaemonError('CHARDEV_IN_USE', `Chardev '${id}' is busy`);
    this.chardevs.delete(id);
    await c.close();
  }

  /**
   * chardev-change. QSD's only chardev users are monitors, which cannot switch backends, so
   * a chardev with a monitor is refused; any other one is closed and re-created from the new
   * backend, exactly like QEMU's "easy case": when the new backend fails to open the old
   * chardev is gone too.
   */
  async changeChardev(id: string, create: () => Promise<Chardev>): Promise<Chardev> {
    const c = this.chardevs.get(id);
    if (c === undefined) throw new DaemonError('CHARDEV_NOT_FOUND', `Chardev '${id}' does not exist`);
    if (c.attached) throw new DaemonError('CHARDEV_IN_USE', 'Chardev user does not support chardev hotswap');
    this.chardevs.delete(id);
    await c.close();
    return create();
  }

  /** Attach a QMP monitor to a chardev (`--monitor chardev=ID,pretty=...`). */
  attach(chardevId: string, opts: MonitorOptions = {}): void {
    const c = this.chardevs.get(chardevId);
    if (c === undefined) throw new DaemonError('CHARDEV_NOT_FOUND', `chardev "${chardevId}" not found`);
    if (c.attached) throw new DaemonError('CHARDEV_IN_USE', `Device '${chardevId}' is in use`);
    c.setHandler((peer) => {
      const s = new MonitorSession(peer, this.services, this.dispatcher, this.log, opts);
      this.sessions.add(s);
      peer.onClose(() => this.sessions.delete(s));
    });
  }

  /** Live sessions (tests). */
  activeSessions(): number {
    return this.sessions.size;
  }

  /** Close every session and chardev; unix socket files we created are removed. */
  async close(): Promise<void> {
    for (const s of [...this.sessions]) s.close();
    this.sessions.clear();
    const all = [...this.chardevs.values()];
    this.chardevs.clear();
    await Promise.all(all.map((c) => c.close()));
  }
}

/** An inet SocketAddress as QEMU reports a listening chardev's: the bound port and family. */
function inetAddr(host: string, port: number | string, family: string | undefined): Record<string, unknown> {
  const out: Record<string, unknown> = { host, port: String(port), type: 'inet' };
  if (family === 'IPv4') out.ipv4 = true;
  if (family === 'IPv6') out.ipv6 = true;
  return out;
}
