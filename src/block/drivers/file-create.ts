/**
 * blockdev-create for the `file` driver: create (or reuse) a host file, empty it, and give it
 * its size with the requested preallocation, as QEMU 7.2's file-posix create does:
 *  - off: a sparse file;
 *  - falloc: the blocks are reserved (FALLOC_FL_ZERO_RANGE, zero buffers where unsupported);
 *  - full: zeroes are written;
 *  - metadata: refused after the file was emptied ("Unsupported preallocation mode: metadata").
 *
 * The file is opened synchronously (`openCreateFile`) so that a failure to create it fails the
 * job before blockdev-create replies, as in QSD; the rest is asynchronous and cancellable.
 */
import { constants as fsc, openSync, closeSync, ftruncate, write, close } from 'node:fs';
import { promisify } from 'node:util';
import { BlockError, strerror } from '../../util/errors.js';
import { nativeOps } from '../native.js';

const pFtruncate = promisify(ftruncate);
const pWrite = promisify(write);
const pClose = promisify(close);

export type FilePrealloc = 'off' | 'metadata' | 'falloc' | 'full';

export interface FileCreateOptions {
  filename: string;
  size: number;
  preallocation?: FilePrealloc;
  /** Accepted for compatibility (btrfs NOCOW is not set). */
  nocow?: boolean;
  /** Accepted for compatibility. */
  extentSizeHint?: number;
}

/** Zero-filled chunk for full preallocation. */
const CHUNK = 1 << 20;

/** Open (creating it if needed) the file to create; throws QEMU's "Could not create" text. */
export function openCreateFile(filename: string): number {
  try {
    return openSync(filename, fsc.O_RDWR | fsc.O_CREAT, 0o644);
  } catch (err) {
    throw new BlockError('CREATE', 'EIO', `Could not create '${filename}': ${strerror(err)}`, { cause: err });
  }
}

function isNotSup(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === 'ENOTSUP' || code === 'EOPNOTSUPP';
}

async function writeZeroes(fd: number, from: number, to: number, signal?: AbortSignal): Promise<void> {
  const zero = Buffer.alloc(Math.min(CHUNK, Math.max(0, to - from)));
  for (let pos = from; pos < to; ) {
    signal?.throwIfAborted();
    const n = Math.min(zero.length, to - pos);
    const { bytesWritten } = await pWrite(fd, zero, 0, n, pos);
    pos += bytesWritten;
  }
}

/** Empty `fd` and give it `o.size` bytes with the requested preallocation; closes `fd`. */
export async function fillCreatedFile(fd: number, o: FileCreateOptions, signal?: AbortSignal): Promise<void> {
  try {
    try {
      await pFtruncate(fd, 0);
    } catch (err) {
      throw new BlockError('CREATE', 'EIO', `Could not resize file: ${strerror(err)}`, { cause: err });
    }
    const mode = o.preallocation ?? 'off';
    if (mode === 'metadata') {
      throw new BlockError('CREATE', 'ENOTSUP', 'Unsupported preallocation mode: metadata');
    }
    try {
      await pFtruncate(fd, o.size);
    } catch (err) {
      throw new BlockError('CREATE', 'EIO', `Could not resize file: ${strerror(err)}`, { cause: err });
    }
    if (mode === 'falloc' && o.size > 0) {
      signal?.throwIfAborted();
      try {
        nativeOps().zeroRange(fd, 0, o.size);
      } catch (err) {
        if (!isNotSup(err)) {
          throw new BlockError('CREATE', 'EIO', `Could not preallocate new data: ${strerror(err)}`, { cause: err });
        }
        await writeZeroes(fd, 0, o.size, signal);
      }
    } else if (mode === 'full') {
      try {
        await writeZeroes(fd, 0, o.size, signal);
      } catch (err) {
        if (signal?.aborted) throw err;
        throw new BlockError('CREATE', 'EIO', `Could not write zeros for preallocation: ${strerror(err)}`, { cause: err });
      }
    }
  } finally {
    await pClose(fd).catch(() => undefined);
  }
}

/** Create a host file in one call (tests, tools): `openCreateFile` + `fillCreatedFile`. */
export async function createFile(o: FileCreateOptions, signal?: AbortSignal): Promise<void> {
  const fd = openCreateFile(o.filename);
  await fillCreatedFile(fd, o, signal);
}

/** Close an fd from `openCreateFile` that will not be filled (a job failed before starting). */
export function closeCreateFile(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // already closed
  }
}
