/**
 * Test harness shared by the bitmap integration tests: an in-process daemon (Services) driven
 * through the real schema validation and command handlers, plus tool helpers.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createConnection } from 'node:net';
import { existsSync } from 'node:fs';
import { promisify } from 'node:util';

export const run = promisify(execFile);
const CI = process.env.CI === 'true';

/** Whether an external tool is installed (a failure under CI=true). */
export async function haveTool(cmd: string, args: string[] = ['--version']): Promise<boolean> {
  try {
    await run(cmd, args);
    return true;
  } catch {
    if (CI) throw new Error(`${cmd} is required under CI`);
    return false;
  }
}

export { Daemon, type Reply } from './in-process-daemon.js';

/** `nbdinfo --map=CTX` as [offset, length, flags] rows. */
export async function nbdMap(uri: string, ctx: string): Promise<[number, number, number][]> {
  const { stdout } = await run('nbdinfo', [`--map=${ctx}`, uri]);
  return stdout
    .trim()
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => {
      const [o, n, f] = l.trim().split(/\s+/);
      return [Number(o), Number(n), Number(f)];
    });
}

/** A minimal QMP client for a reference qemu-storage-daemon. */
export class RefQsd {
  private buf = '';
  private waiters: Array<(line: Record<string, unknown>) => void> = [];
  private constructor(
    private readonly proc: ChildProcess,
    private readonly sock: ReturnType<typeof createConnection>,
  ) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      let i: number;
      while ((i = this.buf.indexOf('\n')) >= 0) {
        const line = JSON.parse(this.buf.slice(0, i)) as Record<string, unknown>;
        this.buf = this.buf.slice(i + 1);
        if ('event' in line) continue;
        this.waiters.shift()?.(line);
      }
    });
  }

  static async start(qmpPath: string, args: string[] = []): Promise<RefQsd> {
    const pidfile = `${qmpPath}.pid`;
    const proc = spawn(
      'qemu-storage-daemon',
      ['--chardev', `socket,id=m,path=${qmpPath},server=on,wait=off`, '--monitor', 'm', ...args, '--pidfile', pidfile],
      { stdio: 'ignore' },
    );
    // The pidfile, not the socket file: QSD's socket exists a moment before it listens.
    for (let i = 0; i < 400 && !existsSync(pidfile); i++) await new Promise((r) => setTimeout(r, 25));
    const sock = createConnection(qmpPath);
    await new Promise<void>((res, rej) => {
      sock.once('connect', () => res());
      sock.once('error', rej);
    });
    const q = new RefQsd(proc, sock);
    await q.next(); // greeting
    await q.cmd('qmp_capabilities');
    return q;
  }

  private next(): Promise<Record<string, unknown>> {
    return new Promise((r) => this.waiters.push(r));
  }

  async cmd(name: string, args?: Record<string, unknown>): Promise<Record<string, unknown>> {
    const p = this.next();
    this.sock.write(JSON.stringify(args ? { execute: name, arguments: args } : { execute: name }) + '\n');
    return p;
  }

  async stop(): Promise<void> {
    this.sock.destroy();
    if (this.proc.exitCode === null) {
      const done = new Promise((r) => this.proc.once('exit', r));
      this.proc.kill('SIGTERM');
      await done;
    }
  }
}
