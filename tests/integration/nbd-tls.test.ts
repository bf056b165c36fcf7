/**
 * NBD over TLS (nbd-server-start tls-creds / tls-authz): the whole stack (objects, export
 * manager, NBD engine) in process, driven by real clients (nbdinfo, nbdsh, qemu-img, qemu-io)
 * and by a raw socket client for the protocol rules before and around NBD_OPT_STARTTLS.
 */
import net from 'node:net';
import tls from 'node:tls';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { Daemon } from '../helpers/in-process-daemon.js';
import { execFileP, requireTool } from '../helpers/nbd-tools.js';
import { ByteStream } from '../helpers/byte-stream.js';
import { haveOpenssl, makeTlsCreds, type TlsTestCreds } from '../helpers/tls-certs.js';
import {
  decodeOptionReply,
  encodeOption,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_LIST,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_SERVER,
  type OptionReply,
} from '../../src/nbd/protocol.js';

const SIZE = 4 << 20;
let root: string;
let creds: TlsTestCreds;

beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'nbd-tls-creds-'));
  if (haveOpenssl()) creds = makeTlsCreds(root);
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

let dir: string;
let sock: string;
let img: string;
let d: Daemon;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'nbd-tls-'));
  sock = join(dir, 'nbd.sock');
  img = join(dir, 'disk.raw');
  const data = Buffer.alloc(SIZE);
  for (let i = 0; i < SIZE; i += 4096) data.writeUInt32BE(i, i);
  writeFileSync(img, data);
  d = new Daemon();
});

afterEach(async () => {
  await d.svc.shutdown();
  rmSync(dir, { recursive: true, force: true });
});

/** A server with `creds` (object-add props) and optional authz object, exporting `disk`. */
async function serve(credsObj: Record<string, unknown>, authz?: Record<string, unknown>): Promise<void> {
  await d.ok('object-add', { id: 'tls0', ...credsObj });
  if (authz) await d.ok('object-add', { id: 'az0', ...authz });
  await d.ok('blockdev-add', { driver: 'file', filename: img, 'node-name': 'n0' });
  await d.ok('nbd-server-start', {
    addr: { type: 'unix', data: { path: sock } },
    'tls-creds': 'tls0',
    ...(authz ? { 'tls-authz': 'az0' } : {}),
  });
  await d.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'n0', name: 'disk', writable: true });
}

const x509Server = (): Record<string, unknown> => ({ 'qom-type': 'tls-creds-x509', endpoint: 'server', dir: creds.serverDir });
const pskServer = (): Record<string, unknown> => ({ 'qom-type': 'tls-creds-psk', endpoint: 'server', dir: creds.pskDir });

const certUri = (certDir: string): string => `nbds+unix:///disk?socket=${sock}&tls-certificates=${certDir}`;
const pskUri = (user: string, pskDir: string): string =>
  `nbds+unix://${user}@/disk?socket=${sock}&tls-psk-file=${join(pskDir, 'keys.psk')}`;

/** Run a tool; resolve with its exit code and output instead of throwing. */
async function run(cmd: string, args: string[], env?: NodeJS.ProcessEnv): Promise<{ code: number; out: string }> {
  try {
    const r = await execFileP(cmd, args, { timeout: 60_000, ...(env ? { env } : {}) });
    return { code: 0, out: `${r.stdout}${r.stderr}` };
  } catch (e) {
    const x = e as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof x.code === 'number' ? x.code : 1, out: `${x.stdout ?? ''}${x.stderr ?? ''}` };
  }
}

function qemuOpts(credsObj: string, extra = ''): string[] {
  return [
    '--object', credsObj,
    '--image-opts', `driver=nbd,server.type=unix,server.path=${sock},export=disk,tls-creds=tls0${extra}`,
  ];
}

// ------------------------------------------------------------------ raw socket client

/** Exact bytes over a plain socket, then (after STARTTLS) over a TLS socket on top of it. */
class RawTlsClient {
  private readonly bytes: ByteStream;
  private stream: net.Socket;

  private constructor(readonly plain: net.Socket) {
    this.stream = plain;
    this.bytes = new ByteStream(plain);
  }

  static connect(path: string): Promise<RawTlsClient> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection(path);
      s.once('connect', () => resolve(new RawTlsClient(s)));
      s.once('error', reject);
    });
  }

  read(n: number): Promise<Buffer | undefined> {
    return this.bytes.read(n);
  }

  waitClosed(): Promise<boolean> {
    return this.bytes.waitClosed();
  }

  write(b: Buffer): void {
    this.stream.write(b);
  }

  async handshake(): Promise<void> {
    const g = await this.read(18);
    expect(g).toBeDefined();
    this.write(Buffer.from([0, 0, 0, 3]));
  }

  async option(opt: number, payload?: Buffer): Promise<OptionReply | undefined> {
    this.write(encodeOption(opt, payload));
    return this.reply();
  }

  async reply(): Promise<OptionReply | undefined> {
    const h = await this.read(20);
    if (!h) return undefined;
    const len = h.readUInt32BE(16);
    const p = len > 0 ? await this.read(len) : Buffer.alloc(0);
    if (!p) return undefined;
    return decodeOptionReply(Buffer.concat([h, p]));
  }

  /** Switch to TLS over the same socket with the given client certificate directory. */
  async startTls(certDir: string): Promise<void> {
    const t = tls.connect({
      socket: this.plain,
      ca: readFileSync(join(certDir, 'ca-cert.pem')),
      cert: readFileSync(join(certDir, 'client-cert.pem')),
      key: readFileSync(join(certDir, 'client-key.pem')),
      servername: 'localhost',
    });
    this.stream = t;
    this.bytes.attach(t);
    await new Promise<void>((resolve, reject) => {
      t.once('secureConnect', resolve);
      t.once('error', reject);
    });
  }

  destroy(): void {
    this.stream.destroy();
    this.plain.destroy();
  }
}

function text(r: OptionReply | undefined): string {
  return r?.payload.toString('utf8') ?? '';
}

function goPayload(name: string): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.alloc(4 + n.length + 2);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  return b;
}

async function connectionsSettle(): Promise<number> {
  // Bounded wait for the server to forget closed connections.
  for (let i = 0; i < 200; i++) {
    if (d.svc.exports.serverClientCount === 0) return 0;
    await new Promise((r) => setTimeout(r, 10));
  }
  return -1;
}

// ------------------------------------------------------------------ tests

describe('NBD server with x509 credentials', () => {
  it('serves nbdinfo over TLS with a client certificate', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo || !haveOpenssl()) return ctx.skip();
    await serve(x509Server());
    const r = await run(nbdinfo, ['--json', certUri(creds.clientDir)]);
    expect(r.code).toBe(0);
    const j = JSON.parse(r.out) as { TLS: boolean; exports: Array<Record<string, unknown>> };
    expect(j.TLS).toBe(true);
    expect(j.exports[0]).toMatchObject({ 'export-name': 'disk', 'export-size': SIZE });
  });

  it('writes and reads back through qemu-io with tls-creds, and qemu-img compares', async (ctx) => {
    const qemuIo = requireTool('qemu-io');
    const qemuImg = requireTool('qemu-img');
    if (!qemuIo || !qemuImg || !haveOpenssl()) return ctx.skip();
    await serve(x509Server());
    const cli = `tls-creds-x509,id=tls0,endpoint=client,dir=${creds.clientDir}`;
    const io = await run(qemuIo, [
      ...qemuOpts(cli, ',tls-hostname=localhost'),
      '-c', 'write -P 0x5a 64k 128k',
      '-c', 'read -P 0x5a 64k 128k',
    ]);
    expect(io.out).not.toMatch(/fail|error/i);
    expect(io.code).toBe(0);
    expect(readFileSync(img).subarray(65536, 65536 + 131072).every((b) => b === 0x5a)).toBe(true);
    const out = join(dir, 'copy.raw');
    const conv = await run(qemuImg, ['convert', ...qemuOpts(cli, ',tls-hostname=localhost'), '-O', 'raw', out]);
    expect(conv.code).toBe(0);
    expect(readFileSync(out).equals(readFileSync(img))).toBe(true);
    const cmp = await run(qemuImg, [
      'compare', '--object', cli, '--image-opts',
      `driver=nbd,server.type=unix,server.path=${sock},export=disk,tls-creds=tls0,tls-hostname=localhost`,
      `driver=raw,file.driver=file,file.filename=${out}`,
    ]);
    expect(cmp.out).toContain('Images are identical.');
  });

  it('serves nbdsh (python libnbd) with TLS required', async (ctx) => {
    const nbdsh = requireTool('nbdsh');
    const py = requireTool('python3-nbd');
    if (!nbdsh || !py || !haveOpenssl()) return ctx.skip();
    await serve(x509Server());
    const script = [
      'h.set_tls(nbd.TLS_REQUIRE)',
      `h.set_tls_certificates('${creds.clientDir}')`,
      `h.connect_uri('nbd+unix:///disk?socket=${sock}')`,
      "h.pwrite(b'tls!' * 1024, 8192)",
      "assert h.pread(4096, 8192) == b'tls!' * 1024",
      'print(h.get_tls_negotiated(), h.get_size())',
      'h.shutdown()',
    ].join('\n');
    const env = { ...process.env, PATH: `${dirname(py.includes('/') ? py : '/usr/bin/python3')}:${process.env.PATH ?? ''}` };
    const r = await run(nbdsh, ['-c', script], env);
    expect(r.out.trim()).toBe(`True ${SIZE}`);
  });

  it('refuses a client certificate from another CA, and a client without one', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo || !haveOpenssl()) return ctx.skip();
    await serve(x509Server());
    expect((await run(nbdinfo, ['--size', certUri(creds.otherClientDir)])).code).not.toBe(0);
    const noCert = join(dir, 'ca-only');
    mkdirSync(noCert);
    writeFileSync(join(noCert, 'ca-cert.pem'), readFileSync(join(creds.clientDir, 'ca-cert.pem')));
    expect((await run(nbdinfo, ['--size', certUri(noCert)])).code).not.toBe(0);
    // The server is unaffected: a good client still gets in.
    const ok = await run(nbdinfo, ['--size', certUri(creds.clientDir)]);
    expect(ok.out.trim()).toBe(String(SIZE));
  });

  it('tells a plaintext qemu-img that TLS is required', async (ctx) => {
    const qemuImg = requireTool('qemu-img');
    if (!qemuImg || !haveOpenssl()) return ctx.skip();
    await serve(x509Server());
    const r = await run(qemuImg, ['info', '--image-opts', `driver=nbd,server.type=unix,server.path=${sock},export=disk`]);
    expect(r.code).not.toBe(0);
    expect(r.out).toContain('TLS negotiation required before option 7 (go)');
    expect(r.out).toContain('server reported: Option 0x7 not permitted before TLS');
  });

  it('lets tls-authz (authz-simple) admit only the named certificate subject', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo || !haveOpenssl()) return ctx.skip();
    await serve(x509Server(), { 'qom-type': 'authz-simple', identity: 'CN=client' });
    expect((await run(nbdinfo, ['--size', certUri(creds.clientDir)])).code).not.toBe(0);
    // QEMU's distinguished name format; qom-set applies to the next client.
    await d.ok('qom-set', { path: '/objects/az0', property: 'identity', value: creds.clientDname });
    expect((await run(nbdinfo, ['--size', certUri(creds.clientDir)])).out.trim()).toBe(String(SIZE));
  });

  it('matches authz-list glob rules against the certificate subject', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo || !haveOpenssl()) return ctx.skip();
    await serve(x509Server(), {
      'qom-type': 'authz-list',
      policy: 'deny',
      rules: [{ match: '*,CN=client', policy: 'allow', format: 'glob' }],
    });
    expect((await run(nbdinfo, ['--size', certUri(creds.clientDir)])).out.trim()).toBe(String(SIZE));
  });

  it('refuses every client when tls-authz names no authz object', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo || !haveOpenssl()) return ctx.skip();
    await d.ok('object-add', { id: 'tls0', ...x509Server() });
    await d.ok('blockdev-add', { driver: 'file', filename: img, 'node-name': 'n0' });
    await d.ok('nbd-server-start', { addr: { type: 'unix', data: { path: sock } }, 'tls-creds': 'tls0', 'tls-authz': 'nope' });
    await d.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'n0', name: 'disk' });
    expect((await run(nbdinfo, ['--size', certUri(creds.clientDir)])).code).not.toBe(0);
  });
});

describe('NBD server with other credentials', () => {
  it('lets a client without a certificate in when verify-peer is off', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo || !haveOpenssl()) return ctx.skip();
    await serve({ ...x509Server(), 'verify-peer': false });
    const caOnly = join(dir, 'ca-only');
    mkdirSync(caOnly);
    writeFileSync(join(caOnly, 'ca-cert.pem'), readFileSync(join(creds.clientDir, 'ca-cert.pem')));
    expect((await run(nbdinfo, ['--size', certUri(caOnly)])).out.trim()).toBe(String(SIZE));
  });

  it('uses an encrypted server key with passwordid', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo || !haveOpenssl()) return ctx.skip();
    const enc = join(dir, 'enc');
    mkdirSync(enc);
    for (const f of ['ca-cert.pem', 'server-cert.pem']) writeFileSync(join(enc, f), readFileSync(join(creds.serverDir, f)));
    await execFileP('openssl', [
      'pkey', '-in', join(creds.serverDir, 'server-key.pem'), '-aes256', '-passout', 'pass:hunter2',
      '-out', join(enc, 'server-key.pem'),
    ]);
    await d.ok('object-add', { 'qom-type': 'secret', id: 'pw', data: 'hunter2' });
    await serve({ 'qom-type': 'tls-creds-x509', endpoint: 'server', dir: enc, passwordid: 'pw' });
    expect((await run(nbdinfo, ['--size', certUri(creds.clientDir)])).out.trim()).toBe(String(SIZE));
  });

  it('serves a TLS client that waited behind max-connections once the slot frees', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo || !haveOpenssl()) return ctx.skip();
    await d.ok('object-add', { id: 'tls0', ...x509Server() });
    await d.ok('blockdev-add', { driver: 'file', filename: img, 'node-name': 'n0' });
    await d.ok('nbd-server-start', { addr: { type: 'unix', data: { path: sock } }, 'tls-creds': 'tls0', 'max-connections': 1 });
    await d.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'n0', name: 'disk' });
    const first = await RawTlsClient.connect(sock);
    await first.handshake();
    expect((await first.option(NBD_OPT_STARTTLS))?.type).toBe(NBD_REP_ACK);
    await first.startTls(creds.clientDir);
    // The second client is accepted but not greeted while the first holds the only slot.
    const second = run(nbdinfo, ['--size', certUri(creds.clientDir)]);
    expect((await first.option(NBD_OPT_LIST))?.type).toBe(NBD_REP_SERVER);
    expect((await first.reply())?.type).toBe(NBD_REP_ACK);
    first.destroy();
    expect((await second).out.trim()).toBe(String(SIZE));
  });

  it('serves qemu-img with anonymous credentials', async (ctx) => {
    const qemuImg = requireTool('qemu-img');
    if (!qemuImg || !haveOpenssl()) return ctx.skip();
    await serve({ 'qom-type': 'tls-creds-anon', endpoint: 'server' });
    const r = await run(qemuImg, ['info', ...qemuOpts('tls-creds-anon,id=tls0,endpoint=client')]);
    expect(r.out).toContain(`virtual size: 4 MiB (${SIZE} bytes)`);
    const plain = await run(qemuImg, ['info', '--image-opts', `driver=nbd,server.type=unix,server.path=${sock},export=disk`]);
    expect(plain.code).not.toBe(0);
  });
});

describe('NBD server with PSK credentials', () => {
  it('serves qemu-img and nbdinfo with the right key', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    const qemuImg = requireTool('qemu-img');
    if (!nbdinfo || !qemuImg || !haveOpenssl()) return ctx.skip();
    await serve(pskServer());
    expect((await run(nbdinfo, ['--size', pskUri('alice', creds.pskDir)])).out.trim()).toBe(String(SIZE));
    const r = await run(qemuImg, ['info', ...qemuOpts(`tls-creds-psk,id=tls0,endpoint=client,dir=${creds.pskDir},username=bob`)]);
    expect(r.out).toContain(`virtual size: 4 MiB (${SIZE} bytes)`);
  });

  it('refuses a wrong key and an unknown user', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo || !haveOpenssl()) return ctx.skip();
    await serve(pskServer());
    expect((await run(nbdinfo, ['--size', pskUri('alice', creds.wrongPskDir)])).code).not.toBe(0);
    const carol = join(dir, 'psk-carol');
    mkdirSync(carol);
    writeFileSync(join(carol, 'keys.psk'), `carol:${'c3'.repeat(32)}\n`);
    expect((await run(nbdinfo, ['--size', pskUri('carol', carol)])).code).not.toBe(0);
  });

  it('checks tls-authz against the PSK username', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo || !haveOpenssl()) return ctx.skip();
    await serve(pskServer(), { 'qom-type': 'authz-list', policy: 'deny', rules: [{ match: 'alice', policy: 'allow' }] });
    expect((await run(nbdinfo, ['--size', pskUri('alice', creds.pskDir)])).out.trim()).toBe(String(SIZE));
    expect((await run(nbdinfo, ['--size', pskUri('bob', creds.pskDir)])).code).not.toBe(0);
  });
});

describe('NBD TLS protocol rules (raw socket)', () => {
  it('answers every option before STARTTLS with ERR_TLS_REQD in QSD words, ABORT with ACK', async (ctx) => {
    if (!haveOpenssl()) return ctx.skip();
    await serve(x509Server());
    const c = await RawTlsClient.connect(sock);
    await c.handshake();
    for (const opt of [NBD_OPT_LIST, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_GO, 99]) {
      const r = await c.option(opt, opt === NBD_OPT_GO ? goPayload('disk') : undefined);
      expect(r?.type).toBe(NBD_REP_ERR_TLS_REQD);
      expect(text(r)).toBe(`Option 0x${opt.toString(16)} not permitted before TLS`);
    }
    const ab = await c.option(NBD_OPT_ABORT);
    expect(ab?.type).toBe(NBD_REP_ACK);
    expect(await c.waitClosed()).toBe(true);
  });

  it('closes on NBD_OPT_EXPORT_NAME before TLS', async (ctx) => {
    if (!haveOpenssl()) return ctx.skip();
    await serve(x509Server());
    const c = await RawTlsClient.connect(sock);
    await c.handshake();
    c.write(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
    expect(await c.read(1)).toBeUndefined();
  });

  it('answers STARTTLS with a payload with ERR_INVALID and closes', async (ctx) => {
    if (!haveOpenssl()) return ctx.skip();
    await serve(x509Server());
    const c = await RawTlsClient.connect(sock);
    await c.handshake();
    const r = await c.option(NBD_OPT_STARTTLS, Buffer.from('xy'));
    expect(r?.type).toBe(NBD_REP_ERR_INVALID);
    expect(text(r)).toBe("option 'starttls' has unexpected length");
    expect(await c.waitClosed()).toBe(true);
  });

  it('negotiates encrypted after the STARTTLS ACK and refuses a second STARTTLS', async (ctx) => {
    if (!haveOpenssl()) return ctx.skip();
    await serve(x509Server());
    const c = await RawTlsClient.connect(sock);
    await c.handshake();
    expect((await c.option(NBD_OPT_STARTTLS))?.type).toBe(NBD_REP_ACK);
    await c.startTls(creds.clientDir);
    const again = await c.option(NBD_OPT_STARTTLS);
    expect(again?.type).toBe(NBD_REP_ERR_INVALID);
    expect(text(again)).toBe('TLS already enabled');
    const list = await c.option(NBD_OPT_LIST);
    expect(list?.type).toBe(NBD_REP_SERVER);
    expect(list?.payload.subarray(4).toString()).toBe('disk');
    expect((await c.reply())?.type).toBe(NBD_REP_ACK);
    c.destroy();
  });

  it('drops a client that sends garbage instead of a TLS ClientHello, and keeps serving', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo || !haveOpenssl()) return ctx.skip();
    await serve(x509Server());
    const c = await RawTlsClient.connect(sock);
    await c.handshake();
    expect((await c.option(NBD_OPT_STARTTLS))?.type).toBe(NBD_REP_ACK);
    c.write(Buffer.from('GET / HTTP/1.0\r\n\r\n'.repeat(8)));
    // No plaintext comes back: the connection just closes (a TLS alert at most).
    const rest = await c.read(1);
    if (rest !== undefined) expect(rest[0]).toBe(0x15);
    expect(await c.waitClosed()).toBe(true);
    expect((await run(nbdinfo, ['--size', certUri(creds.clientDir)])).out.trim()).toBe(String(SIZE));
  });

  it('drops a client that stalls in the TLS handshake at handshake-max-seconds', async (ctx) => {
    if (!haveOpenssl()) return ctx.skip();
    await d.ok('object-add', { id: 'tls0', ...x509Server() });
    await d.ok('nbd-server-start', {
      addr: { type: 'unix', data: { path: sock } },
      'tls-creds': 'tls0',
      'handshake-max-seconds': 1,
    });
    const c = await RawTlsClient.connect(sock);
    await c.handshake();
    expect((await c.option(NBD_OPT_STARTTLS))?.type).toBe(NBD_REP_ACK);
    // No ClientHello: the handshake deadline covers the TLS handshake too.
    expect(await c.waitClosed()).toBe(true);
    expect(await connectionsSettle()).toBe(0);
  });

  it('stops the server while a client is in the middle of the TLS handshake', async (ctx) => {
    if (!haveOpenssl()) return ctx.skip();
    await serve(x509Server());
    const c = await RawTlsClient.connect(sock);
    await c.handshake();
    expect((await c.option(NBD_OPT_STARTTLS))?.type).toBe(NBD_REP_ACK);
    c.write(Buffer.from([0x16, 0x03, 0x01]));
    expect(await d.ok('nbd-server-stop')).toEqual({});
    expect(await c.waitClosed()).toBe(true);
    expect(d.svc.exports.serverClientCount).toBe(0);
  });

  it('survives a client that vanishes in the middle of the TLS handshake', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo || !haveOpenssl()) return ctx.skip();
    await serve(x509Server());
    const c = await RawTlsClient.connect(sock);
    await c.handshake();
    expect((await c.option(NBD_OPT_STARTTLS))?.type).toBe(NBD_REP_ACK);
    // The start of a ClientHello record, then gone.
    c.write(Buffer.from([0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00]));
    c.destroy();
    expect(await connectionsSettle()).toBe(0);
    expect((await run(nbdinfo, ['--size', certUri(creds.clientDir)])).out.trim()).toBe(String(SIZE));
  });
});
