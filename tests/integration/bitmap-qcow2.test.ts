import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { copyFileSync, mkdtempSync, openSync, readSync, rmSync, writeSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Daemon, RefQsd, haveTool, run } from '../helpers/bitmap-harness.js';

interface QemuImgBitmap {
  name: string;
  granularity: number;
  flags: string[];
}

async function imgBitmaps(path: string): Promise<QemuImgBitmap[] | undefined> {
  const { stdout } = await run('qemu-img', ['info', '-U', '--output=json', path]);
  const info = JSON.parse(stdout) as { 'format-specific'?: { data?: { bitmaps?: QemuImgBitmap[] } } };
  return info['format-specific']?.data?.bitmaps;
}

/** Byte offset of the bitmap directory (from the header extension). */
function directoryOffset(path: string): number {
  const fd = openSync(path, 'r');
  const b = Buffer.alloc(65536);
  readSync(fd, b, 0, b.length, 0);
  closeSync(fd);
  let off = b.readUInt32BE(100);
  for (;;) {
    const type = b.readUInt32BE(off);
    const len = b.readUInt32BE(off + 4);
    if (type === 0) throw new Error('no bitmaps extension');
    if (type === 0x23852875) return Number(b.readBigUInt64BE(off + 8 + 16));
    off += 8 + Math.ceil(len / 8) * 8;
  }
}

function patch(path: string, offset: number, data: Buffer): void {
  const fd = openSync(path, 'r+');
  writeSync(fd, data, 0, data.length, offset);
  closeSync(fd);
}

describe('persistent dirty bitmaps in qcow2', () => {
  let dir: string;
  let d: Daemon;
  let img: string;

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'blockd-bmq-'));
    img = join(dir, 'a.qcow2');
    d = new Daemon();
  });

  afterEach(async () => {
    await d.shutdown();
    rmSync(dir, { recursive: true, force: true });
  });

  const open = (name = 'a', path = img, ro = false): Promise<unknown> =>
    d.ok('blockdev-add', {
      driver: 'qcow2',
      'node-name': name,
      'read-only': ro,
      file: { driver: 'file', filename: path, 'node-name': `${name}-file` },
    });

  it('refuses a persistent bitmap on a qcow2 v2 image and on a non-qcow2 node', async () => {
    if (!(await haveTool('qemu-img'))) return;
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', img, '1M']);
    await open();
    expect(await d.err('block-dirty-bitmap-add', { node: 'a', name: 'p', persistent: true })).toBe(
      "Can't make bitmap 'p' persistent in 'a': Cannot store dirty bitmaps in qcow2 v2 files",
    );
    expect(await d.err('block-dirty-bitmap-add', { node: 'a-file', name: 'p', persistent: true })).toBe(
      "Can't store persistent bitmaps to a-file: Operation not supported",
    );
  });

  it('defaults the granularity to the cluster size clamped to 4 KiB..64 KiB', async () => {
    if (!(await haveTool('qemu-img'))) return;
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M', img, '4M']);
    await open();
    await d.ok('block-dirty-bitmap-add', { node: 'a', name: 'b' });
    expect((await d.bitmaps('a'))![0]!['granularity']).toBe(65536);
    const small = join(dir, 's.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', small, '4M']);
    await open('s', small);
    await d.ok('block-dirty-bitmap-add', { node: 's', name: 'b' });
    expect((await d.bitmaps('s'))![0]!['granularity']).toBe(4096);
  });

  it('loads bitmaps made by qemu-img bitmap --add and marks them in-use while open', async () => {
    if (!(await haveTool('qemu-img'))) return;
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
    await run('qemu-img', ['bitmap', '--add', img, 'pre']);
    await run('qemu-img', ['bitmap', '--add', '-g', '512', '--disable', img, 'pre2']);
    await open();
    expect(await d.bitmaps('a')).toEqual([
      { name: 'pre2', recording: false, persistent: true, busy: false, granularity: 512, count: 0 },
      { name: 'pre', recording: true, persistent: true, busy: false, granularity: 65536, count: 0 },
    ]);
    expect(await imgBitmaps(img)).toEqual([
      { flags: ['in-use', 'auto'], name: 'pre', granularity: 65536 },
      { flags: ['in-use'], name: 'pre2', granularity: 512 },
    ]);
    await d.ok('blockdev-del', { 'node-name': 'a' });
    expect(await imgBitmaps(img)).toEqual([
      { flags: ['auto'], name: 'pre', granularity: 65536 },
      { flags: [], name: 'pre2', granularity: 512 },
    ]);
    const { stdout } = await run('qemu-img', ['check', img]);
    expect(stdout).toContain('No errors were found');
  });

  it('stores bits on clean close that qemu-storage-daemon reads back with the same hash', async () => {
    if (!(await haveTool('qemu-img')) || !(await haveTool('qemu-storage-daemon'))) return;
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
    await open();
    await d.ok('block-dirty-bitmap-add', { node: 'a', name: 'p', persistent: true, granularity: 512 });
    await d.ok('block-dirty-bitmap-add', { node: 'a', name: 'q', persistent: true, disabled: true });
    await d.ok('block-dirty-bitmap-add', { node: 'a', name: 'volatile' });
    const io = d.svc.graph.find('a').io;
    for (const [o, l] of [
      [0, 1],
      [70000, 100],
      [5 << 20, 3 << 20],
      [(64 << 20) - 1, 1],
    ] as const)
      await io.write(Buffer.alloc(l, 7), o);
    const ours = await d.ok('x-debug-block-dirty-bitmap-sha256', { node: 'a', name: 'p' });
    await d.ok('blockdev-del', { 'node-name': 'a' });
    expect((await imgBitmaps(img))!.map((b) => b.name)).toEqual(['p', 'q']);
    const { stdout } = await run('qemu-img', ['check', img]);
    expect(stdout).toContain('No errors were found');
    const ref = await RefQsd.start(join(dir, 'ref.sock'));
    try {
      await ref.cmd('blockdev-add', {
        driver: 'qcow2',
        'node-name': 'a',
        'read-only': true,
        file: { driver: 'file', filename: img },
      });
      expect(await ref.cmd('x-debug-block-dirty-bitmap-sha256', { node: 'a', name: 'p' })).toEqual({ return: ours });
    } finally {
      await ref.stop();
    }
  });

  it('reads the bits qemu-storage-daemon stored, and keeps recording into them', async () => {
    if (!(await haveTool('qemu-img')) || !(await haveTool('qemu-storage-daemon'))) return;
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']);
    const ref = await RefQsd.start(join(dir, 'ref.sock'));
    let theirs: unknown;
    try {
      await ref.cmd('blockdev-add', { driver: 'qcow2', 'node-name': 'a', file: { driver: 'file', filename: img } });
      await ref.cmd('block-dirty-bitmap-add', { node: 'a', name: 'p', persistent: true, granularity: 4096 });
      await ref.cmd('nbd-server-start', { addr: { type: 'unix', data: { path: join(dir, 'ref-nbd.sock') } } });
      await ref.cmd('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'a', writable: true });
      await run('qemu-io', ['-f', 'raw', '-c', 'write 1M 100k', '-c', 'write 9000 1', `nbd+unix:///a?socket=${join(dir, 'ref-nbd.sock')}`]);
      theirs = await ref.cmd('x-debug-block-dirty-bitmap-sha256', { node: 'a', name: 'p' });
      await ref.cmd('block-export-del', { id: 'e' });
      await ref.cmd('blockdev-del', { 'node-name': 'a' });
    } finally {
      await ref.stop();
    }
    await open();
    expect({ return: await d.ok('x-debug-block-dirty-bitmap-sha256', { node: 'a', name: 'p' }) }).toEqual(theirs);
    expect((await d.bitmaps('a'))![0]).toMatchObject({ name: 'p', recording: true, count: 26 * 4096 });
  });

  it('reports a bitmap left in use by a crash as inconsistent and refuses to use it', async () => {
    if (!(await haveTool('qemu-img'))) return;
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
    await run('qemu-img', ['bitmap', '--add', img, 'bm0']);
    // A crash: the image as it is on disk while a daemon has it open.
    await open();
    const crashed = join(dir, 'crashed.qcow2');
    copyFileSync(img, crashed);
    await open('c', crashed);
    expect(await d.bitmaps('c')).toEqual([
      {
        name: 'bm0',
        recording: false,
        persistent: true,
        busy: false,
        granularity: 65536,
        count: 0,
        inconsistent: true,
      },
    ]);
    const bad = "Bitmap 'bm0' is inconsistent and cannot be used";
    expect(await d.err('block-dirty-bitmap-clear', { node: 'c', name: 'bm0' })).toBe(bad);
    expect(await d.err('block-dirty-bitmap-enable', { node: 'c', name: 'bm0' })).toBe(bad);
    await d.ok('block-dirty-bitmap-add', { node: 'c', name: 'ok' });
    expect(await d.err('block-dirty-bitmap-merge', { node: 'c', target: 'ok', bitmaps: ['bm0'] })).toBe(bad);
    await d.ok('nbd-server-start', { addr: { type: 'unix', data: { path: join(dir, 'nbd.sock') } } });
    expect(
      await d.err('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'c', writable: true, bitmaps: ['bm0'] }),
    ).toBe(bad);
    // Kept as it was (still in use) across a clean close, until removed (as QSD).
    await d.ok('blockdev-del', { 'node-name': 'c' });
    expect(await imgBitmaps(crashed)).toEqual([{ flags: ['in-use', 'auto'], name: 'bm0', granularity: 65536 }]);
    await open('c', crashed);
    await d.ok('block-dirty-bitmap-remove', { node: 'c', name: 'bm0' });
    await d.ok('blockdev-del', { 'node-name': 'c' });
    expect(await imgBitmaps(crashed)).toBeUndefined();
    const { stdout } = await run('qemu-img', ['check', crashed]);
    expect(stdout).toContain('No errors were found');
  });

  it('refuses an image whose bitmap directory is corrupt with a clear error', async () => {
    if (!(await haveTool('qemu-img'))) return;
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
    await run('qemu-img', ['bitmap', '--add', img, 'bm']);
    const dirOff = directoryOffset(img);
    const cases: [string, number, Buffer, string][] = [
      ['type', 16, Buffer.from([2]), "Bitmap 'bm' doesn't satisfy the constraints"],
      ['gran', 17, Buffer.from([5]), "Bitmap 'bm' doesn't satisfy the constraints"],
      ['extra', 20, Buffer.from([0, 0, 0, 8]), 'Broken bitmap directory'],
    ];
    for (const [name, rel, data, msg] of cases) {
      const p = join(dir, `${name}.qcow2`);
      copyFileSync(img, p);
      patch(p, dirOff + rel, data);
      expect(
        await d.err('blockdev-add', {
          driver: 'qcow2',
          'node-name': name,
          file: { driver: 'file', filename: p },
        }),
      ).toBe(msg);
    }
    expect(d.svc.graph.list()).toHaveLength(0);
  });

  it('drops a removed persistent bitmap from the image at once', async () => {
    if (!(await haveTool('qemu-img'))) return;
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
    await run('qemu-img', ['bitmap', '--add', img, 'x']);
    await run('qemu-img', ['bitmap', '--add', img, 'y']);
    await open();
    await d.ok('block-dirty-bitmap-remove', { node: 'a', name: 'x' });
    expect(await imgBitmaps(img)).toEqual([{ flags: ['in-use', 'auto'], name: 'y', granularity: 65536 }]);
    await d.ok('blockdev-del', { 'node-name': 'a' });
    expect((await imgBitmaps(img))!.map((b) => b.name)).toEqual(['y']);
    const { stdout } = await run('qemu-img', ['check', img]);
    expect(stdout).toContain('No errors were found');
  });

  it('stores persistent bitmaps when the daemon shuts down (quit, SIGTERM)', async () => {
    if (!(await haveTool('qemu-img'))) return;
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
    await open();
    await d.ok('block-dirty-bitmap-add', { node: 'a', name: 'p', persistent: true });
    await d.svc.graph.find('a').io.write(Buffer.alloc(512, 1), 0);
    await d.shutdown();
    expect(await imgBitmaps(img)).toEqual([{ flags: ['auto'], name: 'p', granularity: 65536 }]);
  });

  it('finds a bitmap named by string down the backing chain of an exported overlay', async () => {
    if (!(await haveTool('qemu-img')) || !(await haveTool('nbdinfo'))) return;
    const base = join(dir, 'base.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '1M']);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', img]);
    await open('base', base);
    await d.ok('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'top',
      backing: 'base',
      file: { driver: 'file', filename: img },
    });
    await d.ok('block-dirty-bitmap-add', { node: 'base', name: 'bb', granularity: 4096 });
    await d.svc.graph.find('base').io.write(Buffer.alloc(4096, 1), 8192);
    const sock = join(dir, 'nbd.sock');
    await d.ok('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    expect(await d.err('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'top', bitmaps: ['bb'] })).toBe(
      "Enabled bitmap 'bb' incompatible with readonly export",
    );
    await d.ok('block-dirty-bitmap-disable', { node: 'base', name: 'bb' });
    await d.ok('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'top', bitmaps: ['bb'] });
    const { stdout } = await run('nbdinfo', ['--map=qemu:dirty-bitmap:bb', `nbd+unix:///top?socket=${sock}`]);
    expect(stdout.trim().split('\n').map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number))).toEqual([
      [0, 8192, 0],
      [8192, 4096, 1],
      [12288, (1 << 20) - 12288, 0],
    ]);
    expect((await d.bitmaps('base'))![0]!['busy']).toBe(true);
  });

  it('loads bitmaps of a read-only image read-only, as qemu-storage-daemon does', async () => {
    if (!(await haveTool('qemu-img'))) return;
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
    await run('qemu-img', ['bitmap', '--add', img, 'pre']);
    await open('a', img, true);
    expect(await d.bitmaps('a')).toEqual([
      { name: 'pre', recording: true, persistent: true, busy: false, granularity: 65536, count: 0 },
    ]);
    const ro = "Bitmap 'pre' is readonly and cannot be modified";
    expect(await d.err('block-dirty-bitmap-clear', { node: 'a', name: 'pre' })).toBe(ro);
    expect(await d.err('block-dirty-bitmap-remove', { node: 'a', name: 'pre' })).toBe(ro);
    await d.ok('block-dirty-bitmap-disable', { node: 'a', name: 'pre' });
    await d.ok('block-dirty-bitmap-enable', { node: 'a', name: 'pre' });
    await d.ok('block-dirty-bitmap-add', { node: 'a', name: 't' });
    await d.ok('block-dirty-bitmap-merge', { node: 'a', target: 't', bitmaps: ['pre'] });
    expect(await d.err('block-dirty-bitmap-merge', { node: 'a', target: 'pre', bitmaps: ['t'] })).toBe(ro);
    await d.ok('blockdev-del', { 'node-name': 'a' });
    expect(await imgBitmaps(img)).toEqual([{ flags: ['auto'], name: 'pre', granularity: 65536 }]);
  });

  it('never crashes on random corruption of the bitmap directory and tables', async () => {
    if (!(await haveTool('qemu-img'))) return;
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '8M']);
    await run('qemu-img', ['bitmap', '--add', '-g', '4096', img, 'b1']);
    await run('qemu-img', ['bitmap', '--add', img, 'b2']);
    const dirOff = directoryOffset(img);
    let seed = 99;
    const rnd = (n: number): number => {
      seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
      return seed % n;
    };
    const outcomes = new Set<string>();
    for (let i = 0; i < 40; i++) {
      const p = join(dir, `fz${i}.qcow2`);
      copyFileSync(img, p);
      for (let k = 0; k < 1 + rnd(3); k++) patch(p, dirOff + rnd(64), Buffer.from([rnd(256)]));
      const r = await d.qmp('blockdev-add', {
        driver: 'qcow2',
        'node-name': `fz${i}`,
        'read-only': i % 2 === 0,
        file: { driver: 'file', filename: p },
      });
      outcomes.add('error' in r ? r.error.desc.replace(/'[^']*'/g, "'X'") : 'opened');
      if (!('error' in r)) await d.ok('blockdev-del', { 'node-name': `fz${i}` });
    }
    expect(outcomes.size).toBeGreaterThan(1);
  });
});
