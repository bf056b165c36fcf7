import { describe, it, expect, beforeAll, afterEach } from 'vitest';
import { existsSync, readFileSync, statSync, writeFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import net from 'node:net';
import {
  ROOT,
  buildDist,
  cleanupProcesses,
  runBlockd,
  startBlockd,
  tempDir,
} from '../helpers/blockd-process.js';

beforeAll(buildDist, 120_000);
afterEach(cleanupProcesses);

const start = startBlockd;
const runToEnd = runBlockd;

/** Poll until `cond` holds (no timing assertion: the test timeout is the only limit). */
async function until(cond: () => boolean): Promise<void> {
  while (!cond()) await new Promise((r) => setTimeout(r, 20));
}

/** The file's text, or undefined while it does not exist. */
function contentOf(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    if ((err as { code?: string }).code === 'ENOENT') return undefined;
    throw err;
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Send QMP commands after negotiation; resolves with every line received until EOF. */
function qmp(path: string, commands: object[]): Promise<string[]> {
  return new Promise((res, rej) => {
    const s = net.connect({ path });
    let buf = '';
    s.on('data', (d) => (buf += d.toString()));
    s.on('error', rej);
    s.on('close', () => res(buf.split(/\r?\n/).filter((l) => l !== '')));
    s.write(`${JSON.stringify({ execute: 'qmp_capabilities' })}\n`);
    for (const c of commands) s.write(`${JSON.stringify(c)}\n`);
  });
}

describe('blockd command line: help, version, errors', () => {
  it('prints the usage on stdout and exits 0 for --help', async () => {
    const r = await runToEnd(['--help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^Usage: blockd \[options\]/);
    expect(r.stdout).toContain('--config');
    expect(r.stderr).toBe('');
  });

  it('prints the version and a copyright line for -V', async () => {
    const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string };
    const r = await runToEnd(['-V']);
    expect(r.code).toBe(0);
    const lines = r.stdout.split('\n');
    expect(lines[0]).toBe(`blockd version ${pkg.version} (compatible with qemu-storage-daemon 7.2)`);
    expect(lines[1]).toMatch(/^Copyright/);
  });

  it('accepts a unique prefix of --version', async () => {
    expect((await runToEnd(['--ver'])).code).toBe(0);
  });

  it('prints the help even after a bad option argument (pass 1)', async () => {
    const r = await runToEnd(['--blockdev', 'bogus', '--help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^Usage:/);
  });

  it('exits 1 on an unknown option before creating anything', async () => {
    const dir = tempDir();
    const sock = join(dir, 'm.sock');
    const r = await runToEnd(['--chardev', `socket,id=m,path=${sock},server=on,wait=off`, '--bogus']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe("blockd: unrecognized option '--bogus'\n");
    expect(existsSync(sock)).toBe(false);
  });

  it('reports a missing option argument like getopt', async () => {
    const r = await runToEnd(['--blockdev']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe("blockd: option '--blockdev' requires an argument\n");
  });

  it('refuses a non-option argument', async () => {
    const r = await runToEnd(['extra']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe('blockd: extra: Unexpected argument\n');
  });

  it('quotes the option as typed in a keyval error', async () => {
    const r = await runToEnd(['--blockdev=null-co,node-name=a,bogus=1']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe("blockd: --blockdev=null-co,node-name=a,bogus=1: Parameter 'bogus' is unexpected\n");
  });

  it('reports keyval type errors with QEMU text', async () => {
    const r = await runToEnd(['--blockdev', 'null-co,node-name=a,size=1M']);
    expect(r.stderr).toBe("blockd: --blockdev null-co,node-name=a,size=1M: Parameter 'size' expects integer\n");
  });

  it('reports JSON syntax errors with QEMU text', async () => {
    const arg = '{"driver":"null-co","node-name":"a","size":1048576';
    const r = await runToEnd(['--blockdev', arg]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`blockd: --blockdev ${arg}: JSON parse error, premature EOI\n`);
  });

  it('says help is not available for --blockdev help', async () => {
    const r = await runToEnd(['--blockdev', 'help']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe('blockd: --blockdev help: Help is not available for this option\n');
  });

  it('lists the chardev backends and exits 0 for --chardev help', async () => {
    const r = await runToEnd(['--chardev', 'help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('  socket\n');
  });

  it('refuses an unknown object type with the QAPI enum error', async () => {
    const r = await runToEnd(['--object', 'bogus,id=s']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe("blockd: --object bogus,id=s: Parameter 'qom-type' does not accept value 'bogus'\n");
  });

  it('refuses readline monitors', async () => {
    const dir = tempDir();
    const r = await runToEnd([
      '--chardev', `socket,id=m,path=${join(dir, 'm.sock')},server=on,wait=off`,
      '--monitor', 'chardev=m,mode=readline',
    ]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe('blockd: --monitor chardev=m,mode=readline: Only QMP is supported\n');
  });

  it('prints the deprecation warnings of short-form chardev booleans', async () => {
    const dir = tempDir();
    const arg = `socket,id=m,path=${join(dir, 'm.sock')},server,nowait`;
    const r = await runToEnd(['--chardev', arg, 'extra']);
    expect(r.stderr).toBe(
      `blockd: --chardev ${arg}: warning: short-form boolean option 'server' deprecated\n` +
        'Please use server=on instead\n' +
        `blockd: --chardev ${arg}: warning: short-form boolean option 'nowait' deprecated\n` +
        'Please use wait=off instead\n' +
        'blockd: extra: Unexpected argument\n',
    );
  });

  it('removes the socket files it created when a later option fails (QSD leaves them)', async () => {
    const dir = tempDir();
    const sock = join(dir, 'm.sock');
    const r = await runToEnd(['--chardev', `socket,id=m,path=${sock},server=on,wait=off`, '--monitor', 'nope']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe('blockd: --monitor nope: chardev "nope" not found\n');
    expect(existsSync(sock)).toBe(false);
  });
});

describe('blockd process lifecycle', () => {
  it('writes the pidfile once ready with PID and mode 0600, and cleans up on SIGTERM', async () => {
    const dir = tempDir();
    const sock = join(dir, 'qmp.sock');
    const pidfile = join(dir, 'pid');
    const { child, done } = start([
      '--pidfile', pidfile,
      '--chardev', `socket,id=m,path=${sock},server=on,wait=off`,
      '--monitor', 'm',
    ]);
    await until(() => existsSync(pidfile));
    expect(readFileSync(pidfile, 'utf8')).toBe(`${child.pid}\n`);
    expect(statSync(pidfile).mode & 0o777).toBe(0o600);
    expect(existsSync(sock)).toBe(true);
    child.kill('SIGTERM');
    const r = await done;
    expect(r.code).toBe(0);
    expect(existsSync(pidfile)).toBe(false);
    expect(existsSync(sock)).toBe(false);
  });

  it('refuses a second daemon with the same pidfile', async () => {
    const dir = tempDir();
    const pidfile = join(dir, 'pid');
    const first = start(['--pidfile', pidfile]);
    await until(() => existsSync(pidfile));
    const r = await runToEnd(['--pidfile', pidfile]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe('blockd: cannot create PID file: Cannot lock pid file: Resource temporarily unavailable\n');
    expect(readFileSync(pidfile, 'utf8')).toBe(`${first.child.pid}\n`);
    first.child.kill('SIGINT');
    expect((await first.done).code).toBe(0);
  });

  it('replaces a stale pidfile left by a dead process', async () => {
    const dir = tempDir();
    const pidfile = join(dir, 'pid');
    // A PID that cannot be alive: above the kernel's pid_max limit.
    writeFileSync(pidfile, '99999999\n');
    const { child, done } = start(['--pidfile', pidfile]);
    // The daemon removes the stale file before it links its own in: it may vanish in between.
    await until(() => contentOf(pidfile) === `${child.pid}\n`);
    child.kill('SIGHUP');
    expect((await done).code).toBe(0);
    expect(existsSync(pidfile)).toBe(false);
  });

  it('exits 0 after quit and removes its files', async () => {
    const dir = tempDir();
    const sock = join(dir, 'qmp.sock');
    const pidfile = join(dir, 'pid');
    const { done } = start(['--chardev', `socket,id=m,path=${sock},server=on,wait=off`, '--monitor', 'm', '--pidfile', pidfile]);
    await until(() => existsSync(pidfile));
    const lines = await qmp(sock, [{ execute: 'quit' }]);
    expect(lines.slice(1)).toEqual(['{"return": {}}', '{"return": {}}']);
    expect((await done).code).toBe(0);
    expect(existsSync(pidfile)).toBe(false);
    expect(existsSync(sock)).toBe(false);
  });

  it('starts the NBD server from the flat --nbd-server address and exports a node', async () => {
    const dir = tempDir();
    const sock = join(dir, 'qmp.sock');
    const nbd = join(dir, 'nbd.sock');
    const pidfile = join(dir, 'pid');
    const { done } = start([
      '--blockdev', 'null-co,node-name=n0,size=0x100000',
      '--nbd-server', `addr.type=unix,addr.path=${nbd}`,
      '--export', 'nbd,id=e0,node-name=n0,name=disk,writable=on',
      '--chardev', `socket,id=m,path=${sock},server=on,wait=off`, '--monitor', 'm', '--pidfile', pidfile,
    ]);
    await until(() => existsSync(pidfile));
    expect(existsSync(nbd)).toBe(true);
    const lines = await qmp(sock, [{ execute: 'query-block-exports' }, { execute: 'quit' }]);
    expect(lines[2]).toContain('"id": "e0"');
    expect(lines[2]).toContain('"writable": true');
    expect((await done).code).toBe(0);
  });

  it('runs --config commands through the dispatcher in order', async () => {
    const dir = tempDir();
    const sock = join(dir, 'qmp.sock');
    const pidfile = join(dir, 'pid');
    const config = join(dir, 'c.json');
    writeFileSync(
      config,
      JSON.stringify([{ execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'n0' } }]),
    );
    const { child, done } = start([
      '--config', config,
      '--chardev', `socket,id=m,path=${sock},server=on,wait=off`, '--monitor', 'm', '--pidfile', pidfile,
    ]);
    await until(() => existsSync(pidfile));
    const lines = await qmp(sock, [{ execute: 'query-named-block-nodes' }, { execute: 'quit' }]);
    expect(lines[2]).toContain('"node-name": "n0"');
    expect((await done).code).toBe(0);
    expect(child.exitCode).toBe(0);
  });

  it('reports a failing --config command with its name', async () => {
    const dir = tempDir();
    const config = join(dir, 'c.json');
    writeFileSync(config, JSON.stringify([{ execute: 'blockdev-add', arguments: { driver: 'null-co' } }]));
    const r = await runToEnd(['--config', config]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`^blockd: --config ${config}: blockdev-add: .+\\n$`));
  });

  it('daemonizes: the parent exits 0 once ready and the daemon runs in / with umask 027', async () => {
    const dir = tempDir();
    const sock = join(dir, 'qmp.sock');
    const r = await runToEnd(
      ['--daemonize', '--chardev', `socket,id=m,path=${sock},server=on,wait=off`, '--monitor', 'm', '--pidfile', 'pid'],
      { cwd: dir },
    );
    expect(r.code).toBe(0);
    const pidfile = join(dir, 'pid');
    expect(existsSync(pidfile)).toBe(true);
    const pid = Number(readFileSync(pidfile, 'utf8'));
    expect(alive(pid)).toBe(true);
    try {
      expect(readlinkSync(`/proc/${pid}/cwd`)).toBe('/');
      expect(readFileSync(`/proc/${pid}/status`, 'utf8')).toMatch(/Umask:\s+0027/);
      expect(statSync(sock).mode & 0o777).toBe(0o750);
    } finally {
      process.kill(pid, 'SIGTERM');
    }
    await until(() => !existsSync(pidfile));
    await until(() => !alive(pid));
  });

  it('daemonizes: the parent exits 1 and shows the error when startup fails', async () => {
    const r = await runToEnd(['--daemonize', '--blockdev', 'bogus']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe("blockd: --blockdev bogus: Parameter 'driver' does not accept value 'bogus'\n");
  });
});
