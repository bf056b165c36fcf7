import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Daemon, RefQsd, haveTool, nbdMap, run } from '../helpers/bitmap-harness.js';

/** Writes used against both daemons (qemu-io commands). */
const WRITES = ['write -P 1 0 1', 'write 70000 100', 'write 100351 1', 'write -z 8192 512'];

describe('dirty bitmaps in NBD exports', () => {
  let dir: string;
  let sock: string;
  let d: Daemon;

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'blockd-bitmap-'));
    sock = join(dir, 'nbd.sock');
    d = new Daemon();
    await d.ok('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await d.ok('blockdev-add', { driver: 'null-co', 'node-name': 'n0', size: 100000 });
    await d.ok('blockdev-add', { driver: 'null-co', 'node-name': 'ro', size: 1 << 20, 'read-only': true });
  });

  afterEach(async () => {
    await d.shutdown();
    rmSync(dir, { recursive: true, force: true });
  });

  const uri = (name: string): string => `nbd+unix:///${name}?socket=${sock}`;

  async function writeWithQemuIo(name: string): Promise<void> {
    await run('qemu-io', ['-f', 'raw', ...WRITES.flatMap((w) => ['-c', w]), uri(name)]);
  }

  it('lists the bitmap contexts after qemu:allocation-depth, in the order given', async () => {
    if (!(await haveTool('nbdinfo'))) return;
    await d.ok('block-dirty-bitmap-add', { node: 'n0', name: 'a' });
    await d.ok('block-dirty-bitmap-add', { node: 'n0', name: 'b', granularity: 512 });
    await d.ok('block-export-add', {
      type: 'nbd',
      id: 'e',
      'node-name': 'n0',
      writable: true,
      bitmaps: ['b', 'a'],
      'allocation-depth': true,
    });
    const { stdout } = await run('nbdinfo', ['--list', `nbd+unix:///?socket=${sock}`]);
    const ctxs = stdout.split('contexts:')[1]!.split('\n').map((l) => l.trim()).filter((l) => /^[a-z]+:/.test(l));
    expect(ctxs.slice(0, 4)).toEqual([
      'base:allocation',
      'qemu:allocation-depth',
      'qemu:dirty-bitmap:b',
      'qemu:dirty-bitmap:a',
    ]);
  });

  it('maps exactly the written ranges rounded to the granularity', async () => {
    if (!(await haveTool('nbdinfo')) || !(await haveTool('qemu-io'))) return;
    for (const [name, g] of [
      ['a', 65536],
      ['b', 512],
      ['c', 4096],
    ] as const) {
      await d.ok('block-dirty-bitmap-add', { node: 'n0', name, granularity: g });
    }
    await d.ok('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'n0', writable: true, bitmaps: ['a', 'b', 'c'] });
    await writeWithQemuIo('n0');
    // Expected maps as printed by qemu-storage-daemon 7.2 for the same writes.
    expect(await nbdMap(uri('n0'), 'qemu:dirty-bitmap:a')).toEqual([[0, 100352, 1]]);
    expect(await nbdMap(uri('n0'), 'qemu:dirty-bitmap:b')).toEqual([
      [0, 512, 1],
      [512, 7680, 0],
      [8192, 512, 1],
      [8704, 60928, 0],
      [69632, 512, 1],
      [70144, 29696, 0],
      [99840, 512, 1],
    ]);
    expect(await nbdMap(uri('n0'), 'qemu:dirty-bitmap:c')).toEqual([
      [0, 4096, 1],
      [4096, 4096, 0],
      [8192, 4096, 1],
      [12288, 57344, 0],
      [69632, 4096, 1],
      [73728, 24576, 0],
      [98304, 2048, 1],
    ]);
    const counts = Object.fromEntries((await d.bitmaps('n0'))!.map((b) => [b['name'], b['count']]));
    expect(counts).toEqual({ a: 131072, b: 2048, c: 16384 });
  });

  it('hashes the same as qemu-storage-daemon after the same writes over NBD', async () => {
    if (!(await haveTool('qemu-io')) || !(await haveTool('qemu-storage-daemon'))) return;
    const grans = [512, 4096, 65536, 1 << 20];
    const refSock = join(dir, 'ref-nbd.sock');
    const ref = await RefQsd.start(join(dir, 'ref-qmp.sock'));
    try {
      await ref.cmd('blockdev-add', { driver: 'null-co', 'node-name': 'n0', size: 100000 });
      await ref.cmd('nbd-server-start', { addr: { type: 'unix', data: { path: refSock } } });
      for (const g of grans) {
        await ref.cmd('block-dirty-bitmap-add', { node: 'n0', name: `g${g}`, granularity: g });
        await d.ok('block-dirty-bitmap-add', { node: 'n0', name: `g${g}`, granularity: g });
      }
      const exp = { type: 'nbd', id: 'e', 'node-name': 'n0', writable: true };
      expect(await ref.cmd('block-export-add', exp)).toEqual({ return: {} });
      await d.ok('block-export-add', exp);
      await run('qemu-io', ['-f', 'raw', ...WRITES.flatMap((w) => ['-c', w]), `nbd+unix:///n0?socket=${refSock}`]);
      await writeWithQemuIo('n0');
      for (const g of grans) {
        const theirs = await ref.cmd('x-debug-block-dirty-bitmap-sha256', { node: 'n0', name: `g${g}` });
        const ours = await d.ok('x-debug-block-dirty-bitmap-sha256', { node: 'n0', name: `g${g}` });
        expect({ return: ours }).toEqual(theirs);
      }
    } finally {
      await ref.stop();
    }
  });

  it('refuses an enabled bitmap on a writable node for a read-only export', async () => {
    await d.ok('block-dirty-bitmap-add', { node: 'n0', name: 'a' });
    expect(await d.err('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'n0', bitmaps: ['a'] })).toBe(
      "Enabled bitmap 'a' incompatible with readonly export",
    );
    expect((await d.bitmaps('n0'))![0]!['busy']).toBe(false);
  });

  it('accepts a disabled bitmap for a read-only export', async () => {
    await d.ok('block-dirty-bitmap-add', { node: 'n0', name: 'a', disabled: true });
    await d.ok('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'n0', bitmaps: ['a'] });
  });

  it('accepts an enabled bitmap on a read-only node for a read-only export', async () => {
    await d.ok('block-dirty-bitmap-add', { node: 'ro', name: 'r' });
    await d.ok('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'ro', bitmaps: ['r'] });
  });

  it('accepts an enabled bitmap named by {node, name} for a read-only export, as QSD 7.2 does', async () => {
    await d.ok('block-dirty-bitmap-add', { node: 'n0', name: 'a' });
    await d.ok('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'n0', bitmaps: [{ node: 'n0', name: 'a' }] });
  });

  it('accepts an enabled bitmap for a writable export', async () => {
    await d.ok('block-dirty-bitmap-add', { node: 'n0', name: 'a' });
    await d.ok('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'n0', writable: true, bitmaps: ['a'] });
  });

  it('names a missing bitmap or node the way qemu-storage-daemon does', async () => {
    const add = (bitmaps: unknown[]): Promise<string> =>
      d.err('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'n0', bitmaps });
    expect(await add(['zz'])).toBe("Bitmap 'zz' is not found");
    expect(await add([{ node: 'n0', name: 'zz' }])).toBe("Dirty bitmap 'zz' not found");
    expect(await add([{ node: 'zz', name: 'zz' }])).toBe("Node 'zz' not found");
  });

  it('marks an exported bitmap busy until the export is deleted', async () => {
    await d.ok('block-dirty-bitmap-add', { node: 'ro', name: 'r' });
    await d.ok('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'ro', bitmaps: ['r'] });
    expect((await d.bitmaps('ro'))![0]!['busy']).toBe(true);
    const busy = "Bitmap 'r' is currently in use by another operation and cannot be used";
    expect(await d.err('block-dirty-bitmap-remove', { node: 'ro', name: 'r' })).toBe(busy);
    expect(await d.err('block-dirty-bitmap-clear', { node: 'ro', name: 'r' })).toBe(busy);
    expect(await d.err('block-dirty-bitmap-merge', { node: 'ro', target: 'r', bitmaps: ['r'] })).toBe(busy);
    expect(
      await d.err('block-export-add', { type: 'nbd', id: 'e2', name: 'x', 'node-name': 'ro', bitmaps: ['r'] }),
    ).toBe(busy);
    await d.ok('block-export-del', { id: 'e' });
    expect((await d.bitmaps('ro'))![0]!['busy']).toBe(false);
    await d.ok('block-dirty-bitmap-remove', { node: 'ro', name: 'r' });
  });

  it('keeps the node of an exported bitmap from being deleted while the export exists', async () => {
    await d.ok('blockdev-add', { driver: 'null-co', 'node-name': 'n1', size: 100000 });
    await d.ok('block-dirty-bitmap-add', { node: 'n1', name: 'r', disabled: true });
    await d.ok('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'n0', bitmaps: [{ node: 'n1', name: 'r' }] });
    expect(await d.err('blockdev-del', { 'node-name': 'n1' })).toBe('Node n1 is in use');
    await d.ok('block-export-del', { id: 'e' });
    await d.ok('blockdev-del', { 'node-name': 'n1' });
  });

  it('exports a bitmap through the legacy nbd-server-add', async () => {
    if (!(await haveTool('nbdinfo'))) return;
    await d.ok('block-dirty-bitmap-add', { node: 'n0', name: 'a', granularity: 4096 });
    await d.svc.graph.find('n0').io.write(Buffer.alloc(10, 1), 8190);
    expect(await d.err('nbd-server-add', { device: 'n0', bitmap: 'a' })).toBe(
      "Enabled bitmap 'a' incompatible with readonly export",
    );
    await d.ok('block-dirty-bitmap-disable', { node: 'n0', name: 'a' });
    await d.ok('nbd-server-add', { device: 'n0', bitmap: 'a' });
    expect(await nbdMap(uri('n0'), 'qemu:dirty-bitmap:a')).toEqual([
      [0, 4096, 0],
      [4096, 8192, 1],
      [12288, 88064, 0],
    ]);
  });

  it('answers block status of a huge sparse bitmap in a few extents', async () => {
    if (!(await haveTool('nbdinfo'))) return;
    await d.ok('blockdev-add', { driver: 'null-co', 'node-name': 'big', size: 2 ** 40 });
    await d.ok('block-dirty-bitmap-add', { node: 'big', name: 'a' });
    const io = d.svc.graph.find('big').io;
    await io.write(Buffer.alloc(1), 2 ** 39);
    await io.write(Buffer.alloc(1), 2 ** 40 - 1);
    await d.ok('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'big', writable: true, bitmaps: ['a'] });
    const rows = await nbdMap(uri('big'), 'qemu:dirty-bitmap:a');
    // nbdinfo merges equal neighbours; runs longer than 2 GiB arrive in pieces.
    const dirty = rows.filter((r) => r[2] === 1);
    expect(dirty).toEqual([
      [2 ** 39, 65536, 1],
      [2 ** 40 - 65536, 65536, 1],
    ]);
  });
});
