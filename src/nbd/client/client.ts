/**
 * An NBD client for one export: what the `nbd` block driver runs on.
 *
 * - open-timeout: the first connection is retried for that long while connecting fails.
 * - x-connections: when the server advertises NBD_FLAG_CAN_MULTI_CONN, up to N connections
 *   are opened and each request goes to the one with the fewest requests in flight (the spec
 *   makes a FLUSH on one connection cover writes completed on all of them).
 * - reconnect-delay: when connections are lost, each is reconnected in the background; requests
 *   that were in flight or arrive meanwhile wait, and are sent again on a new connection, for up
 *   to reconnect-delay seconds after the last connection went away. After that they fail with
 *   EIO (QEMU's semantics), while reconnecting goes on. 0 = no reconnecting at all.
 * - Requests are split at the server's maximum block size; unaligned ones (minimum block size
 *   above 1) are widened (reads) or read-modify-written (writes, zeroes).
 * - Extended headers (default on, when the server offers them): TRIM, WRITE_ZEROES and
 *   BLOCK_STATUS go out with 64-bit lengths, unsplit; otherwise the compact protocol as before.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { ConnectionOptions } from 'node:tls';
import type { Logger } from '../../util/logger.js';
import { NbdError } from '../../util/errors.js';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_READ_ONLY,
} from '../protocol.js';
import { NbdClientConnection, type ClientExtent, type ClientRequest } from './connection.js';
import { negotiate, type NegotiatedInfo } from './negotiate.js';
import { ClientWire, connectSocket, NbdConnectError, NbdConnectionLost, type NbdServerAddress } from './wire.js';

export type { ClientExtent } from './connection.js';
export type { NbdServerAddress } from './wire.js';

export interface NbdClientOptions {
  address: NbdServerAddress;
  exportName: string;
  /** The user will not write: NBD_OPT_READ_ONLY is sent, and a read-only export is fine. */
  readOnly: boolean;
  /** Metadata contexts to select (block status uses the first one). */
  metaContexts: readonly string[];
  /** Seconds requests wait for a lost connection to come back (0 = never reconnect). */
  reconnectDelay: number;
  /** Seconds the first connection is retried while the server is unreachable. */
  openTimeout: number;
  /** Connections to open when the server allows multi-conn (default 1). */
  connections: number;
  /** Ask for NBD_OPT_EXTENDED_HEADERS (falls back to compact headers when refused). */
  extendedHeaders: boolean;
  log: Logger;
  /** TLS (NBD_OPT_STARTTLS) with these Node TLS client options, on every connection. */
  tls?: ConnectionOptions | undefined;
}

/** Largest TRIM / WRITE_ZEROES length sent in one compact request (lengths are u32). */
const MAX_ZERO_REQUEST = 1 << 30;
/** With extended headers, effect lengths are u64: one request covers any range of the export. */
const MAX_EXT_EFFECT = 2 ** 52;
/** Reconnect back-off bounds, in ms. */
const RETRY_FIRST_MS = 100;
const RETRY_MAX_MS = 2000;

interface Slot {
  conn: NbdClientConnection | undefined;
  reconnecting: boolean;
}

export class NbdClient {
  private readonly slots: Slot[] = [];
  private closing = false;
  /** When the last live connection went away (0 = some connection is up). */
  private lostAt = 0;
  private liveWaiters: Array<() => void> = [];
  /** Serialises read-modify-write cycles (unaligned writes on a server with a block size). */
  private rmwChain: Promise<void> = Promise.resolve();
  readonly info: NegotiatedInfo;

  private constructor(
    private readonly opts: NbdClientOptions,
    first: NbdClientConnection,
  ) {
    this.info = first.info;
    this.slots.push({ conn: undefined, reconnecting: false });
    this.adopt(this.slots[0]!, first);
  }

  /** Connect, negotiate and (multi-conn) open the extra connections. */
  static async open(opts: NbdClientOptions): Promise<NbdClient> {
    const deadline = Date.now() + opts.openTimeout * 1000;
    let delay = RETRY_FIRST_MS;
    let first: NbdClientConnection;
    for (;;) {
      try {
        first = await connectOnce(opts);
        break;
      } catch (err) {
        if (!(err instanceof NbdConnectError) || Date.now() + delay > deadline) throw err;
        opts.log.debug({ err: err.message }, 'NBD server not reachable yet, retrying');
        await sleep(delay);
        delay = Math.min(delay * 2, RETRY_MAX_MS);
      }
    }
    if (first.info.flags & NBD_FLAG_READ_ONLY && !opts.readOnly) {
      first.disconnect();
      throw new NbdError('NBD_READ_ONLY', 'EACCES', 'Could not open image: Permission denied', true);
    }
    const client = new NbdClient(opts, first);
    const want = first.info.flags & NBD_FLAG_CAN_MULTI_CONN ? Math.max(1, opts.connections) : 1;
    if (want < opts.connections) {
      opts.log.info({ connections: opts.connections }, 'NBD server does not allow multi-conn: using one connection');
    }
    try {
      for (let i = 1; i < want; i++) {
        const c = await connectOnce(opts);
        const slot: Slot = { conn: undefined, reconnecting: false };
        client.slots.push(slot);
        client.adopt(slot, c);
        client.checkSame(c.info);
      }
    } catch (err) {
      await client.close();
      throw err;
    }
    return client;
  }

  /** Connections currently up. */
  get liveConnections(): number {
    return this.slots.filter((s) => s.conn?.alive).length;
  }

  private checkSame(info: NegotiatedInfo): void {
    if (
      info.size !== this.info.size ||
      (info.flags & NBD_FLAG_READ_ONLY) !== (this.info.flags & NBD_FLAG_READ_ONLY) ||
      info.extended !== this.info.extended
    ) {
      throw new NbdError('NBD_EXPORT_CHANGED', 'EIO', 'The NBD export changed size or flags between connections', true);
    }
  }

  private adopt(slot: Slot, conn: NbdClientConnection): void {
    slot.conn = conn;
    this.lostAt = 0;
    for (const w of this.liveWaiters.splice(0)) w();
    conn.onLost = (err) => {
      if (slot.conn === conn) slot.conn = undefined;
      if (this.closing) return;
      this.opts.log.warn({ err: err.message }, 'NBD connection lost');
      if (this.liveConnections === 0 && this.lostAt === 0) this.lostAt = Date.now();
      if (this.opts.reconnectDelay > 0) void this.reconnect(slot);
      else for (const w of this.liveWaiters.splice(0)) w();
    };
  }

  private async reconnect(slot: Slot): Promise<void> {
    if (slot.reconnecting) return;
    slot.reconnecting = true;
    let delay = RETRY_FIRST_MS;
    try {
      while (!this.closing) {
        try {
          const c = await connectOnce(this.opts);
          if (this.closing) {
            c.disconnect();
            return;
          }
          try {
            this.checkSame(c.info);
          } catch (err) {
            c.disconnect();
            throw err;
          }
          this.opts.log.info('NBD connection re-established');
          this.adopt(slot, c);
          return;
        } catch (err) {
          this.opts.log.debug({ err: (err as Error).message }, 'NBD reconnect attempt failed');
        }
        await sleep(delay);
        delay = Math.min(delay * 2, RETRY_MAX_MS);
      }
    } finally {
      slot.reconnecting = false;
    }
  }

  /** A live connection (the least loaded), waiting for a reconnect within reconnect-delay. */
  private async acquire(): Promise<NbdClientConnection> {
    for (;;) {
      if (this.closing) throw new NbdConnectionLost('NBD client is closed');
      let best: NbdClientConnection | undefined;
      for (const s of this.slots) {
        const c = s.conn;
        if (c?.alive && (!best || c.inFlight < best.inFlight)) best = c;
      }
      if (best) return best;
      const deadline = this.lostAt + this.opts.reconnectDelay * 1000;
      const left = deadline - Date.now();
      if (this.opts.reconnectDelay === 0 || left <= 0) {
        throw new NbdError('NBD_DISCONNECTED', 'EIO', 'Connection to the NBD server lost');
      }
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.liveWaiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  /** Send one request, again on another connection while connections get lost. */
  private async exec(req: ClientRequest): Promise<ClientExtent[] | undefined> {
    for (;;) {
      const conn = await this.acquire();
      try {
        return await conn.submit(req);
      } catch (err) {
        if (err instanceof NbdConnectionLost && !this.closing) continue;
        throw err;
      }
    }
  }

  private get maxPayload(): number {
    const m = this.info.minBlock;
    return Math.floor(this.info.maxBlock / m) * m;
  }

  private aligned(offset: number, length: number): boolean {
    const m = this.info.minBlock;
    return m === 1 || (offset % m === 0 && (length % m === 0 || offset + length === this.info.size));
  }

  /** Fill `buf` from `offset`. */
  async read(buf: Buffer, offset: number): Promise<void> {
    if (!this.aligned(offset, buf.length)) {
      const m = this.info.minBlock;
      const start = offset - (offset % m);
      const end = Math.min(Math.ceil((offset + buf.length) / m) * m, this.info.size);
      const bounce = Buffer.allocUnsafe(end - start);
      await this.read(bounce, start);
      bounce.copy(buf, 0, offset - start, offset - start + buf.length);
      return;
    }
    const max = this.maxPayload;
    const parts: Promise<unknown>[] = [];
    for (let pos = 0; pos < buf.length; pos += max) {
      const n = Math.min(max, buf.length - pos);
      parts.push(this.exec({ type: NBD_CMD_READ, flags: 0, offset: offset + pos, length: n, dest: buf.subarray(pos, pos + n) }));
    }
    await Promise.all(parts);
  }

  async write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    if (!this.aligned(offset, buf.length)) return this.rmw(offset, buf, fua);
    const max = this.maxPayload;
    const flags = fua ? NBD_CMD_FLAG_FUA : 0;
    const parts: Promise<unknown>[] = [];
    for (let pos = 0; pos < buf.length; pos += max) {
      const n = Math.min(max, buf.length - pos);
      parts.push(this.exec({ type: NBD_CMD_WRITE, flags, offset: offset + pos, length: n, data: buf.subarray(pos, pos + n) }));
    }
    await Promise.all(parts);
  }

  /** Unaligned write: read the covering blocks, patch, write back, one cycle at a time. */
  private rmw(offset: number, data: Buffer, fua: boolean): Promise<void> {
    const run = async (): Promise<void> => {
      const m = this.info.minBlock;
      const start = offset - (offset % m);
      const end = Math.min(Math.ceil((offset + data.length) / m) * m, this.info.size);
      const b = Buffer.allocUnsafe(end - start);
      await this.read(b, start);
      data.copy(b, offset - start);
      await this.write(b, start, fua);
    };
    const p = this.rmwChain.then(run, run);
    this.rmwChain = p.catch(() => undefined);
    return p;
  }

  async writeZeroes(offset: number, length: number, o: { fua: boolean; mayUnmap: boolean; fastZero: boolean }): Promise<void> {
    if (!this.aligned(offset, length)) return this.rmw(offset, Buffer.alloc(length), o.fua);
    const flags = (o.fua ? NBD_CMD_FLAG_FUA : 0) | (o.mayUnmap ? 0 : NBD_CMD_FLAG_NO_HOLE) | (o.fastZero ? NBD_CMD_FLAG_FAST_ZERO : 0);
    await this.ranged(NBD_CMD_WRITE_ZEROES, flags, offset, length);
  }

  /** TRIM is advisory: the unaligned head and tail are left as they are. */
  async trim(offset: number, length: number): Promise<void> {
    const m = this.info.minBlock;
    const start = Math.ceil(offset / m) * m;
    const end = offset + length === this.info.size ? offset + length : Math.floor((offset + length) / m) * m;
    if (end > start) await this.ranged(NBD_CMD_TRIM, 0, start, end - start);
  }

  private async ranged(type: number, flags: number, offset: number, length: number): Promise<void> {
    const limit = this.info.extended ? MAX_EXT_EFFECT : MAX_ZERO_REQUEST;
    const max = Math.floor(limit / this.info.minBlock) * this.info.minBlock;
    const parts: Promise<unknown>[] = [];
    for (let pos = 0; pos < length; pos += max) {
      parts.push(this.exec({ type, flags, offset: offset + pos, length: Math.min(max, length - pos) }));
    }
    await Promise.all(parts);
  }

  async flush(): Promise<void> {
    await this.exec({ type: NBD_CMD_FLUSH, flags: 0, offset: 0, length: 0 });
  }

  /**
   * Extents of `context` from `offset`, covering at most `length` bytes (possibly fewer);
   * undefined when the context was not negotiated.
   */
  async blockStatus(context: string, offset: number, length: number): Promise<ClientExtent[] | undefined> {
    const id = this.info.contexts.get(context);
    if (id === undefined) return undefined;
    const m = this.info.minBlock;
    const start = offset - (offset % m);
    const len = Math.min(Math.ceil((offset + length) / m) * m, this.info.size) - start;
    // Compact requests carry a u32 length; extended ones a u64 (extents come back 64-bit too).
    const capped = this.info.extended ? len : Math.min(len, Math.floor(0xffffffff / m) * m);
    const ext = (await this.exec({ type: NBD_CMD_BLOCK_STATUS, flags: 0, offset: start, length: capped, contextId: id })) ?? [];
    // Drop the widened head so the extents start at `offset`.
    let skip = offset - start;
    const out: ClientExtent[] = [];
    for (const e of ext) {
      if (skip >= e.length) {
        skip -= e.length;
        continue;
      }
      out.push({ length: e.length - skip, flags: e.flags });
      skip = 0;
    }
    return out;
  }

  /** NBD_CMD_DISC on every connection; requests still waiting fail. */
  async close(): Promise<void> {
    this.closing = true;
    for (const w of this.liveWaiters.splice(0)) w();
    for (const s of this.slots) s.conn?.disconnect();
    await Promise.resolve();
  }
}

/** One connection: connect, negotiate, start transmission. */
async function connectOnce(opts: NbdClientOptions): Promise<NbdClientConnection> {
  const socket = await connectSocket(opts.address);
  const wire = new ClientWire(socket);
  try {
    const info = await negotiate(wire, {
      exportName: opts.exportName,
      readOnlyIntent: opts.readOnly,
      metaContexts: opts.metaContexts,
      extendedHeaders: opts.extendedHeaders,
      tls: opts.tls,
    });
    return new NbdClientConnection(wire, info);
  } catch (err) {
    wire.destroy(err instanceof Error ? err : new Error(String(err)));
    throw err;
  }
}
