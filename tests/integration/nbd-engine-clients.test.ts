/**
 * The NBD engine driven by real clients (libnbd tools, python nbd, qemu-io, qemu-img,
 * nbdcopy) against the in-memory backend.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { NbdServer } from '../../src/nbd/server.js';
import { silentLogger } from '../../src/util/logger.js';
import { MemoryBackend } from '../helpers/nbd-memory-backend.js';
import { execFileP, requireTool } from '../helpers/nbd-tools.js';

let dir: string;
let sock: string;
let backend: MemoryBackend;
let server: NbdServer;

const uri = (name: string) => `nbd+unix:///${name}?socket=${sock}`;

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), 'nbd-engine-'));
  sock = join(dir, 'nbd.sock');
  backend = new MemoryBackend([
    { name: 'disk', size: 4 << 20, dirtyBitmap: 'b0' },
    { name: 'ro', size: 1 << 20, readOnly: true, description: 'a ro' },
    { name: 'async', size: 4 << 20, syncReads: false },
  ]);
  server = new NbdServer({ backend, log: silentLogger() });
  await server.listen({ type: 'unix', path: sock });
});

afterEach(async () => {
  await server.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('NBD engine with real clients', () => {
  it('shows exports, flags and block sizes to nbdinfo --list like QSD', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo) return ctx.skip();
    const { stdout } = await execFileP(nbdinfo, ['--json', '--list', uri('')]);
    const j = JSON.parse(stdout) as { exports: Array<Record<string, unknown>> };
    const disk = j.exports.find((e) => e['export-name'] === 'disk')!;
    expect(disk).toMatchObject({
      'export-size': 4 << 20,
      is_read_only: false,
      can_multi_conn: true,
      can_fast_zero: true,
      can_df: true,
      can_cache: true,
      block_size_minimum: 1,
      block_size_preferred: 4096,
      block_size_maximum: 33554432,
    });
    expect(disk['contexts']).toEqual(['base:allocation', 'qemu:dirty-bitmap:b0']);
    const ro = j.exports.find((e) => e['export-name'] === 'ro')!;
    expect(ro).toMatchObject({ is_read_only: true, can_trim: false, description: 'a ro' });
  });

  it('maps allocation with nbdinfo --map', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo) return ctx.skip();
    backend.get('disk').fill(65536, Buffer.alloc(65536, 1));
    const { stdout } = await execFileP(nbdinfo, ['--json', '--map', uri('disk')]);
    const m = JSON.parse(stdout) as Array<{ offset: number; length: number; type: number }>;
    expect(m.map((x) => [x.offset, x.length, x.type])).toEqual([
      [0, 65536, 3],
      [65536, 65536, 0],
      [131072, (4 << 20) - 131072, 3],
    ]);
  });

  it('reads back what nbdsh wrote and reports the dirty bitmap', async (ctx) => {
    const nbdsh = requireTool('nbdsh');
    const py = requireTool('python3-nbd');
    if (!nbdsh || !py) return ctx.skip();
    const script = [
      "h.add_meta_context('qemu:dirty-bitmap:b0')",
      `h.connect_uri('${uri('disk')}')`,
      "h.pwrite(b'hello' * 1000, 8192, nbd.CMD_FLAG_FUA)",
      'assert h.pread(5000, 8192) == b"hello" * 1000',
      'seen = []',
      "h.block_status(65536, 0, lambda ctx, off, ents, err: seen.append((ctx, list(ents))))",
      "print(seen)",
      'h.flush()',
      'h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)',
      'h.trim(4096, 65536)',
      'h.cache(4096, 0)',
      'h.shutdown()',
    ].join('\n');
    // nbdsh runs `env python3`: put the interpreter that has the nbd module first.
    const env = { ...process.env, PATH: `${dirname(py.includes('/') ? py : '/usr/bin/python3')}:${process.env.PATH ?? ''}` };
    const { stdout } = await execFileP(nbdsh, ['-c', script], { env });
    expect(stdout).toContain("('qemu:dirty-bitmap:b0', [8192, 0, 8192, 1, 49152, 0])");
    expect(backend.get('disk').calls.map((c) => c.op)).toEqual(
      expect.arrayContaining(['write', 'flush', 'writeZeroes', 'trim', 'cache']),
    );
  });

  it('answers pipelined asynchronous reads from python nbd', async (ctx) => {
    const py = requireTool('python3-nbd');
    if (!py) return ctx.skip();
    const e = backend.get('async');
    for (let i = 0; i < 64; i++) e.fill(i * 4096, Buffer.alloc(4096, i + 1));
    const script = `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
bufs = [nbd.Buffer(4096) for _ in range(64)]
cookies = [h.aio_pread(bufs[i], i * 4096) for i in range(64)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, c in enumerate(cookies):
    h.aio_command_completed(c)
    assert bufs[i].to_bytearray() == bytes([i + 1]) * 4096, i
print('ok', h.get_size())
h.shutdown()
`;
    const { stdout } = await execFileP(py, ['-c', script, uri('async')]);
    expect(stdout.trim()).toBe(`ok ${4 << 20}`);
  });

  it('serves qemu-io writes and pattern-checked reads', async (ctx) => {
    const qemuIo = requireTool('qemu-io');
    if (!qemuIo) return ctx.skip();
    const { stdout } = await execFileP(qemuIo, [
      '-f', 'raw',
      '-c', 'write -P 0x55 0 64k',
      '-c', 'read -P 0x55 0 64k',
      '-c', 'write -z 64k 64k',
      '-c', 'read -P 0 64k 64k',
      '-c', 'discard 128k 64k',
      '-c', 'aio_write -P 0x66 1M 4k',
      '-c', 'aio_flush',
      '-c', 'read -P 0x66 1M 4k',
      uri('disk'),
    ]);
    expect(stdout).not.toMatch(/Pattern verification failed|error/i);
    expect(backend.get('disk').data.subarray(0, 65536).every((b) => b === 0x55)).toBe(true);
  });

  it('makes qemu-io refuse to open a read-only export for writing, like QSD', async (ctx) => {
    const qemuIo = requireTool('qemu-io');
    if (!qemuIo) return ctx.skip();
    const r = await execFileP(qemuIo, ['-f', 'raw', '-c', 'write 0 4k', uri('ro')]).catch(
      (e: { stdout: string; stderr: string }) => e,
    );
    expect(`${r.stdout}${r.stderr}`).toContain('Could not open image: Permission denied');
  });

  it('copies an export to a file with qemu-img convert', async (ctx) => {
    const qemuImg = requireTool('qemu-img');
    if (!qemuImg) return ctx.skip();
    const src = Buffer.alloc(1 << 20);
    for (let i = 0; i < src.length; i += 4) src.writeUInt32BE(i, i);
    backend.get('disk').fill(1 << 20, src);
    const out = join(dir, 'out.raw');
    await execFileP(qemuImg, ['convert', '-f', 'raw', '-O', 'raw', uri('disk'), out]);
    const got = readFileSync(out);
    expect(got.length).toBe(4 << 20);
    expect(got.subarray(1 << 20, 2 << 20).equals(src)).toBe(true);
  });

  it('copies a file into an export with nbdcopy', async (ctx) => {
    const nbdcopy = requireTool('nbdcopy');
    if (!nbdcopy) return ctx.skip();
    const input = join(dir, 'in.raw');
    const data = Buffer.alloc(4 << 20);
    for (let i = 0; i < data.length; i += 512) data[i] = (i / 512) & 0xff;
    writeFileSync(input, data);
    await execFileP(nbdcopy, [input, uri('disk')]);
    expect(backend.get('disk').data.equals(data)).toBe(true);
  });
});
