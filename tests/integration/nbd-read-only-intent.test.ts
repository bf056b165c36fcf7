/**
 * NBD_OPT_READ_ONLY (blockd's experimental option, docs/nbd.md): a raw-socket client and two
 * daemons. The client sees the export read-only, its write-type requests fail with EPERM, and it
 * does not count against a writable export's max-connections.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Daemon } from '../helpers/in-process-daemon.js';
import { RawNbdClient } from '../helpers/nbd-raw-client.js';
import { execFileP, requireTool } from '../helpers/nbd-tools.js';
import {
  encodeInfoRequest,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EPERM,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_INFO_EXPORT,
  NBD_OPT_GO,
  NBD_OPT_READ_ONLY,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_INFO,
  type OptionReply,
} from '../../src/nbd/protocol.js';

let dir: string;
let sock: string;
let img: string;
let a: Daemon;
const daemons: Daemon[] = [];
const clients: RawNbdClient[] = [];

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), 'blockd-ro-intent-'));
  sock = join(dir, 'a.sock');
  img = join(dir, 'a.raw');
  await execFileP('truncate', ['-s', String(1 << 20), img]);
  a = new Daemon();
  daemons.push(a);
  await a.ok('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  await a.ok('blockdev-add', { driver: 'raw', 'node-name': 'disk', file: { driver: 'file', filename: img } });
  await a.ok('block-export-add', { type: 'nbd', id: 'disk', 'node-name': 'disk', writable: true, 'max-connections': 1 });
});

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const d of daemons.splice(0).reverse()) await d.shutdown();
  rmSync(dir, { recursive: true, force: true });
});

async function raw(): Promise<RawNbdClient> {
  const c = await RawNbdClient.connect(sock);
  clients.push(c);
  await c.greeting();
  return c;
}

function exportFlags(replies: OptionReply[]): number {
  const info = replies.find((r) => r.type === NBD_REP_INFO && r.payload.readUInt16BE(0) === NBD_INFO_EXPORT);
  if (!info) throw new Error(`no NBD_INFO_EXPORT in ${JSON.stringify(replies.map((r) => r.type))}`);
  return info.payload.readUInt16BE(10);
}

async function go(c: RawNbdClient, readOnly: boolean): Promise<OptionReply[]> {
  if (readOnly) expect((await c.option(NBD_OPT_READ_ONLY)).map((r) => r.type)).toEqual([NBD_REP_ACK]);
  await c.option(NBD_OPT_STRUCTURED_REPLY);
  return c.option(NBD_OPT_GO, encodeInfoRequest('disk', [3]));
}

describe('NBD_OPT_READ_ONLY', () => {
  it('is acknowledged and shows the writable export read-only to that client', async () => {
    const c = await raw();
    const replies = await go(c, true);
    expect(replies.at(-1)!.type).toBe(NBD_REP_ACK);
    const f = exportFlags(replies);
    expect(f & NBD_FLAG_READ_ONLY).toBe(NBD_FLAG_READ_ONLY);
    expect(f & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES)).toBe(0);
  });

  it('refuses a payload with NBD_REP_ERR_INVALID', async () => {
    const c = await raw();
    const r = await c.option(NBD_OPT_READ_ONLY, Buffer.from([1]));
    expect(r.map((x) => x.type)).toEqual([NBD_REP_ERR_INVALID]);
  });

  it('fails writes, trims and write-zeroes with EPERM, drains the payload and keeps serving reads', async () => {
    const c = await raw();
    await go(c, true);
    c.request(NBD_CMD_WRITE, 0, 4096, 0, 1n, Buffer.alloc(4096, 0xff));
    expect(RawNbdClient.errorOf(await c.reply())?.error).toBe(NBD_EPERM);
    c.request(NBD_CMD_TRIM, 0, 4096, 0, 2n);
    expect(RawNbdClient.errorOf(await c.reply())?.error).toBe(NBD_EPERM);
    c.request(NBD_CMD_WRITE_ZEROES, 0, 4096, 0, 3n);
    expect(RawNbdClient.errorOf(await c.reply())?.error).toBe(NBD_EPERM);
    c.request(NBD_CMD_READ, 0, 512, 0, 4n);
    const r = await c.reply();
    expect(r?.kind === 'chunk' && r.cookie.readBigUInt64BE(0)).toBe(4n);
    expect(readFileSync(img).subarray(0, 4096).every((b) => b === 0)).toBe(true);
  });

  it('does not count against max-connections, so a writer gets in after a reader', async () => {
    const reader = await raw();
    expect((await go(reader, true)).at(-1)!.type).toBe(NBD_REP_ACK);
    const writer = await raw();
    const w = await go(writer, false);
    expect(w.at(-1)!.type).toBe(NBD_REP_ACK);
    expect(exportFlags(w) & NBD_FLAG_READ_ONLY).toBe(0);
    // The limit still holds for writers.
    const second = await raw();
    expect((await go(second, false)).at(-1)!.type).toBe(NBD_REP_ERR_UNKNOWN);
  });

  it('still locks the writer out after a reader that did not declare it', async () => {
    const plain = await raw();
    expect((await go(plain, false)).at(-1)!.type).toBe(NBD_REP_ACK);
    const writer = await raw();
    expect((await go(writer, false)).at(-1)!.type).toBe(NBD_REP_ERR_UNKNOWN);
  });

  it("is sent by blockd's nbd driver for a read-only node, leaving the writable slot to qemu-io", async (ctx) => {
    if (!requireTool('qemu-io')) return ctx.skip();
    const b = new Daemon();
    daemons.push(b);
    await b.ok('blockdev-add', {
      driver: 'nbd',
      'node-name': 'ro',
      'read-only': true,
      server: { type: 'unix', path: sock },
      export: 'disk',
    });
    const { stdout } = await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 0 64K', `nbd+unix:///disk?socket=${sock}`]);
    expect(stdout).toContain('wrote 65536/65536');
    // The reader sees the writer's data.
    const buf = Buffer.alloc(65536);
    await b.svc.graph.find('ro').io.read(buf, 0);
    expect(buf.every((x) => x === 0x42)).toBe(true);
    const exports = (await a.ok('query-block-exports')) as Array<Record<string, unknown>>;
    expect(exports[0]!['connections']).toBe(1);
  });
});
