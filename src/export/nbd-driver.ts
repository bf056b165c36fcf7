/**
 * The `nbd` protocol block driver: a block node backed by a remote NBD export, through the
 * client in nbd/client/. It lives here because block/ and nbd/ may not import each other; the
 * composition root registers it with `BlockGraph.registerDriver('nbd', ...)`.
 *
 * Options are QSD 7.2's BlockdevOptionsNbd (server, export, tls-creds, tls-hostname,
 * x-dirty-bitmap, reconnect-delay, open-timeout) plus blockd's `x-connections` and
 * `x-extended-headers`.
 */
import {
  BASE_MEMBERS,
  optBool,
  optError,
  optSize,
  optString,
  rejectUnknown,
  type DriverOpenContext,
  type Options,
} from '../block/drivers/common.js';
import {
  EXTENT_ALLOCATED,
  EXTENT_DATA,
  EXTENT_ZERO,
  type BlockDriver,
  type BlockExtent,
  type DriverCaps,
  type WriteFlags,
  type ZeroFlags,
} from '../block/types.js';
import { BlockError, DaemonError } from '../util/errors.js';
import { NbdClient, type NbdServerAddress } from '../nbd/client/client.js';
import type { ConnectionOptions } from 'node:tls';
import type { TlsCredsResolver } from './manager.js';
import { nbdClientTls } from './nbd-tls.js';
import {
  NBD_CONTEXT_BASE_ALLOCATION,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
} from '../nbd/protocol.js';

const NBD_MEMBERS = [
  ...BASE_MEMBERS,
  'server',
  'export',
  'tls-creds',
  'tls-hostname',
  'x-dirty-bitmap',
  'reconnect-delay',
  'open-timeout',
  'x-connections',
  'x-extended-headers',
];
/** Most connections `x-connections` may ask for. */
const MAX_CONNECTIONS = 16;

/** Parse the `server` member (SocketAddress, flat form); unix and inet are supported. */
function serverAddress(v: unknown): NbdServerAddress {
  if (v === undefined) throw optError("Parameter 'server' is missing");
  if (v === null || typeof v !== 'object' || Array.isArray(v)) {
    throw optError("Invalid parameter type for 'server', expected: object");
  }
  const o = v as Options;
  const type = optString(o, 'type', true);
  if (type === 'unix') {
    const path = optString(o, 'path', true);
    if (o['abstract'] === true) throw optError('Abstract unix sockets are not supported by blockd');
    return { type: 'unix', path };
  }
  if (type === 'inet') {
    const host = optString(o, 'host', true);
    const portText = optString(o, 'port', true);
    const port = Number(portText);
    if (!/^\d+$/.test(portText) || port > 65535) throw optError(`Invalid port '${portText}'`);
    return { type: 'inet', host, port };
  }
  throw optError(`NBD server address type '${type}' is not supported by blockd`);
}

/** Checks `uint32` members (the schema bounds them on QMP; the CLI path may not). */
function optU32(o: Options, key: string): number | undefined {
  const v = optSize(o, key, 'uint64');
  if (v !== undefined && v > 0xffffffff) throw optError(`Parameter '${key}' expects uint32_t`);
  return v;
}

/** Turn a client failure into a BlockError with the same errno (the io layer counts it). */
function ioError(err: unknown): never {
  if (err instanceof BlockError) throw err;
  if (err instanceof DaemonError) throw new BlockError('NBD_IO', err.errno, err.message, { cause: err });
  throw err;
}

export class NbdBlockDriver implements BlockDriver {
  readonly name = 'nbd';
  readonly caps: DriverCaps;
  private readonly context: string;

  private constructor(
    private readonly client: NbdClient,
    private readonly address: NbdServerAddress,
    private readonly exportName: string | undefined,
    dirtyBitmap: string | undefined,
  ) {
    const f = client.info.flags;
    this.context = dirtyBitmap !== undefined ? `qemu:dirty-bitmap:${dirtyBitmap}` : NBD_CONTEXT_BASE_ALLOCATION;
    this.caps = {
      writeZeroes: (f & NBD_FLAG_SEND_WRITE_ZEROES) !== 0,
      fua: (f & NBD_FLAG_SEND_FUA) !== 0,
      discard: (f & NBD_FLAG_SEND_TRIM) !== 0,
      blockStatus: client.info.contexts.has(this.context),
      resize: false,
      readSync: false,
      zeroInit: false,
    };
  }

  /**
   * `tlsLookup` resolves `tls-creds` ids (the object registry, wired by the composition root);
   * without it every id is unknown.
   */
  static async open(ctx: DriverOpenContext, opts: Options, tlsLookup?: TlsCredsResolver): Promise<NbdBlockDriver> {
    rejectUnknown(opts, NBD_MEMBERS);
    const address = serverAddress(opts['server']);
    const exportName = optString(opts, 'export');
    const tlsCreds = optString(opts, 'tls-creds');
    const tlsHostname = optString(opts, 'tls-hostname');
    const dirtyBitmap = optString(opts, 'x-dirty-bitmap');
    const reconnectDelay = optU32(opts, 'reconnect-delay') ?? 0;
    const openTimeout = optU32(opts, 'open-timeout') ?? 0;
    const connections = optU32(opts, 'x-connections') ?? 1;
    const extendedHeaders = optBool(opts, 'x-extended-headers') ?? true;
    if (connections < 1 || connections > MAX_CONNECTIONS) {
      throw optError(`Parameter 'x-connections' must be between 1 and ${MAX_CONNECTIONS}`);
    }
    let tls: ConnectionOptions | undefined;
    if (tlsCreds !== undefined) {
      // QEMU's lookup errors, in its order; the hostname defaults to the server's inet host.
      const c = tlsLookup?.(tlsCreds) ?? { kind: 'missing' as const };
      if (c.kind === 'missing') throw optError(`No TLS credentials with id '${tlsCreds}'`);
      if (c.kind === 'not-tls-creds') throw optError(`Object with id '${tlsCreds}' is not TLS credentials`);
      if (c.endpoint !== 'client') throw optError('Expected TLS credentials for a client endpoint');
      const t = nbdClientTls(c.material, tlsHostname ?? (address.type === 'inet' ? address.host : undefined));
      if (typeof t === 'string') throw optError(t);
      tls = t;
    }
    const meta = dirtyBitmap !== undefined ? `qemu:dirty-bitmap:${dirtyBitmap}` : NBD_CONTEXT_BASE_ALLOCATION;
    let client: NbdClient;
    try {
      client = await NbdClient.open({
        address,
        exportName: exportName ?? '',
        readOnly: ctx.readOnly,
        metaContexts: [meta],
        reconnectDelay,
        openTimeout,
        connections,
        extendedHeaders,
        log: ctx.log.child({ component: 'nbd-client' }),
        tls,
      });
    } catch (err) {
      if (err instanceof DaemonError) throw new BlockError('NBD_OPEN', err.errno, err.message, { cause: err });
      throw err;
    }
    if (dirtyBitmap !== undefined && !client.info.contexts.has(meta)) {
      await client.close();
      throw optError(`requested x-dirty-bitmap ${dirtyBitmap} not found`);
    }
    return new NbdBlockDriver(client, address, exportName, dirtyBitmap);
  }

  getLength(): number {
    return this.client.info.size;
  }

  /** Whether the connection uses NBD extended headers (asked for, and the server agreed). */
  get extendedHeaders(): boolean {
    return this.client.info.extended;
  }

  /** Whether the server shows the export read-only (NBD_FLAG_READ_ONLY). */
  get serverReadOnly(): boolean {
    return (this.client.info.flags & NBD_FLAG_READ_ONLY) !== 0;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    await this.client.read(buf, offset).catch(ioError);
  }

  async write(buf: Buffer, offset: number, flags: WriteFlags): Promise<void> {
    await this.client.write(buf, offset, flags.fua === true && this.caps.fua).catch(ioError);
  }

  async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    const fastZero = flags.noFallback === true;
    if (fastZero && !(this.client.info.flags & NBD_FLAG_SEND_FAST_ZERO)) {
      throw new BlockError('NO_FAST_ZERO', 'ENOTSUP', 'NBD server cannot zero fast');
    }
    await this.client
      .writeZeroes(offset, length, { fua: flags.fua === true && this.caps.fua, mayUnmap: flags.mayUnmap === true, fastZero })
      .catch(ioError);
  }

  async discard(offset: number, length: number): Promise<void> {
    await this.client.trim(offset, length).catch(ioError);
  }

  async flush(): Promise<void> {
    if (!(this.client.info.flags & NBD_FLAG_SEND_FLUSH)) return;
    await this.client.flush().catch(ioError);
  }

  /**
   * base:allocation: HOLE clear = data; ZERO = reads as zeroes; a range that is either is
   * allocated (QEMU's rule for protocol nodes). A dirty-bitmap context (x-dirty-bitmap) is read
   * the same way, as QEMU's client does: its dirty bit is the HOLE bit, so dirty ranges show as
   * `data: false` in `qemu-img map`.
   */
  async blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    const ext = await this.client.blockStatus(this.context, offset, length).catch(ioError);
    if (!ext || ext.length === 0) {
      return [{ offset, length, flags: EXTENT_DATA | EXTENT_ALLOCATED, depth: 1 }];
    }
    const out: BlockExtent[] = [];
    let pos = offset;
    const end = offset + length;
    for (const e of ext) {
      if (pos >= end) break;
      const n = Math.min(e.length, end - pos);
      let flags = (e.flags & NBD_STATE_HOLE ? 0 : EXTENT_DATA) | (e.flags & NBD_STATE_ZERO ? EXTENT_ZERO : 0);
      if (flags !== 0) flags |= EXTENT_ALLOCATED;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += n;
      else out.push({ offset: pos, length: n, flags, depth: flags & EXTENT_ALLOCATED ? 1 : 0 });
      pos += n;
    }
    return out;
  }

  async close(): Promise<void> {
    await this.client.close();
  }

  /** QEMU's URI form: `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST:PORT/EXPORT`. */
  describeFilename(): string {
    const a = this.address;
    const e = this.exportName ?? '';
    if (a.type === 'unix') return `nbd+unix:///${e}?socket=${a.path}`;
    return `nbd://${a.host}:${a.port}/${e}`;
  }

  async queryImage(): Promise<Record<string, unknown>> {
    return {};
  }
}
