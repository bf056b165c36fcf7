/**
 * Image creation (blockdev-create): `file` (create/truncate a host file) and `qcow2` (format a
 * writable node). Option checks and error texts follow QEMU 7.2's qcow2_co_create.
 *
 * qcow2 layout written: header cluster, refcount table, refcount blocks, L1 table, then (with
 * preallocation metadata, falloc or full) the L2 tables and the data clusters they map, the
 * same layout as `qemu-img create -o preallocation=...`. Everything is counted in the refcount
 * blocks, so `qemu-img check` finds no leaks. The data area is then left sparse (metadata),
 * reserved with fallocate-style write-zeroes (falloc), or written with zeroes (full).
 */
import { BlockError } from '../../../util/errors.js';
import type { BlockIO } from '../../types.js';
import { HI_COPIED, buildHeader, newHeader, writeU64 } from './format.js';

/** Host file creation moved to ../file-create.ts; re-exported for existing callers. */
export { createFile, type FileCreateOptions } from '../file-create.js';

function createError(msg: string): BlockError {
  return new BlockError('CREATE', 'EINVAL', msg);
}

export interface Qcow2CreateOptions {
  size: number;
  version?: 'v2' | 'v3';
  clusterSize?: number;
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
  lazyRefcounts?: boolean;
  refcountBits?: number;
  compressionType?: 'zlib' | 'zstd';
  backingFile?: string;
  backingFmt?: string;
  extendedL2?: boolean;
}

function isPow2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/** Validate options the way QEMU does; returns the derived parameters. */
export function checkQcow2Create(o: Qcow2CreateOptions): { clusterBits: number; refcountOrder: number; version: 2 | 3 } {
  const version = o.version === 'v2' ? 2 : 3;
  const cs = o.clusterSize ?? 65536;
  if (!isPow2(cs) || cs < 512 || cs > 2 * 1024 * 1024) {
    throw createError('Cluster size must be a power of two between 512 and 2048k');
  }
  const clusterBits = Math.log2(cs);
  if (o.size % 512 !== 0) throw createError('Image size must be a multiple of 512 bytes');
  if (o.extendedL2) {
    if (version < 3) throw createError('Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)');
    if (cs < 16384) throw createError('Extended L2 entries are only supported with cluster sizes of at least 16 KiB');
  }
  const refcountBits = o.refcountBits ?? 16;
  if (!isPow2(refcountBits) || refcountBits > 64) {
    throw createError('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version < 3 && refcountBits !== 16) {
    throw createError('Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)');
  }
  if (version < 3 && o.lazyRefcounts) {
    throw createError('Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  if (o.backingFmt !== undefined && o.backingFile === undefined) {
    throw createError('Backing format cannot be used without backing file');
  }
  if (o.backingFile !== undefined && o.preallocation !== undefined && o.preallocation !== 'off' && !o.extendedL2) {
    throw createError('Backing file and preallocation can only be used at the same time if extended_l2 is on');
  }
  if (o.compressionType === 'zstd') {
    if (version < 3) throw createError('Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  return { clusterBits, refcountOrder: Math.log2(refcountBits), version };
}

/** Format `io` (a writable node) as a qcow2 image. */
export async function createQcow2(io: BlockIO, o: Qcow2CreateOptions, signal?: AbortSignal): Promise<void> {
  const { clusterBits, refcountOrder, version } = checkQcow2Create(o);
  const cs = 2 ** clusterBits;
  const entrySize = o.extendedL2 ? 16 : 8;
  const l2Entries = cs / entrySize;
  const l1Size = Math.ceil(o.size / (cs * l2Entries));
  const l1Clusters = Math.max(1, Math.ceil((l1Size * 8) / cs));
  const prealloc = o.preallocation !== undefined && o.preallocation !== 'off';
  const dataClusters = prealloc ? Math.ceil(o.size / cs) : 0;
  const l2Tables = prealloc ? l1Size : 0;
  const perBlock = (cs * 8) / 2 ** refcountOrder;

  // Fixpoint: refcount blocks and table must cover everything including themselves.
  let rb = 1;
  let rt = 1;
  for (;;) {
    const total = 1 + rt + rb + l1Clusters + l2Tables + dataClusters;
    const needRb = Math.ceil(total / perBlock);
    const needRt = Math.ceil((needRb * 8) / cs);
    if (needRb === rb && needRt === rt) break;
    rb = Math.max(rb, needRb);
    rt = Math.max(rt, needRt);
  }
  if (rt * cs > 8 * 1024 * 1024) throw createError('Image size is too big for a qcow2 refcount table');
  if (l1Size * 8 > 32 * 1024 * 1024) throw createError('The image size is too large for file format \'qcow2\' (try using a larger cluster size)');

  const rtOff = cs;
  const rbOff = rtOff + rt * cs;
  const l1Off = rbOff + rb * cs;
  // Where QEMU puts the L2 tables and data: with metadata each L2 table is followed by the data
  // clusters it maps (one table, its data, the next table); with falloc and full the data is one
  // contiguous run after the first L2 table, and the other tables follow it.
  const l2Off = l1Off + l1Clusters * cs;
  const contiguous = o.preallocation === 'falloc' || o.preallocation === 'full';
  const tableOff = (i: number): number =>
    !contiguous ? l2Off + i * (1 + l2Entries) * cs : i === 0 ? l2Off : l2Off + (dataClusters + i) * cs;
  const dataOffOf = (g: number): number =>
    !contiguous ? tableOff(Math.floor(g / l2Entries)) + (1 + (g % l2Entries)) * cs : l2Off + (1 + g) * cs;
  const total = 1 + rt + rb + l1Clusters + l2Tables + dataClusters;

  const h = newHeader({
    version,
    clusterBits,
    size: o.size,
    refcountOrder,
    lazyRefcounts: o.lazyRefcounts ?? false,
    extendedL2: o.extendedL2 ?? false,
    ...(o.backingFile !== undefined ? { backingFile: o.backingFile } : {}),
    ...(o.backingFmt !== undefined ? { backingFormat: o.backingFmt } : {}),
  });
  if (o.compressionType === 'zstd') {
    h.compressionType = 1;
    h.incompatible |= 1n << 3n;
  }
  h.l1Size = l1Size;
  h.l1TableOffset = l1Off;
  h.refcountTableOffset = rtOff;
  h.refcountTableClusters = rt;
  // The whole header cluster is written (zero padded), as QEMU does: same allocated size.
  const headerBytes = buildHeader(h);
  const header = Buffer.alloc(Math.max(cs, headerBytes.length));
  headerBytes.copy(header);

  const reftable = Buffer.alloc(rt * cs);
  for (let i = 0; i < rb; i++) writeU64(reftable, i * 8, rbOff + i * cs);
  const refblocks = Buffer.alloc(rb * cs);
  const width = 2 ** refcountOrder;
  for (let c = 0; c < total; c++) setRefcountOne(refblocks, c, width);

  const l1 = Buffer.alloc(l1Clusters * cs);
  for (let i = 0; i < l2Tables; i++) {
    const off = tableOff(i);
    l1.writeUInt32BE((Math.floor(off / 0x100000000) | HI_COPIED) >>> 0, i * 8);
    l1.writeUInt32BE(off >>> 0, i * 8 + 4);
  }

  // Start from an empty file, then write everything in place; QEMU's files end after the L1.
  const fileEnd = prealloc ? total * cs : l1Off + Math.max(8, l1Size * 8);
  await io.truncate(0);
  await io.truncate(fileEnd);
  const parts: [Buffer, number][] = [
    [header.subarray(0, Math.min(header.length, fileEnd)), 0],
    [reftable, rtOff],
    [refblocks, rbOff],
    // Only the used part of the L1 table, like QEMU (the rest of its cluster stays a hole).
    [l1.subarray(0, Math.max(8, l1Size * 8)), l1Off],
  ];
  for (const [buf, off] of parts) {
    signal?.throwIfAborted();
    if (buf.length) await io.write(buf, off);
  }
  const l2 = Buffer.alloc(l2Tables ? cs : 0);
  const zero = o.preallocation === 'full' ? Buffer.alloc(Math.min(FULL_CHUNK, l2Entries * cs)) : undefined;
  for (let i = 0; i < l2Tables; i++) {
    signal?.throwIfAborted();
    const off = tableOff(i);
    const first = i * l2Entries;
    const count = Math.min(l2Entries, dataClusters - first);
    l2.fill(0);
    for (let k = 0; k < count; k++) {
      const dataOff = dataOffOf(first + k);
      const at = k * entrySize;
      l2.writeUInt32BE((Math.floor(dataOff / 0x100000000) | HI_COPIED) >>> 0, at);
      l2.writeUInt32BE(dataOff >>> 0, at + 4);
      if (o.extendedL2) l2.writeUInt32BE(0xffffffff, at + 12);
    }
    await io.write(l2, off);
    const dataStart = dataOffOf(first);
    const dataEnd = dataStart + count * cs;
    if (o.preallocation === 'falloc') {
      // Reserve without writing: the file driver turns this into FALLOC_FL_ZERO_RANGE.
      await io.writeZeroes(dataStart, dataEnd - dataStart, {});
    } else if (zero) {
      for (let pos = dataStart; pos < dataEnd; pos += zero.length) {
        signal?.throwIfAborted();
        const n = Math.min(zero.length, dataEnd - pos);
        await io.write(n === zero.length ? zero : zero.subarray(0, n), pos);
      }
    }
  }
  await io.flush();
}

/** Zero buffer size for preallocation=full. */
const FULL_CHUNK = 1 << 20;

function setRefcountOne(buf: Buffer, i: number, width: number): void {
  if (width >= 8) {
    const bytes = width / 8;
    buf[i * bytes + bytes - 1] = 1;
    return;
  }
  const perByte = 8 / width;
  const idx = Math.floor(i / perByte);
  buf[idx] = (buf[idx] ?? 0) | (1 << ((i % perByte) * width));
}
