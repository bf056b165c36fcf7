/**
 * What every layer of the qcow2 driver shares: the image geometry, its header, the `file` child
 * (`Storage`), the refcounts (read-write only), the children, and the corruption guard: overlap
 * checks before metadata or data writes, BLOCK_IMAGE_CORRUPTED events, the corrupt bit.
 *
 * The driver is one object built in layers, each in its own file, each extending the one below:
 * image.ts (this) -> cluster-map.ts (L1/L2 map and its cache) -> read.ts (reads, block status)
 * -> allocate.ts (allocation, copy-on-write, metadata write-back) -> qcow2.ts (the driver face:
 * open, options, bitmaps, write/zero/discard/resize entry points, close).
 */
import { BlockError } from '../../../util/errors.js';
import type { BlockIO } from '../../types.js';
import type { DriverOpenContext, Options } from '../common.js';
import { INCOMPAT_CORRUPT, INCOMPAT_EXTL2, type Qcow2Header, type SnapshotInfo } from './format.js';
import type { Refcounts } from './refcount.js';
import type { Storage } from './storage.js';
import { MetadataMap, OL_MAIN_HEADER, overlapName, parseOverlapCheck } from './overlap.js';

/** Header offsets of the version 3 feature bit fields. */
export const HDR_INCOMPATIBLE = 72;
export const HDR_AUTOCLEAR = 88;

/** What open() hands to the layers' constructors. */
export interface Qcow2Parts {
  ctx: DriverOpenContext;
  opts: Options;
  header: Qcow2Header;
  l1: Buffer;
  storage: Storage;
  refcounts: Refcounts | undefined;
  l2CacheBytes: number;
  writable: boolean;
}

export abstract class Qcow2Image {
  readonly header: Qcow2Header;
  readonly clusterSize: number;
  readonly writable: boolean;
  protected readonly ctx: DriverOpenContext;
  protected readonly clusterBits: number;
  protected readonly extL2: boolean;
  protected readonly entrySize: number;
  protected readonly l2Entries: number;
  protected readonly subclusterSize: number;
  protected readonly storage: Storage;
  protected readonly refcounts: Refcounts | undefined;
  protected size: number;
  protected closed = false;
  /** Internal snapshots (read at open; never changed by blockd) and the table's length. */
  protected snapshots: SnapshotInfo[] = [];
  protected snapshotTableBytes = 0;
  /** Metadata kinds checked before writes (overlap-check), and where metadata lives. */
  protected readonly olMask: number;
  protected readonly ol: MetadataMap;
  /**
   * Set when a write would have hit metadata: the image is marked corrupt and the node refuses
   * all further I/O (QEMU detaches the driver: "No medium found").
   */
  protected broken = false;

  protected constructor(p: Qcow2Parts) {
    const header = p.header;
    this.ctx = p.ctx;
    this.writable = p.writable;
    this.header = header;
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.extL2 = (header.incompatible & INCOMPAT_EXTL2) !== 0n;
    this.entrySize = this.extL2 ? 16 : 8;
    this.l2Entries = this.clusterSize / this.entrySize;
    this.subclusterSize = this.clusterSize / 32;
    this.storage = p.storage;
    this.refcounts = p.refcounts;
    this.size = header.size;
    this.olMask = p.writable ? parseOverlapCheck(p.opts['overlap-check']) : 0;
    this.ol = new MetadataMap(this.clusterSize);
  }

  /**
   * Overlap check before writing `[offset, offset+length)` of the image file, which rewrites
   * metadata of kinds `own` (0 for guest data and new clusters). On an overlap: mark the image
   * corrupt and throw EIO (QEMU's qcow2_pre_write_overlap_check).
   */
  checkOverlap(offset: number, length: number, own: number): void {
    if (this.broken) throw this.noMedium();
    const mask = this.olMask & ~own;
    if (mask === 0) return;
    // The header check is by offset, not by cluster (QEMU: any write below the first cluster end).
    let hit = offset < this.clusterSize ? mask & OL_MAIN_HEADER : 0;
    if (hit === 0) hit = this.ol.check(offset, length, mask);
    if (hit !== 0) throw this.signalCorruption(offset, length, `Preventing invalid write on metadata (overlaps with ${overlapName(hit)})`);
  }

  /**
   * Fatal corruption: log it, emit BLOCK_IMAGE_CORRUPTED (once), set the corrupt bit in the
   * header (in the background; nothing else is written afterwards) and stop all I/O.
   */
  protected signalCorruption(offset: number | undefined, size: number | undefined, msg: string): BlockError {
    if (!this.broken) {
      this.broken = true;
      this.ctx.log.error(
        { offset, size },
        `qcow2: Marking image as corrupt: ${msg}; further corruption events will be suppressed`,
      );
      this.corruptionEvent(msg, true, offset, size);
      if (this.header.version === 3) {
        this.header.incompatible |= INCOMPAT_CORRUPT;
        this.corruptMarked = this.writeHeaderU64(HDR_INCOMPATIBLE, this.header.incompatible).catch(
          (err: unknown) => this.ctx.log.error({ err }, 'qcow2: could not set the corrupt bit'),
        );
      }
    }
    return corruptError(msg);
  }

  /** BLOCK_IMAGE_CORRUPTED; QEMU leaves offset and size out when it is not about one write. */
  protected corruptionEvent(msg: string, fatal: boolean, offset?: number, size?: number): void {
    this.ctx.emitEvent?.('BLOCK_IMAGE_CORRUPTED', {
      device: '',
      msg,
      ...(offset !== undefined && { offset }),
      'node-name': this.ctx.nodeName,
      fatal,
      ...(size !== undefined && { size }),
    });
  }

  /** The header write of signalCorruption() (close waits for it). */
  protected corruptMarked: Promise<void> | undefined;

  protected noMedium(): BlockError {
    return new BlockError('NO_MEDIUM', 'EINVAL', 'No medium found');
  }

  /** Guest data (or a new cluster's contents) to the file, after the overlap check. */
  protected writeData(buf: Buffer, offset: number): Promise<void> {
    try {
      this.checkOverlap(offset, buf.length, 0);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.storage.write(buf, offset);
  }

  /** One 64-bit header field (feature bits), written and flushed. */
  protected async writeHeaderU64(at: number, v: bigint): Promise<void> {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(v, 0);
    await this.storage.write(b, at);
    await this.storage.flush();
  }

  protected backing(): BlockIO | undefined {
    if (this.ctx.hasChild && !this.ctx.hasChild('backing')) return undefined;
    try {
      return this.ctx.childIO('backing');
    } catch {
      return undefined;
    }
  }

  /** Set while statusKind() classifies entries (see there). */
  protected quietCorruption = false;
  /** A non-fatal BLOCK_IMAGE_CORRUPTED was emitted (read-only image): no more of them. */
  protected signaledNonFatal = false;

  /**
   * Corrupt metadata met by a request: like QEMU's qcow2_signal_corruption(), fatal on a
   * writable image (corrupt bit, event, no more I/O), a one-time non-fatal event on a read-only
   * one. The request fails with EIO either way.
   */
  protected corruption(msg: string): BlockError {
    if (this.quietCorruption) return corruptError(msg);
    if (this.writable && this.refcounts) return this.signalCorruption(undefined, undefined, msg);
    if (!this.signaledNonFatal) {
      this.signaledNonFatal = true;
      this.ctx.log.error(`qcow2: Image is corrupt: ${msg}; further non-fatal corruption events will be suppressed`);
      this.corruptionEvent(msg, false);
    }
    return corruptError(msg);
  }

}

/** The EIO error of corrupt metadata (QEMU: "qcow2: ..."). */
export function corruptError(msg: string): BlockError {
  return new BlockError('QCOW2_CORRUPT', 'EIO', `qcow2: ${msg}`);
}
