/**
 * errno -> NBD error mapping (NBD spec: Error values), the single place where backend
 * failures are narrowed for the wire. Flag-aware: NBD_ENOTSUP is only legal as the
 * answer to a FAST_ZERO request and NBD_EOVERFLOW only to a DF read; otherwise both
 * become NBD_EINVAL.
 */
import { DaemonError, type Errno } from '../util/errors.js';
import {
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_READ,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
} from './protocol.js';

/** The errno carried by a backend failure; anything not a DaemonError is an I/O error. */
export function errnoOfFailure(err: unknown): Errno {
  return err instanceof DaemonError ? err.errno : 'EIO';
}

/**
 * Map an errno to the NBD error sent for command `cmd` with request `flags`.
 */
export function nbdErrnoFor(errno: Errno, cmd: number, flags: number): number {
  switch (errno) {
    case 'EPERM':
    case 'EROFS':
      return NBD_EPERM;
    case 'EIO':
      return NBD_EIO;
    case 'ENOMEM':
      return NBD_ENOMEM;
    case 'ENOSPC':
    case 'EFBIG':
      return NBD_ENOSPC;
    case 'EOVERFLOW':
      return cmd === NBD_CMD_READ && (flags & NBD_CMD_FLAG_DF) !== 0 ? NBD_EOVERFLOW : NBD_EINVAL;
    case 'ENOTSUP':
      return cmd === NBD_CMD_WRITE_ZEROES && (flags & NBD_CMD_FLAG_FAST_ZERO) !== 0
        ? NBD_ENOTSUP
        : NBD_EINVAL;
    case 'ESHUTDOWN':
      return NBD_ESHUTDOWN;
    default:
      return NBD_EINVAL;
  }
}

/** Shorthand: map a caught failure for `cmd`/`flags`. */
export function nbdErrorOf(err: unknown, cmd: number, flags: number): number {
  return nbdErrnoFor(errnoOfFailure(err), cmd, flags);
}
