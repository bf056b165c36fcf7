/**
 * Unix socket files that exist only once they accept connections.
 *
 * bind() creates the file and listen() makes it accept; a client that polls for the file in
 * between (management tools do) gets ECONNREFUSED. Binding under a temporary name beside the
 * final one, listening, then rename()-ing it into place closes that window: rename is atomic,
 * so the final path is either absent or listening.
 */
import { existsSync, lstatSync, renameSync, unlinkSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';

/** sun_path holds 108 bytes including the terminating NUL. */
const SUN_PATH_MAX = 107;

/** Remove a stale socket file at `path` (QEMU replaces those); other files stay. */
export function unlinkStaleSocket(path: string): void {
  try {
    if (lstatSync(path).isSocket()) unlinkSync(path);
  } catch {
    // absent
  }
}

/**
 * Where to bind for `path`: a temporary name in the same directory, or `path` itself when
 * something still occupies it (bind then fails with the error QEMU reports) or when the
 * temporary name would not fit in sun_path.
 */
export function bindPathFor(path: string): string {
  if (existsSync(path)) return path;
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(4).toString('hex')}`);
  return Buffer.byteLength(tmp) <= SUN_PATH_MAX ? tmp : path;
}

/** Move a listening socket bound at `bound` to `path` (no-op when they are the same). */
export function publishSocket(bound: string, path: string): void {
  if (bound === path) return;
  try {
    renameSync(bound, path);
  } catch (err) {
    try {
      unlinkSync(bound);
    } catch {
      // already gone
    }
    throw err;
  }
}
