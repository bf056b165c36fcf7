/**
 * `--daemonize` (qsd-cli.md §5). QSD forks, calls setsid() and forks again; the original
 * parent waits until the daemon has finished startup, then exits 0 (or 1 if startup
 * failed), and startup errors still reach the original stderr.
 *
 * Node.js cannot fork, so the parent re-spawns the same script, detached (a new session,
 * like setsid), with an environment marker, stdin/stdout/stderr on /dev/null and one
 * extra pipe (fd 3). The child sends everything it would print on stderr during startup
 * over that pipe as NDJSON messages, then either `ready` or `failed`; the parent copies
 * the text to its own stderr and exits 0 on `ready`, 1 otherwise. After `ready` the child
 * closes the pipe, changes to `/` and keeps running; its umask is 027 from the start.
 */
import { spawn } from 'node:child_process';
import { writeSync, closeSync } from 'node:fs';
import { createInterface } from 'node:readline';

/** Set in the daemon child's environment (and removed from it at once). */
export const DAEMON_ENV = 'BLOCKD_DAEMONIZED_CHILD';
const REPORT_FD = 3;

type Msg = { t: 'stderr'; text: string } | { t: 'ready' } | { t: 'failed' };

/**
 * Parent side: start the daemon and wait for its verdict. Resolves with the exit code
 * for the parent (0 ready, 1 failed). `stderr` receives the child's startup output.
 */
export function spawnDaemon(
  script: string,
  args: readonly string[],
  stderr: (text: string) => void,
): Promise<number> {
  const child = spawn(process.execPath, [...process.execArgv, script, ...args], {
    detached: true,
    stdio: ['ignore', 'ignore', 'ignore', 'pipe'],
    env: { ...process.env, [DAEMON_ENV]: '1' },
  });
  return new Promise<number>((resolve) => {
    let verdict: number | undefined;
    const settle = (code: number): void => {
      if (verdict !== undefined) return;
      verdict = code;
      if (code === 0) child.unref();
      resolve(code);
    };
    child.on('error', (err) => {
      stderr(`cannot start the daemon: ${err.message}\n`);
      settle(1);
    });
    const pipe = child.stdio[REPORT_FD];
    if (pipe === null || pipe === undefined || !('on' in pipe)) {
      settle(1);
      return;
    }
    const rl = createInterface({ input: pipe as NodeJS.ReadableStream });
    rl.on('line', (line) => {
      let msg: Msg | undefined;
      try {
        msg = JSON.parse(line) as Msg;
      } catch {
        return;
      }
      if (msg.t === 'stderr' && typeof msg.text === 'string') stderr(msg.text);
      else if (msg.t === 'ready') settle(0);
      else if (msg.t === 'failed') settle(1);
    });
    rl.on('close', () => {
      // The pipe closed without a verdict: the child died during startup.
      if (verdict === undefined) settle(1);
    });
    child.on('exit', () => {
      if (verdict === undefined) settle(1);
    });
  });
}

/** Child side: the report pipe to the waiting parent. */
export class DaemonChannel {
  private open = true;

  /** The channel if this process is a daemon child (the marker is consumed). */
  static fromEnv(): DaemonChannel | undefined {
    if (process.env[DAEMON_ENV] !== '1') return undefined;
    delete process.env[DAEMON_ENV];
    return new DaemonChannel();
  }

  private send(msg: Msg): void {
    if (!this.open) return;
    try {
      writeSync(REPORT_FD, `${JSON.stringify(msg)}\n`);
    } catch {
      // The parent is gone: nobody is listening any more.
      this.open = false;
    }
  }

  /** Startup stderr text, forwarded to the parent's stderr. Dropped after ready. */
  stderr(text: string): void {
    this.send({ t: 'stderr', text });
  }

  get connected(): boolean {
    return this.open;
  }

  /** Startup finished: release the parent. */
  ready(): void {
    this.send({ t: 'ready' });
    this.close();
  }

  /** Startup failed (the error text was sent before): the parent exits 1. */
  failed(): void {
    this.send({ t: 'failed' });
    this.close();
  }

  private close(): void {
    if (!this.open) return;
    this.open = false;
    try {
      closeSync(REPORT_FD);
    } catch {
      // already closed
    }
  }
}
