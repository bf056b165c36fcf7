/**
 * qcow2 reference counts: the refcount table, a cache of refcount blocks, first-fit cluster
 * allocation, new refcount blocks and refcount table growth (digest §6, §7 rules 1, 5, 6).
 *
 * Every method runs under the driver's metadata mutex; nothing here is re-entrant.
 * Crash safety: new refcount blocks and a grown table are written and synced before anything
 * points at them; increments reach the disk before the L2/L1 entries that need them (the driver
 * calls `writeDirty()` + sync first); decrements are applied only after the references are gone
 * from the disk (the driver defers frees to its flush). A dirty block leaves the cache only
 * together with the L2 tables that depend on it (`beforeDirtyEvict`).
 */
import { corrupt, u64, writeU64 } from './format.js';
import { OL_REFCOUNT_BLOCK, OL_REFCOUNT_TABLE } from './overlap.js';
import type { Storage } from './storage.js';

interface CachedBlock {
  buf: Buffer;
  dirty: boolean;
}

export interface RefcountHost {
  storage: Storage;
  /** Switch the header to a new refcount table (one 12-byte write at offset 48, synced). */
  writeReftablePointer(offset: number, clusters: number): Promise<void>;
  /**
   * Metadata overlap check before a write to `[offset, offset+length)` that rewrites metadata
   * of kinds `own` (OL_* bits); throws (and marks the image corrupt) on an overlap.
   */
  checkWrite?(offset: number, length: number, own: number): void;
  /**
   * A dirty refcount block is about to leave the cache. The driver writes every dirty refcount
   * block and then the cached L2 tables that point at the clusters they count, so that a crash
   * right after the eviction finds no counted cluster unreferenced. Without it the block is
   * written alone.
   */
  beforeDirtyEvict?(): Promise<void>;
  /** Refcount metadata appeared (`added`) or went away: kind OL_REFCOUNT_BLOCK or OL_REFCOUNT_TABLE. */
  metadataChanged?(kind: number, offset: number, bytes: number, added: boolean): void;
  /** A free cluster that allocation must pass over for now (qcow2/held-clusters.ts). */
  skipFree?(idx: number): boolean;
}

export class Refcounts {
  readonly cs: number;
  /** Entries per refcount block. */
  readonly perBlock: number;
  private readonly width: number;
  private readonly maxRefcount: number;
  table: number[];
  tableOffset: number;
  tableClusters: number;
  private readonly blocks = new Map<number, CachedBlock>();
  /** The block of the last cache hit. */
  private last: CachedBlock | undefined;
  private freeHint = 0;
  /** Highest cluster index allocated during this session (file trimming on close). */
  highestAllocated = -1;
  /**
   * Held-back increments, by refcount block offset: clusters allocated for data that nothing
   * points at yet (their data write is in flight). Blocks are written with these counts one
   * lower, stay dirty and are never evicted, so a crash in between leaves no leak on disk.
   */
  private readonly held = new Map<number, Set<number>>();

  constructor(
    private readonly host: RefcountHost,
    clusterBits: number,
    readonly order: number,
    tableBuf: Buffer,
    tableOffset: number,
    tableClusters: number,
    private readonly capacity: number,
  ) {
    this.cs = 2 ** clusterBits;
    this.width = 2 ** order;
    this.perBlock = (this.cs * 8) / this.width;
    this.maxRefcount = order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** this.width - 1;
    this.tableOffset = tableOffset;
    this.tableClusters = tableClusters;
    this.table = [];
    for (let i = 0; i + 8 <= tableBuf.length; i += 8) {
      this.table.push(this.parseTableEntry(tableBuf, i));
    }
  }

  private parseTableEntry(buf: Buffer, off: number): number {
    if ((buf.readUInt32BE(off + 4) & 0x1ff) !== 0) throw corrupt('Reserved bits set in a refcount table entry');
    const v = u64(buf, off, 'refcount block offset');
    return v;
  }

  /** Load the refcount table of an image (checked by the header parser). */
  static async readTable(storage: Storage, offset: number, clusters: number, cs: number): Promise<Buffer> {
    const buf = Buffer.alloc(clusters * cs);
    await storage.read(buf, offset);
    return buf;
  }

  // ---- entry access -----------------------------------------------------------------------

  private getEntry(buf: Buffer, i: number): number {
    switch (this.order) {
      case 3:
        return buf[i] ?? 0;
      case 4:
        return buf.readUInt16BE(i * 2);
      case 5:
        return buf.readUInt32BE(i * 4);
      case 6: {
        const hi = buf.readUInt32BE(i * 8);
        const lo = buf.readUInt32BE(i * 8 + 4);
        return hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 0x100000000 + lo;
      }
      default: {
        const perByte = 8 / this.width;
        const byte = buf[Math.floor(i / perByte)] ?? 0;
        return (byte >> ((i % perByte) * this.width)) & ((1 << this.width) - 1);
      }
    }
  }

  private setEntry(buf: Buffer, i: number, v: number): void {
    switch (this.order) {
      case 3:
        buf[i] = v;
        return;
      case 4:
        buf.writeUInt16BE(v, i * 2);
        return;
      case 5:
        buf.writeUInt32BE(v, i * 4);
        return;
      case 6:
        writeU64(buf, i * 8, v);
        return;
      default: {
        const perByte = 8 / this.width;
        const idx = Math.floor(i / perByte);
        const shift = (i % perByte) * this.width;
        const mask = ((1 << this.width) - 1) << shift;
        buf[idx] = ((buf[idx] ?? 0) & ~mask) | ((v << shift) & mask);
      }
    }
  }

  private async block(offset: number): Promise<CachedBlock> {
    let b = this.blocks.get(offset);
    if (b) {
      // LRU by re-insertion, but not for repeated hits on the same block (allocation runs).
      if (b !== this.last) {
        this.blocks.delete(offset);
        this.blocks.set(offset, b);
        this.last = b;
      }
      return b;
    }
    if (offset % this.cs !== 0) throw corrupt('Refcount block offset is not cluster aligned');
    const buf = Buffer.alloc(this.cs);
    await this.host.storage.read(buf, offset);
    b = { buf, dirty: false };
    this.blocks.set(offset, b);
    this.last = b;
    await this.evict();
    return b;
  }

  private async evict(): Promise<void> {
    for (const [off, b] of this.blocks) {
      if (this.blocks.size <= this.capacity) break;
      if (this.held.has(off)) continue; // its counts on disk lag behind: keep it cached
      if (b.dirty && this.host.beforeDirtyEvict) await this.host.beforeDirtyEvict();
      if (b.dirty) {
        this.host.checkWrite?.(off, this.cs, OL_REFCOUNT_BLOCK);
        await this.host.storage.write(b.buf, off);
      }
      this.blocks.delete(off);
    }
  }

  /** Refcount of cluster `idx` (0 when no refcount block covers it). */
  async get(idx: number): Promise<number> {
    const t = Math.floor(idx / this.perBlock);
    const off = this.table[t];
    if (off === undefined || off === 0) return 0;
    const b = await this.block(off);
    return this.getEntry(b.buf, idx % this.perBlock);
  }

  /** Add `delta` to the refcount of cluster `idx`; its refcount block must exist. */
  async update(idx: number, delta: number): Promise<number> {
    const t = Math.floor(idx / this.perBlock);
    const off = this.table[t];
    if (off === undefined || off === 0) {
      throw corrupt(`No refcount block covers cluster ${idx}`);
    }
    const b = await this.block(off);
    const cur = this.getEntry(b.buf, idx % this.perBlock);
    const next = cur + delta;
    if (next < 0) throw corrupt(`Refcount of cluster ${idx} would drop below zero`);
    if (next > this.maxRefcount) throw corrupt(`Refcount of cluster ${idx} would overflow`);
    this.setEntry(b.buf, idx % this.perBlock, next);
    b.dirty = true;
    if (next === 0) this.lookFrom(idx);
    if (delta > 0 && idx > this.highestAllocated) this.highestAllocated = idx;
    return next;
  }

  /** Free clusters from `idx` on may be available (a count dropped to 0, held ones let go: skipFree). */
  lookFrom(idx: number): void {
    if (idx < this.freeHint) this.freeHint = idx;
  }

  /**
   * Allocate `n` contiguous free clusters (first fit) with refcount 1; returns the host offset.
   * The new refcounts are only in the cache: the caller writes them (writeDirty + sync) before
   * linking the clusters anywhere on disk.
   */
  async alloc(n: number): Promise<number> {
    for (;;) {
      const start = await this.findFree(this.freeHint, n);
      // Make sure refcount blocks (and table entries) exist for the whole run.
      let restarted = false;
      for (let c = start; c < start + n; c = (Math.floor(c / this.perBlock) + 1) * this.perBlock) {
        const t = Math.floor(c / this.perBlock);
        if (t >= this.table.length || this.table[t] === 0) {
          await this.ensureBlock(c);
          restarted = true;
          break;
        }
      }
      if (restarted) continue;
      for (let c = start; c < start + n; c++) await this.update(c, 1);
      if (n === 1 || start === this.freeHint) this.freeHint = start + n;
      return start * this.cs;
    }
  }

  private async findFree(from: number, n: number): Promise<number> {
    let start = from;
    let run = 0;
    while (run < n) {
      const c = start + run;
      const t = Math.floor(c / this.perBlock);
      if (t >= this.table.length || this.table[t] === 0) {
        // No refcount block: the rest of this block's range is free.
        run += this.perBlock - (c % this.perBlock);
        continue;
      }
      if ((await this.get(c)) !== 0 || this.host.skipFree?.(c) === true) {
        start = c + 1;
        run = 0;
      } else {
        run++;
      }
    }
    return start;
  }

  /**
   * Create the refcount block covering cluster `idx` (growing the table if needed). The block
   * is placed inside its own range (at the first cluster of the range at or after `idx`, which
   * is free because nothing covers that range yet) and counts itself.
   */
  private async ensureBlock(idx: number): Promise<void> {
    const t = Math.floor(idx / this.perBlock);
    if (t >= this.table.length) {
      await this.growTable(t + 1);
      return;
    }
    if (this.table[t] !== 0) return;
    const at = idx;
    const buf = Buffer.alloc(this.cs);
    this.setEntry(buf, at % this.perBlock, 1);
    this.host.checkWrite?.(at * this.cs, this.cs, 0);
    await this.host.storage.write(buf, at * this.cs);
    await this.host.storage.flush();
    const entry = Buffer.alloc(8);
    writeU64(entry, 0, at * this.cs);
    this.host.checkWrite?.(this.tableOffset + t * 8, 8, OL_REFCOUNT_TABLE);
    await this.host.storage.write(entry, this.tableOffset + t * 8);
    await this.host.storage.flush();
    this.host.metadataChanged?.(OL_REFCOUNT_BLOCK, at * this.cs, this.cs, true);
    this.table[t] = at * this.cs;
    this.blocks.set(at * this.cs, { buf, dirty: false });
    if (at > this.highestAllocated) this.highestAllocated = at;
    await this.evict();
  }

  /**
   * Grow the refcount table to at least `need` entries: the new table and the refcount blocks
   * describing it go to the first range no block covers, counting themselves; written and synced
   * before the header switches to them; the old table is freed afterwards.
   */
  private async growTable(need: number): Promise<void> {
    const perCluster = this.cs / 8;
    let entries = Math.max(need, Math.ceil((this.table.length * 3) / 2), 1);
    const area = this.table.length * this.perBlock; // first cluster no block can cover
    let blocks = 1;
    let tableClusters = 0;
    for (;;) {
      tableClusters = Math.ceil(entries / perCluster);
      const endIdx = area + blocks + tableClusters; // exclusive
      const needBlocks = Math.ceil((endIdx - area) / this.perBlock);
      const needEntries = this.table.length + needBlocks;
      if (needBlocks > blocks) {
        blocks = needBlocks;
        continue;
      }
      if (needEntries > entries) {
        entries = needEntries;
        continue;
      }
      break;
    }
    if (tableClusters * this.cs > 8 * 1024 * 1024) {
      throw corrupt('Refcount table would exceed the maximum size');
    }
    const newTable = [...this.table];
    while (newTable.length < tableClusters * perCluster) newTable.push(0);
    const blockBufs: Buffer[] = [];
    const total = blocks + tableClusters;
    for (let b = 0; b < blocks; b++) {
      const buf = Buffer.alloc(this.cs);
      const first = area + b * this.perBlock;
      for (let c = first; c < Math.min(first + this.perBlock, area + total); c++) {
        this.setEntry(buf, c - first, 1);
      }
      blockBufs.push(buf);
      newTable[this.table.length + b] = (area + b) * this.cs;
    }
    const tableBuf = Buffer.alloc(tableClusters * this.cs);
    newTable.forEach((v, i) => writeU64(tableBuf, i * 8, v));
    this.host.checkWrite?.(area * this.cs, (blocks + tableClusters) * this.cs, 0);
    for (let b = 0; b < blocks; b++) {
      await this.host.storage.write(blockBufs[b] as Buffer, (area + b) * this.cs);
    }
    const newOffset = (area + blocks) * this.cs;
    await this.host.storage.write(tableBuf, newOffset);
    await this.host.storage.flush();
    await this.host.writeReftablePointer(newOffset, tableClusters);
    const oldOffset = this.tableOffset;
    const oldClusters = this.tableClusters;
    this.table = newTable;
    this.tableOffset = newOffset;
    this.tableClusters = tableClusters;
    for (let b = 0; b < blocks; b++) {
      this.blocks.set((area + b) * this.cs, { buf: blockBufs[b] as Buffer, dirty: false });
    }
    this.host.metadataChanged?.(OL_REFCOUNT_TABLE, oldOffset, oldClusters * this.cs, false);
    this.host.metadataChanged?.(OL_REFCOUNT_TABLE, newOffset, tableClusters * this.cs, true);
    this.host.metadataChanged?.(OL_REFCOUNT_BLOCK, area * this.cs, blocks * this.cs, true);
    const last = area + total - 1;
    if (last > this.highestAllocated) this.highestAllocated = last;
    for (let i = 0; i < oldClusters; i++) await this.update(oldOffset / this.cs + i, -1);
    await this.evict();
  }

  /**
   * Hold back the increment of cluster `idx` (just allocated, refcount 1 in the cache) from
   * the disk until `release(idx)`. The caller releases it in the same synchronous step that
   * sets the L2 entry in the cache (so no L2 table reaches the disk pointing at a cluster whose
   * count was held back), or after a failed write (the cluster then leaks as before).
   */
  hold(idx: number): void {
    const off = this.table[Math.floor(idx / this.perBlock)];
    if (off === undefined || off === 0) return;
    let set = this.held.get(off);
    if (!set) {
      set = new Set();
      this.held.set(off, set);
    }
    set.add(idx % this.perBlock);
  }

  release(idx: number): void {
    const off = this.table[Math.floor(idx / this.perBlock)];
    if (off === undefined) return;
    const set = this.held.get(off);
    if (!set?.delete(idx % this.perBlock)) return;
    if (set.size === 0) this.held.delete(off);
    const b = this.blocks.get(off);
    if (b) b.dirty = true; // the disk copy may still lack this increment
  }

  /** Write every dirty refcount block (no sync), held-back increments left out. */
  async writeDirty(): Promise<boolean> {
    let any = false;
    for (const [off, b] of this.blocks) {
      if (!b.dirty) continue;
      this.host.checkWrite?.(off, this.cs, OL_REFCOUNT_BLOCK);
      any = true;
      const held = this.held.get(off);
      if (held) {
        const copy = Buffer.from(b.buf);
        for (const i of held) this.setEntry(copy, i, Math.max(0, this.getEntry(copy, i) - 1));
        await this.host.storage.write(copy, off);
      } else {
        b.dirty = false;
        await this.host.storage.write(b.buf, off);
      }
    }
    return any;
  }

  get hasDirty(): boolean {
    for (const b of this.blocks.values()) if (b.dirty) return true;
    return false;
  }

  /** Switch to a rebuilt table (drops the block cache). */
  replaceTable(tableBuf: Buffer, offset: number, clusters: number): void {
    this.blocks.clear();
    this.freeHint = 0;
    this.table = [];
    for (let i = 0; i + 8 <= tableBuf.length; i += 8) this.table.push(this.parseTableEntry(tableBuf, i));
    this.tableOffset = offset;
    this.tableClusters = clusters;
    const last = offset / this.cs + clusters - 1;
    if (last > this.highestAllocated) this.highestAllocated = last;
  }
}
