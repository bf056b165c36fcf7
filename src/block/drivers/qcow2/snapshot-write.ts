/**
 * Internal snapshots written to a qcow2 image whose driver is closed (the graph reopens the
 * node around these calls: graph.reopenDriver), following QEMU's qcow2_snapshot_create and
 * qcow2_snapshot_delete:
 *
 * Create: copy the active L1 table to new clusters; add one reference to every L2 table and
 * every cluster the active L1 reaches (data, preallocated zero, compressed) and clear their
 * COPIED flags (they are shared now, so the next write copies); write a new snapshot table with
 * the entry appended, point the header at it, free the old table.
 *
 * Delete: write a new snapshot table without the entry (header first, so a crash only leaks
 * clusters); drop one reference from everything the snapshot's L1 reaches and from its L1
 * table; set COPIED again where the active L1 reaches a cluster that is now referenced once.
 *
 * Refcounts reach the disk (and are synced) before anything that depends on them; the image is
 * left clean, so `qemu-img check` finds neither leaks nor errors. Every offset read from the
 * image is checked (cluster alignment, L1 sizes, table bounds) before use.
 */
import { BlockError } from '../../../util/errors.js';
import type { BlockIO } from '../../types.js';
import {
  HEADER_PROBE,
  HI_COMPRESSED,
  HI_COPIED,
  HI_OFFSET_MASK,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  LO_OFFSET_MASK,
  MAX_L1_SIZE,
  MAX_SNAPSHOTS,
  checkSnapshotL1,
  corrupt,
  parseHeader,
  readSnapshotTable,
  snapshotEntryHead,
  u64,
  writeU64,
  type Qcow2Header,
} from './format.js';
import { pageLoansOf } from '../../../util/page-loans.js';
import { compressedDesc } from './compress.js';
import { heldClustersOf } from './held-clusters.js';
import { Refcounts } from './refcount.js';
import { Storage } from './storage.js';

/** One snapshot table entry: what QMP reports, and its bytes as read (kept on rewrite). */
export interface SnapshotEntry {
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
  dateSec: number;
  dateNsec: number;
  /** Guest clock in ns (QSD: the host's clock; may exceed 2^53). */
  vmClockNsec: bigint;
  vmStateSize: number;
  /** undefined = not recorded (QEMU's -1). */
  icount: number | undefined;
  raw: Buffer;
}

/** Bytes of the extra data QEMU 7.2 writes: vm_state_size_large, disk_size, icount. */
const EXTRA_SIZE = 24;

function err(msg: string): BlockError {
  return new BlockError('SNAPSHOT', 'EINVAL', msg);
}

/*
 * Entry: [0..7] L1 offset  [8..11] L1 entries  [12..13] id length  [14..15] name length
 * [16..19] date (s)  [20..23] date (ns)  [24..31] VM clock (ns)  [32..35] VM state size
 * [36..39] extra length, extra ([0..7] VM state size 64-bit, [8..15] disk size, [16..23] icount),
 * id, name, zero padding to a multiple of 8.
 */
function parseEntries(buf: Buffer, nb: number, cs: number): SnapshotEntry[] {
  const out: SnapshotEntry[] = [];
  let pos = 0;
  for (let i = 0; i < nb; i++) {
    if (pos + 40 > buf.length) throw corrupt('Snapshot table truncated');
    const h = snapshotEntryHead(buf, pos);
    if (pos + h.len > buf.length) throw corrupt('Snapshot table truncated');
    checkSnapshotL1(h, cs);
    const { l1TableOffset, l1Size, idLen, nameLen, extra, len, idAt } = h;
    let vmStateSize = buf.readUInt32BE(pos + 32);
    if (extra >= 8) vmStateSize = u64(buf, pos + 40, 'snapshot VM state size');
    let icount: number | undefined;
    if (extra >= 24) {
      const hi = buf.readUInt32BE(pos + 56);
      const lo = buf.readUInt32BE(pos + 60);
      icount = hi === 0xffffffff && lo === 0xffffffff ? undefined : hi * 0x100000000 + lo;
    }
    out.push({
      id: buf.toString('utf8', idAt, idAt + idLen),
      name: buf.toString('utf8', idAt + idLen, idAt + idLen + nameLen),
      l1TableOffset,
      l1Size,
      dateSec: buf.readUInt32BE(pos + 16),
      dateNsec: buf.readUInt32BE(pos + 20),
      vmClockNsec: buf.readBigUInt64BE(pos + 24),
      vmStateSize,
      icount,
      raw: Buffer.from(buf.subarray(pos, pos + len)),
    });
    pos += len;
  }
  return out;
}

function encodeEntry(e: Omit<SnapshotEntry, 'raw'>, diskSize: number): Buffer {
  const id = Buffer.from(e.id, 'utf8');
  const name = Buffer.from(e.name, 'utf8');
  const len = Math.ceil((40 + EXTRA_SIZE + id.length + name.length) / 8) * 8;
  const b = Buffer.alloc(len);
  writeU64(b, 0, e.l1TableOffset);
  b.writeUInt32BE(e.l1Size, 8);
  b.writeUInt16BE(id.length, 12);
  b.writeUInt16BE(name.length, 14);
  b.writeUInt32BE(e.dateSec, 16);
  b.writeUInt32BE(e.dateNsec, 20);
  b.writeBigUInt64BE(e.vmClockNsec, 24);
  b.writeUInt32BE(Math.min(e.vmStateSize, 0xffffffff), 32);
  b.writeUInt32BE(EXTRA_SIZE, 36);
  writeU64(b, 40, e.vmStateSize);
  writeU64(b, 48, diskSize);
  if (e.icount === undefined) b.fill(0xff, 56, 64);
  else writeU64(b, 56, e.icount);
  id.copy(b, 40 + EXTRA_SIZE);
  name.copy(b, 40 + EXTRA_SIZE + id.length);
  return b;
}

/** An image opened for an offline metadata edit. */
class OfflineImage {
  readonly cs: number;
  readonly extL2: boolean;
  private constructor(
    readonly storage: Storage,
    readonly h: Qcow2Header,
    readonly rc: Refcounts,
    readonly snapshots: SnapshotEntry[],
  ) {
    this.cs = 2 ** h.clusterBits;
    this.extL2 = (h.incompatible & INCOMPAT_EXTL2) !== 0n;
  }

  /** `forEdit`: the image must be clean (its driver closed it); listing works on an open image. */
  static async open(io: BlockIO, forEdit = true): Promise<OfflineImage> {
    const fileSize = io.size();
    const storage = new Storage(() => io, 512);
    const probe = Buffer.alloc(Math.min(HEADER_PROBE, fileSize));
    await storage.read(probe, 0);
    if (probe.length < 24) throw corrupt('Image is not in qcow2 format');
    const bits = probe.readUInt32BE(20);
    const c0 = Buffer.alloc(Math.min(2 ** Math.min(Math.max(bits, 9), 21), fileSize));
    await storage.read(c0, 0);
    const h = parseHeader(c0, fileSize);
    if (forEdit && (h.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)) !== 0n) {
      throw err('The image is dirty or corrupt: internal snapshots need a clean image');
    }
    const cs = 2 ** h.clusterBits;
    const st = new Storage(() => io, cs);
    const table = await Refcounts.readTable(st, h.refcountTableOffset, h.refcountTableClusters, cs);
    // Clusters the closed driver freed while replies over them may still be unread stay out of
    // reach here too (held-clusters.ts); the driver lets them go once reopened.
    const held = heldClustersOf(pageLoansOf(io.imageIdentity?.()));
    const rc = new Refcounts(
      {
        storage: st,
        skipFree: (idx) => held.has(idx),
        writeReftablePointer: async (offset, clusters) => {
          const b = Buffer.alloc(12);
          writeU64(b, 0, offset);
          b.writeUInt32BE(clusters, 8);
          await st.write(b, 48);
          await st.flush();
          h.refcountTableOffset = offset;
          h.refcountTableClusters = clusters;
        },
      },
      h.clusterBits,
      h.refcountOrder,
      table,
      h.refcountTableOffset,
      h.refcountTableClusters,
      1024,
    );
    let snapshots: SnapshotEntry[] = [];
    if (h.nbSnapshots > 0) {
      if (h.nbSnapshots > MAX_SNAPSHOTS) throw corrupt('Too many snapshots');
      // The checked reader finds the table's length (reading as far as it needs, bounded).
      const { bytes } = await readSnapshotTable((b, o) => st.read(b, o), h.snapshotsOffset, h.nbSnapshots, cs);
      if (h.snapshotsOffset + bytes > fileSize) throw corrupt('Snapshot table beyond the end of the image');
      const buf = Buffer.alloc(bytes);
      await st.read(buf, h.snapshotsOffset);
      snapshots = parseEntries(buf, h.nbSnapshots, cs);
    }
    return new OfflineImage(st, h, rc, snapshots);
  }

  get tableBytes(): number {
    return this.snapshots.reduce((n, s) => n + s.raw.length, 0);
  }

  async readL1(offset: number, entries: number): Promise<Buffer> {
    if (entries * 8 > MAX_L1_SIZE) throw corrupt('L1 table too large');
    const b = Buffer.alloc(entries * 8);
    if (entries > 0) await this.storage.read(b, offset);
    return b;
  }

  /** L2 table offset of L1 entry `i` (0 = none), with QEMU's checks. */
  private l2Offset(l1: Buffer, i: number): number {
    const hi = l1.readUInt32BE(i * 8) & 0x00ffffff;
    const lo = l1.readUInt32BE(i * 8 + 4) & 0xfffffe00;
    const off = hi * 0x100000000 + (lo >>> 0);
    if (off % this.cs !== 0) throw corrupt(`L2 table offset 0x${off.toString(16)} unaligned (L1 index: ${i})`);
    return off;
  }

  /** Clusters one standard L2 entry (first 8 bytes of an entry) references. */
  private refsOf(hi: number, lo: number): number[] {
    if ((hi & HI_COMPRESSED) !== 0) {
      const d = compressedDesc(hi, lo, this.h.clusterBits);
      const first = Math.floor(d.offset / this.cs);
      const last = Math.floor((d.offset + d.length - 1) / this.cs);
      const out: number[] = [];
      for (let c = first; c <= last; c++) out.push(c);
      return out;
    }
    const host = (hi & HI_OFFSET_MASK) * 0x100000000 + ((lo & LO_OFFSET_MASK) >>> 0);
    if (host === 0) return [];
    if (host % this.cs !== 0) throw corrupt(`Cluster allocation offset 0x${host.toString(16)} unaligned`);
    return [host / this.cs];
  }

  /**
   * Add `delta` to every cluster an L1 table reaches (its L2 tables and their clusters). With
   * `fixCopied`, the COPIED flags of the (active) tables are set again where the refcount is 1
   * and cleared elsewhere, and changed tables are written back.
   */
  async walk(l1: Buffer, entries: number, delta: number, fixCopied: boolean): Promise<void> {
    const es = this.extL2 ? 16 : 8;
    let l1Dirty = false;
    for (let i = 0; i < entries; i++) {
      const l2off = this.l2Offset(l1, i);
      if (l2off === 0) continue;
      const t = Buffer.alloc(this.cs);
      await this.storage.read(t, l2off);
      let dirty = false;
      for (let at = 0; at + es <= this.cs; at += es) {
        const hi = t.readUInt32BE(at);
        const lo = t.readUInt32BE(at + 4);
        const refs = this.refsOf(hi, lo);
        let count = 0;
        for (const c of refs) count = delta !== 0 ? await this.rc.update(c, delta) : await this.rc.get(c);
        if (!fixCopied || (hi & HI_COMPRESSED) !== 0 || refs.length === 0) continue;
        const want = count === 1 ? (hi | HI_COPIED) >>> 0 : (hi & ~HI_COPIED) >>> 0;
        if (want !== hi) {
          t.writeUInt32BE(want, at);
          dirty = true;
        }
      }
      const n = delta !== 0 ? await this.rc.update(l2off / this.cs, delta) : await this.rc.get(l2off / this.cs);
      if (fixCopied) {
        if (dirty && n > 0) await this.storage.write(t, l2off);
        const hi = l1.readUInt32BE(i * 8);
        const want = n === 1 ? (hi | HI_COPIED) >>> 0 : (hi & ~HI_COPIED) >>> 0;
        if (want !== hi) {
          l1.writeUInt32BE(want, i * 8);
          l1Dirty = true;
        }
      }
    }
    if (fixCopied && l1Dirty) await this.storage.write(l1, this.h.l1TableOffset);
  }

  async syncRefcounts(): Promise<void> {
    await this.rc.writeDirty();
    await this.storage.flush();
  }

  /** Write `entries` as the new snapshot table, switch the header to it, free the old one. */
  async replaceTable(entries: Buffer[]): Promise<void> {
    const oldOffset = this.h.snapshotsOffset;
    const oldBytes = this.tableBytes;
    const bytes = entries.reduce((n, b) => n + b.length, 0);
    let offset = 0;
    if (entries.length > 0) {
      offset = await this.rc.alloc(Math.ceil(bytes / this.cs));
      await this.syncRefcounts();
      await this.storage.write(Buffer.concat(entries), offset);
      await this.storage.flush();
    }
    // [60..63] nb_snapshots  [64..71] snapshots_offset
    const hdr = Buffer.alloc(12);
    hdr.writeUInt32BE(entries.length, 0);
    writeU64(hdr, 4, offset);
    await this.storage.write(hdr, 60);
    await this.storage.flush();
    this.h.nbSnapshots = entries.length;
    this.h.snapshotsOffset = offset;
    if (oldBytes > 0) {
      const first = oldOffset / this.cs;
      for (let c = 0; c < Math.ceil(oldBytes / this.cs); c++) await this.rc.update(first + c, -1);
      await this.syncRefcounts();
    }
  }
}

/** The internal snapshots of an image (read through its `file` child). */
export async function listInternalSnapshots(file: BlockIO): Promise<SnapshotEntry[]> {
  return (await OfflineImage.open(file, false)).snapshots;
}

/** QEMU's snapshot lookup: by id and/or name (both must match when both are given). */
export function findSnapshot(list: readonly SnapshotEntry[], id?: string, name?: string): SnapshotEntry | undefined {
  return list.find((s) => (id === undefined || s.id === id) && (name === undefined || s.name === name));
}

export interface NewSnapshot {
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
}

/** Take an internal snapshot of the active state; returns its entry (id: highest numeric + 1). */
export async function createInternalSnapshot(file: BlockIO, s: NewSnapshot): Promise<SnapshotEntry> {
  const img = await OfflineImage.open(file);
  const h = img.h;
  if (img.snapshots.length >= MAX_SNAPSHOTS) throw err('Too many snapshots');
  let maxId = 0;
  for (const e of img.snapshots) {
    const n = Number.parseInt(e.id, 10);
    if (Number.isSafeInteger(n) && n > maxId) maxId = n;
  }
  const l1 = await img.readL1(h.l1TableOffset, h.l1Size);
  // 1. The snapshot's copy of the active L1 table.
  let l1Copy = 0;
  if (h.l1Size > 0) {
    l1Copy = await img.rc.alloc(Math.ceil((h.l1Size * 8) / img.cs));
    await img.syncRefcounts();
    await img.storage.write(l1, l1Copy);
  }
  // 2. One more reference to everything the active L1 reaches; shared now, so no COPIED.
  const active = Buffer.from(l1);
  await img.walk(active, h.l1Size, 1, false);
  await img.syncRefcounts();
  await img.walk(active, h.l1Size, 0, true);
  await img.storage.flush();
  // 3. The table with the new entry.
  const entry: Omit<SnapshotEntry, 'raw'> = {
    id: String(maxId + 1),
    name: s.name,
    l1TableOffset: l1Copy,
    l1Size: h.l1Size,
    dateSec: s.dateSec,
    dateNsec: s.dateNsec,
    vmClockNsec: s.vmClockNsec,
    vmStateSize: 0,
    icount: undefined,
  };
  const raw = encodeEntry(entry, h.size);
  await img.replaceTable([...img.snapshots.map((e) => e.raw), raw]);
  return { ...entry, raw };
}

/** Delete an internal snapshot (already looked up with findSnapshot). */
export async function deleteInternalSnapshot(file: BlockIO, target: SnapshotEntry): Promise<void> {
  const img = await OfflineImage.open(file);
  const h = img.h;
  const sn = img.snapshots.find((e) => e.id === target.id && e.name === target.name);
  if (!sn) throw err(`Snapshot '${target.name}' disappeared`);
  await img.replaceTable(img.snapshots.filter((e) => e !== sn).map((e) => e.raw));
  const l1 = await img.readL1(sn.l1TableOffset, sn.l1Size);
  await img.walk(l1, sn.l1Size, -1, false);
  if (sn.l1Size > 0) {
    const first = sn.l1TableOffset / img.cs;
    for (let c = 0; c < Math.ceil((sn.l1Size * 8) / img.cs); c++) await img.rc.update(first + c, -1);
  }
  await img.syncRefcounts();
  const active = await img.readL1(h.l1TableOffset, h.l1Size);
  await img.walk(active, h.l1Size, 0, true);
  await img.storage.flush();
}
