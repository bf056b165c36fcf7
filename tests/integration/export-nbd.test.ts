import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { Services } from '../../src/qmp/services.js';
import { silentLogger } from '../../src/util/logger.js';
import type { QmpEvent } from '../../src/util/events.js';
import { DaemonError } from '../../src/util/errors.js';
import { nativeLoadError, nativeOps } from '../../src/block/native.js';

const run = promisify(execFile);
const CI = process.env.CI === 'true';

async function haveTool(cmd: string, args: string[] = ['--version']): Promise<boolean> {
  try {
    await run(cmd, args);
    return true;
  } catch {
    if (CI) throw new Error(`${cmd} is required under CI`);
    return false;
  }
}

async function py(code: string): Promise<string> {
  const { stdout } = await run('/usr/bin/python3', ['-c', code]);
  return stdout;
}

describe('NBD exports of block nodes', () => {
  let dir: string;
  let svc: Services;
  let events: QmpEvent[];
  let sock: string;

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'blockd-export-'));
    sock = join(dir, 'nbd.sock');
    svc = new Services(silentLogger());
    events = [];
    svc.events.subscribe((e) => events.push(e));
    await svc.exports.startServer({ addr: { type: 'unix', path: sock } });
  });

  afterEach(async () => {
    await svc.shutdown();
    rmSync(dir, { recursive: true, force: true });
  });

  async function rawImage(size: number): Promise<string> {
    const img = join(dir, 'disk.raw');
    writeFileSync(img, Buffer.alloc(0));
    await run('truncate', ['-s', String(size), img]);
    await svc.graph.add({
      driver: 'raw',
      'node-name': 'disk',
      file: { driver: 'file', filename: img, 'node-name': 'disk-file' },
    });
    return img;
  }

  it('lets qemu-io write data that qemu-img reads back from the image file', async () => {
    if (!(await haveTool('qemu-io'))) return;
    const img = await rawImage(4 << 20);
    svc.exports.addExport({ type: 'nbd', id: 'e0', nodeName: 'disk', writable: true });
    const uri = `nbd+unix:///disk?socket=${sock}`;
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 65536 131072', '-c', 'flush', uri]);
    const data = readFileSync(img);
    expect(data.subarray(65536, 65536 + 131072).every((b) => b === 0xab)).toBe(true);
    expect(data[65535]).toBe(0);
    const { stdout } = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0xab 65536 131072', uri]);
    expect(stdout).toContain('read 131072/131072 bytes');
  });

  it('advertises the same flags as qemu-storage-daemon for writable and read-only exports', async () => {
    if (!(await haveTool('nbdinfo'))) return;
    await rawImage(1 << 20);
    svc.exports.addExport({ type: 'nbd', id: 'rw', nodeName: 'disk', writable: true, name: 'rw' });
    svc.exports.addExport({ type: 'nbd', id: 'ro', nodeName: 'disk', name: 'ro' });
    const flags = await py(`
import nbd
for name in ('rw', 'ro'):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(${JSON.stringify(sock)})
    print(name, h.is_read_only(), h.can_multi_conn(), h.can_flush(), h.can_fua(), h.can_trim(),
          h.can_zero(), h.can_fast_zero(), h.can_cache(), h.can_df(),
          h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED),
          h.get_block_size(nbd.SIZE_MAXIMUM))
    h.shutdown()
`);
    expect(flags.trim().split('\n')).toEqual([
      'rw False True True True True True True True True 1 4096 33554432',
      'ro True True True True False False False True True 1 4096 33554432',
    ]);
  });

  it('makes a write on one connection visible on a third after a flush on a second (multi-conn)', async () => {
    if (!(await haveTool('nbdinfo'))) return;
    await rawImage(1 << 20);
    svc.exports.addExport({ type: 'nbd', id: 'e', nodeName: 'disk', writable: true });
    const out = await py(`
import nbd
hs = []
for i in range(3):
    h = nbd.NBD()
    h.set_export_name('disk')
    h.connect_unix(${JSON.stringify(sock)})
    hs.append(h)
assert all(h.can_multi_conn() for h in hs)
hs[0].pwrite(b'\\x5a' * 4096, 8192)
hs[1].flush()
print(hs[2].pread(4096, 8192) == b'\\x5a' * 4096)
for h in hs: h.shutdown()
`);
    expect(out.trim()).toBe('True');
    const info = svc.exports.query()[0]!;
    expect(info.statistics['flush-requested']).toBe(1);
    expect(info.statistics['flush-performed']).toBe(1);
  });

  it('elides flushes when nothing was written since the last one', async () => {
    if (!(await haveTool('nbdinfo'))) return;
    await rawImage(1 << 20);
    svc.exports.addExport({ type: 'nbd', id: 'e', nodeName: 'disk', writable: true });
    await py(`
import nbd
hs = []
for i in range(4):
    h = nbd.NBD()
    h.set_export_name('disk')
    h.connect_unix(${JSON.stringify(sock)})
    hs.append(h)
hs[0].pwrite(b'x' * 512, 0)
for h in hs: h.flush()
for h in hs: h.shutdown()
`);
    const s = svc.exports.query()[0]!.statistics;
    expect(s['flush-requested']).toBe(4);
    expect(s['flush-performed']).toBe(1);
  });

  it('does not advertise multi-conn when the export is limited to one connection', async () => {
    if (!(await haveTool('nbdinfo'))) return;
    await rawImage(1 << 20);
    svc.exports.addExport({ type: 'nbd', id: 'one', nodeName: 'disk', maxConnections: 1, name: 'one' });
    svc.exports.addExport({ type: 'nbd', id: 'off', nodeName: 'disk', multiConn: 'off', name: 'off' });
    const out = await py(`
import nbd
for n in ('one', 'off'):
    h = nbd.NBD()
    h.set_export_name(n)
    h.connect_unix(${JSON.stringify(sock)})
    print(h.can_multi_conn())
    h.shutdown()
`);
    expect(out.trim().split('\n')).toEqual(['False', 'False']);
  });

  it('reports holes and data through base:allocation like qemu-img map', async () => {
    if (!(await haveTool('nbdinfo'))) return;
    // Without the native addon there is no SEEK_DATA/SEEK_HOLE: everything is reported as data.
    if (nativeLoadError() !== undefined || !nativeOps().available) return;
    const img = await rawImage(4 << 20);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 1M 64k', '-c', 'write -P 2 3M 128k', img]).catch(() => undefined);
    svc.exports.addExport({ type: 'nbd', id: 'e', nodeName: 'disk', name: 'e' });
    const { stdout } = await run('nbdinfo', ['--map', '--json', `nbd+unix:///e?socket=${sock}`]);
    const ours = (JSON.parse(stdout) as Array<{ offset: number; length: number; type: number }>).map(
      (e) => [e.offset, e.length, e.type & 1 ? 'hole' : 'data'],
    );
    const { stdout: qmap } = await run('qemu-img', ['map', '--output=json', '-f', 'raw', img]);
    const theirs = (JSON.parse(qmap) as Array<{ start: number; length: number; data: boolean }>).map((e) => [
      e.start,
      e.length,
      e.data ? 'data' : 'hole',
    ]);
    expect(ours).toEqual(theirs);
  });

  it('answers small reads of unallocated and zero qcow2 clusters with a hole chunk, as QSD', async () => {
    if (!(await haveTool('qemu-img'))) return;
    const img = join(dir, 'disk.qcow2');
    await run('qemu-img', ['create', '-f', 'qcow2', img, '1M']);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 64k 64k', '-c', 'write -z 128k 64k', img]);
    await svc.graph.add({
      driver: 'qcow2',
      'node-name': 'q',
      file: { driver: 'file', filename: img, 'node-name': 'q-file' },
    });
    svc.exports.addExport({ type: 'nbd', id: 'e', nodeName: 'q', name: 'e' });
    // Chunk kinds of 4 KiB reads: unallocated, data, zero cluster, then unallocated with DF.
    const out = await py(`
import nbd
h = nbd.NBD()
h.connect_uri("nbd+unix:///e?socket=${sock}")
for off, fl in ((0, 0), (65536, 0), (131072, 0), (0, nbd.CMD_FLAG_DF)):
    kinds = []
    buf = h.pread_structured(4096, off, lambda b, o, st, err: kinds.append('data' if st == nbd.READ_DATA else 'hole') or 0, flags=fl)
    print(off, ','.join(kinds), sum(buf))
h.shutdown()
`);
    expect(out.trim().split('\n')).toEqual(['0 hole 0', `65536 data ${4096}`, '131072 hole 0', '0 data 0']);
  });

  it('keeps a qcow2 image exact under concurrent libnbd writes, in place and allocating', async () => {
    if (!(await haveTool('qemu-img'))) return;
    const img = join(dir, 'disk.qcow2');
    const before = join(dir, 'before.raw');
    const expected = join(dir, 'expected.raw');
    const after = join(dir, 'after.raw');
    await run('qemu-img', ['create', '-f', 'qcow2', '-o', 'cluster_size=65536', img, '8M']);
    // Every other 64 KiB cluster allocated: writes go in place (callback path) or allocate.
    const cmds = [];
    for (let c = 0; c < 128; c += 2) cmds.push('-c', `write -P ${1 + c} ${c * 65536} 65536`);
    await run('qemu-io', ['-f', 'qcow2', ...cmds, img]);
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, before]);
    await svc.graph.add({ driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: img, 'node-name': 'q-file' } });
    svc.exports.addExport({ type: 'nbd', id: 'e', nodeName: 'q', name: 'e', writable: true });
    // 1500 writes of 512 B to 8 KiB at distinct 8 KiB slots (so their order does not matter),
    // 30 slots (up to 60 writes) in flight; the expected content is kept alongside.
    const out = await py(`
import nbd, random
rnd = random.Random(5)
data = bytearray(open(${JSON.stringify(before)}, 'rb').read())
h = nbd.NBD()
h.connect_uri("nbd+unix:///e?socket=${sock}")
slots = rnd.sample(range(len(data) // 8192), 900)
writes = 0
for k in range(0, len(slots), 30):
    for s in slots[k:k + 30]:
        for part in range(2 if s % 3 == 0 else 1):
            off = s * 8192 + part * 4096 + rnd.randrange(0, 8) * 512
            ln = min(rnd.choice((512, 4096, 3584)), s * 8192 + 8192 - off)
            if part == 0 and s % 3 == 0:
                ln = min(ln, 4096 - (off - s * 8192))
            b = bytes([rnd.randrange(1, 256)]) * ln
            data[off:off + ln] = b
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b)), off)
            writes += 1
    while h.aio_in_flight() > 0:
        h.poll(-1)
h.flush()
h.shutdown()
open(${JSON.stringify(expected)}, 'wb').write(data)
print(writes)
`);
    expect(Number(out.trim())).toBeGreaterThan(900);
    await svc.shutdown(); // closes the image (idempotent: afterEach's call shares this one)
    const chk = await run('qemu-img', ['check', img]);
    expect(chk.stdout).toContain('No errors were found');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, after]);
    expect(readFileSync(after).equals(readFileSync(expected))).toBe(true);
  });

  it('survives a client killed with writes in flight on the callback path, and serves the next one', async () => {
    if (!(await haveTool('qemu-io'))) return;
    const img = await rawImage(8 << 20);
    svc.exports.addExport({ type: 'nbd', id: 'e0', nodeName: 'disk', writable: true });
    const uri = `nbd+unix:///disk?socket=${sock}`;
    // 96 writes of 64 KiB queued, then SIGKILL: replies go to a socket nobody reads any more.
    const killed = await run('/usr/bin/python3', [
      '-c',
      `
import nbd, os, signal
h = nbd.NBD()
h.connect_uri(${JSON.stringify(uri)})
buf = nbd.Buffer.from_bytearray(bytearray(b'\x5a' * 65536))
for i in range(96):
    h.aio_pwrite(buf, (i % 128) * 65536)
while h.aio_in_flight() > 90:
    h.poll(-1)
os.kill(os.getpid(), signal.SIGKILL)
`,
    ]).then(
      () => 'exited',
      (e: { signal?: string }) => e.signal ?? 'failed',
    );
    expect(killed).toBe('SIGKILL');
    // The export, its node and the next client are unaffected.
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 1M 64k', '-c', 'flush', uri]);
    const { stdout } = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x33 1M 64k', uri]);
    expect(stdout).toContain('read 65536/65536 bytes');
    expect(readFileSync(img).subarray(1 << 20, (1 << 20) + 65536).every((b) => b === 0x33)).toBe(true);
  });

  it('refuses to delete an export in safe mode while a client is connected, and hard-deletes it', async () => {
    if (!(await haveTool('nbdinfo'))) return;
    await rawImage(1 << 20);
    svc.exports.addExport({ type: 'nbd', id: 'e', nodeName: 'disk' });
    const { spawn } = await import('node:child_process');
    const holder = spawn('/usr/bin/python3', [
      '-c',
      `
import nbd, sys, time
h = nbd.NBD()
h.set_export_name('disk')
h.connect_unix(${JSON.stringify(sock)})
print('connected', flush=True)
try:
    sys.stdin.read()
except Exception:
    pass
`,
    ]);
    await new Promise<void>((resolve) => holder.stdout.once('data', () => resolve()));
    await expect(svc.exports.deleteExport('e', 'safe')).rejects.toThrow("export 'e' still in use");
    expect(svc.exports.query()).toHaveLength(1);
    await svc.exports.deleteExport('e', 'hard');
    for (let i = 0; i < 100 && events.length === 0; i++) await new Promise((r) => setTimeout(r, 20));
    expect(events.map((e) => [e.event, e.data])).toEqual([['BLOCK_EXPORT_DELETED', { id: 'e' }]]);
    expect(svc.exports.query()).toHaveLength(0);
    holder.kill();
  });

  it('gives QSD errors for bad export options', async () => {
    await rawImage(1 << 20);
    const bad = (o: Parameters<typeof svc.exports.addExport>[0]): string => {
      try {
        svc.exports.addExport(o);
        return 'ok';
      } catch (e) {
        return (e as DaemonError).message;
      }
    };
    expect(bad({ type: 'nbd', id: 'x', nodeName: 'nope' })).toBe("Cannot find device='' nor node-name='nope'");
    expect(bad({ type: 'nbd', id: 'bad id', nodeName: 'disk' })).toBe('Invalid block export id');
    expect(bad({ type: 'nbd', id: 'a', nodeName: 'disk' })).toBe('ok');
    expect(bad({ type: 'nbd', id: 'a', nodeName: 'disk' })).toBe("Block export id 'a' is already in use");
    expect(bad({ type: 'nbd', id: 'b', nodeName: 'disk' })).toBe("NBD server already has export named 'disk'");
    expect(bad({ type: 'nbd', id: 'c', nodeName: 'disk', name: 'x'.repeat(4097) })).toMatch(/^export name 'x+' too long$/);
  });
});
