/**
 * The file/raw drivers against the real QEMU tools, with the native addon and with the pure-JS
 * fallback (BLOCKD_NO_ADDON=1 semantics through resetNativeOpsForTests).
 */
import { afterAll, afterEach, beforeEach, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { nativeOps, resetNativeOpsForTests } from '../../src/block/native.js';
import { EXTENT_DATA, EXTENT_ZERO } from '../../src/block/types.js';
import { silentLogger } from '../../src/util/logger.js';

function have(tool: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}
const tools = have('qemu-img') && have('qemu-io');
const MiB = 1 << 20;

function qemuIo(img: string, cmd: string, ro = false): string {
  return execFileSync('qemu-io', ['-f', 'raw', ...(ro ? ['-r'] : []), '-c', cmd, img], { encoding: 'utf8' });
}

interface MapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

for (const mode of ['addon', 'fallback'] as const) {
  describe.skipIf(!tools)(`file driver (${mode})`, () => {
    let dir: string;
    let img: string;
    let g: BlockGraph;
    const saved = process.env['BLOCKD_NO_ADDON'];

    beforeEach(() => {
      if (mode === 'fallback') process.env['BLOCKD_NO_ADDON'] = '1';
      else delete process.env['BLOCKD_NO_ADDON'];
      resetNativeOpsForTests();
      dir = mkdtempSync(join(tmpdir(), 'blockd-file-'));
      img = join(dir, 'a.raw');
      execFileSync('qemu-img', ['create', '-f', 'raw', img, '8M'], { stdio: 'ignore' });
      qemuIo(img, 'write -P 0x11 1M 64k');
      qemuIo(img, 'write -P 0x22 5M 1M');
      g = new BlockGraph(silentLogger());
    });

    afterEach(async () => {
      await g.closeAll();
      rmSync(dir, { recursive: true, force: true });
    });

    afterAll(() => {
      if (saved === undefined) delete process.env['BLOCKD_NO_ADDON'];
      else process.env['BLOCKD_NO_ADDON'] = saved;
      resetNativeOpsForTests();
    });

    it('uses the expected native implementation', () => {
      if (mode === 'fallback') expect(nativeOps().available).toBe(false);
      else if (nativeOps().available === false) console.warn('native addon not built: addon tests run the fallback');
    });

    it('reads data written by qemu-io', async () => {
      await g.add({ driver: 'raw', 'node-name': 'r', file: { driver: 'file', filename: img } });
      const b = Buffer.alloc(65536);
      await g.find('r').io.read(b, MiB);
      expect(b.every((x) => x === 0x11)).toBe(true);
    });

    it('writes data that qemu-io reads back', async () => {
      await g.add({ driver: 'raw', 'node-name': 'r', file: { driver: 'file', filename: img } });
      await g.find('r').io.write(Buffer.alloc(4096, 0x5a), 3 * MiB, { fua: true });
      await g.closeAll();
      expect(qemuIo(img, 'read -P 0x5a 3M 4k', true)).toMatch(/read 4096\/4096 bytes/);
    });

    it('reports the same data/hole extents as qemu-img map', async () => {
      await g.add({ driver: 'raw', 'node-name': 'r', file: { driver: 'file', filename: img } });
      const ours = await g.find('r').io.blockStatus(0, 8 * MiB);
      const map = JSON.parse(
        execFileSync('qemu-img', ['map', '--output=json', '-f', 'raw', img], { encoding: 'utf8' }),
      ) as MapEntry[];
      if (mode === 'fallback' || !nativeOps().available) {
        expect(ours).toHaveLength(1);
        expect(ours[0]!.flags & EXTENT_DATA).toBeTruthy();
        return;
      }
      const simplified = ours.map((e) => ({
        start: e.offset,
        length: e.length,
        data: (e.flags & EXTENT_DATA) !== 0,
        zero: (e.flags & EXTENT_ZERO) !== 0,
      }));
      expect(simplified).toEqual(map.map((m) => ({ start: m.start, length: m.length, data: m.data, zero: m.zero })));
    });

    it('punches a hole on discard with discard=unmap (visible in st_blocks)', async () => {
      await g.add({ driver: 'raw', 'node-name': 'r', discard: 'unmap', file: { driver: 'file', filename: img } });
      const before = statSync(img).blocks;
      await g.find('r').io.discard(5 * MiB, MiB);
      const after = statSync(img).blocks;
      if (mode === 'addon' && nativeOps().available) expect(after).toBeLessThan(before);
      else expect(after).toBe(before);
    });

    it('zeroes ranges so qemu-io reads zeroes, with or without unmap', async () => {
      await g.add({ driver: 'raw', 'node-name': 'r', discard: 'unmap', file: { driver: 'file', filename: img } });
      const io = g.find('r').io;
      await io.writeZeroes(MiB, 4096, { mayUnmap: true });
      await io.writeZeroes(5 * MiB, 8192, {});
      await g.closeAll();
      expect(qemuIo(img, 'read -P 0 1M 4k', true)).toMatch(/read 4096\/4096/);
      expect(qemuIo(img, 'read -P 0 5M 8k', true)).toMatch(/read 8192\/8192/);
      expect(qemuIo(img, 'read -P 0x22 5251072 4096', true)).toMatch(/read 4096\/4096/);
    });

    it('answers fast-zero requests only when it can zero without writing', async () => {
      await g.add({ driver: 'raw', 'node-name': 'r', file: { driver: 'file', filename: img } });
      const p = g.find('r').io.writeZeroes(0, 4096, { noFallback: true });
      if (mode === 'fallback' || !nativeOps().available) await expect(p).rejects.toMatchObject({ errno: 'ENOTSUP' });
      else await expect(p).resolves.toBeUndefined();
    });

    it('reads and writes unaligned ranges with cache.direct=on', async () => {
      await g.add({
        driver: 'raw',
        'node-name': 'r',
        cache: { direct: true },
        file: { driver: 'file', filename: img },
      });
      const io = g.find('r').io;
      await io.write(Buffer.alloc(1000, 0x33), MiB + 100);
      const b = Buffer.alloc(1200);
      await io.read(b, MiB);
      expect(b.subarray(0, 100).every((x) => x === 0x11)).toBe(true);
      expect(b.subarray(100, 1100).every((x) => x === 0x33)).toBe(true);
      expect(b.subarray(1100).every((x) => x === 0x11)).toBe(true);
    });

    it('serves cached reads through the synchronous fast path when possible', async () => {
      await g.add({ driver: 'raw', 'node-name': 'r', file: { driver: 'file', filename: img } });
      const io = g.find('r').io;
      const b = Buffer.alloc(4096);
      await io.read(b, MiB);
      const ok = io.tryReadSync(b, MiB);
      if (mode === 'fallback') expect(ok).toBe(false);
      if (ok) expect(b.every((x) => x === 0x11)).toBe(true);
    });

    it('refuses an image a QEMU process holds for writing (OFD locks)', async () => {
      if (mode === 'fallback' || !nativeOps().available) return;
      await g.add({ driver: 'raw', 'node-name': 'r', file: { driver: 'file', filename: img } });
      g.find('r').attach({
        name: 'an unnamed block device',
        kind: 'backend',
        perm: { consistentRead: true, write: true },
        shared: { consistentRead: true, writeUnchanged: true },
      });
      let out = '';
      try {
        execFileSync('qemu-io', ['-f', 'raw', '-c', 'read 0 512', img], { encoding: 'utf8', stdio: 'pipe' });
      } catch (e) {
        out = String((e as { stderr?: string }).stderr);
      }
      expect(out).toMatch(/Failed to get .*lock/);
    });
  });
}
