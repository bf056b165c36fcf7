import { describe, it, expect, beforeEach, afterEach } from 'vitest';
import { mkdtempSync, rmSync, existsSync, openSync, closeSync, readSync, writeSync, constants } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import net from 'node:net';
import { silentLogger } from '../../src/util/logger.js';
import { Services } from '../../src/qmp/services.js';
import { Dispatcher } from '../../src/qmp/dispatcher.js';
import { SchemaRegistry } from '../../src/qmp/schema-registry.js';
import { MonitorManager } from '../../src/qmp/monitor-manager.js';
import { ALL_COMMANDS } from '../../src/qmp/commands/index.js';
import { QmpTestClient } from '../helpers/qmp-client.js';

const schema = SchemaRegistry.load();
let dir: string;
let services: Services;
let manager: MonitorManager;
let qmp: QmpTestClient;

/** Wait for a condition the daemon reaches asynchronously (an accept, a connect). */
async function until(cond: () => boolean | Promise<boolean>): Promise<void> {
  while (!(await cond())) await new Promise((r) => setTimeout(r, 5));
}

const unix = (path: string, extra: Record<string, unknown> = {}): Record<string, unknown> => ({
  type: 'socket',
  data: { addr: { type: 'unix', data: { path } }, ...extra },
});

async function ok(name: string, args?: Record<string, unknown>): Promise<unknown> {
  const r = await qmp.cmd(name, args);
  if (r.error !== undefined) throw new Error(`${name}: ${r.error.desc}`);
  return r.return;
}

async function err(name: string, args?: Record<string, unknown>): Promise<string | undefined> {
  return (await qmp.cmd(name, args)).error?.desc;
}

async function filename(label: string): Promise<string | undefined> {
  const list = (await ok('query-chardev')) as Array<{ label: string; filename: string }>;
  return list.find((e) => e.label === label)?.filename;
}

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), 'blockd-chardev-'));
  const log = silentLogger();
  services = new Services(log);
  manager = new MonitorManager(services, new Dispatcher(services, ALL_COMMANDS, schema), log);
  const sock = join(dir, 'qmp.sock');
  await manager.addChardev({ id: 'qmp0', addr: { type: 'unix', path: sock }, server: true, wait: false, websocket: false, multiClient: false });
  manager.attach('qmp0');
  qmp = await QmpTestClient.connect({ path: sock }, { negotiate: true });
});

afterEach(async () => {
  qmp.close();
  await manager.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('chardev commands', () => {
  it('lists the monitor chardev with QSD members and a connected filename', async () => {
    expect(await ok('query-chardev')).toEqual([
      { 'frontend-open': true, filename: `unix:${join(dir, 'qmp.sock')},server=on`, label: 'qmp0' },
    ]);
  });

  it('lists the backends blockd opens in QSD order', async () => {
    expect(await ok('query-chardev-backends')).toEqual(
      ['pipe', 'null', 'ringbuf', 'stdio', 'socket', 'file', 'memory'].map((name) => ({ name })),
    );
  });

  it('refuses a backend blockd does not have as QSD refuses one not built in', async () => {
    expect(await err('chardev-add', { id: 'p', backend: { type: 'pty', data: {} } })).toBe(
      "Failed to add chardev 'p': 'pty' is not a valid char driver name",
    );
  });

  it('writes and reads a ringbuf in both formats', async () => {
    await ok('chardev-add', { id: 'r', backend: { type: 'ringbuf', data: { size: 8 } } });
    await ok('ringbuf-write', { device: 'r', data: 'abcdefghij' });
    expect(await ok('ringbuf-read', { device: 'r', size: 3 })).toBe('cde');
    await ok('ringbuf-write', { device: 'r', data: '/w==', format: 'base64' });
    expect(await ok('ringbuf-read', { device: 'r', size: 100, format: 'base64' })).toBe(
      Buffer.from('fghij\xff', 'latin1').toString('base64'),
    );
  });

  it('refuses a ringbuf size that is not a power of two', async () => {
    expect(await err('chardev-add', { id: 'r', backend: { type: 'memory', data: { size: 1000 } } })).toBe(
      "Failed to add chardev 'r': size of ringbuf chardev must be power of two",
    );
  });

  it('takes integers beyond 2^53 as QSD does: INT64_MAX is an int, UINT64_MAX is not', async () => {
    await ok('chardev-add', { id: 'r', backend: { type: 'ringbuf', data: { size: 8 } } });
    await ok('ringbuf-write', { device: 'r', data: 'abc' });
    // Raw text: JSON.stringify cannot write these integers exactly.
    qmp.send('{"execute":"ringbuf-read","arguments":{"device":"r","size":9223372036854775807}}');
    expect(await qmp.next()).toEqual({ return: 'abc' });
    qmp.send('{"execute":"ringbuf-read","arguments":{"device":"r","size":9223372036854775808}}');
    expect(((await qmp.next()) as { error?: { desc: string } }).error?.desc).toBe(
      "Invalid parameter type for 'size', expected: integer",
    );
    qmp.send('{"execute":"ringbuf-read","arguments":{"device":"r","size":18446744073709551615}}');
    expect(((await qmp.next()) as { error?: { desc: string } }).error?.desc).toBe(
      "Invalid parameter type for 'size', expected: integer",
    );
  });

  it('refuses ringbuf commands on other chardevs and on unknown ones', async () => {
    expect(await err('ringbuf-read', { device: 'qmp0', size: 1 })).toBe('qmp0 is not a ringbuf device');
    expect(await err('ringbuf-write', { device: 'nope', data: 'x' })).toBe("Device 'nope' not found");
    await ok('chardev-add', { id: 'r', backend: { type: 'ringbuf', data: {} } });
    expect(await err('ringbuf-read', { device: 'r', size: 0 })).toBe('size must be greater than zero');
  });

  it('refuses to remove or change the chardev of a monitor', async () => {
    expect(await err('chardev-remove', { id: 'qmp0' })).toBe("Chardev 'qmp0' is busy");
    expect(await err('chardev-change', { id: 'qmp0', backend: { type: 'null', data: {} } })).toBe(
      'Chardev user does not support chardev hotswap',
    );
  });

  it('removes a socket chardev and its socket file', async () => {
    const path = join(dir, 's.sock');
    await ok('chardev-add', { id: 's', backend: unix(path) });
    expect(existsSync(path)).toBe(true);
    expect(await filename('s')).toBe(`disconnected:unix:${path},server=on`);
    await ok('chardev-remove', { id: 's' });
    expect(existsSync(path)).toBe(false);
    expect(await err('chardev-remove', { id: 's' })).toBe("Chardev 's' not found");
  });

  it('loses the old chardev when chardev-change fails, as QSD', async () => {
    await ok('chardev-add', { id: 'n', backend: { type: 'null', data: {} } });
    expect(await err('chardev-change', { id: 'n', backend: { type: 'ringbuf', data: { size: 3 } } })).toBe(
      "Failed to add chardev 'n': size of ringbuf chardev must be power of two",
    );
    expect(await err('chardev-send-break', { id: 'n' })).toBe("Chardev 'n' not found");
  });

  it('changes a chardev without a monitor to a new backend', async () => {
    await ok('chardev-add', { id: 'n', backend: { type: 'null', data: {} } });
    await ok('chardev-change', { id: 'n', backend: { type: 'ringbuf', data: {} } });
    await ok('ringbuf-write', { device: 'n', data: 'x' });
    expect(await ok('ringbuf-read', { device: 'n', size: 9 })).toBe('x');
  });

  it('shows both ends of a unix client and server as QEMU names them', async () => {
    const path = join(dir, 's.sock');
    await ok('chardev-add', { id: 'srv', backend: unix(path) });
    await ok('chardev-add', { id: 'cli', backend: unix(path, { server: false }) });
    expect(await filename('cli')).toBe('unix:');
    await until(async () => (await filename('srv')) === `unix:${path},server=on`);
  });

  it('shows the bound port and then both TCP ends', async () => {
    await ok('chardev-add', {
      id: 't',
      backend: { type: 'socket', data: { addr: { type: 'inet', data: { host: '127.0.0.1', port: '0' } } } },
    });
    const port = manager.chardev('t')?.port as number;
    expect(await filename('t')).toBe(`disconnected:tcp:127.0.0.1:${port},server=on`);
    const c = net.connect({ host: '127.0.0.1', port });
    await new Promise((r) => c.once('connect', r));
    const mine = c.localPort as number;
    await until(async () => (await filename('t')) === `tcp:127.0.0.1:${port},server=on <-> 127.0.0.1:${mine}`);
    c.destroy();
  });

  it('reconnects a client with reconnect set once the server appears', async () => {
    const path = join(dir, 'later.sock');
    await ok('chardev-add', { id: 'rc', backend: unix(path, { server: false, reconnect: 1 }) });
    expect(await filename('rc')).toBe(`disconnected:unix:${path}`);
    const server = net.createServer();
    const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
    await new Promise<void>((r) => server.listen(path, r));
    const peer = await accepted;
    await until(async () => (await filename('rc')) === 'unix:');
    peer.destroy();
    await new Promise((r) => server.close(r));
  });

  it('refuses an fd address from a QMP monitor like QSD', async () => {
    expect(
      await err('chardev-add', { id: 'f', backend: { type: 'socket', data: { addr: { type: 'fd', data: { str: '3' } } } } }),
    ).toBe("Failed to add chardev 'f': only QEMU supports file descriptor passing");
  });
});

describe('monitors on other backends', () => {
  it('writes a ringbuf monitor greeting into the ring once released', async () => {
    manager.hold();
    await manager.addChardev({ id: 'rb', backend: 'ringbuf', size: 4096 });
    manager.attach('rb');
    expect(await ok('ringbuf-read', { device: 'rb', size: 4096 })).toBe('');
    manager.release();
    const text = (await ok('ringbuf-read', { device: 'rb', size: 4096 })) as string;
    expect(JSON.parse(text.split('\r\n')[0] as string)).toHaveProperty('QMP.version');
  });

  it('runs a QMP session over pipe FIFOs', async () => {
    const base = join(dir, 'mon');
    execFileSync('mkfifo', [`${base}.in`, `${base}.out`]);
    await manager.addChardev({ id: 'pm', backend: 'pipe', device: base });
    manager.attach('pm');
    const out = openSync(`${base}.out`, constants.O_RDONLY | constants.O_NONBLOCK);
    const inp = openSync(`${base}.in`, constants.O_WRONLY);
    let buf = '';
    const line = async (): Promise<string> => {
      const chunk = Buffer.alloc(65536);
      await until(() => {
        try {
          const n = readSync(out, chunk, 0, chunk.length, null);
          buf += chunk.subarray(0, n).toString();
        } catch {
          // EAGAIN: nothing yet
        }
        return buf.includes('\n');
      });
      const i = buf.indexOf('\n');
      const l = buf.slice(0, i);
      buf = buf.slice(i + 1);
      return l.replace(/\r$/, '');
    };
    expect(JSON.parse(await line())).toHaveProperty('QMP');
    writeSync(inp, '{"execute": "qmp_capabilities"}\n{"execute": "chardev-remove", "arguments": {"id": "pm"}}\n');
    expect(JSON.parse(await line())).toEqual({ return: {} });
    expect(JSON.parse(await line())).toEqual({ error: { class: 'GenericError', desc: "Chardev 'pm' is busy" } });
    closeSync(inp);
    closeSync(out);
  });
});
