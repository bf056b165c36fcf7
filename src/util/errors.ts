/**
 * Typed errors shared by every layer. Branch on `code`, never on message text.
 * The message of an error that reaches a QMP client is its `desc`: one sentence,
 * names in single quotes, no trailing period (iotests pin these strings).
 */

/** QMP error classes (QEMU qapi/control.json ErrorClass). */
export type QmpErrorClass =
  | 'GenericError'
  | 'CommandNotFound'
  | 'DeviceNotActive'
  | 'DeviceNotFound'
  | 'KVMMissingCap';

/** The errno names we map to NBD errors or report in logs. */
export type Errno =
  | 'EPERM'
  | 'ENOENT'
  | 'EIO'
  | 'ENOMEM'
  | 'EACCES'
  | 'EBUSY'
  | 'EEXIST'
  | 'EINVAL'
  | 'EFBIG'
  | 'ENOSPC'
  | 'EROFS'
  | 'EAGAIN'
  | 'ENOTSUP'
  | 'EOVERFLOW'
  | 'ESHUTDOWN'
  | 'ECONNRESET'
  | 'ETIMEDOUT'
  | 'EPROTO'
  | 'ECANCELED';

export interface DaemonErrorOptions {
  errno?: Errno;
  qmpClass?: QmpErrorClass;
  cause?: unknown;
}

/** Base class of every error blockd throws on purpose. */
export class DaemonError extends Error {
  readonly code: string;
  readonly errno: Errno;
  readonly qmpClass: QmpErrorClass;

  constructor(code: string, message: string, opts: DaemonErrorOptions = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = new.target.name;
    this.code = code;
    this.errno = opts.errno ?? 'EINVAL';
    this.qmpClass = opts.qmpClass ?? 'GenericError';
  }
}

/** A QMP-level failure: the message is the reply's `desc`. */
export class QmpError extends DaemonError {
  constructor(message: string, qmpClass: QmpErrorClass = 'GenericError', code = 'QMP') {
    super(code, message, { qmpClass });
  }
}

/** Block layer failure (I/O, graph, permissions). */
export class BlockError extends DaemonError {
  constructor(code: string, errno: Errno, message: string, opts: Omit<DaemonErrorOptions, 'errno'> = {}) {
    super(code, message, { ...opts, errno });
  }
}

/** NBD protocol failure. `fatal` ones close the connection. */
export class NbdError extends DaemonError {
  readonly fatal: boolean;
  constructor(code: string, errno: Errno, message: string, fatal = false) {
    super(code, message, { errno });
    this.fatal = fatal;
  }
}

/** Command-line failure: printed as `blockd: <option> <arg>: <message>`, exit 1. */
export class CliError extends DaemonError {
  constructor(message: string, code = 'CLI') {
    super(code, message);
  }
}

/** Map a Node.js system error (err.code such as 'ENOENT') to our Errno set. */
export function errnoOf(err: unknown): Errno {
  const code = (err as { code?: unknown } | null)?.code;
  switch (code) {
    case 'EPERM':
    case 'ENOENT':
    case 'EIO':
    case 'ENOMEM':
    case 'EACCES':
    case 'EBUSY':
    case 'EEXIST':
    case 'EINVAL':
    case 'EFBIG':
    case 'ENOSPC':
    case 'EROFS':
    case 'EAGAIN':
    case 'EOVERFLOW':
    case 'ESHUTDOWN':
    case 'ECONNRESET':
    case 'ETIMEDOUT':
    case 'ECANCELED':
      return code;
    case 'ENOTSUP':
    case 'EOPNOTSUPP':
      return 'ENOTSUP';
    case 'EDQUOT':
      // Out of quota is out of space for a client (QEMU's NBD errno mapping does the same).
      return 'ENOSPC';
    default:
      return 'EIO';
  }
}

/** Human text for a Node.js system error, the way QEMU prints strerror(). */
export function strerror(err: unknown): string {
  const code = (err as { code?: unknown } | null)?.code;
  const table: Record<string, string> = {
    ENOENT: 'No such file or directory',
    EACCES: 'Permission denied',
    EPERM: 'Operation not permitted',
    EISDIR: 'Is a directory',
    ENOTDIR: 'Not a directory',
    EEXIST: 'File exists',
    EAGAIN: 'Resource temporarily unavailable',
    EROFS: 'Read-only file system',
    ENOSPC: 'No space left on device',
    EINVAL: 'Invalid argument',
    EADDRINUSE: 'Address already in use',
    ECONNREFUSED: 'Connection refused',
    ENOTSUP: 'Operation not supported',
    EOPNOTSUPP: 'Operation not supported',
    EIO: 'Input/output error',
    EBUSY: 'Device or resource busy',
    EFBIG: 'File too large',
    ENOMEM: 'Cannot allocate memory',
    EOVERFLOW: 'Value too large for defined data type',
    ESHUTDOWN: 'Cannot send after transport endpoint shutdown',
    ECANCELED: 'Operation canceled',
    ECONNRESET: 'Connection reset by peer',
    ETIMEDOUT: 'Connection timed out',
    EPROTO: 'Protocol error',
  };
  if (typeof code === 'string' && table[code] !== undefined) return table[code];
  return err instanceof Error ? err.message : String(err);
}
