/**
 * qcow2 reads and block status: the synchronous fast path over cached L2 tables, segment reads
 * (data, zero, compressed clusters, backing fall-through) and block status (one pass over
 * cached per-table entry kinds for standard L2, segments for extended L2, the backing chain for
 * unallocated runs).
 */
import {
  EXTENT_ALLOCATED,
  EXTENT_DATA,
  EXTENT_ZERO,
  type BlockExtent,
  type BlockIO,
  type FileRange,
  type FilePiece,
} from '../../types.js';
import { pageLoansOf } from '../../../util/page-loans.js';
import { heldClustersOf } from './held-clusters.js';
import { compressedDesc, decompressCluster } from './compress.js';
import {
  K_CORRUPT,
  K_DATA,
  K_UNALLOC,
  K_ZERO,
  Qcow2ClusterMap,
  type Seg,
} from './cluster-map.js';

/**
 * A file range handed out for sendfile has at most this many pieces (runs of contiguous host
 * clusters); a read scattered wider is copied (one sendfile and one queue entry per piece).
 */
const FILE_PIECES_MAX = 16;

/** Block status covers at most this many clusters per call (the caller asks again for the rest). */
const STATUS_MAX_CLUSTERS = 1 << 20;

export abstract class Qcow2Reader extends Qcow2ClusterMap {
  protected readonly decompressed = new Map<number, Promise<Buffer>>();
  /**
   * Host ranges handed out by fileRangeSync and sent by reference, shared by every driver of
   * the same image file: clusters freed while a reply over them may still wait in a socket are
   * held from reuse (`held`) until a fence over these has passed (allocate.ts, writeback).
   */
  readonly loans = pageLoansOf(this.ctx.childDriver('file').imageIdentity?.());
  readonly held = heldClustersOf(this.loans);

  // ---- read -----------------------------------------------------------------------------------

  /**
   * Synchronous read when every L2 table involved is cached and the range holds only data
   * clusters (read with the file child's own sync path, contiguous host clusters in one call)
   * and zero or unallocated clusters (without a backing file). False = use read().
   */
  tryReadSync(buf: Buffer, offset: number): boolean {
    if (this.extL2 || this.closed || this.broken) return false;
    const cs = this.clusterSize;
    const span = this.l2Entries * cs;
    const end = offset + buf.length;
    let file: BlockIO | undefined;
    let backingKnown = false;
    let pos = offset;
    // The pending run of contiguous host data: buffer index, host offset, length.
    let runAt = 0;
    let runHost = -1;
    let runLen = 0;
    while (pos < end) {
      const l1i = Math.floor(pos / span);
      const t = this.cachedL2(l1i);
      if (t === null) return false;
      const tEnd = Math.min(end, (l1i + 1) * span);
      if (t === undefined) {
        if (!backingKnown) {
          if (this.backing() !== undefined) return false;
          backingKnown = true;
        }
        zeroFill(buf, pos - offset, tEnd - offset);
        pos = tEnd;
        continue;
      }
      while (pos < tEnd) {
        const g = Math.floor(pos / cs);
        const inOff = pos - g * cs;
        const n = Math.min(cs - inOff, tEnd - pos);
        const k = this.kindOf(t, g % this.l2Entries);
        if (k === K_DATA) {
          const h = this.hostOut + inOff;
          if (runHost >= 0 && runHost + runLen === h) {
            runLen += n;
          } else {
            if (runHost >= 0) {
              file ??= this.ctx.childIO('file');
              if (!file.tryReadSync(buf.subarray(runAt, runAt + runLen), runHost)) return false;
            }
            runAt = pos - offset;
            runHost = h;
            runLen = n;
          }
        } else if (k === K_ZERO) {
          zeroFill(buf, pos - offset, pos - offset + n);
        } else if (k === K_UNALLOC) {
          if (!backingKnown) {
            if (this.backing() !== undefined) return false;
            backingKnown = true;
          }
          zeroFill(buf, pos - offset, pos - offset + n);
        } else {
          return false;
        }
        pos += n;
      }
    }
    if (runHost >= 0) {
      file ??= this.ctx.childIO('file');
      const part = runLen === buf.length ? buf : buf.subarray(runAt, runAt + runLen);
      if (!file.tryReadSync(part, runHost)) return false;
    }
    return true;
  }

  /**
   * BlockDriver.fileRangeSync: a range of data clusters whose L2 tables are cached, and whose host
   * bytes the file child says are cached, as the file range(s) behind it: contiguous host
   * clusters make one piece, at most FILE_PIECES_MAX pieces. With `holes`, zero clusters and
   * unallocated ones with no backing file may be in the range too, as pieces with offset -1
   * (adjacent ones merged); at least one piece must then be data. Anything else (compressed
   * clusters, unallocated ones over a backing file, extended L2, an uncached table, a bad entry)
   * gives undefined, and the read takes the copying path, which also reports corruption.
   * Only for callers `lending` (see BlockDriver.fileRangeSync): a host cluster can be freed and
   * reused for other guest data while the reply still waits, so the range carries `loans`.
   */
  fileRangeSync(offset: number, length: number, holes = false, lending = false): FileRange | undefined {
    if (!lending || this.extL2 || this.closed || this.broken) return undefined;
    const cs = this.clusterSize;
    const end = offset + length;
    const pieces: FilePiece[] = [];
    // The open run: a file range (runHost >= 0), zeroes (-1), or nothing yet (-2).
    let runHost = -2;
    let runLen = 0;
    let data = 0;
    try {
      for (let pos = offset; pos < end; ) {
        const g = Math.floor(pos / cs);
        const t = this.cachedL2(Math.floor(g / this.l2Entries));
        if (t === null) return undefined; // not cached
        const k = t === undefined ? K_UNALLOC : this.kindOf(t, g % this.l2Entries); // undefined: no L2 table
        const inOff = pos - g * cs;
        const n = Math.min(cs - inOff, end - pos);
        let h: number;
        if (k === K_DATA) {
          h = this.hostOut + inOff;
          data++;
        } else if (holes && (k === K_ZERO || (k === K_UNALLOC && this.backing() === undefined))) {
          h = -1;
        } else {
          return undefined;
        }
        if (runHost !== -2 && (h < 0 ? runHost === -1 : runHost >= 0 && runHost + runLen === h)) runLen += n;
        else {
          if (runHost !== -2) {
            if (pieces.length === FILE_PIECES_MAX - 1) return undefined;
            pieces.push({ offset: runHost, length: runLen });
          }
          runHost = h;
          runLen = n;
        }
        pos += n;
      }
    } catch {
      return undefined;
    }
    if (data === 0) return undefined;
    pieces.push({ offset: runHost, length: runLen });
    const file = this.ctx.childIO('file');
    if (!file.fileRangeSync) return undefined;
    let fd = -1;
    for (const p of pieces) {
      if (p.offset < 0) continue;
      const r = file.fileRangeSync(p.offset, p.length);
      if (r === undefined || r.pieces !== undefined || r.offset !== p.offset || (fd >= 0 && r.fd !== fd)) return undefined;
      fd = r.fd;
    }
    const loans = this.loans;
    return pieces.length === 1 ? { fd, offset: runHost, loans } : { fd, offset: pieces[0]!.offset, pieces, loans };
  }

  /** True when the range is all data clusters whose L2 tables are cached (no block status needed). */
  isDataSync(offset: number, length: number): boolean {
    if (this.extL2 || this.closed) return false;
    const cs = this.clusterSize;
    const end = offset + length;
    for (let g = Math.floor(offset / cs); g * cs < end; g++) {
      const t = this.cachedL2(Math.floor(g / this.l2Entries));
      if (!t) return false;
      if (this.kindOf(t, g % this.l2Entries) !== K_DATA) return false;
    }
    return true;
  }

  /**
   * True when every cluster of the range is a zero cluster, or unallocated with no backing file,
   * and its L2 table is cached (what QSD's block status reports as BDRV_BLOCK_ZERO).
   */
  isZeroSync(offset: number, length: number): boolean {
    if (this.extL2 || this.closed || this.broken) return false;
    const cs = this.clusterSize;
    const end = offset + length;
    let backingChecked = false;
    for (let g = Math.floor(offset / cs); g * cs < end; g++) {
      const t = this.cachedL2(Math.floor(g / this.l2Entries));
      if (t === null) return false;
      const k = t === undefined ? K_UNALLOC : this.kindOf(t, g % this.l2Entries);
      if (k === K_ZERO) continue;
      if (k !== K_UNALLOC) return false;
      if (!backingChecked) {
        if (this.backing() !== undefined) return false;
        backingChecked = true;
      }
    }
    return true;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    // Page-cache hits on cached metadata need no promise chain at all.
    if (this.tryReadSync(buf, offset)) return;
    if (this.broken) throw this.noMedium();
    const segs = await this.segments(offset, buf.length);
    await Promise.all(segs.map((s) => this.readSeg(s, buf.subarray(s.guest - offset, s.guest - offset + s.length))));
  }

  protected async readSeg(s: Seg, out: Buffer): Promise<void> {
    switch (s.kind) {
      case 'data':
        return this.storage.read(out, s.host);
      case 'zero':
        out.fill(0);
        return;
      case 'unalloc':
        return this.readBacking(out, s.guest);
      case 'compressed': {
        const data = await this.decompress(s.cluster, s.hi, s.lo);
        const inOff = s.guest - s.cluster * this.clusterSize;
        data.copy(out, 0, inOff, inOff + s.length);
      }
    }
  }

  /** Read from the backing chain; past its end (or without one) the data is zero. */
  protected async readBacking(out: Buffer, guest: number): Promise<void> {
    const b = this.backing();
    const bsize = b ? b.size() : 0;
    const n = Math.max(0, Math.min(out.length, bsize - guest));
    if (n < out.length) out.fill(0, n);
    if (n > 0 && b) await b.read(out.subarray(0, n), guest);
  }

  protected decompress(cluster: number, hi: number, lo: number): Promise<Buffer> {
    const key = cluster;
    const hit = this.decompressed.get(key);
    if (hit) return hit;
    const p = (async () => {
      const d = compressedDesc(hi, lo, this.clusterBits);
      const src = Buffer.alloc(Math.min(d.length, this.clusterSize * 2 + 512));
      await this.storage.read(src, d.offset);
      const out = Buffer.alloc(this.clusterSize);
      await decompressCluster(src, out, this.header.compressionType);
      return out;
    })();
    this.decompressed.set(key, p);
    p.catch(() => this.decompressed.delete(key));
    while (this.decompressed.size > 8) {
      const first = this.decompressed.keys().next().value as number;
      this.decompressed.delete(first);
    }
    return p;
  }

  // ---- block status ---------------------------------------------------------------------------

  /** Extended L2: one L2 table's worth of segments per call. */
  protected statusSegsExt(offset: number, length: number): Promise<Seg[]> {
    const span = this.l2Entries * this.clusterSize;
    const end = Math.min(offset + length, (Math.floor(offset / span) + 1) * span);
    return this.segments(offset, end - offset);
  }

  /**
   * Standard L2: walk the tables (cached ones without a promise) and build extents of one kind
   * in one pass over the whole request (up to STATUS_MAX_CLUSTERS clusters), merging neighbours.
   * Unallocated runs get `unallocFlags` and depth 0 (the caller resolves them in the backing chain).
   */
  protected async statusRuns(offset: number, length: number, unallocFlags: number): Promise<BlockExtent[]> {
    const cs = this.clusterSize;
    const span = this.l2Entries * cs;
    const end = Math.min(offset + length, (Math.floor(offset / cs) + STATUS_MAX_CLUSTERS) * cs);
    const out: BlockExtent[] = [];
    let runKind = -1;
    let runStart = offset;
    const emit = (kind: number, start: number, stop: number): void => {
      const len = stop - start;
      if (kind === K_DATA) out.push({ offset: start, length: len, flags: EXTENT_DATA | EXTENT_ALLOCATED, depth: 1 });
      else if (kind === K_ZERO) out.push({ offset: start, length: len, flags: EXTENT_ZERO | EXTENT_ALLOCATED, depth: 1 });
      else out.push({ offset: start, length: len, flags: unallocFlags, depth: 0 });
    };
    let pos = offset;
    while (pos < end) {
      const l1i = Math.floor(pos / span);
      const tEnd = Math.min(end, (l1i + 1) * span);
      let t = this.cachedL2(l1i);
      if (t === null) t = await this.l2Read(l1i);
      if (t === undefined) {
        if (runKind !== K_UNALLOC) {
          if (runKind >= 0) emit(runKind, runStart, pos);
          runKind = K_UNALLOC;
          runStart = pos;
        }
        pos = tEnd;
        continue;
      }
      const first = Math.floor(pos / cs);
      const last = Math.ceil(tEnd / cs);
      const base = l1i * this.l2Entries;
      const kinds = this.kindsOf(t);
      const stop = last - base;
      let i = first - base;
      while (i < stop) {
        const k = kinds[i] as number;
        if (k === K_CORRUPT) this.kindOf(t, i); // throws the corruption error
        let j = i + 1;
        while (j < stop && kinds[j] === k) j++;
        if (k !== runKind) {
          const at = Math.max((base + i) * cs, offset);
          if (runKind >= 0) emit(runKind, runStart, at);
          runKind = k;
          runStart = at;
        }
        i = j;
      }
      pos = tEnd;
    }
    if (runKind >= 0 && runStart < end) emit(runKind, runStart, end);
    return out;
  }

  async blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    if (this.broken) throw this.noMedium();
    const b = this.backing();
    if (!this.extL2 && !b) return this.statusRuns(offset, length, EXTENT_ZERO);
    let segs: Seg[];
    if (this.extL2) {
      segs = await this.statusSegsExt(offset, length);
    } else {
      segs = [];
      for (const e of await this.statusRuns(offset, length, 0)) {
        if (e.depth === 0) segs.push({ kind: 'unalloc', guest: e.offset, length: e.length });
        else if (e.flags & EXTENT_ZERO) segs.push({ kind: 'zero', guest: e.offset, length: e.length });
        else segs.push({ kind: 'data', guest: e.offset, length: e.length, host: 0 });
      }
    }
    const out: BlockExtent[] = [];
    const bsize = b ? b.size() : 0;
    for (const s of segs) {
      if (s.kind === 'data' || s.kind === 'compressed') {
        out.push({ offset: s.guest, length: s.length, flags: EXTENT_DATA | EXTENT_ALLOCATED, depth: 1 });
      } else if (s.kind === 'zero') {
        out.push({ offset: s.guest, length: s.length, flags: EXTENT_ZERO | EXTENT_ALLOCATED, depth: 1 });
      } else {
        let pos = s.guest;
        const sEnd = s.guest + s.length;
        if (b && pos < bsize) {
          const bEnd = Math.min(sEnd, bsize);
          while (pos < bEnd) {
            const ext = await b.blockStatus(pos, bEnd - pos);
            if (ext.length === 0) break;
            for (const e of ext) {
              out.push({ offset: e.offset, length: e.length, flags: e.flags, depth: e.depth > 0 ? e.depth + 1 : 0 });
              pos = e.offset + e.length;
            }
          }
          // Return what we have: the caller asks again for the rest.
          if (pos < sEnd) {
            // Past the backing file's end QEMU reports zeroes "allocated" in the backing layer.
            if (pos >= bsize) out.push({ offset: pos, length: sEnd - pos, flags: EXTENT_ZERO | EXTENT_ALLOCATED, depth: 2 });
            break;
          }
        } else if (b) {
          out.push({ offset: pos, length: sEnd - pos, flags: EXTENT_ZERO | EXTENT_ALLOCATED, depth: 2 });
        } else {
          out.push({ offset: pos, length: sEnd - pos, flags: EXTENT_ZERO, depth: 0 });
        }
      }
    }
    return out;
  }
}

const typedFill = Uint8Array.prototype.fill;

/** Zero `buf[start, end)` (the typed-array builtin: Buffer#fill's argument handling costs more). */
function zeroFill(buf: Buffer, start: number, end: number): void {
  typedFill.call(buf, 0, start, end);
}
