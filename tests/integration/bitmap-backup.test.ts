import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Daemon, haveTool, run } from '../helpers/bitmap-harness.js';

const MiB = 1 << 20;

/** A pull-mode backup client: reads the dirty map of `ctx`, then only the dirty extents. */
async function pullDirty(sock: string, exportName: string, ctx: string): Promise<Array<[number, number, number[]]>> {
  const code = `
import nbd, json
h = nbd.NBD()
h.add_meta_context(${JSON.stringify(ctx)})
h.set_export_name(${JSON.stringify(exportName)})
h.connect_unix(${JSON.stringify(sock)})
size = h.get_size()
exts = []
def cb(name, offset, entries, err):
    if name != ${JSON.stringify(ctx)}: return 0
    pos = offset
    for i in range(0, len(entries), 2):
        exts.append((pos, entries[i], entries[i + 1]))
        pos += entries[i]
    return 0
off = 0
while off < size:
    n = len(exts)
    h.block_status(min(size - off, 1 << 30), off, cb)
    off = exts[-1][0] + exts[-1][1] if len(exts) > n else size
out = []
for (pos, length, flags) in exts:
    if flags & 1:
        data = h.pread(length, pos)
        out.append([pos, length, sorted(set(data))])
h.shutdown()
print(json.dumps(out))
`;
  const { stdout } = await run('/usr/bin/python3', ['-c', code]);
  return JSON.parse(stdout) as Array<[number, number, number[]]>;
}

async function guestWrite(sock: string, pattern: number, offset: number, length: number): Promise<void> {
  await run('qemu-io', ['-f', 'raw', '-c', `write -P ${pattern} ${offset} ${length}`, `nbd+unix:///guest?socket=${sock}`]);
}

describe('pull-mode incremental backup with copy-before-write', () => {
  let dir: string;
  let sock: string;
  let d: Daemon;

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'blockd-pull-'));
    sock = join(dir, 'nbd.sock');
    d = new Daemon();
    await d.ok('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  });

  afterEach(async () => {
    await d.shutdown();
    rmSync(dir, { recursive: true, force: true });
  });

  it('serves only the blocks changed since the last checkpoint, as they were at backup start', async () => {
    if (!(await haveTool('qemu-img')) || !(await haveTool('qemu-io')) || !(await haveTool('nbdinfo'))) return;
    const srcImg = join(dir, 'src.raw');
    writeFileSync(srcImg, Buffer.alloc(4 * MiB, 0x11));
    await d.ok('blockdev-add', {
      driver: 'raw',
      'node-name': 'src',
      file: { driver: 'file', filename: srcImg },
    });
    await d.ok('block-export-add', { type: 'nbd', id: 'guest', 'node-name': 'src', name: 'guest', writable: true });
    // The previous backup left checkpoint c1; the guest has written since.
    await d.ok('block-dirty-bitmap-add', { node: 'src', name: 'c1' });
    await guestWrite(sock, 0x22, 1 * MiB, 65536);
    await guestWrite(sock, 0x22, 3 * MiB + 4096, 4096);

    // 1. Scratch overlay on top of the source.
    const scratch = join(dir, 'fleece.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', scratch, String(4 * MiB)]);
    await d.ok('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'fleece',
      backing: 'src',
      file: { driver: 'file', filename: scratch },
    });
    // 2. New checkpoint and the temporary (disabled) bitmap of this backup, atomically.
    await d.ok('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-add', data: { node: 'src', name: 'c2' } },
        { type: 'block-dirty-bitmap-add', data: { node: 'src', name: 'tmp', disabled: true } },
        { type: 'block-dirty-bitmap-merge', data: { node: 'src', target: 'tmp', bitmaps: ['c1'] } },
      ],
    });
    // 3. The point in time: from now on old data is copied into the overlay before a write lands.
    await d.ok('blockdev-add', { driver: 'copy-before-write', 'node-name': 'cbw', file: 'src', target: 'fleece' });
    // 4. Writes that raced between 2 and 3 are in c2: fold them in.
    await d.ok('block-dirty-bitmap-merge', { node: 'src', target: 'tmp', bitmaps: ['c2'] });
    // 5. Export the point-in-time view with the temporary bitmap (found down fleece's backing chain).
    await d.ok('block-export-add', { type: 'nbd', id: 'backup', 'node-name': 'fleece', name: 'backup', bitmaps: ['tmp'] });

    // The guest keeps writing, over changed and unchanged blocks.
    await guestWrite(sock, 0x33, 1 * MiB, 4096);
    await guestWrite(sock, 0x33, 2 * MiB, 65536);

    const pulled = await pullDirty(sock, 'backup', 'qemu:dirty-bitmap:tmp');
    expect(pulled).toEqual([
      [1 * MiB, 65536, [0x22]],
      [3 * MiB, 65536, [0x11, 0x22]],
    ]);
    // The unchanged block the guest overwrote after the start still reads as it was.
    const { stdout } = await run('qemu-io', [
      '-r',
      '-f',
      'raw',
      '-c',
      `read -P 0x11 ${2 * MiB} 65536`,
      `nbd+unix:///backup?socket=${sock}`,
    ]);
    expect(stdout).toContain('read 65536/65536 bytes');

    // Teardown: export, filter, overlay, temporary bitmap, old checkpoint; c2 stays for next time.
    await d.ok('block-export-del', { id: 'backup' });
    await d.ok('blockdev-del', { 'node-name': 'cbw' });
    await d.ok('blockdev-del', { 'node-name': 'fleece' });
    await d.ok('block-dirty-bitmap-remove', { node: 'src', name: 'tmp' });
    await d.ok('block-dirty-bitmap-remove', { node: 'src', name: 'c1' });
    const left = (await d.bitmaps('src'))!;
    expect(left.map((b) => [b['name'], b['count']])).toEqual([['c2', 2 * 65536]]);
    // The source has the guest's latest data.
    const check = await run('qemu-io', ['-r', '-f', 'raw', '-c', `read -P 0x33 ${2 * MiB} 65536`, `nbd+unix:///guest?socket=${sock}`]);
    expect(check.stdout).toContain('read 65536/65536 bytes');
  });

  it('copies a cluster only once and never the new data', async () => {
    if (!(await haveTool('qemu-img')) || !(await haveTool('qemu-io'))) return;
    const srcImg = join(dir, 'src.raw');
    writeFileSync(srcImg, Buffer.alloc(1 * MiB, 0x44));
    await d.ok('blockdev-add', { driver: 'raw', 'node-name': 'src', file: { driver: 'file', filename: srcImg } });
    const scratch = join(dir, 'fleece.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', scratch, String(1 * MiB)]);
    await d.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'fleece', backing: 'src', file: { driver: 'file', filename: scratch } });
    await d.ok('blockdev-add', { driver: 'copy-before-write', 'node-name': 'cbw', file: 'src', target: 'fleece' });
    const io = d.svc.graph.find('src').io;
    const fleeceStats = d.svc.graph.find('fleece').io.stats;
    // Concurrent writes to one cluster: one copy, made before either lands.
    await Promise.all([io.write(Buffer.alloc(512, 1), 4096), io.write(Buffer.alloc(512, 2), 8192)]);
    await io.write(Buffer.alloc(512, 3), 0);
    expect(fleeceStats.writeOps).toBe(1);
    const buf = Buffer.alloc(65536);
    await d.svc.graph.find('fleece').io.read(buf, 0);
    expect(buf.every((b) => b === 0x44)).toBe(true);
  });

  it('refuses a target whose size differs from the source', async () => {
    if (!(await haveTool('qemu-img'))) return;
    await d.ok('blockdev-add', { driver: 'null-co', 'node-name': 'src', size: 1 * MiB });
    await d.ok('blockdev-add', { driver: 'null-co', 'node-name': 't', size: 2 * MiB });
    expect(await d.err('blockdev-add', { driver: 'copy-before-write', 'node-name': 'cbw', file: 'src', target: 't' })).toBe(
      `Source and target sizes differ: ${1 * MiB} vs ${2 * MiB}`,
    );
  });
});
