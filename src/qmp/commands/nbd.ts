import type { CommandDef } from '../types.js';
import { defineCommand } from '../types.js';
import { QmpError } from '../../util/errors.js';
import type { NbdListenAddress } from '../../nbd/server.js';
import { idWellFormed, type ExportAddOptions } from '../../export/manager.js';
import type { MultiConnMode, OnErrorPolicy } from '../../export/nbd-export.js';

interface SocketAddressLegacy {
  type: 'inet' | 'unix' | 'vsock' | 'fd';
  data: { host?: string; port?: string; path?: string; str?: string; abstract?: boolean };
}

interface NbdServerStartArgs {
  addr: SocketAddressLegacy;
  'tls-creds'?: string;
  'tls-authz'?: string;
  'max-connections'?: number;
  'handshake-max-seconds'?: number;
}

interface BlockExportAddArgs {
  type: string;
  id: string;
  'node-name': string;
  writable?: boolean;
  writethrough?: boolean;
  iothread?: string;
  'fixed-iothread'?: boolean;
  'allow-inactive'?: boolean;
  name?: string;
  description?: string;
  bitmaps?: Array<string | { node: string; name: string }>;
  'allocation-depth'?: boolean;
  'max-connections'?: number;
  'multi-conn'?: MultiConnMode;
  werror?: OnErrorPolicy;
  rerror?: OnErrorPolicy;
}

function listenAddress(a: SocketAddressLegacy, origin: 'qmp' | 'cli'): NbdListenAddress {
  switch (a.type) {
    case 'unix':
      if (a.data.abstract) throw new QmpError('Abstract unix sockets are not supported by blockd');
      return { type: 'unix', path: a.data.path ?? '' };
    case 'inet':
      return { type: 'inet', host: a.data.host ?? '', port: a.data.port ?? '' };
    case 'fd': {
      // QSD 7.2 quirk kept: fd addresses only from the command line (inherited sockets).
      if (origin === 'qmp') throw new QmpError('only QEMU supports file descriptor passing');
      const s = a.data.str ?? '';
      if (!/^\d+$/.test(s)) throw new QmpError(`File descriptor '${s}' is not a number`);
      return { type: 'fd', fd: Number(s) };
    }
    case 'vsock':
      throw new QmpError('vsock addresses are not supported by blockd');
  }
}

const UNSUPPORTED_EXPORT_TYPES = new Set(['vhost-user-blk', 'fuse', 'vduse-blk']);

function exportOptions(a: BlockExportAddArgs): ExportAddOptions {
  if (UNSUPPORTED_EXPORT_TYPES.has(a.type)) {
    throw new QmpError(`Export type '${a.type}' is not supported by blockd`);
  }
  if (a['allow-inactive']) throw new QmpError("'allow-inactive' is not supported by blockd");
  const o: ExportAddOptions = { type: a.type, id: a.id, nodeName: a['node-name'] };
  if (a.writable !== undefined) o.writable = a.writable;
  if (a.writethrough !== undefined) o.writethrough = a.writethrough;
  if (a.name !== undefined) o.name = a.name;
  if (a.description !== undefined) o.description = a.description;
  if (a.bitmaps !== undefined) o.bitmaps = a.bitmaps;
  if (a['allocation-depth'] !== undefined) o.allocationDepth = a['allocation-depth'];
  if (a['max-connections'] !== undefined) o.maxConnections = a['max-connections'];
  if (a['multi-conn'] !== undefined) o.multiConn = a['multi-conn'];
  if (a.werror !== undefined) o.werror = a.werror;
  if (a.rerror !== undefined) o.rerror = a.rerror;
  return o;
}

export const nbdCommands: readonly CommandDef[] = [
  defineCommand<NbdServerStartArgs>('nbd-server-start', async (a, ctx) => {
    if (ctx.services.exports.serverRunning) throw new QmpError('NBD server already running');
    const addr = listenAddress(a.addr, ctx.origin);
    await ctx.services.exports.startServer({
      addr,
      ...(a['max-connections'] === undefined ? {} : { maxConnections: a['max-connections'] }),
      ...(a['handshake-max-seconds'] === undefined ? {} : { handshakeMaxSeconds: a['handshake-max-seconds'] }),
      ...(a['tls-creds'] === undefined ? {} : { tlsCreds: a['tls-creds'] }),
      ...(a['tls-authz'] === undefined ? {} : { tlsAuthz: a['tls-authz'] }),
    });
    return {};
  }),
  defineCommand<Record<string, never>>('nbd-server-stop', async (_a, ctx) => {
    await ctx.services.exports.stopServer();
    return {};
  }),
  defineCommand<BlockExportAddArgs>('block-export-add', (a, ctx) => {
    const o = exportOptions(a);
    if (a.iothread !== undefined && !ctx.services.objects.isIothread(a.iothread)) {
      // QSD looks the iothread up after the id and node checks. An existing one is accepted
      // (with or without fixed-iothread): blockd serves every export from its one event loop.
      if (!idWellFormed(o.id)) throw new QmpError('Invalid block export id');
      if (ctx.services.exports.query().some((e) => e.id === o.id)) {
        throw new QmpError(`Block export id '${o.id}' is already in use`);
      }
      if (!ctx.services.graph.get(o.nodeName)) {
        throw new QmpError(`Cannot find device='' nor node-name='${o.nodeName}'`);
      }
      throw new QmpError(`iothread "${a.iothread}" not found`);
    }
    ctx.services.exports.addExport(o);
    return {};
  }),
  defineCommand<{ id: string; mode?: 'safe' | 'hard' }>('block-export-del', async (a, ctx) => {
    await ctx.services.exports.deleteExport(a.id, a.mode ?? 'safe');
    return {};
  }),
  defineCommand<Record<string, never>>('query-block-exports', (_a, ctx) => ctx.services.exports.query()),
  defineCommand<{ id: string }>('x-block-export-resume', (a, ctx) => {
    ctx.services.exports.resumeExport(a.id);
    return {};
  }),
  defineCommand<{ device: string; name?: string; description?: string; writable?: boolean; bitmap?: string }>(
    'nbd-server-add',
    (a, ctx) => {
      const name = a.name ?? a.device;
      const o: ExportAddOptions = { type: 'nbd', id: name, nodeName: a.device, name };
      if (a.description !== undefined) o.description = a.description;
      if (a.writable !== undefined) o.writable = a.writable;
      if (a.bitmap !== undefined) o.bitmaps = [a.bitmap];
      ctx.services.exports.addExport(o);
      return {};
    },
  ),
  defineCommand<{ name: string; mode?: 'safe' | 'hard' }>('nbd-server-remove', async (a, ctx) => {
    await ctx.services.exports.deleteExport(a.name, a.mode ?? 'safe');
    return {};
  }),
];
