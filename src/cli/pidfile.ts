/**
 * `--pidfile PATH` (qsd-cli.md §5): written once startup is complete, contents `PID\n`,
 * mode 0600, removed at normal exit.
 *
 * QSD holds an exclusive fcntl() lock on the file while it runs, so a second daemon
 * with the same path fails with "Cannot lock pid file: Resource temporarily unavailable".
 * Node.js has no fcntl() locks, so the lock is emulated: the file is written under a private
 * name beside it and hard-linked into place (link() fails with EEXIST, like O_CREAT|O_EXCL,
 * but the file never shows up empty: a reader that waits for the path always gets the PID,
 * and a second daemon starting at the same moment never takes a half-written file for a
 * stale one), and an existing file counts as "locked" only while the PID written in
 * it belongs to a live process (other than us). A stale file left by a killed daemon (or
 * one with unreadable contents) is replaced, which is what a real lock allows too.
 * Limitation: if the stale PID has been reused by an unrelated live process, the path
 * stays "locked" until that file is removed.
 */
import {
  closeSync,
  fsyncSync,
  linkSync,
  openSync,
  readFileSync,
  unlinkSync,
  writeSync,
} from 'node:fs';
import { resolve } from 'node:path';
import { CliError, strerror } from '../util/errors.js';

/** link() errors of file systems without hard links. */
const NO_LINKS = new Set(['EPERM', 'ENOTSUP', 'EOPNOTSUPP', 'EMLINK']);

const LOCKED = 'cannot create PID file: Cannot lock pid file: Resource temporarily unavailable';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: it exists but belongs to someone else.
    return (err as { code?: string }).code === 'EPERM';
  }
}

/** The PID recorded in an existing pidfile, or undefined if unreadable/garbage. */
function recordedPid(path: string): number | undefined {
  try {
    const text = readFileSync(path, 'utf8');
    const m = /^\s*(\d{1,10})\s*$/.exec(text);
    if (m === null) return undefined;
    const pid = Number(m[1]);
    return pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/**
 * `PID\n` into a new file of mode 0600. A leftover of ours is removed first; O_EXCL, so a
 * symbolic link planted at the name is not followed.
 */
function writeFull(path: string, pid: number): void {
  let fd: number;
  try {
    try {
      unlinkSync(path);
    } catch {
      // none left over
    }
    fd = openSync(path, 'wx', 0o600);
  } catch (err) {
    throw new CliError(`cannot create PID file: ${strerror(err)}`, 'PIDFILE');
  }
  writePid(fd, pid);
}

/** Write `PID\n`, sync and close `fd`. */
function writePid(fd: number, pid: number): void {
  try {
    writeSync(fd, `${pid}\n`);
    fsyncSync(fd);
  } catch (err) {
    throw new CliError(`cannot create PID file: ${strerror(err)}`, 'PIDFILE');
  } finally {
    closeSync(fd);
  }
}

/** The path exists: throw LOCKED while a live daemon owns it, else remove it (stale). */
function removeStale(abs: string, pid: number): void {
  const owner = recordedPid(abs);
  if (owner !== undefined && owner !== pid && alive(owner)) throw new CliError(LOCKED, 'PIDFILE');
  try {
    unlinkSync(abs);
  } catch (e) {
    if ((e as { code?: string }).code !== 'ENOENT') {
      throw new CliError(`cannot create PID file: ${strerror(e)}`, 'PIDFILE');
    }
  }
}

export class PidFile {
  private removed = false;

  private constructor(
    /** Absolute path (resolved when written, like QSD). */
    readonly path: string,
    readonly pid: number,
  ) {}

  /**
   * Create the pidfile for this process. Throws `CliError` with QSD's text when another
   * live daemon holds it, or `cannot create PID file: <strerror>` on I/O errors.
   */
  static write(path: string, pid: number = process.pid): PidFile {
    const abs = resolve(path);
    const tmp = `${abs}.${pid}.tmp`;
    writeFull(tmp, pid);
    try {
      for (let attempt = 0; attempt < 5; attempt++) {
        try {
          linkSync(tmp, abs);
          return new PidFile(abs, pid);
        } catch (err) {
          const code = (err as { code?: string }).code ?? '';
          if (NO_LINKS.has(code)) {
            // A file system without hard links: create the file in place (not atomic).
            return PidFile.writeInPlace(abs, pid);
          }
          if (code !== 'EEXIST') {
            throw new CliError(`cannot create PID file: ${strerror(err)}`, 'PIDFILE');
          }
        }
        removeStale(abs, pid);
      }
      throw new CliError(LOCKED, 'PIDFILE');
    } finally {
      try {
        unlinkSync(tmp);
      } catch {
        // already gone
      }
    }
  }

  private static writeInPlace(abs: string, pid: number): PidFile {
    for (let attempt = 0; attempt < 5; attempt++) {
      let fd: number;
      try {
        fd = openSync(abs, 'wx', 0o600);
      } catch (err) {
        if ((err as { code?: string }).code !== 'EEXIST') {
          throw new CliError(`cannot create PID file: ${strerror(err)}`, 'PIDFILE');
        }
        removeStale(abs, pid);
        continue;
      }
      writePid(fd, pid);
      return new PidFile(abs, pid);
    }
    throw new CliError(LOCKED, 'PIDFILE');
  }

  /** Remove the file if it is still ours. Safe to call more than once. */
  remove(): void {
    if (this.removed) return;
    this.removed = true;
    if (recordedPid(this.path) !== this.pid) return;
    try {
      unlinkSync(this.path);
    } catch {
      // already gone
    }
  }
}
