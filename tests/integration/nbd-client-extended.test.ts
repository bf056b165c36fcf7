/**
 * blockd's NBD client (driver=nbd) with extended headers: against blockd's own server they are
 * negotiated and carry 64-bit lengths (one WRITE_ZEROES for 5 GiB, a 10 GiB hole in one extent),
 * and the data is checked through a second export with qemu-img and nbdinfo; against qemu-nbd
 * and qemu-storage-daemon 7.2 (no extended headers) the client falls back to compact headers.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, mkdtempSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Daemon } from '../helpers/in-process-daemon.js';
import { nativeLoadError } from '../../src/block/native.js';
import type { NbdBlockDriver } from '../../src/export/nbd-driver.js';
import { execFileP, requireTool } from '../helpers/nbd-tools.js';

const GiB = 2 ** 30;
const MiB = 2 ** 20;

let dir: string;
const daemons: Daemon[] = [];
const children: ChildProcess[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'blockd-nbd-xclient-'));
});

afterEach(async () => {
  for (const d of daemons.splice(0).reverse()) await d.shutdown();
  for (const c of children.splice(0)) c.kill('SIGTERM');
  rmSync(dir, { recursive: true, force: true });
});

async function daemon(sock?: string): Promise<Daemon> {
  const d = new Daemon();
  daemons.push(d);
  if (sock) await d.ok('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  return d;
}

/** Daemon A exporting node `name` (built by `node`) writable on a.sock. */
async function exporter(node: Record<string, unknown>, name = 'disk'): Promise<{ d: Daemon; sock: string }> {
  const sock = join(dir, `${name}-a.sock`);
  const d = await daemon(sock);
  await d.ok('blockdev-add', { 'node-name': name, ...node });
  await d.ok('block-export-add', { type: 'nbd', id: name, 'node-name': name, writable: true });
  return { d, sock };
}

/** Daemon B with an nbd node `remote` on `sock`, re-exported writable on b.sock. */
async function reexporter(sock: string, exp: string, extra: Record<string, unknown> = {}) {
  const bsock = join(dir, 'b.sock');
  const d = await daemon(bsock);
  await d.ok('blockdev-add', { driver: 'nbd', 'node-name': 'remote', server: { type: 'unix', path: sock }, export: exp, ...extra });
  await d.ok('block-export-add', { type: 'nbd', id: 'remote', 'node-name': 'remote', writable: true });
  const driver = d.svc.graph.find('remote').driver as NbdBlockDriver;
  return { d, driver, uri: `nbd+unix:///remote?socket=${bsock}` };
}

function sparseFile(name: string, size: number, dataAt: number, dataLen: number, byte: number): string {
  const img = join(dir, name);
  const fd = openSync(img, 'w');
  ftruncateSync(fd, size);
  writeSync(fd, Buffer.alloc(dataLen, byte), 0, dataLen, dataAt);
  closeSync(fd);
  return img;
}

async function zeroOps(d: Daemon, id: string): Promise<number> {
  const all = (await d.ok('query-block-exports')) as Array<{ id: string; statistics: Record<string, number> }>;
  return all.find((e) => e.id === id)!.statistics['zero-operations']!;
}

const strip = (s: string): unknown =>
  (JSON.parse(s) as Array<Record<string, unknown>>).map(({ start, length, data, zero }) => ({ start, length, data, zero }));

describe('driver=nbd with extended headers against blockd', () => {
  it('negotiates them and serves reads, writes, zeroes and maps through a second export', async (ctx) => {
    if (!requireTool('qemu-img') || !requireTool('qemu-io') || !requireTool('nbdinfo')) return ctx.skip();
    const img = join(dir, 'a.raw');
    await execFileP('qemu-img', ['create', '-f', 'raw', img, String(8 * MiB)]);
    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 1M 2M', img]);
    const { sock } = await exporter({ driver: 'raw', file: { driver: 'file', filename: img } });
    const { driver, uri } = await reexporter(sock, 'disk');
    expect(driver.extendedHeaders).toBe(true);

    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 100 5000', '-c', 'write -z 1536K 1M', '-c', 'flush', uri]);
    const { stdout } = await execFileP('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, img]);
    expect(stdout).toContain('Images are identical');
    const data = readFileSync(img);
    expect(data.subarray(100, 5100).every((b) => b === 0x77)).toBe(true);
    expect(data.subarray(1536 << 10, 2560 << 10).every((b) => b === 0)).toBe(true);
    if (!nativeLoadError()) {
      const viaNbd = await execFileP('qemu-img', ['map', '--output=json', '-f', 'raw', uri]);
      const direct = await execFileP('qemu-img', ['map', '--output=json', '-f', 'raw', img]);
      expect(strip(viaNbd.stdout)).toEqual(strip(direct.stdout));
      const m1 = await execFileP('nbdinfo', ['--map', uri]);
      const m2 = await execFileP('nbdinfo', ['--map', `nbd+unix:///disk?socket=${sock}`]);
      expect(m1.stdout).toBe(m2.stdout);
    }
  });

  it('reports a 10 GiB hole as one extent and maps a 16 GiB sparse file like the file itself', async (ctx) => {
    if (nativeLoadError()) return ctx.skip(); // hole detection needs the addon
    if (!requireTool('nbdinfo') || !requireTool('qemu-img')) return ctx.skip();
    const img = sparseFile('big.raw', 16 * GiB, 10 * GiB, MiB, 0x42);
    const { sock } = await exporter({ driver: 'raw', file: { driver: 'file', filename: img } });
    const { driver, uri } = await reexporter(sock, 'disk');
    expect(driver.extendedHeaders).toBe(true);
    const ext = await driver.blockStatus(0, 16 * GiB);
    expect(ext[0]).toMatchObject({ offset: 0, length: 10 * GiB });
    expect(ext[1]).toMatchObject({ offset: 10 * GiB, length: MiB });
    // The same through the node's I/O layer and a second export.
    const viaNbd = await execFileP('nbdinfo', ['--map', uri]);
    const direct = await execFileP('nbdinfo', ['--map', `nbd+unix:///disk?socket=${sock}`]);
    expect(viaNbd.stdout).toBe(direct.stdout);
    const m = await execFileP('qemu-img', ['map', '--output=json', '-f', 'raw', uri]);
    const f = await execFileP('qemu-img', ['map', '--output=json', '-f', 'raw', img]);
    expect(strip(m.stdout)).toEqual(strip(f.stdout));
  });

  it('zeroes 5 GiB in one request with extended headers, in 1 GiB pieces without', async () => {
    const node = { driver: 'null-co', size: 8 * 2 ** 40, 'read-zeroes': true };
    const { d: a, sock } = await exporter(node, 'z');
    const ext = await reexporter(sock, 'z');
    expect(ext.driver.extendedHeaders).toBe(true);
    const io = ext.d.svc.graph.find('remote').io;
    await io.writeZeroes(GiB, 5 * GiB, {});
    expect(await zeroOps(a, 'z')).toBe(1);
    // The same with x-extended-headers off: compact headers, u32 lengths.
    const c = await daemon();
    await c.ok('blockdev-add', {
      driver: 'nbd',
      'node-name': 'compact',
      server: { type: 'unix', path: sock },
      export: 'z',
      'x-extended-headers': false,
    });
    const compact = c.svc.graph.find('compact');
    expect((compact.driver as NbdBlockDriver).extendedHeaders).toBe(false);
    await compact.io.writeZeroes(GiB, 5 * GiB, {});
    expect(await zeroOps(a, 'z')).toBe(1 + 5);
    const st = await compact.io.blockStatus(0, 8 * GiB);
    expect(st[0]!.length).toBeLessThan(2 ** 32);
    const wide = await io.blockStatus(0, 8 * GiB);
    expect(wide[0]!.length).toBe(8 * GiB);
  });
});

function waitForFile(path: string): Promise<void> {
  return (async () => {
    for (let i = 0; i < 200 && !existsSync(path); i++) await sleep(25);
    if (!existsSync(path)) throw new Error(`${path} never appeared`);
  })();
}

describe('driver=nbd falls back to compact headers against QEMU 7.2 servers', () => {
  it('qemu-nbd: compact headers, data intact', async (ctx) => {
    if (!requireTool('qemu-nbd') || !requireTool('qemu-img')) return ctx.skip();
    const img = join(dir, 'q.raw');
    await execFileP('qemu-img', ['create', '-f', 'raw', img, String(4 * MiB)]);
    const sock = join(dir, 'qn.sock');
    const p = spawn('qemu-nbd', ['-t', '-e', '4', '-k', sock, '-f', 'raw', '-x', 'exp', img], { stdio: 'ignore' });
    children.push(p);
    await waitForFile(sock);
    const { driver, uri } = await reexporter(sock, 'exp', { 'open-timeout': 10 });
    expect(driver.extendedHeaders).toBe(false);
    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0x99 3M 12345', '-c', 'write -z 0 64K', '-c', 'flush', uri]);
    const { stdout } = await execFileP('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, img]);
    expect(stdout).toContain('Images are identical');
  });

  it('qemu-storage-daemon: compact headers, block status like QSD', async (ctx) => {
    if (!requireTool('qemu-storage-daemon') || !requireTool('qemu-img')) return ctx.skip();
    const img = join(dir, 's.raw');
    await execFileP('qemu-img', ['create', '-f', 'raw', img, String(4 * MiB)]);
    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 1M 1M', img]);
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
    const { driver, uri } = await reexporter(sock, 'exp', { 'open-timeout': 10 });
    expect(driver.extendedHeaders).toBe(false);
    const viaBlockd = await execFileP('qemu-img', ['map', '--output=json', '-f', 'raw', uri]);
    const viaQsd = await execFileP('qemu-img', ['map', '--output=json', '-f', 'raw', `nbd+unix:///exp?socket=${sock}`]);
    expect(strip(viaBlockd.stdout)).toEqual(strip(viaQsd.stdout));
  });
});
