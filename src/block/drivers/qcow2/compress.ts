/**
 * Compressed clusters (digest §5): descriptor decoding and decompression.
 * Deflate: raw stream (no zlib header); QEMU writes with a 4 KiB window, a 32 KiB window reads
 * everything. zstd: only when node:zlib provides it (Node >= 22.15), otherwise refused clearly.
 */
import { inflateRaw, constants as zc } from 'node:zlib';
import * as zlib from 'node:zlib';
import { BlockError } from '../../../util/errors.js';

export interface CompressedDesc {
  /** Host byte offset of the compressed data (not aligned). */
  offset: number;
  /** Bytes to read from `offset` (whole 512-byte sectors, minus the offset in the first). */
  length: number;
}

/** Decode the descriptor bits (0..61) of a compressed L2 entry given as hi/lo halves. */
export function compressedDesc(hi: number, lo: number, clusterBits: number): CompressedDesc {
  const entry = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo >>> 0);
  const x = BigInt(62 - (clusterBits - 8));
  const offset = entry & ((1n << x) - 1n);
  const nsect = ((entry >> x) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1n;
  if (offset >= 1n << 56n) {
    throw new BlockError('QCOW2_INVALID', 'EIO', 'Compressed cluster offset out of range');
  }
  const off = Number(offset);
  return { offset: off, length: Number(nsect) * 512 - (off % 512) };
}

type ZstdFn = (buf: Buffer, cb: (err: Error | null, out: Buffer) => void) => void;

/** Whether this Node.js can decompress zstd clusters. */
export function hasZstd(): boolean {
  return typeof (zlib as unknown as { zstdDecompress?: ZstdFn }).zstdDecompress === 'function';
}

/** Decompress one cluster; `out` must come out exactly full. */
export function decompressCluster(src: Buffer, out: Buffer, type: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const done = (err: Error | null, res: Buffer): void => {
      if (err) {
        reject(new BlockError('QCOW2_INVALID', 'EIO', `Failed to decompress cluster: ${err.message}`));
        return;
      }
      if (res.length < out.length) {
        reject(new BlockError('QCOW2_INVALID', 'EIO', 'Compressed cluster is too short'));
        return;
      }
      res.copy(out, 0, 0, out.length);
      resolve();
    };
    if (type === 1) {
      const z = (zlib as unknown as { zstdDecompress?: ZstdFn }).zstdDecompress;
      if (!z) {
        reject(new BlockError('NOT_SUPPORTED', 'ENOTSUP', 'zstd compressed clusters are not supported by this Node.js'));
        return;
      }
      z(src, done);
      return;
    }
    // The input is padded to whole sectors: trailing garbage after the stream end is fine, and a
    // truncated-looking end is fine as long as the full cluster came out (finishFlush SYNC).
    inflateRaw(src, { finishFlush: zc.Z_SYNC_FLUSH, maxOutputLength: out.length * 2 + 65536 }, (err, res) => {
      if (err && (err as { code?: string }).code !== 'Z_BUF_ERROR') done(err, Buffer.alloc(0));
      else done(null, res ?? Buffer.alloc(0));
    });
  });
}
