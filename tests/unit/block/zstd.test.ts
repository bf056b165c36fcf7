/**
 * The addon's zstd (libzstd.so.1 loaded at run time) and the qcow2 cluster decoder built on it,
 * checked against frames made by the system `zstd` tool; and the refusal without the addon.
 */
import { describe, expect, it } from 'vitest';
import { execFileSync, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  nativeOps,
  zstdOpsIfAvailable,
  zstdUnavailableReason,
  type ZstdOps,
} from '../../../src/block/native.js';
import { decompressCluster, hasZstd } from '../../../src/block/drivers/qcow2/compress.js';
import { have, rm, tmp } from '../../helpers/qcow2.js';
import { withoutAddon } from '../../helpers/native.js';

const haveCli = have('zstd');
const z: ZstdOps | undefined = zstdOpsIfAvailable();
if (process.env['CI'] === 'true' && process.env['BLOCKD_NO_ADDON'] !== '1' && (!z || !haveCli)) {
  throw new Error('zstd tests need the native addon, libzstd.so.1 and the zstd tool under CI');
}

/** Compressible but not trivial: runs, a ramp, random bytes and zeroes. */
function sample(size: number, seed = 1): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = ((i * 7 + seed) ^ (i >> 9)) & 0xff;
  randomFillSync(b, Math.floor(size / 4), Math.floor(size / 8));
  b.fill(0, Math.floor(size / 2), Math.floor((size * 5) / 8));
  return b;
}

/** A zstd frame of `data`, made by the zstd command-line tool (with a checksum, as by default). */
function cliFrame(data: Buffer, ...opts: string[]): Buffer {
  return execFileSync('zstd', ['-q', '-c', ...opts], { input: data, maxBuffer: 64 * 1024 * 1024 });
}

describe.skipIf(!z || !haveCli)('zstd in the native addon', () => {
  const zz = z as ZstdOps;

  it('reports libzstd as available with its version', () => {
    expect(zz.available()).toBe(true);
    expect(zz.status()).toMatchObject({ available: true, version: expect.stringMatching(/^1\.\d+\.\d+$/) });
  });

  it('decompresses a frame made by the zstd tool', () => {
    const data = sample(300_000);
    const out = Buffer.alloc(data.length);
    expect(zz.decompress(cliFrame(data), out)).toBe(data.length);
    expect(out.equals(data)).toBe(true);
  });

  it('ignores garbage after the end of the frame', () => {
    const data = sample(65536);
    const src = Buffer.concat([cliFrame(data), Buffer.alloc(511, 0xa5)]);
    const out = Buffer.alloc(data.length);
    expect(zz.decompress(src, out)).toBe(data.length);
    expect(out.equals(data)).toBe(true);
  });

  it('returns the bytes produced when the output buffer is larger than the data', () => {
    const data = sample(10_000);
    const src = Buffer.concat([cliFrame(data), Buffer.from('not a frame')]);
    expect(zz.decompress(src, Buffer.alloc(20_000))).toBe(data.length);
  });

  it('decodes frames that follow each other', () => {
    const a = sample(4096, 1);
    const b = sample(4096, 2);
    const out = Buffer.alloc(8192);
    expect(zz.decompress(Buffer.concat([cliFrame(a), cliFrame(b), Buffer.alloc(9)]), out)).toBe(8192);
    expect(out.equals(Buffer.concat([a, b]))).toBe(true);
  });

  it('throws EIO for a truncated frame', () => {
    const data = sample(65536);
    const frame = cliFrame(data);
    for (const cut of [0, 3, 10, frame.length >> 1, frame.length - 1]) {
      expect(() => zz.decompress(frame.subarray(0, cut), Buffer.alloc(data.length))).toThrow(
        expect.objectContaining({ code: 'EIO', message: expect.stringMatching(/^zstd: /) }),
      );
    }
  });

  it('throws EIO for input that is not zstd at all', () => {
    expect(() => zz.decompress(Buffer.alloc(4096, 0x41), Buffer.alloc(4096))).toThrow(
      expect.objectContaining({ code: 'EIO', message: 'zstd: Unknown frame descriptor' }),
    );
  });

  it('throws EIO when a damaged frame fails its checksum', () => {
    const data = sample(65536);
    const frame = Buffer.from(cliFrame(data));
    frame[frame.length - 2] = (frame[frame.length - 2] ?? 0) ^ 0xff;
    expect(() => zz.decompress(frame, Buffer.alloc(data.length))).toThrow(expect.objectContaining({ code: 'EIO' }));
  });

  it('throws EIO when the data is longer than the output buffer', () => {
    const data = sample(8192);
    expect(() => zz.decompress(cliFrame(data), Buffer.alloc(8191))).toThrow(
      expect.objectContaining({ code: 'EIO', message: 'zstd: data decompresses to more than 8191 bytes' }),
    );
  });

  it('stops without error once the output is full when asked to', () => {
    const data = sample(8192);
    const out = Buffer.alloc(4096);
    expect(zz.decompress(cliFrame(data), out, true)).toBe(4096);
    expect(out.equals(data.subarray(0, 4096))).toBe(true);
  });

  it('throws a TypeError for arguments that are not Buffers', () => {
    expect(() => zz.decompress('abc' as unknown as Buffer, Buffer.alloc(1))).toThrow(TypeError);
  });

  it('decompresses a 2 MiB frame on the thread pool', async () => {
    const data = sample(2 * 1024 * 1024);
    const out = Buffer.alloc(data.length);
    expect(await zz.decompressAsync(Buffer.concat([cliFrame(data), Buffer.alloc(100, 7)]), out)).toBe(data.length);
    expect(out.equals(data)).toBe(true);
  });

  it('rejects with EIO on the thread pool for a truncated frame', async () => {
    const frame = cliFrame(sample(65536));
    await expect(zz.decompressAsync(frame.subarray(0, 100), Buffer.alloc(65536))).rejects.toMatchObject({
      code: 'EIO',
    });
  });

  it('compresses into a frame the zstd tool decodes', () => {
    const data = sample(100_000);
    const dst = Buffer.alloc(data.length);
    const n = zz.compress(data, dst, 3);
    expect(n).toBeGreaterThan(0);
    expect(execFileSync('zstd', ['-q', '-d', '-c'], { input: dst.subarray(0, n) }).equals(data)).toBe(true);
  });

  it('returns -1 from compress when the frame does not fit', () => {
    const data = Buffer.alloc(4096);
    randomFillSync(data);
    expect(zz.compress(data, Buffer.alloc(4095), 3)).toBe(-1);
  });

  it('reports a missing libzstd as unavailable and refuses with ENOTSUP', () => {
    const addon = join(import.meta.dirname, '../../../native/build/Release/blockd_native.node');
    const script = `
      const a = require(${JSON.stringify(addon)});
      let err;
      try { a.zstdDecompress(Buffer.alloc(8), Buffer.alloc(8)); } catch (e) { err = { code: e.code, message: e.message }; }
      console.log(JSON.stringify({ available: a.zstdAvailable(), status: a.zstdStatus(), err }));`;
    const r = spawnSync(process.execPath, ['-e', script], {
      env: { ...process.env, BLOCKD_ZSTD_LIBRARY: 'libblockd-no-such-zstd.so.1' },
      encoding: 'utf8',
    });
    expect(r.status).toBe(0);
    const out = JSON.parse(r.stdout) as { available: boolean; status: { error: string }; err: { code: string; message: string } };
    expect(out.available).toBe(false);
    expect(out.status.error).toContain('cannot load libblockd-no-such-zstd.so.1');
    expect(out.err.code).toBe('ENOTSUP');
    expect(out.err.message).toMatch(/^zstd is not available: cannot load libblockd-no-such-zstd\.so\.1/);
  });
});

describe.skipIf(!z || !haveCli)('qcow2 zstd clusters', () => {
  it('decodes a 4 KiB cluster padded to the sector end', async () => {
    const data = sample(4096);
    const frame = cliFrame(data);
    const src = Buffer.concat([frame, Buffer.alloc(512 - (frame.length % 512), 0xee)]);
    const out = Buffer.alloc(4096);
    await decompressCluster(src, out, 1);
    expect(out.equals(data)).toBe(true);
  });

  it('decodes a 2 MiB cluster (thread pool path)', async () => {
    const data = sample(2 * 1024 * 1024);
    const out = Buffer.alloc(data.length);
    await decompressCluster(Buffer.concat([cliFrame(data), Buffer.alloc(300, 1)]), out, 1);
    expect(out.equals(data)).toBe(true);
  });

  it('fails with EIO when the cluster comes out short', async () => {
    await expect(decompressCluster(cliFrame(sample(4000)), Buffer.alloc(4096), 1)).rejects.toMatchObject({
      errno: 'EIO',
      message: 'Compressed cluster is too short',
    });
  });

  it('fails with EIO for a corrupt cluster', async () => {
    await expect(decompressCluster(Buffer.alloc(1024, 0x33), Buffer.alloc(65536), 1)).rejects.toMatchObject({
      errno: 'EIO',
      message: 'Failed to decompress cluster: zstd: Unknown frame descriptor',
    });
  });

  it('decodes frames written with a large window (zstd --long)', async () => {
    const dir = tmp('blockd-zstd-');
    try {
      const data = sample(1024 * 1024);
      const file = join(dir, 'd');
      writeFileSync(file, data);
      const frame = execFileSync('zstd', ['-q', '-c', '--long=23', file]);
      const out = Buffer.alloc(data.length);
      await decompressCluster(frame, out, 1);
      expect(out.equals(data)).toBe(true);
    } finally {
      rm(dir);
    }
  });

  it('refuses a frame that declares a window over 8 MiB', async () => {
    const data = sample(100_000);
    const frame = execFileSync('zstd', ['-q', '-c', '--long=27', '--no-content-size'], { input: data });
    await expect(decompressCluster(frame, Buffer.alloc(data.length), 1)).rejects.toMatchObject({
      errno: 'EIO',
      message: 'Failed to decompress cluster: zstd: Frame requires too much memory for decoding',
    });
  });
});

describe('qcow2 zstd clusters without the native addon', () => {
  withoutAddon();

  it('says zstd is unavailable and why', () => {
    expect(nativeOps().zstd).toBeUndefined();
    expect(hasZstd()).toBe(false);
    expect(zstdUnavailableReason()).toBe('the native addon is disabled (BLOCKD_NO_ADDON=1)');
  });

  it('refuses a zstd cluster with ENOTSUP and a message naming zstd', async () => {
    await expect(decompressCluster(Buffer.alloc(512), Buffer.alloc(4096), 1)).rejects.toMatchObject({
      code: 'NOT_SUPPORTED',
      errno: 'ENOTSUP',
      message: 'zstd compressed clusters cannot be read: the native addon is disabled (BLOCKD_NO_ADDON=1)',
    });
  });

  it('still reads deflate clusters', async () => {
    const { deflateRawSync } = await import('node:zlib');
    const data = sample(4096);
    const out = Buffer.alloc(4096);
    await decompressCluster(Buffer.concat([deflateRawSync(data, { windowBits: 12 }), Buffer.alloc(100)]), out, 0);
    expect(out.equals(data)).toBe(true);
  });
});
