/**
 * qcow2 allocation and copy-on-write: guest writes to new or shared clusters (per-cluster locks,
 * COW from the backing chain), cluster allocation through the refcounts, L2 entry updates,
 * private L2 tables, L1 writes and growth, the lazy-refcounts dirty bit, and the write-back of
 * dirty metadata with the deferred frees.
 *
 * Ordering (digest §7): data is written before the L2 entry that points at it; L2/L1 entries
 * reach the disk only after the refcount increments they depend on; clusters whose last
 * reference goes away are freed only after that change is on disk (deferred to write-back).
 */
import { BlockError } from '../../../util/errors.js';
import type { WriteDone } from '../../types.js';
import { optBool } from '../common.js';
import {
  HI_COPIED,
  HI_OFFSET_MASK,
  COMPAT_LAZY_REFCOUNTS,
  INCOMPAT_DIRTY,
  LO_ZERO_FLAG,
  MAX_L1_SIZE,
  writeU64,
} from './format.js';
import { KeyedLocks, Mutex } from './storage.js';
import { OL_ACTIVE_L1, OL_ACTIVE_L2 } from './overlap.js';
import { HDR_INCOMPATIBLE, type Qcow2Parts } from './image.js';
import { K_DATA, type CachedL2, type Entry } from './cluster-map.js';
import { Qcow2Reader } from './read.js';

interface PendingFree {
  cluster: number;
  discard: boolean;
}

export abstract class Qcow2Allocator extends Qcow2Reader {
  protected readonly meta = new Mutex();
  protected readonly clusterLocks = new KeyedLocks();
  protected pending: PendingFree[] = [];
  protected lazy: boolean;
  protected dirtyBitSet: boolean;
  protected readonly passDiscardRequest: boolean;

  protected constructor(p: Qcow2Parts) {
    super(p);
    const header = p.header;
    const lazyOpt = optBool(p.opts, 'lazy-refcounts');
    this.lazy = p.writable && (lazyOpt ?? (header.compatible & COMPAT_LAZY_REFCOUNTS) !== 0n);
    this.dirtyBitSet = (header.incompatible & INCOMPAT_DIRTY) !== 0n;
    this.passDiscardRequest = optBool(p.opts, 'pass-discard-request') ?? p.ctx.options.discard === 'unmap';
  }

  /** Whether a write into this cluster can go straight to its host cluster. */
  protected inPlace(e: Entry): boolean {
    return e.type === 'normal' && e.copied && (!this.extL2 || e.bitmap === 0xffffffff);
  }

  /**
   * The host offset of guest cluster `g` when a write may go straight to it: an owned (COPIED)
   * data cluster of a standard L2 table that is cached; -1 otherwise. Throws what kindOf throws
   * for a bad entry.
   */
  private ownedDataHost(g: number): number {
    if (this.extL2) return -1;
    const t = this.cachedL2(Math.floor(g / this.l2Entries));
    if (!t || this.kindOf(t, g % this.l2Entries) !== K_DATA || !this.copiedOut) return -1;
    return this.hostOut;
  }

  /** A corrupt L2 entry may point into metadata: one map lookup (`host` is cluster-aligned). */
  private inMetadata(host: number): boolean {
    return this.olMask !== 0 && this.ol.at(host / this.clusterSize, this.olMask) !== 0;
  }

  /** Never throws synchronously (callers collect these promises). */
  protected writeCluster(g: number, inOff: number, data: Buffer): Promise<void> {
    // Overwrite of an owned data cluster whose L2 table is cached: straight to the file.
    try {
      const host = this.ownedDataHost(g);
      if (host >= 0) {
        // Into metadata: writeData's overlap check reports the corruption.
        return this.inMetadata(host) ? this.writeData(data, host + inOff) : this.storage.write(data, host + inOff);
      }
    } catch (err) {
      return Promise.reject(err);
    }
    return this.writeClusterSlow(g, inOff, data);
  }

  /**
   * writeCluster's first case as a callback (BlockDriver.submitWrite): an overwrite of an owned
   * data cluster whose L2 table is cached goes straight to the file's callback path; anything
   * else (allocation, copy-on-write, extended L2, an uncached table, an entry pointing into
   * metadata) returns false and takes write(). Looked up and issued in one synchronous step,
   * as writeCluster's fast case (see writeClusterSlow).
   */
  protected submitCluster(g: number, inOff: number, data: Buffer, done: WriteDone): boolean {
    try {
      const host = this.ownedDataHost(g);
      if (host < 0 || this.inMetadata(host)) return false;
      return this.storage.submitWrite(data, host + inOff, done);
    } catch {
      return false;
    }
  }

  protected async writeClusterSlow(g: number, inOff: number, data: Buffer): Promise<void> {
    const l1i = Math.floor(g / this.l2Entries);
    // Decode and issue an in-place write in one synchronous step: a discard that drops the
    // mapping in between would otherwise not see this write (see writeback's barrier).
    const t0 = await this.l2Read(l1i);
    const e = this.decode(t0, g % this.l2Entries);
    if (this.inPlace(e)) return this.writeData(data, e.host + inOff);
    await this.clusterLocks.run(g, async () => {
      const t1 = await this.l2Read(l1i);
      const cur = this.decode(t1, g % this.l2Entries);
      if (this.inPlace(cur)) {
        await this.writeData(data, cur.host + inOff);
        return;
      }
      const cs = this.clusterSize;
      // Reuse the host cluster when we own it (zero-alloc, or a partly allocated ext-L2 cluster).
      const reuse = (cur.type === 'zero-alloc' || cur.type === 'normal') && cur.copied;
      let host: number;
      let fresh = false;
      if (reuse) {
        host = cur.host;
      } else {
        host = await this.meta.run(async () => {
          // QEMU's order: the L2 table exists before the data cluster is allocated. A new L2
          // table syncs the refcounts; done later, that sync would put the count of this data
          // cluster on disk long before the (cached) L2 entry pointing at it: a leak on a crash.
          const l1e = this.l1Entry(l1i);
          if (l1e.offset === 0 || !l1e.copied) await this.l2Write(l1i);
          const h = await this.allocClusters(1);
          // Until its L2 entry is set, no metadata write puts this cluster's count on disk.
          this.refcounts?.hold(h / cs);
          fresh = this.storage.claimZero(h, cs);
          return h;
        });
      }
      try {
        // A cluster that reads as zeroes around the new data needs no copy-on-write: the guest
        // view was zero (zero cluster, or unallocated without a backing file) and the new host
        // cluster lies in never-written sparse space.
        const zeroView =
          cur.type === 'zero-plain' || cur.type === 'zero-alloc' || (cur.type === 'unalloc' && !this.backing());
        if (fresh && zeroView) {
          this.checkOverlap(host, cs, 0);
          await this.storage.ensureSize(host + cs);
          await this.storage.write(data, host + inOff);
        } else {
          let full: Buffer;
          if (inOff === 0 && data.length === cs) {
            full = data;
          } else {
            full = Buffer.alloc(cs);
            if (cur.type !== 'zero-alloc' && cur.type !== 'zero-plain') await this.readCluster(g, full);
            data.copy(full, inOff);
          }
          await this.writeData(full, host);
        }
        await this.meta.run(async () => {
          await this.setEntry(g, host, reuse ? undefined : cur, 'data', false, !reuse);
        });
      } catch (err) {
        if (!reuse) await this.meta.run(() => this.freeUnlinked(g, host));
        throw err;
      } finally {
        if (!reuse) this.refcounts?.release(host / cs);
      }
    });
  }

  /**
   * A data cluster allocated for a write that failed (ENOSPC, EIO) before its L2 entry was set
   * goes back to the free clusters, as QEMU's qcow2_alloc_cluster_abort frees it: otherwise every
   * failed attempt (a stopped export retried after `cont`) leaks a cluster. Its increment was held
   * back from the disk, so no metadata write has counted it yet. Under the metadata mutex.
   */
  private async freeUnlinked(g: number, host: number): Promise<void> {
    const rc = this.refcounts;
    if (!rc) return;
    const t = await this.l2Read(Math.floor(g / this.l2Entries));
    const e = this.decode(t, g % this.l2Entries);
    if (e.type === 'normal' && e.host === host) return; // linked after all: it stays
    const idx = host / this.clusterSize;
    rc.release(idx);
    await rc.update(idx, -1);
  }

  /** Read the guest view of a whole cluster (the part inside the disk; zero beyond). */
  protected async readCluster(g: number, out: Buffer): Promise<void> {
    const start = g * this.clusterSize;
    const n = Math.min(this.clusterSize, this.size - start);
    if (n < out.length) out.fill(0, Math.max(0, n));
    if (n > 0) await this.read(out.subarray(0, n), start);
  }

  protected async allocClusters(n: number): Promise<number> {
    const rc = this.refcounts;
    if (!rc) throw new BlockError('READ_ONLY', 'EPERM', 'image is read-only');
    await this.releaseHeld(); // what clients have read by now may be reused (writeback)
    return rc.alloc(n);
  }

  /** Clusters held since a free (writeback) whose readers have caught up: free to reuse now. */
  protected async releaseHeld(): Promise<void> {
    const { lowest, punch } = this.held.release();
    // Allocations meanwhile went past them: the next one starts looking there again.
    if (lowest >= 0) this.refcounts?.lookFrom(lowest);
    await this.punch(punch);
  }

  /** Discard freed host clusters in the file (pass-discard-request). */
  private async punch(clusters: readonly number[]): Promise<void> {
    for (const c of clusters) {
      await this.storage.discard(c * this.clusterSize, this.clusterSize).catch(() => undefined);
    }
  }


  /**
   * Under the metadata mutex: point guest cluster `g` at `host` (data), or make it zero/unallocated.
   * `old` (the entry being replaced) has its references freed after the change is on disk.
   */
  protected async setEntry(
    g: number,
    host: number,
    old: Entry | undefined,
    mode: 'data' | 'zero-plain' | 'zero-alloc' | 'unalloc',
    discard = false,
    held = false,
  ): Promise<void> {
    const t = await this.l2Write(Math.floor(g / this.l2Entries));
    const at = (g % this.l2Entries) * this.entrySize;
    const current = this.decode(t, g % this.l2Entries);
    if (old) {
      for (const c of this.refsOf(current)) this.pending.push({ cluster: c, discard });
    }
    let hi = 0;
    let lo = 0;
    let alloc = 0;
    let zeros = 0;
    const setHost = (): void => {
      hi = (Math.floor(host / 0x100000000) & HI_OFFSET_MASK) | HI_COPIED;
      lo = host >>> 0;
    };
    if (mode === 'data') {
      setHost();
      alloc = 0xffffffff;
    } else if (mode === 'zero-alloc') {
      setHost();
      if (this.extL2) zeros = 0xffffffff;
      else lo |= LO_ZERO_FLAG;
    } else if (mode === 'zero-plain') {
      if (this.extL2) zeros = 0xffffffff;
      else lo = LO_ZERO_FLAG;
    }
    t.buf.writeUInt32BE(hi >>> 0, at);
    t.buf.writeUInt32BE(lo >>> 0, at + 4);
    if (this.extL2) {
      t.buf.writeUInt32BE(zeros >>> 0, at + 8);
      t.buf.writeUInt32BE(alloc >>> 0, at + 12);
    }
    if (t.kinds) t.kinds[g % this.l2Entries] = this.statusKind(t, g % this.l2Entries);
    t.dirty = true;
    // Linked now (in the cache): the next metadata write must count the cluster.
    if (held) this.refcounts?.release(host / this.clusterSize);
    // A reader may have evicted the (then clean) table meanwhile: this copy is the current one.
    this.touch(t);
    await this.maybeWriteback();
  }

  /** Under the metadata mutex: a private, cached L2 table for L1 index `l1i`. */
  protected async l2Write(l1i: number): Promise<CachedL2> {
    if (l1i >= this.header.l1Size) throw this.corruption('L1 index out of range');
    const e = this.l1Entry(l1i);
    if (e.offset !== 0 && e.copied) {
      const t = await this.loadL2(e.offset);
      this.touch(t);
      return t;
    }
    const newOff = await this.allocClusters(1);
    const buf = Buffer.alloc(this.clusterSize);
    if (e.offset !== 0) {
      const old = await this.loadL2(e.offset);
      old.buf.copy(buf);
    }
    await this.syncRefcounts(true);
    // As QEMU's l2_allocate flushes its whole L2 cache: the refcounts just written count the
    // data clusters that other dirty tables point at, so those tables go to disk now as well.
    await this.writeDirtyL2();
    this.checkOverlap(newOff, this.clusterSize, 0);
    await this.storage.write(buf, newOff);
    const t: CachedL2 = { offset: newOff, buf, dirty: false, used: ++this.useClock };
    this.l2Cache.set(newOff, t);
    await this.writeL1Entry(l1i, newOff);
    this.ol.add(newOff, this.clusterSize, OL_ACTIVE_L2);
    if (e.offset !== 0) {
      this.ol.remove(e.offset, this.clusterSize, OL_ACTIVE_L2);
      this.l2Cache.delete(e.offset);
      this.pending.push({ cluster: e.offset / this.clusterSize, discard: false });
    }
    this.evictClean();
    return t;
  }

  protected async writeL1Entry(l1i: number, offset: number): Promise<void> {
    await this.markDirtyIfLazy();
    const b = Buffer.alloc(8);
    if (offset !== 0) {
      b.writeUInt32BE(((Math.floor(offset / 0x100000000) & HI_OFFSET_MASK) | HI_COPIED) >>> 0, 0);
      b.writeUInt32BE(offset >>> 0, 4);
    }
    this.checkOverlap(this.header.l1TableOffset + l1i * 8, 8, OL_ACTIVE_L1);
    await this.storage.write(b, this.header.l1TableOffset + l1i * 8);
    b.copy(this.l1, l1i * 8);
  }

  /**
   * Refcount increments reach the disk before metadata that depends on them. `dataFirst`
   * (metadata written in the middle of a stream of writes, not for a flush) syncs the data
   * written so far before the refcount blocks: that sync can be long, and done between the
   * refcount blocks and the L2 tables it would be a long window in which a crash leaks every
   * cluster the unwritten tables point at. The second sync then covers little more than the
   * refcount blocks.
   */
  protected async syncRefcounts(dataFirst = false): Promise<void> {
    const rc = this.refcounts;
    if (!rc) return;
    if (dataFirst && !this.lazy && rc.hasDirty) await this.storage.flush();
    if (await rc.writeDirty()) {
      if (!this.lazy) await this.storage.flush();
    }
  }

  protected async markDirtyIfLazy(): Promise<void> {
    if (!this.lazy || this.dirtyBitSet || this.header.version !== 3) return;
    this.header.incompatible |= INCOMPAT_DIRTY;
    await this.writeHeaderU64(HDR_INCOMPATIBLE, this.header.incompatible);
    this.dirtyBitSet = true;
  }

  protected dirtyL2Count(): number {
    let n = 0;
    for (const t of this.l2Cache.values()) if (t.dirty) n++;
    return n;
  }

  protected async maybeWriteback(): Promise<void> {
    if (this.l2Cache.size > this.l2Capacity && this.dirtyL2Count() > this.l2Capacity / 2) {
      await this.writeback(true);
    }
    this.evictClean();
  }

  /**
   * Under the metadata mutex: refcount blocks, then every dirty cached L2 table (no frees). At
   * any point under the mutex each cached L2 entry's cluster is already counted in the cache,
   * so this leaves nothing on disk counted but unreferenced (except clusters whose data writes
   * are in flight and not yet linked).
   */
  protected async writeMetadata(dataFirst = false): Promise<void> {
    await this.syncRefcounts(dataFirst);
    await this.writeDirtyL2();
  }

  /** Under the metadata mutex, after syncRefcounts(): write every dirty cached L2 table. */
  protected async writeDirtyL2(): Promise<void> {
    const dirty = [...this.l2Cache.values()].filter((t) => t.dirty);
    if (dirty.length === 0) return;
    await this.markDirtyIfLazy();
    for (const t of dirty) this.checkOverlap(t.offset, this.clusterSize, OL_ACTIVE_L2);
    // All at once: the window between the refcount blocks and the last table stays short.
    await Promise.all(
      dirty.map(async (t) => {
        await this.storage.write(t.buf, t.offset);
        t.dirty = false;
      }),
    );
  }

  /**
   * Under the metadata mutex: refcount blocks, then L2 tables, then deferred frees.
   * The caller syncs afterwards (flush) when it needs durability. `dataFirst`: see
   * syncRefcounts (write-backs forced by cache pressure, not by a flush).
   */
  protected async writeback(dataFirst = false): Promise<void> {
    await this.writeMetadata(dataFirst);
    if (this.pending.length) {
      // Overwrites issued while the old mappings were live may still be in flight: they must
      // land before their host clusters can be reallocated.
      await this.storage.ioBarrier();
      await this.storage.flush();
      // So may READ replies sent by reference (NBD sendfile) that a client has not read yet:
      // their pages would show whatever a reused cluster receives. The clusters are freed now
      // but held from allocation until those clients have read that far (held-clusters.ts).
      const fence = this.loans.fence();
      const frees = this.pending;
      this.pending = [];
      const rc = this.refcounts;
      if (rc) {
        const freed: number[] = [];
        const punch: number[] = [];
        for (const f of frees) {
          if ((await rc.update(f.cluster, -1)) !== 0) continue;
          freed.push(f.cluster);
          if (f.discard && this.passDiscardRequest) punch.push(f.cluster);
        }
        await this.punch(this.held.hold(freed, punch, fence));
        await rc.writeDirty();
      }
    }
    await this.releaseHeld();
  }


  /**
   * Apply `fn` to every whole cluster of the range (under its cluster lock and the metadata
   * mutex); partial head/tail clusters are written as zero bytes when `zeroPartial`, ignored
   * otherwise (discard). The range end at the disk end counts as a cluster end.
   */
  protected async clearRange(
    offset: number,
    length: number,
    fn: (g: number, cur: Entry) => Promise<void>,
    zeroPartial: boolean,
  ): Promise<void> {
    const cs = this.clusterSize;
    const end = offset + length;
    let pos = offset;
    const tasks: Promise<void>[] = [];
    while (pos < end) {
      const g = Math.floor(pos / cs);
      const cStart = g * cs;
      const cEnd = Math.min(cStart + cs, this.size);
      const n = Math.min(cEnd, end) - pos;
      if (pos === cStart && pos + n === cEnd) {
        tasks.push(
          this.clusterLocks.run(g, async () => {
            await this.meta.run(async () => fn(g, await this.lookup(g)));
          }),
        );
      } else if (zeroPartial) {
        tasks.push(this.writeCluster(g, pos - cStart, Buffer.alloc(n)));
      }
      pos += n;
    }
    await Promise.all(tasks);
  }

  protected async writeSize(size: number): Promise<void> {
    await this.writeMetadata();
    const b = Buffer.alloc(8);
    writeU64(b, 0, size);
    await this.storage.write(b, 24);
    await this.storage.flush();
    this.header.size = size;
  }

  protected async growL1(need: number): Promise<void> {
    const cs = this.clusterSize;
    // QEMU grows the L1 table by about 1.5x.
    let entries = Math.max(need, Math.floor((this.header.l1Size * 3) / 2));
    if (entries * 8 > MAX_L1_SIZE) entries = need;
    if (entries * 8 > MAX_L1_SIZE) throw new BlockError('BAD_SIZE', 'EFBIG', 'Image size too big for qcow2 L1 table');
    const clusters = Math.ceil((entries * 8) / cs);
    const newOff = await this.allocClusters(clusters);
    const buf = Buffer.alloc(clusters * cs);
    this.l1.copy(buf);
    await this.writeMetadata();
    await this.markDirtyIfLazy();
    this.checkOverlap(newOff, buf.length, 0);
    await this.storage.write(buf, newOff);
    await this.storage.flush();
    const hdr = Buffer.alloc(12);
    hdr.writeUInt32BE(entries, 0);
    writeU64(hdr, 4, newOff);
    await this.storage.write(hdr, 36);
    await this.storage.flush();
    const oldOff = this.header.l1TableOffset;
    const oldClusters = Math.ceil((this.header.l1Size * 8) / cs);
    this.ol.remove(oldOff, this.header.l1Size * 8, OL_ACTIVE_L1);
    this.ol.add(newOff, entries * 8, OL_ACTIVE_L1);
    this.header.l1TableOffset = newOff;
    this.header.l1Size = entries;
    this.l1 = buf.subarray(0, entries * 8);
    if (oldOff !== 0) {
      for (let i = 0; i < oldClusters; i++) this.pending.push({ cluster: oldOff / cs + i, discard: true });
    }
  }
}
