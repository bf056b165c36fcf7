import type { CommandContext, CommandDef } from '../types.js';
import { defineCommand } from '../types.js';
import { DaemonError, QmpError } from '../../util/errors.js';
import type { Chardev, ChardevOptions, ChardevSocketAddress } from '../chardev.js';
import type { MonitorManager } from '../monitor-manager.js';
import {
  RINGBUF_DEFAULT_SIZE,
  decodeBase64Lenient,
  decodeUtf8AsQemu,
  ringbufSizeValid,
} from '../ringbuf.js';

/**
 * qapi/char.json (schema/commands/chardev-*.json, query-chardev*.json, ringbuf-*.json).
 * The chardevs live in the MonitorManager (services.chardevs); docs/chardev.md.
 */

/** The backend kinds blockd opens, in the order QSD 7.2 lists them in query-chardev-backends. */
export const CHARDEV_BACKENDS_AVAILABLE = ['pipe', 'null', 'ringbuf', 'stdio', 'socket', 'file', 'memory'] as const;

interface WireAddr {
  type: 'inet' | 'unix' | 'vsock' | 'fd';
  data: Record<string, unknown>;
}

/** ChardevBackend as the schema lets it through (validated; only members we read are typed). */
interface WireBackend {
  type: string;
  data: {
    logfile?: string;
    size?: number;
    out?: string;
    in?: string;
    append?: boolean;
    device?: string;
    addr?: WireAddr;
    'tls-creds'?: string;
    'tls-authz'?: string;
    server?: boolean;
    wait?: boolean;
    nodelay?: boolean;
    telnet?: boolean;
    tn3270?: boolean;
    websocket?: boolean;
    reconnect?: number;
  };
}

interface AddArgs {
  id: string;
  backend: WireBackend;
}

const failed = (msg: string): never => {
  throw new QmpError(msg, 'GenericError', 'CHARDEV');
};

function socketAddress(a: WireAddr, origin: CommandContext['origin']): ChardevSocketAddress {
  const d = a.data;
  switch (a.type) {
    case 'unix': {
      const out: ChardevSocketAddress = { type: 'unix', path: d.path as string };
      if (typeof d.abstract === 'boolean') out.abstract = d.abstract;
      if (typeof d.tight === 'boolean') out.tight = d.tight;
      return out;
    }
    case 'inet': {
      const out: ChardevSocketAddress = { type: 'inet', host: d.host as string, port: d.port as string };
      if (typeof d.ipv4 === 'boolean') out.ipv4 = d.ipv4;
      if (typeof d.ipv6 === 'boolean') out.ipv6 = d.ipv6;
      if (typeof d.to === 'number') out.to = d.to;
      return out;
    }
    case 'fd':
      // From a QMP monitor QSD looks the name up among passed fds, which it does not have.
      if (origin === 'qmp') failed('only QEMU supports file descriptor passing');
      if (!/^[0-9]+$/.test(d.str as string)) failed(`Unable to parse FD number ${String(d.str)}`);
      return { type: 'fd', str: d.str as string };
    default:
      return failed('vsock sockets are not supported by blockd');
  }
}

/** ChardevBackend -> our options, with QEMU's checks in QEMU's order (errors unprefixed). */
function toOptions(id: string, b: WireBackend, ctx: CommandContext): ChardevOptions {
  const d = b.data;
  const kind = b.type;
  if (!(CHARDEV_BACKENDS_AVAILABLE as readonly string[]).includes(kind)) {
    failed(`'${kind}' is not a valid char driver name`);
  }
  if (d.logfile !== undefined) failed("chardev option 'logfile' is not supported by blockd yet");
  switch (kind) {
    case 'ringbuf':
    case 'memory': {
      const size = d.size ?? RINGBUF_DEFAULT_SIZE;
      if (!ringbufSizeValid(size)) failed('size of ringbuf chardev must be power of two');
      // Negative sizes are powers of two as QEMU sees them (2^63 unsigned): no limit for us.
      return { id, backend: kind, size: size < 0 || size > Number.MAX_SAFE_INTEGER ? Number.MAX_SAFE_INTEGER : size };
    }
    case 'null':
      return { id, backend: 'null' };
    case 'stdio':
      return { id, backend: 'stdio' };
    case 'file':
      return {
        id,
        backend: 'file',
        out: d.out as string,
        ...(d.in !== undefined ? { in: d.in } : {}),
        append: d.append ?? false,
      };
    case 'pipe':
      return { id, backend: 'pipe', device: d.device as string };
    default:
      break;
  }
  // socket: qmp_chardev_validate_socket's order, then the parts blockd lacks.
  const addr = d.addr as WireAddr;
  const server = d.server ?? true;
  if (addr.type === 'fd' && d.reconnect !== undefined) failed("'reconnect' option is incompatible with 'fd' address type");
  if (d['tls-authz'] !== undefined && d['tls-creds'] === undefined) failed("'tls_authz' option requires 'tls_creds' option");
  if (server) {
    if (d.reconnect !== undefined) failed("'reconnect' option is incompatible with socket in server listen mode");
  } else {
    if (d.websocket === true) failed('Websocket client is not implemented');
    if (d.wait !== undefined) failed("'wait' option is incompatible with socket in client connect mode");
  }
  const creds = d['tls-creds'];
  if (creds !== undefined) {
    const found = ctx.services.objects.tlsCreds(creds);
    if (found.kind === 'missing') failed(`No TLS credentials with id '${creds}'`);
    if (found.kind === 'not-tls-creds') failed(`Object with id '${creds}' is not TLS credentials`);
    failed('TLS chardevs are not supported by blockd');
  }
  if (d.telnet === true || d.tn3270 === true) failed('telnet is not supported by blockd');
  const opts: ChardevOptions = {
    id,
    backend: 'socket',
    addr: socketAddress(addr, ctx.origin),
    server,
    wait: server && d.wait === true,
    websocket: d.websocket === true,
    multiClient: false,
    nodelay: d.nodelay === true,
  };
  if (d.reconnect !== undefined) opts.reconnect = d.reconnect;
  return opts;
}

function registry(ctx: CommandContext): MonitorManager {
  const r = ctx.services.chardevs;
  if (r === undefined) throw new QmpError('chardevs are not available in this daemon', 'GenericError', 'CHARDEV');
  return r;
}

/** chardev-add's work: the id check first, then every other failure prefixed like QSD. */
async function add(m: MonitorManager, a: AddArgs, ctx: CommandContext): Promise<Record<string, never>> {
  if (m.chardev(a.id) !== undefined) {
    throw new DaemonError('CHARDEV_EXISTS', `Chardev with id '${a.id}' already exists`);
  }
  try {
    await m.addChardev(toOptions(a.id, a.backend, ctx), {
      onWaiting: (address) => ctx.log.info({ chardev: a.id }, `QEMU waiting for connection on: ${address}`),
    });
  } catch (err) {
    if (err instanceof DaemonError) {
      throw new QmpError(`Failed to add chardev '${a.id}': ${err.message}`, 'GenericError', err.code);
    }
    throw err;
  }
  return {};
}

function ringbuf(ctx: CommandContext, device: string): NonNullable<Chardev['ring']> {
  const c = registry(ctx).chardev(device);
  if (c === undefined) throw new QmpError(`Device '${device}' not found`, 'GenericError', 'CHARDEV_NOT_FOUND');
  const ring = c.ring;
  if (ring === undefined) throw new QmpError(`${device} is not a ringbuf device`);
  return ring;
}

export const charCommands: readonly CommandDef[] = [
  defineCommand('query-chardev', (_a, ctx) =>
    // Members in the order QSD 7.2 prints them (its QDict's hash order).
    (ctx.services.chardevs?.list() ?? []).map((c) => ({
      'frontend-open': c.attached,
      filename: c.filename,
      label: c.id,
    })),
  ),
  defineCommand('query-chardev-backends', () => CHARDEV_BACKENDS_AVAILABLE.map((name) => ({ name }))),
  defineCommand<AddArgs>('chardev-add', (a, ctx) => add(registry(ctx), a, ctx)),
  defineCommand<AddArgs>('chardev-change', async (a, ctx) => {
    const m = registry(ctx);
    let result: Record<string, never> = {};
    await m.changeChardev(a.id, async () => {
      result = await add(m, a, ctx);
      return m.chardev(a.id) as Chardev;
    });
    return result;
  }),
  defineCommand<{ id: string }>('chardev-remove', async (a, ctx) => {
    await registry(ctx).removeChardev(a.id);
    return {};
  }),
  defineCommand<{ id: string }>('chardev-send-break', (a, ctx) => {
    // A break goes to the frontend; monitors (the only frontends) ignore it, as in QSD.
    if (ctx.services.chardevs?.chardev(a.id) === undefined) {
      throw new QmpError(`Chardev '${a.id}' not found`, 'GenericError', 'CHARDEV_NOT_FOUND');
    }
    return {};
  }),
  defineCommand<{ device: string; data: string; format?: 'utf8' | 'base64' }>('ringbuf-write', (a, ctx) => {
    const ring = ringbuf(ctx, a.device);
    let bytes: Buffer;
    if (a.format === 'base64') {
      bytes = decodeBase64Lenient(a.data);
    } else {
      // QEMU takes the data as a C string: it ends at the first NUL.
      const nul = a.data.indexOf('\0');
      bytes = Buffer.from(nul < 0 ? a.data : a.data.slice(0, nul), 'utf8');
    }
    ring.write(bytes);
    return {};
  }),
  defineCommand<{ device: string; size: number; format?: 'utf8' | 'base64' }>('ringbuf-read', (a, ctx) => {
    const ring = ringbuf(ctx, a.device);
    if (a.size <= 0) throw new QmpError('size must be greater than zero');
    const bytes = ring.read(a.size);
    return a.format === 'base64' ? bytes.toString('base64') : decodeUtf8AsQemu(bytes);
  }),
];
