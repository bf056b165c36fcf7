/**
 * Internal snapshots and reopen under load and on failure: writes racing a snapshot are all
 * kept (each either in the snapshot or not, never torn), create/delete on an image with many
 * small L2 tables and 8-bit refcounts stays clean for qemu-img check, and a reopen that fails
 * on an image lock changes nothing.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { Daemon } from '../helpers/in-process-daemon.js';
import { check, contentOf, KiB, MiB, qemuImg, qemuIo, qemuTools, rm, tmp } from '../helpers/qcow2.js';
import type { BlockNode, BlockUser } from '../../src/block/types.js';

const tools = qemuTools();

function pattern(i: number, len: number): Buffer {
  return Buffer.alloc(len, (i * 37 + 11) & 0xff);
}

describe.skipIf(!tools)('internal snapshots and reopen', () => {
  let dir: string;
  let d: Daemon;
  beforeEach(() => {
    dir = tmp('blockd-snap-');
    d = new Daemon();
  });
  afterEach(async () => {
    await d.svc.shutdown();
    rm(dir);
  });

  function writer(node: BlockNode): BlockUser {
    return node.attach({
      name: 'an unnamed block device',
      role: 'root',
      kind: 'backend',
      perm: { consistentRead: true, write: true },
      shared: { consistentRead: true, write: true, writeUnchanged: true },
    });
  }

  it('keeps every write that races a snapshot, each wholly inside or outside it', async () => {
    const img = join(dir, 'a.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    await d.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: img } });
    const user = writer(d.svc.graph.find('q'));
    const cs = 64 * KiB;
    // Batch A (clusters 0..31) is written before the snapshot; batch B (32..63) races it.
    await Promise.all(Array.from({ length: 32 }, (_, i) => user.io.write(pattern(i, cs), i * cs)));
    const raced = Array.from({ length: 32 }, (_, i) => user.io.write(pattern(32 + i, cs), (32 + i) * cs));
    const snap = d.ok('blockdev-snapshot-internal-sync', { device: 'q', name: 's1' });
    const more = Array.from({ length: 32 }, (_, i) => user.io.write(pattern(64 + i, cs), (64 + i) * cs));
    await Promise.all([...raced, snap, ...more]);
    user.detach();
    await d.ok('blockdev-del', { 'node-name': 'q' });

    expect(check(img).code).toBe(0);
    const now = contentOf(img, dir);
    for (let i = 0; i < 96; i++) expect(now.subarray(i * cs, (i + 1) * cs).equals(pattern(i, cs))).toBe(true);
    const copy = join(dir, 'copy.qcow2');
    copyFileSync(img, copy);
    qemuImg('snapshot', '-a', 's1', copy);
    const then = contentOf(copy, dir);
    for (let i = 0; i < 96; i++) {
      const c = then.subarray(i * cs, (i + 1) * cs);
      if (i < 32) expect(c.equals(pattern(i, cs))).toBe(true);
      else expect(c.equals(pattern(i, cs)) || c.equals(Buffer.alloc(cs))).toBe(true);
    }
  });

  it('creates and deletes snapshots on 4 KiB clusters with 8-bit refcounts and stays clean', async () => {
    const img = join(dir, 'small.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,refcount_bits=8', img, '16M');
    // Data in many L2 tables (one covers 2 MiB here), one compressed cluster.
    qemuIo(img, 'qcow2', 'write -P 1 0 64k', 'write -P 2 3M 64k', 'write -P 3 9M 1M', 'write -c -P 4 15M 4k');
    await d.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: img } });
    await d.ok('blockdev-snapshot-internal-sync', { device: 'q', name: 'a' });
    const user = writer(d.svc.graph.find('q'));
    await user.io.write(Buffer.alloc(8 * KiB, 5), 4 * KiB);
    await user.io.write(Buffer.alloc(4 * KiB, 6), 15 * MiB);
    await d.ok('blockdev-snapshot-internal-sync', { device: 'q', name: 'b' });
    await user.io.write(Buffer.alloc(64 * KiB, 7), 9 * MiB);
    const info = (await d.ok('blockdev-snapshot-delete-internal-sync', { device: 'q', name: 'a' })) as Record<string, unknown>;
    expect(info['id']).toBe('1');
    await user.io.write(Buffer.alloc(4 * KiB, 8), 3 * MiB);
    user.detach();
    await d.ok('blockdev-del', { 'node-name': 'q' });
    const c = check(img);
    expect(c.out).toContain('No errors were found on the image.');
    expect(c.out).not.toMatch(/leaked/);
    expect(qemuImg('snapshot', '-l', img)).toMatch(/^2\s+b\s/m);

    const copy = join(dir, 'copy.qcow2');
    copyFileSync(img, copy);
    qemuImg('snapshot', '-a', 'b', copy);
    const b = contentOf(copy, dir);
    expect(b.subarray(0, 4 * KiB).equals(Buffer.alloc(4 * KiB, 1))).toBe(true);
    expect(b.subarray(4 * KiB, 12 * KiB).equals(Buffer.alloc(8 * KiB, 5))).toBe(true);
    expect(b.subarray(9 * MiB, 10 * MiB).equals(Buffer.alloc(MiB, 3))).toBe(true);
    expect(b.subarray(15 * MiB, 15 * MiB + 4 * KiB).equals(Buffer.alloc(4 * KiB, 6))).toBe(true);

    await d.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: img } });
    await d.ok('blockdev-snapshot-delete-internal-sync', { device: 'q', id: '2' });
    await d.ok('blockdev-del', { 'node-name': 'q' });
    const c2 = check(img);
    expect(c2.code).toBe(0);
    expect(c2.out).not.toMatch(/leaked|ERROR/);
    expect(contentOf(img, dir).subarray(3 * MiB, 3 * MiB + 4 * KiB).equals(Buffer.alloc(4 * KiB, 8))).toBe(true);
  });

  it('takes a snapshot of an image with lazy refcounts whose dirty bit is set while open', async () => {
    const img = join(dir, 'lazy.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', img, '4M');
    await d.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: img } });
    const user = writer(d.svc.graph.find('q'));
    await user.io.write(Buffer.alloc(64 * KiB, 1), 0);
    await d.ok('blockdev-snapshot-internal-sync', { device: 'q', name: 'l1' });
    await user.io.write(Buffer.alloc(64 * KiB, 2), 0);
    await d.ok('blockdev-snapshot-internal-sync', { device: 'q', name: 'l2' });
    await user.io.write(Buffer.alloc(64 * KiB, 3), 64 * KiB);
    user.detach();
    await d.ok('blockdev-del', { 'node-name': 'q' });
    const c = check(img);
    expect(c.code).toBe(0);
    expect(c.out).not.toMatch(/leaked|ERROR/);
    expect(qemuImg('snapshot', '-l', img)).toMatch(/^1\s+l1\s[\s\S]*^2\s+l2\s/m);
    const copy = join(dir, 'copy.qcow2');
    copyFileSync(img, copy);
    qemuImg('snapshot', '-a', 'l1', copy);
    expect(contentOf(copy, dir).subarray(0, 128 * KiB).equals(
      Buffer.concat([Buffer.alloc(64 * KiB, 1), Buffer.alloc(64 * KiB)]),
    )).toBe(true);
  });

  it('keeps persistent dirty bitmaps recording across snapshots and reopens', async () => {
    const img = join(dir, 'bm.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '4M');
    await d.ok('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'q',
      file: { driver: 'file', filename: img, 'node-name': 'f' },
    });
    await d.ok('block-dirty-bitmap-add', { node: 'q', name: 'bm', persistent: true });
    const user = writer(d.svc.graph.find('q'));
    await user.io.write(Buffer.alloc(64 * KiB, 1), 0);
    await d.ok('blockdev-snapshot-internal-sync', { device: 'q', name: 's' });
    await user.io.write(Buffer.alloc(64 * KiB, 2), MiB);
    user.detach();
    await d.ok('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'q', file: 'f', 'read-only': true }] });
    const ro = (await d.bitmaps('q')) ?? [];
    expect(ro.map((b) => [b['name'], b['count']])).toEqual([['bm', 128 * KiB]]);
    expect(await d.err('block-dirty-bitmap-clear', { node: 'q', name: 'bm' })).toMatch(/readonly|read-only/);
    await d.ok('blockdev-reopen', {
      options: [
        { driver: 'qcow2', 'node-name': 'q', file: 'f' },
        { driver: 'file', 'node-name': 'f', filename: img },
      ],
    });
    const again = writer(d.svc.graph.find('q'));
    await again.io.write(Buffer.alloc(64 * KiB, 3), 2 * MiB);
    again.detach();
    await d.ok('blockdev-del', { 'node-name': 'q' });
    expect(check(img).code).toBe(0);
    const info = JSON.parse(qemuImg('info', '--output=json', img)) as Record<string, unknown>;
    const bitmaps = (info['format-specific'] as { data: { bitmaps: { name: string; flags: string[] }[] } }).data.bitmaps;
    expect(bitmaps.map((b) => [b.name, b.flags])).toEqual([['bm', ['auto']]]);
    // The stored bits: open again and count.
    await d.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: img } });
    expect(((await d.bitmaps('q')) ?? []).map((b) => b['count'])).toEqual([192 * KiB]);
  });

  it('changes nothing when a reopen read-write fails on an image lock', async () => {
    const img = join(dir, 'locked.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '1M');
    await d.ok('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'q',
      'read-only': true,
      file: { driver: 'file', filename: img, 'node-name': 'f' },
    });
    // A read-only qemu-io that shares nothing but reads: our write lock would conflict with it.
    const holder: ChildProcess = spawn('qemu-io', ['-r', '-f', 'qcow2', img], { stdio: ['pipe', 'pipe', 'ignore'] });
    try {
      await new Promise<void>((resolve, reject) => {
        holder.stdout?.on('data', (b: Buffer) => {
          if (b.toString().includes('qemu-io>')) resolve();
        });
        holder.on('exit', () => reject(new Error('qemu-io exited')));
      });
      const before = await d.ok('x-debug-query-block-graph');
      const desc = await d.err('blockdev-reopen', {
        options: [
          { driver: 'qcow2', 'node-name': 'q', file: 'f' },
          { driver: 'file', 'node-name': 'f', filename: img },
        ],
      });
      expect(desc).toBe('Failed to get "write" lock');
      expect(await d.ok('x-debug-query-block-graph')).toEqual(before);
      const nodes = (await d.ok('query-named-block-nodes')) as Array<Record<string, unknown>>;
      expect(nodes.map((n) => n['ro'])).toEqual([true, true]);
    } finally {
      holder.stdin?.end('quit\n');
      await new Promise((r) => holder.once('exit', r));
    }
    // Once the other process is gone the same reopen works, and writes reach the image.
    await d.ok('blockdev-reopen', {
      options: [
        { driver: 'qcow2', 'node-name': 'q', file: 'f' },
        { driver: 'file', 'node-name': 'f', filename: img },
      ],
    });
    const user = writer(d.svc.graph.find('q'));
    await user.io.write(Buffer.alloc(64 * KiB, 9), 0);
    user.detach();
    await d.ok('blockdev-del', { 'node-name': 'q' });
    expect(check(img).code).toBe(0);
    expect(contentOf(img, dir).subarray(0, 64 * KiB).equals(Buffer.alloc(64 * KiB, 9))).toBe(true);
  });
});
