/**
 * `--chardev` is QemuOpts, not keyval (qsd-cli.md §5): the first bare element is the
 * backend, `,,` escapes a comma (also in that first element), a bare word other than
 * `help` is a deprecated short-form boolean (`server` = `server=on`, `nowait` =
 * `wait=off`), every chardev key of every backend is accepted by the parser (only
 * unknown ones are `Invalid parameter 'X'`), and `id` must be an identifier.
 *
 * blockd opens `socket`, `stdio`, `ringbuf`/`memory`, `null`, `file` and `pipe`; a backend
 * it does not have (`pty`, `udp`, `serial`, `parallel`, `mux`, ...) is refused with QSD's
 * text for a backend that is not built in (docs/chardev.md).
 */
import { CliError } from '../util/errors.js';
import type { ChardevOptions, ChardevSocketAddress, ChardevSocketOptions } from '../qmp/chardev.js';
import { RINGBUF_DEFAULT_SIZE, ringbufSizeValid } from '../qmp/ringbuf.js';
import { parseBool } from './keyval-types.js';

/** The backends blockd opens, in QSD 7.2's `--chardev help` order. */
export const CHARDEV_BACKENDS = ['memory', 'file', 'socket', 'stdio', 'ringbuf', 'null', 'pipe'] as const;

type KeyType = 'bool' | 'str' | 'num' | 'size';

/** Every key of QEMU's chardev option list (all backends share it), plus blockd's `multi-client`. */
const CHARDEV_KEYS: Record<string, KeyType> = {
  abstract: 'bool',
  append: 'bool',
  backend: 'str',
  chardev: 'str',
  clipboard: 'bool',
  cols: 'num',
  debug: 'num',
  delay: 'bool',
  fd: 'str',
  height: 'num',
  host: 'str',
  id: 'str',
  ipv4: 'bool',
  ipv6: 'bool',
  localaddr: 'str',
  localport: 'str',
  logappend: 'bool',
  logfile: 'str',
  mouse: 'bool',
  'multi-client': 'bool',
  mux: 'bool',
  name: 'str',
  nodelay: 'bool',
  path: 'str',
  port: 'str',
  reconnect: 'num',
  rows: 'num',
  server: 'bool',
  signal: 'bool',
  size: 'size',
  telnet: 'bool',
  tight: 'bool',
  'tls-authz': 'str',
  'tls-creds': 'str',
  tn3270: 'bool',
  to: 'num',
  wait: 'bool',
  websocket: 'bool',
  width: 'num',
};

export type { ChardevSocketAddress };

/** A parsed `--chardev socket,...`. */
export type ChardevSocketSpec = ChardevSocketOptions & { backend: 'socket'; nodelay: boolean };

export type ChardevParseResult = { kind: 'help'; backend?: string } | { kind: 'chardev'; spec: ChardevOptions };

const fail = (msg: string): never => {
  throw new CliError(msg, 'CHARDEV');
};

/** QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'. */
export function isWellFormedId(id: string): boolean {
  return /^[A-Za-z][A-Za-z0-9\-._]*$/.test(id);
}

/** One `name=value` (or bare word) of QemuOpts text. */
interface OptElement {
  /** undefined for a bare word */
  name: string | undefined;
  /** the value, or the bare word */
  value: string;
  first: boolean;
}

/**
 * Tokenise QemuOpts text the way QEMU does: a name stops at '=' or ','; a value runs to
 * the next single ',' with ",," meaning a literal comma; the first element without '='
 * is a value for the implied key (and may itself contain ",,").
 */
function tokenize(text: string): OptElement[] {
  const out: OptElement[] = [];
  let pos = 0;
  const readValue = (from: number): { value: string; next: number } => {
    let value = '';
    let p = from;
    while (p < text.length) {
      const c = text[p] as string;
      if (c === ',') {
        if (text[p + 1] !== ',') break;
        p++;
      }
      value += c;
      p++;
    }
    return { value, next: p };
  };
  while (pos < text.length) {
    const first = out.length === 0;
    const m = /[=,]/.exec(text.slice(pos));
    const len = m === null ? text.length - pos : m.index;
    let next: number;
    if (text[pos + len] !== '=') {
      if (first) {
        const r = readValue(pos);
        out.push({ name: undefined, value: r.value, first });
        next = r.next;
      } else {
        out.push({ name: undefined, value: text.slice(pos, pos + len), first });
        next = pos + len;
      }
    } else {
      const r = readValue(pos + len + 1);
      out.push({ name: text.slice(pos, pos + len), value: r.value, first });
      next = r.next;
    }
    pos = text[next] === ',' ? next + 1 : next;
  }
  return out;
}

function parseNum(key: string, v: string): number {
  // QemuOpts numbers: unsigned decimal, hex or octal (strtoull base 0), no junk.
  if (!/^(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.test(v)) fail(`Parameter '${key}' expects a number`);
  const n = Number(v.startsWith('0') && !/^0[xX]/.test(v) && v.length > 1 ? Number.parseInt(v, 8) : v);
  if (!Number.isSafeInteger(n)) fail(`Parameter '${key}' expects a number`);
  return n;
}

/** A QemuOpts size: a number with an optional k/M/G/T/P/E suffix (1024-based) or b/B. */
function parseSize(v: string): bigint {
  const m = /^([0-9]+)(\.[0-9]+)?([bBkKmMgGtTpPeE]?)$/.exec(v);
  if (m === null) return 0n;
  const shift = { '': 0, b: 0, k: 10, m: 20, g: 30, t: 40, p: 50, e: 60 }[(m[3] ?? '').toLowerCase()] ?? 0;
  const whole = BigInt(m[1] as string) << BigInt(shift);
  const frac = m[2] === undefined ? 0n : BigInt(Math.floor(Number(`0${m[2]}`) * 2 ** shift));
  return whole + frac;
}

function parseBoolOpt(key: string, v: string): boolean {
  return parseBool(v) ?? fail(`Parameter '${key}' expects 'on' or 'off'`);
}

/**
 * Parse `--chardev` text. `warn` receives deprecation warnings (each may span two lines,
 * as QEMU prints them). Throws `CliError` with QEMU's message.
 */
export function parseChardev(text: string, warn: (msg: string) => void): ChardevParseResult {
  const opts = new Map<string, string>();
  let help = false;
  for (const el of tokenize(text)) {
    if (el.name === undefined) {
      if (el.value === 'help' || el.value === '?') {
        help = true;
        continue;
      }
      if (el.first) {
        opts.set('backend', el.value);
        continue;
      }
      // Short-form boolean: `server` is server=on, `nowait` is wait=off.
      const off = el.value.startsWith('no');
      const key = off ? el.value.slice(2) : el.value;
      warn(
        `short-form boolean option '${el.value}' deprecated\nPlease use ${key}=${off ? 'off' : 'on'} instead`,
      );
      if (!Object.hasOwn(CHARDEV_KEYS, key)) fail(`Invalid parameter '${key}'`);
      opts.set(key, off ? 'off' : 'on');
      continue;
    }
    const key = el.name;
    const value = el.value;
    const type = Object.hasOwn(CHARDEV_KEYS, key) ? CHARDEV_KEYS[key] : undefined;
    if (type === undefined) fail(`Invalid parameter '${key}'`);
    if (key === 'id' && !isWellFormedId(value)) {
      fail(
        "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
      );
    }
    if (type === 'bool') parseBoolOpt(key, value);
    if (type === 'num') parseNum(key, value);
    if (type === 'size' && !/^[0-9]+(\.[0-9]+)?[bBkKmMgGtTpPeE]?$/.test(value)) {
      fail(
        `Parameter '${key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.`,
      );
    }
    opts.set(key, value);
  }

  const backend = opts.get('backend');
  if (help) return backend === undefined ? { kind: 'help' } : { kind: 'help', backend };

  // QEMU's order: the backend name is checked before the id, but "missing backend" names the id.
  const id = opts.get('id');
  if (backend === undefined) {
    if (id === undefined) fail('chardev: no id specified');
    fail(`chardev: "${id}" missing backend`);
  }
  if (!(CHARDEV_BACKENDS as readonly string[]).includes(backend as string)) {
    fail(`'${backend}' is not a valid char driver name`);
  }
  if (id === undefined) fail('chardev: no id specified');
  const cid = id as string;

  const bool = (k: string, dflt: boolean): boolean => {
    const v = opts.get(k);
    return v === undefined ? dflt : parseBoolOpt(k, v);
  };
  if (opts.has('logfile')) fail("chardev option 'logfile' is not supported by blockd yet");
  if (bool('mux', false)) fail("chardev option 'mux' is not supported by blockd");
  switch (backend) {
    case 'null':
      return { kind: 'chardev', spec: { id: cid, backend: 'null' } };
    case 'stdio':
      // `signal` is accepted; blockd leaves terminal settings alone either way.
      return { kind: 'chardev', spec: { id: cid, backend: 'stdio' } };
    case 'ringbuf':
    case 'memory': {
      // QEMU reads the size into an int: it wraps at 2^32, and 0 means the default.
      const text = opts.get('size');
      const val = text === undefined ? 0 : Number(BigInt.asIntN(32, parseSize(text)));
      const size = val === 0 ? RINGBUF_DEFAULT_SIZE : val;
      if (!ringbufSizeValid(size)) fail('size of ringbuf chardev must be power of two');
      return { kind: 'chardev', spec: { id: cid, backend, size } };
    }
    case 'file': {
      const path = opts.get('path');
      if (path === undefined) fail('chardev: file: no filename given');
      return { kind: 'chardev', spec: { id: cid, backend: 'file', out: path as string, append: bool('append', false) } };
    }
    case 'pipe': {
      const path = opts.get('path');
      if (path === undefined) fail('chardev: pipe: no device path given');
      return { kind: 'chardev', spec: { id: cid, backend: 'pipe', device: path as string } };
    }
    default:
      break;
  }

  const path = opts.get('path');
  const host = opts.get('host');
  const fd = opts.get('fd');
  const server = bool('server', false);
  const given = [path, host, fd].filter((x) => x !== undefined).length;
  if (given > 1) fail("None or one of 'path', 'fd' or 'host' option required.");

  let addr: ChardevSocketAddress;
  if (path !== undefined) {
    addr = { type: 'unix', path };
    if (opts.has('abstract')) addr.abstract = bool('abstract', false);
    if (opts.has('tight')) addr.tight = bool('tight', true);
  } else if (host !== undefined) {
    const port = opts.get('port');
    if (port === undefined) fail('chardev: socket: no port given');
    addr = { type: 'inet', host, port: port as string };
    if (opts.has('ipv4')) addr.ipv4 = bool('ipv4', false);
    if (opts.has('ipv6')) addr.ipv6 = bool('ipv6', false);
    const to = opts.get('to');
    if (to !== undefined) addr.to = parseNum('to', to);
  } else {
    const f = fd ?? '';
    if (!/^[0-9]+$/.test(f)) fail(`Unable to parse FD number ${f}`);
    addr = { type: 'fd', str: f };
  }

  if (!server && opts.has('wait')) fail("'wait' option is incompatible with socket in client connect mode");
  if (server && opts.has('reconnect')) {
    fail("'reconnect' option is incompatible with socket in server listen mode");
  }
  const websocket = bool('websocket', false);
  if (websocket && !server) fail('Websocket client is not implemented');
  if (bool('telnet', false) || bool('tn3270', false)) fail('telnet is not supported by blockd');
  const creds = opts.get('tls-creds');
  if (creds !== undefined) fail(`No TLS credentials with id '${creds}'`);

  const spec: ChardevSocketSpec = {
    id: cid,
    backend: 'socket',
    addr,
    server,
    wait: server ? bool('wait', true) : false,
    websocket,
    multiClient: bool('multi-client', false),
    nodelay: bool('nodelay', false),
  };
  const reconnect = opts.get('reconnect');
  if (reconnect !== undefined) spec.reconnect = parseNum('reconnect', reconnect);
  return { kind: 'chardev', spec };
}

/** Text for `--chardev help` (stdout, exit 0). */
export function chardevHelpText(): string {
  return `Available chardev backend types: \n${CHARDEV_BACKENDS.map((b) => `  ${b}\n`).join('')}`;
}

/** Text for `--chardev TYPE,help`. */
export function chardevKeysHelpText(): string {
  const keys = Object.keys(CHARDEV_KEYS)
    .filter((k) => k !== 'id')
    .sort();
  const label: Record<KeyType, string> = {
    bool: 'bool (on/off)',
    str: 'str',
    num: 'num',
    size: 'size',
  };
  return `chardev options:\n${keys.map((k) => `  ${k}=<${label[CHARDEV_KEYS[k] as KeyType]}>\n`).join('')}`;
}
