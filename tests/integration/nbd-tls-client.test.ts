/**
 * blockd's `nbd` block driver over TLS (`tls-creds`, `tls-hostname`): against qemu-nbd with
 * x509 credentials and against blockd's own TLS server (x509 over TCP, PSK, anon), with QEMU's
 * errors for a wrong CA, a wrong host name, a missing host name and a server without TLS.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { Daemon } from '../helpers/in-process-daemon.js';
import { requireTool } from '../helpers/nbd-tools.js';
import { haveOpenssl, makeTlsCreds, type TlsTestCreds } from '../helpers/tls-certs.js';

const SIZE = 2 << 20;
let root: string;
let creds: TlsTestCreds;

beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'nbd-tls-client-creds-'));
  if (haveOpenssl()) creds = makeTlsCreds(root);
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

let dir: string;
let img: string;
let server: Daemon;
let client: Daemon;
let qemuNbd: ChildProcess | undefined;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'nbd-tls-client-'));
  img = join(dir, 'disk.raw');
  const data = Buffer.alloc(SIZE);
  for (let i = 0; i < SIZE; i += 512) data.writeUInt32BE(i ^ 0x5a5a5a5a, i);
  writeFileSync(img, data);
  server = new Daemon();
  client = new Daemon();
});

afterEach(async () => {
  await client.svc.shutdown();
  await server.svc.shutdown();
  if (qemuNbd && qemuNbd.exitCode === null) {
    const p = qemuNbd;
    await new Promise<void>((r) => {
      p.once('exit', () => r());
      p.kill('SIGTERM');
    });
  }
  qemuNbd = undefined;
  rmSync(dir, { recursive: true, force: true });
});

const x509Client = (certDir = creds.clientDir): Record<string, unknown> => ({
  'qom-type': 'tls-creds-x509', id: 'c0', endpoint: 'client', dir: certDir,
});

/** blockd's TLS server on `addr` exporting img as `disk`. */
async function blockdServer(credsObj: Record<string, unknown>, addr: Record<string, unknown>): Promise<void> {
  await server.ok('object-add', { id: 'tls0', ...credsObj });
  await server.ok('blockdev-add', { driver: 'file', filename: img, 'node-name': 'n0' });
  await server.ok('nbd-server-start', { addr, 'tls-creds': 'tls0' });
  await server.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'n0', name: 'disk', writable: true });
}

/** Open driver=nbd in the client daemon and read the first 64 KiB back through it. */
async function openAndRead(serverAddr: Record<string, unknown>, extra: Record<string, unknown> = {}): Promise<Buffer> {
  await client.ok('blockdev-add', { driver: 'nbd', 'node-name': 'r0', server: serverAddr, export: 'disk', 'tls-creds': 'c0', ...extra });
  const node = client.svc.graph.get('r0')!;
  const buf = Buffer.alloc(65536);
  await node.io.read(buf, 0);
  return buf;
}

async function openError(serverAddr: Record<string, unknown>, extra: Record<string, unknown> = {}): Promise<string> {
  return client.err('blockdev-add', { driver: 'nbd', 'node-name': 'r0', server: serverAddr, export: 'disk', 'tls-creds': 'c0', ...extra });
}

async function startQemuNbd(sock: string): Promise<void> {
  qemuNbd = spawn('qemu-nbd', [
    '--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${creds.serverDir}`,
    '--tls-creds', 'tls0', '-k', sock, '-x', 'disk', '-f', 'raw', '-t', img,
  ], { stdio: 'ignore' });
  for (let i = 0; i < 200 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 25));
  expect(existsSync(sock)).toBe(true);
}

describe('nbd driver with tls-creds', () => {
  it('reads and writes through qemu-nbd --tls-creds (x509, tls-hostname)', async (ctx) => {
    if (!requireTool('qemu-nbd') || !haveOpenssl()) return ctx.skip();
    const sock = join(dir, 'qn.sock');
    await startQemuNbd(sock);
    await client.ok('object-add', x509Client());
    const addr = { type: 'unix', path: sock };
    const got = await openAndRead(addr, { 'tls-hostname': 'localhost' });
    expect(got.equals(readFileSync(img).subarray(0, 65536))).toBe(true);
    const node = client.svc.graph.get('r0')!;
    await node.io.write(Buffer.alloc(4096, 0xab), 8192, {});
    await node.io.flush();
    expect(readFileSync(img).subarray(8192, 8192 + 4096).every((b) => b === 0xab)).toBe(true);
  });

  it('gives QEMU\'s errors: no host name on a unix socket, wrong host name, unknown CA', async (ctx) => {
    if (!requireTool('qemu-nbd') || !haveOpenssl()) return ctx.skip();
    const sock = join(dir, 'qn.sock');
    await startQemuNbd(sock);
    const addr = { type: 'unix', path: sock };
    await client.ok('object-add', x509Client());
    expect(await openError(addr)).toBe('No hostname for certificate validation');
    expect(await openError(addr, { 'tls-hostname': 'elsewhere' })).toBe('Certificate does not match the hostname elsewhere');
    await client.ok('object-del', { id: 'c0' });
    await client.ok('object-add', x509Client(creds.otherClientDir));
    expect(await openError(addr, { 'tls-hostname': 'localhost' })).toBe("The certificate hasn't got a known issuer");
  });

  it('takes the host name from an inet server address (blockd TLS server on TCP)', async (ctx) => {
    if (!haveOpenssl()) return ctx.skip();
    await blockdServer(
      { 'qom-type': 'tls-creds-x509', endpoint: 'server', dir: creds.serverDir },
      { type: 'inet', data: { host: '127.0.0.1', port: '0' } },
    );
    const bound = server.svc.exports.serverAddress;
    expect(bound?.type).toBe('inet');
    const port = bound?.type === 'inet' ? bound.port : 0;
    await client.ok('object-add', x509Client());
    // 127.0.0.1 is in the server certificate's subjectAltName.
    const got = await openAndRead({ type: 'inet', host: '127.0.0.1', port: String(port) });
    expect(got.equals(readFileSync(img).subarray(0, 65536))).toBe(true);
  });

  it('connects to blockd\'s TLS server with PSK, and fails with a wrong key', async (ctx) => {
    if (!haveOpenssl()) return ctx.skip();
    const sock = join(dir, 'b.sock');
    await blockdServer({ 'qom-type': 'tls-creds-psk', endpoint: 'server', dir: creds.pskDir }, { type: 'unix', data: { path: sock } });
    await client.ok('object-add', { 'qom-type': 'tls-creds-psk', id: 'c0', endpoint: 'client', dir: creds.pskDir, username: 'alice' });
    const got = await openAndRead({ type: 'unix', path: sock });
    expect(got.equals(readFileSync(img).subarray(0, 65536))).toBe(true);
    await client.ok('blockdev-del', { 'node-name': 'r0' });
    await client.ok('object-del', { id: 'c0' });
    await client.ok('object-add', { 'qom-type': 'tls-creds-psk', id: 'c0', endpoint: 'client', dir: creds.wrongPskDir, username: 'alice' });
    expect(await openError({ type: 'unix', path: sock })).toMatch(/^TLS handshake failed: /);
  });

  it('connects to blockd\'s TLS server with anonymous credentials', async (ctx) => {
    if (!haveOpenssl()) return ctx.skip();
    const sock = join(dir, 'b.sock');
    await blockdServer({ 'qom-type': 'tls-creds-anon', endpoint: 'server' }, { type: 'unix', data: { path: sock } });
    await client.ok('object-add', { 'qom-type': 'tls-creds-anon', id: 'c0', endpoint: 'client' });
    const got = await openAndRead({ type: 'unix', path: sock });
    expect(got.equals(readFileSync(img).subarray(0, 65536))).toBe(true);
  });

  it('reports a server without TLS like QEMU, and server-endpoint credentials', async (ctx) => {
    if (!haveOpenssl()) return ctx.skip();
    const sock = join(dir, 'plain.sock');
    await server.ok('blockdev-add', { driver: 'file', filename: img, 'node-name': 'n0' });
    await server.ok('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await server.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'n0', name: 'disk' });
    await client.ok('object-add', x509Client());
    expect(await openError({ type: 'unix', path: sock }, { 'tls-hostname': 'localhost' })).toBe(
      'Denied by server for option 5 (starttls)',
    );
    await client.ok('object-del', { id: 'c0' });
    await client.ok('object-add', { 'qom-type': 'tls-creds-anon', id: 'c0', endpoint: 'server' });
    expect(await openError({ type: 'unix', path: sock })).toBe('Expected TLS credentials for a client endpoint');
    expect(await client.err('blockdev-add', {
      driver: 'nbd', 'node-name': 'r1', server: { type: 'unix', path: sock }, 'tls-creds': 'nope',
    })).toBe("No TLS credentials with id 'nope'");
  });
});
