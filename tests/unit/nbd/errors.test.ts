import { describe, expect, it } from 'vitest';
import { nbdErrnoFor, nbdErrorOf } from '../../../src/nbd/errors.js';
import { DaemonError, errnoOf } from '../../../src/util/errors.js';
import {
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
} from '../../../src/nbd/protocol.js';

describe('errno to NBD error mapping', () => {
  it('maps EPERM and EROFS to NBD_EPERM', () => {
    expect(nbdErrnoFor('EPERM', NBD_CMD_WRITE, 0)).toBe(NBD_EPERM);
    expect(nbdErrnoFor('EROFS', NBD_CMD_WRITE, 0)).toBe(NBD_EPERM);
  });

  it('maps ENOSPC and EFBIG to NBD_ENOSPC', () => {
    expect(nbdErrnoFor('ENOSPC', NBD_CMD_WRITE, 0)).toBe(NBD_ENOSPC);
    expect(nbdErrnoFor('EFBIG', NBD_CMD_WRITE, 0)).toBe(NBD_ENOSPC);
  });

  it('answers ENOTSUP only for a FAST_ZERO write-zeroes', () => {
    expect(nbdErrnoFor('ENOTSUP', NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO)).toBe(NBD_ENOTSUP);
    expect(nbdErrnoFor('ENOTSUP', NBD_CMD_WRITE_ZEROES, 0)).toBe(NBD_EINVAL);
    expect(nbdErrnoFor('ENOTSUP', NBD_CMD_WRITE, 0)).toBe(NBD_EINVAL);
  });

  it('answers EOVERFLOW only for a DF read', () => {
    expect(nbdErrnoFor('EOVERFLOW', NBD_CMD_READ, NBD_CMD_FLAG_DF)).toBe(NBD_EOVERFLOW);
    expect(nbdErrnoFor('EOVERFLOW', NBD_CMD_READ, 0)).toBe(NBD_EINVAL);
  });

  it('passes ESHUTDOWN through and defaults to EINVAL', () => {
    expect(nbdErrnoFor('ESHUTDOWN', NBD_CMD_READ, 0)).toBe(NBD_ESHUTDOWN);
    expect(nbdErrnoFor('EBUSY', NBD_CMD_READ, 0)).toBe(NBD_EINVAL);
  });

  it('treats a non-DaemonError failure as EIO', () => {
    expect(nbdErrorOf(new Error('boom'), NBD_CMD_READ, 0)).toBe(NBD_EIO);
    expect(nbdErrorOf(new DaemonError('X', 'x', { errno: 'ENOSPC' }), NBD_CMD_WRITE, 0)).toBe(NBD_ENOSPC);
  });

  it('answers ENOSPC when the file system reports EDQUOT (out of quota), as QEMU does', () => {
    expect(errnoOf(Object.assign(new Error('quota'), { code: 'EDQUOT' }))).toBe('ENOSPC');
    expect(nbdErrnoFor(errnoOf({ code: 'EDQUOT' }), NBD_CMD_WRITE, 0)).toBe(NBD_ENOSPC);
  });
});
