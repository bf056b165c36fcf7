/**
 * The `nbd` block driver against real servers: blockd's own, qemu-nbd and qemu-storage-daemon.
 * Data is checked with qemu-img compare/map and nbdinfo through a second blockd export.
 * Reconnect and multi-conn run through a test proxy that can hold and cut connections.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Daemon } from '../helpers/in-process-daemon.js';
import { MemoryBackend } from '../helpers/nbd-memory-backend.js';
import { NbdServer } from '../../src/nbd/server.js';
import { silentLogger } from '../../src/util/logger.js';
import { nativeLoadError } from '../../src/block/native.js';
import { execFileP, requireTool } from '../helpers/nbd-tools.js';

let dir: string;
const daemons: Daemon[] = [];
const children: ChildProcess[] = [];
const servers: Server[] = [];
const nbdServers: NbdServer[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'blockd-nbd-client-'));
});

afterEach(async () => {
  for (const d of daemons.splice(0).reverse()) await d.shutdown();
  for (const s of nbdServers.splice(0)) await s.close();
  for (const c of children.splice(0)) c.kill('SIGTERM');
  for (const s of servers.splice(0)) s.close();
  rmSync(dir, { recursive: true, force: true });
});

async function daemon(sock?: string): Promise<Daemon> {
  const d = new Daemon();
  daemons.push(d);
  if (sock) await d.ok('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  return d;
}

async function rawImage(name: string, size: number, pattern?: string): Promise<string> {
  const img = join(dir, name);
  await execFileP('qemu-img', ['create', '-f', 'raw', img, String(size)]);
  if (pattern) await execFileP('qemu-io', ['-f', 'raw', '-c', pattern, img]);
  return img;
}

/** Daemon A exporting `img` as `name` on a.sock (writable). */
async function exporter(img: string, name = 'disk'): Promise<{ d: Daemon; sock: string }> {
  const sock = join(dir, `${name}-a.sock`);
  const d = await daemon(sock);
  await d.ok('blockdev-add', { driver: 'raw', 'node-name': name, file: { driver: 'file', filename: img } });
  await d.ok('block-export-add', { type: 'nbd', id: name, 'node-name': name, writable: true });
  return { d, sock };
}

/** Daemon B with an nbd node `remote` (options merged in), re-exported writable on b.sock. */
async function reexporter(server: Record<string, unknown>, extra: Record<string, unknown> = {}): Promise<{ d: Daemon; uri: string }> {
  const sock = join(dir, 'b.sock');
  const d = await daemon(sock);
  await d.ok('blockdev-add', { driver: 'nbd', 'node-name': 'remote', server, ...extra });
  await d.ok('block-export-add', { type: 'nbd', id: 'remote', 'node-name': 'remote', writable: extra['read-only'] !== true });
  return { d, uri: `nbd+unix:///remote?socket=${sock}` };
}

function waitForFile(path: string): Promise<void> {
  return (async () => {
    for (let i = 0; i < 200 && !existsSync(path); i++) await sleep(25);
    if (!existsSync(path)) throw new Error(`${path} never appeared`);
  })();
}

/**
 * A Unix socket proxy to `target`. `hold()` stops forwarding client bytes (requests stay in
 * flight), `cut()` destroys every proxied connection, `release()` forwards again.
 */
class Proxy {
  readonly path: string;
  accepted = 0;
  private held = false;
  private readonly pairs: Array<{ a: Socket; b: Socket; queue: Buffer[] }> = [];
  private readonly server: Server;

  constructor(readonly target: string, name: string) {
    this.path = join(dir, name);
    this.server = createServer((a) => {
      this.accepted++;
      const b = createConnection({ path: this.target });
      const pair = { a, b, queue: [] as Buffer[] };
      this.pairs.push(pair);
      a.on('data', (c: Buffer) => (this.held ? pair.queue.push(c) : b.write(c)));
      b.on('data', (c: Buffer) => a.write(c));
      const end = (): void => {
        a.destroy();
        b.destroy();
      };
      a.on('close', end).on('error', end);
      b.on('close', end).on('error', end);
    });
    servers.push(this.server);
  }

  listen(): Promise<void> {
    return new Promise((r) => this.server.listen(this.path, r));
  }

  hold(): void {
    this.held = true;
  }

  release(): void {
    this.held = false;
    for (const p of this.pairs) for (const c of p.queue.splice(0)) p.b.write(c);
  }

  cut(): void {
    for (const p of this.pairs.splice(0)) {
      p.a.destroy();
      p.b.destroy();
    }
  }

  get open(): number {
    return this.pairs.filter((p) => !p.a.destroyed).length;
  }
}

describe('driver=nbd against blockd', () => {
  it('reads, writes, zeroes and maps a remote export like the image itself', async (ctx) => {
    if (!requireTool('qemu-img') || !requireTool('nbdinfo')) return ctx.skip();
    const img = await rawImage('a.raw', 8 << 20, 'write -P 0x5a 1M 2M');
    const { sock } = await exporter(img);
    const { uri } = await reexporter({ type: 'unix', path: sock }, { export: 'disk' });

    const info = await execFileP('nbdinfo', ['--json', uri]);
    const exp = (JSON.parse(info.stdout) as { exports: Array<Record<string, unknown>> }).exports[0]!;
    expect(exp['export-size']).toBe(8 << 20);
    expect(exp['is_read_only']).toBe(false);

    const viaNbd = await execFileP('qemu-img', ['map', '--output=json', '-f', 'raw', uri]);
    const direct = await execFileP('qemu-img', ['map', '--output=json', '-f', 'raw', img]);
    const strip = (s: string): unknown =>
      (JSON.parse(s) as Array<Record<string, unknown>>).map(({ start, length, data, zero }) => ({ start, length, data, zero }));
    // Without the native addon the file driver has no hole detection: everything is data.
    if (!nativeLoadError()) expect(strip(viaNbd.stdout)).toEqual(strip(direct.stdout));

    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 100 5000', '-c', 'write -z 1536K 1M', '-c', 'flush', uri]);
    const { stdout } = await execFileP('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, img]);
    expect(stdout).toContain('Images are identical');
    const data = readFileSync(img);
    expect(data.subarray(100, 5100).every((b) => b === 0x77)).toBe(true);
    expect(data.subarray(1536 << 10, 2560 << 10).every((b) => b === 0)).toBe(true);
    expect(data[(1 << 20) + 1]).toBe(0x5a);
  });

  it('describes the node with the URI filename QSD uses', async () => {
    const img = await rawImage('a.raw', 1 << 20);
    const { sock } = await exporter(img);
    const { d } = await reexporter({ type: 'unix', path: sock }, { export: 'disk' });
    const nodes = (await d.ok('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
    const n = nodes.find((x) => x['node-name'] === 'remote')!;
    expect(n['drv']).toBe('nbd');
    expect(n['file']).toBe(`nbd+unix:///disk?socket=${sock}`);
    expect((n['image'] as Record<string, unknown>)['virtual-size']).toBe(1 << 20);
  });

  it('fails blockdev-add with the error texts of QSD', async () => {
    const img = await rawImage('a.raw', 1 << 20);
    const { sock } = await exporter(img);
    const d = await daemon();
    const missing = join(dir, 'nosuch.sock');
    expect(await d.err('blockdev-add', { driver: 'nbd', 'node-name': 'n', server: { type: 'unix', path: missing } })).toBe(
      `Failed to connect to '${missing}': No such file or directory`,
    );
    expect(
      await d.err('blockdev-add', { driver: 'nbd', 'node-name': 'n', server: { type: 'unix', path: sock }, export: 'nope' }),
    ).toBe('Requested export not available');
    expect(
      await d.err('blockdev-add', { driver: 'nbd', 'node-name': 'n', server: { type: 'inet', host: '127.0.0.1', port: '1' } }),
    ).toBe("Failed to connect to '127.0.0.1:1': Connection refused");
    // Nothing was left behind by the failed opens.
    expect((await d.ok('query-named-block-nodes')) as unknown[]).toEqual([]);
  });

  it('refuses a writable node on a read-only export, and opens it read-only', async () => {
    const img = await rawImage('a.raw', 1 << 20);
    const sock = join(dir, 'a.sock');
    const a = await daemon(sock);
    await a.ok('blockdev-add', { driver: 'raw', 'node-name': 'disk', file: { driver: 'file', filename: img } });
    await a.ok('block-export-add', { type: 'nbd', id: 'disk', 'node-name': 'disk' });
    const d = await daemon();
    const server = { type: 'unix', path: sock };
    expect(await d.err('blockdev-add', { driver: 'nbd', 'node-name': 'n', server, export: 'disk' })).toBe(
      'Could not open image: Permission denied',
    );
    await d.ok('blockdev-add', { driver: 'nbd', 'node-name': 'n', server, export: 'disk', 'read-only': true });
  });

  it('opens once the server appears within open-timeout', async () => {
    const img = await rawImage('a.raw', 1 << 20);
    const sock = join(dir, 'late.sock');
    const d = await daemon();
    const adding = d.ok('blockdev-add', {
      driver: 'nbd',
      'node-name': 'n',
      server: { type: 'unix', path: sock },
      export: 'disk',
      'open-timeout': 30,
    });
    // The first attempt fails (no socket yet); the retry finds the server.
    const a = await daemon(sock);
    await a.ok('blockdev-add', { driver: 'raw', 'node-name': 'disk', file: { driver: 'file', filename: img } });
    await a.ok('block-export-add', { type: 'nbd', id: 'disk', 'node-name': 'disk', writable: true });
    await adding;
  });

  it('serves as the backing file of a qcow2 overlay on another daemon', async (ctx) => {
    if (!requireTool('qemu-img')) return ctx.skip();
    const base = await rawImage('base.raw', 4 << 20, 'write -P 0x11 0 4M');
    const { sock } = await exporter(base, 'base');
    const overlay = join(dir, 'top.qcow2');
    await execFileP('qemu-img', ['create', '-f', 'qcow2', overlay, String(4 << 20)]);
    const bsock = join(dir, 'b.sock');
    const b = await daemon(bsock);
    await b.ok('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'top',
      file: { driver: 'file', filename: overlay },
      backing: { driver: 'nbd', 'node-name': 'base-remote', server: { type: 'unix', path: sock }, export: 'base' },
    });
    await b.ok('block-export-add', { type: 'nbd', id: 'top', 'node-name': 'top', writable: true });
    const uri = `nbd+unix:///top?socket=${bsock}`;
    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 1M 64K', uri]);
    // Reads through the overlay: the new cluster, then the remote backing file elsewhere.
    const r = await execFileP('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x22 1M 64K', '-c', 'read -P 0x11 0 1M', '-c', 'read -P 0x11 2M 2M', uri]);
    expect(r.stdout).not.toContain('Pattern verification failed');
    expect(r.stdout.match(/^read /gm)?.length).toBe(3);
    // The backing file itself is untouched.
    const { stdout } = await execFileP('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x11 0 4M', base]);
    expect(stdout).not.toContain('Pattern verification failed');
  });
});

describe('driver=nbd against QEMU servers', () => {
  it('reads and writes an export of qemu-nbd', async (ctx) => {
    if (!requireTool('qemu-nbd') || !requireTool('qemu-img')) return ctx.skip();
    const img = await rawImage('q.raw', 4 << 20, 'write -P 0x3c 512K 1M');
    const sock = join(dir, 'qn.sock');
    const p = spawn('qemu-nbd', ['-t', '-e', '4', '-k', sock, '-f', 'raw', '-x', 'exp', img], { stdio: 'ignore' });
    children.push(p);
    await waitForFile(sock);
    const { uri } = await reexporter({ type: 'unix', path: sock }, { export: 'exp' });
    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0x99 3M 12345', '-c', 'write -z 0 64K', '-c', 'flush', uri]);
    const { stdout } = await execFileP('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, img]);
    expect(stdout).toContain('Images are identical');
    const data = readFileSync(img);
    expect(data.subarray(3 << 20, (3 << 20) + 12345).every((b) => b === 0x99)).toBe(true);
  });

  it('reads and writes an export of qemu-storage-daemon and maps it like QSD does', async (ctx) => {
    if (!requireTool('qemu-storage-daemon') || !requireTool('qemu-img')) return ctx.skip();
    const img = await rawImage('s.raw', 4 << 20, 'write -P 0x3c 1M 1M');
    const sock = join(dir, 'qsd.sock');
    const p = spawn(
      'qemu-storage-daemon',
      [
        '--blockdev', `driver=file,node-name=f,filename=${img}`,
        '--nbd-server', `addr.type=unix,addr.path=${sock}`,
        '--export', 'type=nbd,id=e,node-name=f,name=exp,writable=on',
      ],
      { stdio: 'ignore' },
    );
    children.push(p);
    await waitForFile(sock);
    const { uri } = await reexporter({ type: 'unix', path: sock }, { export: 'exp' });
    const viaBlockd = await execFileP('qemu-img', ['map', '--output=json', '-f', 'raw', uri]);
    const viaQsd = await execFileP('qemu-img', ['map', '--output=json', '-f', 'raw', `nbd+unix:///exp?socket=${sock}`]);
    const strip = (s: string): unknown =>
      (JSON.parse(s) as Array<Record<string, unknown>>).map(({ start, length, data, zero }) => ({ start, length, data, zero }));
    expect(strip(viaBlockd.stdout)).toEqual(strip(viaQsd.stdout));
    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 0 4096', '-c', 'flush', uri]);
    const { stdout } = await execFileP('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, img]);
    expect(stdout).toContain('Images are identical');
  });
});

describe('driver=nbd connections', () => {
  it('sends requests in flight again after the connection is cut, within reconnect-delay', async () => {
    const img = await rawImage('a.raw', 1 << 20, 'write -P 0x61 0 1M');
    const { sock } = await exporter(img);
    const proxy = new Proxy(sock, 'proxy.sock');
    await proxy.listen();
    const d = await daemon();
    await d.ok('blockdev-add', {
      driver: 'nbd',
      'node-name': 'n',
      server: { type: 'unix', path: proxy.path },
      export: 'disk',
      'reconnect-delay': 60,
    });
    const node = d.svc.graph.find('n');
    proxy.hold();
    const buf = Buffer.alloc(65536);
    const reading = node.io.read(buf, 4096);
    const writing = node.io.write(Buffer.alloc(4096, 0x62), 128 << 10);
    // Both requests are on the wire (held by the proxy) when the connection goes.
    await sleep(20);
    proxy.cut();
    proxy.release();
    await reading;
    await writing;
    expect(buf.every((b) => b === 0x61)).toBe(true);
    expect(proxy.accepted).toBe(2);
    const data = readFileSync(img);
    expect(data.subarray(128 << 10, 132 << 10).every((b) => b === 0x62)).toBe(true);
  });

  it('fails requests with EIO after a cut when reconnect-delay is 0', async () => {
    const img = await rawImage('a.raw', 1 << 20);
    const { sock } = await exporter(img);
    const proxy = new Proxy(sock, 'proxy.sock');
    await proxy.listen();
    const d = await daemon();
    await d.ok('blockdev-add', { driver: 'nbd', 'node-name': 'n', server: { type: 'unix', path: proxy.path }, export: 'disk' });
    const node = d.svc.graph.find('n');
    proxy.hold();
    const reading = node.io.read(Buffer.alloc(4096), 0);
    await sleep(20);
    proxy.cut();
    await expect(reading).rejects.toMatchObject({ errno: 'EIO' });
    await expect(node.io.read(Buffer.alloc(4096), 0)).rejects.toMatchObject({ errno: 'EIO' });
    expect(proxy.accepted).toBe(1);
  });

  it('stripes over x-connections connections when the server allows multi-conn', async () => {
    const img = await rawImage('a.raw', 4 << 20, 'write -P 0x71 0 4M');
    const { sock } = await exporter(img);
    const proxy = new Proxy(sock, 'proxy.sock');
    await proxy.listen();
    const d = await daemon();
    await d.ok('blockdev-add', {
      driver: 'nbd',
      'node-name': 'n',
      server: { type: 'unix', path: proxy.path },
      export: 'disk',
      'x-connections': 4,
    });
    expect(proxy.open).toBe(4);
    const node = d.svc.graph.find('n');
    const bufs = Array.from({ length: 16 }, () => Buffer.alloc(65536));
    await Promise.all(bufs.map((b, i) => node.io.read(b, i * 65536)));
    expect(bufs.every((b) => b.every((x) => x === 0x71))).toBe(true);
  });

  it('uses one connection when the server does not advertise multi-conn', async () => {
    const sock = join(dir, 'mem.sock');
    const server = new NbdServer({ backend: new MemoryBackend([{ name: 'm', size: 1 << 20, multiConn: false }]), log: silentLogger() });
    nbdServers.push(server);
    await server.listen({ type: 'unix', path: sock });
    const proxy = new Proxy(sock, 'proxy.sock');
    await proxy.listen();
    const d = await daemon();
    await d.ok('blockdev-add', {
      driver: 'nbd',
      'node-name': 'n',
      server: { type: 'unix', path: proxy.path },
      export: 'm',
      'x-connections': 4,
    });
    expect(proxy.open).toBe(1);
  });
});
