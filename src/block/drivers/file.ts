/**
 * `file`: a regular host file. Sparse-aware through the native addon (SEEK_DATA/SEEK_HOLE block
 * status, hole punching, FALLOC_FL_ZERO_RANGE, preadv2(RWF_NOWAIT) fast reads) and correct
 * without it. `cache.direct` opens with O_DIRECT and goes through aligned bounce buffers.
 *
 * Image locking follows QEMU's file-posix scheme so that QEMU tools and we see each other's
 * locks: for each permission bit P (QEMU's BLK_PERM_*), a shared OFD lock on byte 100+P means
 * "I hold P" and one on byte 200+P means "I do not share P". Taking P needs nobody else on 200+P;
 * not sharing P needs nobody else on 100+P. Without the addon the same rules are enforced between
 * nodes of this process only.
 */
import { constants as fsc, fstat, fsync, fdatasync, ftruncate, open, read, write, close } from 'node:fs';
import { getSystemErrorName, promisify } from 'node:util';
import { BlockError, strerror } from '../../util/errors.js';
import { nativeOps, type NativeOps, type WriteLaneOps } from '../native.js';
import { PERM_ALL, type FileRange } from '../types.js';
import {
  EXTENT_ALLOCATED,
  EXTENT_DATA,
  EXTENT_ZERO,
  type BlockDriver,
  type BlockExtent,
  type DriverCaps,
  type WriteDone,
  type WriteFlags,
  type ZeroFlags,
} from '../types.js';
import { PERM_NAMES } from '../node.js';
import {
  BASE_MEMBERS,
  optBool,
  optEnum,
  optError,
  optSize,
  optString,
  rejectUnknown,
  type DriverOpenContext,
  type Options,
} from './common.js';

const FILE_MEMBERS = [
  ...BASE_MEMBERS,
  'filename',
  'pr-manager',
  'locking',
  'aio',
  'aio-max-batch',
  'drop-cache',
  'x-check-cache-dropped',
];

const pOpen = promisify(open);
const pFstat = promisify(fstat);
const pClose = promisify(close);
const pFdatasync = promisify(fdatasync);
const pFsync = promisify(fsync);
const pFtruncate = promisify(ftruncate);

/** O_DIRECT alignment for offsets, lengths and memory (covers 512e and 4Kn devices). */
const DIRECT_ALIGN = 4096;
const LOCK_BASE_PERM = 100;
const LOCK_BASE_SHARED = 200;

function readAt(fd: number, buf: Buffer, offset: number): Promise<number> {
  return new Promise((resolve, reject) => {
    read(fd, buf, 0, buf.length, offset, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function writeAt(fd: number, buf: Buffer, offset: number): Promise<number> {
  return new Promise((resolve, reject) => {
    write(fd, buf, 0, buf.length, offset, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

/** A batch takes at most this many requests or bytes; more go to the next one. */
const BATCH_MAX_OPS = 16;
const BATCH_MAX_BYTES = 1024 * 1024;
/** Reads above this size each get their own batch, so big reads spread over the pool threads. */
const READ_BATCH_MAX_BYTES = 128 * 1024;
/** Read batches running at once (page-cache misses wait for the disk, so they overlap). */
const MAX_RUNNING_READS = 4;

/** Completion of one request of a batch: the error, or the bytes transferred. */
type BatchDone = (err: Error | undefined, n: number) => void;

/** Requests gathered for one native call. */
interface Batch {
  readonly bufs: Buffer[];
  readonly offsets: number[];
  readonly done: BatchDone[];
  bytes: number;
}

type IoBatchFn = NonNullable<NativeOps['ioBatch']>;
type SubmitFn = (bufs: Buffer[], offsets: number[], results: Float64Array, done: () => void) => void;

function batchError(write: boolean, negErrno: number): Error {
  let code: string;
  try {
    code = getSystemErrorName(negErrno);
  } catch {
    code = 'EIO';
  }
  const err = new Error(`${write ? 'pwrite' : 'pread'} failed: ${code}`) as Error & { code: string; errno: number };
  err.code = code;
  err.errno = negErrno;
  return err;
}

/**
 * One kind (reads or writes) of a file's batched thread-pool I/O. The NBD engine starts every
 * request of a socket read synchronously; they are gathered here and handed to the addon as one
 * batch at the end of the event-loop turn (one worker wake-up and one completion for the lot).
 * Requests in a batch run in issue order; batches start in order.
 */
class BatchLane {
  private readonly pending: Batch[] = [];
  private running = 0;
  private scheduled = false;
  private idle: (() => void) | undefined;

  constructor(
    private readonly submitBatch: SubmitFn,
    private readonly write: boolean,
    private readonly maxRunning: number,
    private readonly maxBytes: number,
  ) {}

  /** Bytes transferred (a read is short only at EOF); rejects with an errno-coded Error. */
  run(buf: Buffer, offset: number): Promise<number> {
    return new Promise<number>((resolve, reject) => {
      this.add(buf, offset, (err, n) => (err ? reject(err) : resolve(n)));
    });
  }

  /** As run(), with a callback (called once, from a later turn of the event loop). */
  add(buf: Buffer, offset: number, done: BatchDone): void {
    let b = this.pending[this.pending.length - 1];
    if (b === undefined || b.bufs.length >= BATCH_MAX_OPS || b.bytes + buf.length > this.maxBytes) {
      b = { bufs: [], offsets: [], done: [], bytes: 0 };
      this.pending.push(b);
    }
    b.done.push(done);
    b.bufs.push(buf);
    b.offsets.push(offset);
    b.bytes += buf.length;
    if (!this.scheduled) {
      this.scheduled = true;
      process.nextTick(startLane, this);
    }
  }

  /** Start gathered batches while under the running limit. */
  start(): void {
    this.scheduled = false;
    while (this.running < this.maxRunning && this.pending.length > 0) {
      const b = this.pending.shift()!;
      const results = new Float64Array(b.bufs.length);
      this.running++;
      try {
        this.submitBatch(b.bufs, b.offsets, results, () => this.complete(b, results));
      } catch (err) {
        this.running--;
        const e = err instanceof Error ? err : new Error(String(err));
        for (const done of b.done) done(e, 0);
      }
    }
  }

  private complete(b: Batch, results: Float64Array): void {
    this.running--;
    // Keep the worker busy: start what gathered meanwhile before settling these.
    this.start();
    for (let i = 0; i < results.length; i++) {
      const r = results[i]!;
      if (r >= 0) b.done[i]!(undefined, r);
      else b.done[i]!(batchError(this.write, r), 0);
    }
    if (this.running === 0 && this.pending.length === 0 && this.idle) {
      const idle = this.idle;
      this.idle = undefined;
      idle();
    }
  }

  /** Wait until nothing is gathered or running (close). */
  async drain(): Promise<void> {
    while (this.running > 0 || this.pending.length > 0) {
      if (this.running === 0) this.start();
      await new Promise<void>((r) => (this.idle = r));
    }
  }
}

function startLane(lane: BatchLane): void {
  lane.start();
}

/**
 * Batched reads and writes of one file descriptor. Reads: up to MAX_RUNNING_READS batches on
 * thread-pool threads. Writes: a native write lane, one thread writing batch after batch
 * (buffered writes to one file serialise on the inode lock anyway, so a second writer would
 * only sleep on it), or one batch at a time through ioBatch when the addon has no lanes.
 */
class NativeBatcher {
  readonly reads: BatchLane;
  readonly writes: BatchLane;
  private readonly lane: object | undefined;

  constructor(
    fd: number,
    ioBatch: IoBatchFn,
    private readonly laneOps: WriteLaneOps | undefined,
  ) {
    this.reads = new BatchLane((b, o, r, d) => ioBatch(fd, false, b, o, r, d), false, MAX_RUNNING_READS, READ_BATCH_MAX_BYTES);
    const lane = laneOps?.create();
    this.lane = lane;
    this.writes =
      lane && laneOps
        ? new BatchLane((b, o, r, d) => laneOps.submit(lane, fd, b, o, r, d), true, Infinity, BATCH_MAX_BYTES)
        : new BatchLane((b, o, r, d) => ioBatch(fd, true, b, o, r, d), true, 1, BATCH_MAX_BYTES);
  }

  async drain(): Promise<void> {
    await Promise.all([this.reads.drain(), this.writes.drain()]);
  }

  /** After drain(): release the native lane. */
  close(): void {
    if (this.lane && this.laneOps) this.laneOps.close(this.lane);
  }
}

/** In-process view of image locks: inode -> drivers that have it open. */
const openImages = new Map<string, Set<FileDriver>>();

export class FileDriver implements BlockDriver {
  readonly name = 'file';
  readonly caps: DriverCaps;
  private length: number;
  private closed = false;
  /** Permissions currently held / not shared (lock bytes taken). */
  private heldPerm = 0;
  private heldUnshared = 0;
  /** Batched thread-pool I/O (addon present, page-cache I/O); undefined = one fs call per request. */
  private batcher: NativeBatcher | undefined;
  /**
   * Descriptors replaced by a reopen, kept open (without locks) until close(): requests issued
   * before the reopen may still be running on them.
   */
  private readonly retired: { fd: number; batcher: NativeBatcher | undefined; writable: boolean }[] = [];
  /** Serialises read-modify-write cycles of unaligned O_DIRECT writes. */
  private rmwTail: Promise<void> = Promise.resolve();

  private constructor(
    private readonly ctx: DriverOpenContext,
    readonly filename: string,
    private fd: number,
    private readonly inode: string,
    size: number,
    private readonly direct: boolean,
    private readonly noFlush: boolean,
    private readonly unmap: boolean,
    private readonly locking: 'ofd' | 'process' | 'off',
    private readonly native: NativeOps,
  ) {
    this.length = size;
    this.batcher = !direct && native.ioBatch ? new NativeBatcher(fd, native.ioBatch, native.writeLane) : undefined;
    const n = native.available;
    this.caps = {
      writeZeroes: n,
      fua: false,
      discard: n && unmap,
      blockStatus: n,
      resize: true,
      readSync: n && !direct,
      zeroInit: true,
    };
  }

  /** Open the file; nothing is created or truncated. Errors read `Could not open 'PATH': ...`. */
  static async open(ctx: DriverOpenContext, opts: Options): Promise<FileDriver> {
    rejectUnknown(opts, FILE_MEMBERS);
    const filename = optString(opts, 'filename', true);
    if (opts['pr-manager'] !== undefined) {
      optString(opts, 'pr-manager');
      throw optError("Option 'pr-manager' is not supported by blockd");
    }
    const lockingOpt = optEnum(opts, 'locking', ['auto', 'on', 'off'] as const) ?? 'auto';
    const aio = optEnum(opts, 'aio', ['threads', 'native', 'io_uring'] as const) ?? 'threads';
    optSize(opts, 'aio-max-batch', 'int');
    optBool(opts, 'drop-cache');
    if (optBool(opts, 'x-check-cache-dropped')) {
      throw optError("Option 'x-check-cache-dropped' is not supported by blockd");
    }
    const direct = ctx.options.cacheDirect;
    if (aio === 'native' && !direct) {
      throw optError('aio=native was specified, but it requires cache.direct=on, which was not specified.');
    }
    const native = nativeOps();
    let readOnly = ctx.readOnly;
    let flags = readOnly ? fsc.O_RDONLY : fsc.O_RDWR;
    if (direct) {
      if (native.available) flags |= native.O_DIRECT;
      else ctx.log.warn({ filename }, 'cache.direct=on without the native addon: using the page cache');
    }
    let fd: number;
    try {
      fd = await pOpen(filename, flags);
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (!readOnly && ctx.options.autoReadOnly && (code === 'EACCES' || code === 'EROFS' || code === 'EPERM')) {
        readOnly = true;
        try {
          fd = await pOpen(filename, (flags & ~fsc.O_RDWR) | fsc.O_RDONLY);
        } catch (err2) {
          throw openError(filename, err2);
        }
      } else {
        throw openError(filename, err);
      }
    }
    try {
      const st = await pFstat(fd);
      if (st.isDirectory()) throw openError(filename, { code: 'EISDIR' });
      if (!st.isFile()) {
        throw optError(`Could not open '${filename}': blockd supports regular files only`);
      }
      const locking =
        lockingOpt === 'off' || ctx.options.forceShare
          ? 'off'
          : native.available
            ? 'ofd'
            : 'process';
      if (lockingOpt === 'on' && !native.available) {
        ctx.log.warn({ filename }, 'locking=on without the native addon: image locks are in-process only');
      }
      const drv = new FileDriver(
        ctx,
        filename,
        fd,
        `${st.dev}:${st.ino}`,
        st.size,
        direct && native.available,
        ctx.options.cacheNoFlush,
        ctx.options.discard === 'unmap',
        locking,
        native,
      );
      drv.readOnlyOpen = readOnly;
      // A recycled inode number is another file: its birth time tells them apart (statx).
      drv.identity = `${st.dev}:${st.ino}:${st.birthtimeMs}`;
      let set = openImages.get(drv.inode);
      if (!set) openImages.set(drv.inode, (set = new Set()));
      set.add(drv);
      return drv;
    } catch (err) {
      await pClose(fd).catch(() => undefined);
      throw err;
    }
  }

  /** True when the file was opened read-only (read-only=on, or auto-read-only fell back). */
  readOnlyOpen = false;

  getLength(): number {
    return this.length;
  }

  // ---- reads ------------------------------------------------------------------------------

  /**
   * One range known to be data, from the last SEEK_HOLE. Only our own hole-making calls
   * (write zeroes, discard, truncate) can turn data into holes, and they reset it; a hole that
   * someone else punches would only make us send zeroes as data, never wrong bytes.
   */
  private dataStart = 0;
  private dataEnd = 0;

  isDataSync(offset: number, length: number): boolean {
    if (this.closed || !this.native.available) return false;
    const end = offset + length;
    if (offset >= this.dataStart && end <= this.dataEnd) return true;
    let hole: number;
    try {
      hole = this.native.seekHole(this.fd, offset);
    } catch {
      return false;
    }
    if (hole < end) return false;
    this.dataStart = offset;
    this.dataEnd = Math.min(hole, this.length);
    return end <= this.dataEnd;
  }

  private forgetData(): void {
    this.dataStart = 0;
    this.dataEnd = 0;
  }

  /** The file's dev:ino and birth time (open): see BlockDriver.imageIdentity. */
  private identity = '';

  imageIdentity(): string {
    return this.identity;
  }

  /**
   * The range itself when it holds no hole (isDataSync: a reader sends holes as such) and all
   * of it is in the page cache (cachestat: one syscall, no data touched), so a caller may send it
   * with sendfile() without waiting for the disk. Not for O_DIRECT (the page cache is not the
   * file's truth there) or without cachestat.
   */
  fileRangeSync(offset: number, length: number): FileRange | undefined {
    const cached = this.native.cachedRange;
    if (this.direct || this.closed || !cached || offset + length > this.length) return undefined;
    if (!this.isDataSync(offset, length)) return undefined;
    return cached(this.fd, offset, length) === 1 ? { fd: this.fd, offset } : undefined;
  }

  tryReadSync(buf: Buffer, offset: number): boolean {
    if (this.direct || this.closed) return false;
    const n = this.native.preadNowait(this.fd, buf, offset);
    return n === buf.length;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    if (this.direct) return this.readDirect(buf, offset);
    if (this.batcher) {
      if (this.closed) throw closedError();
      const n = await this.batcher.reads.run(buf, offset);
      // The file shrank under us: what is past EOF reads as zeroes.
      if (n < buf.length) buf.fill(0, n);
      return;
    }
    let done = 0;
    while (done < buf.length) {
      const n = await readAt(this.fd, done === 0 ? buf : buf.subarray(done), offset + done);
      if (n === 0) {
        // The file shrank under us: what is past EOF reads as zeroes.
        buf.fill(0, done);
        return;
      }
      done += n;
    }
  }

  private bounce(size: number): Buffer {
    return this.native.allocAligned(size, DIRECT_ALIGN);
  }

  private async readDirect(buf: Buffer, offset: number): Promise<void> {
    const start = Math.floor(offset / DIRECT_ALIGN) * DIRECT_ALIGN;
    const end = Math.ceil((offset + buf.length) / DIRECT_ALIGN) * DIRECT_ALIGN;
    const b = this.bounce(end - start);
    let done = 0;
    while (done < b.length) {
      const n = await readAt(this.fd, b.subarray(done), start + done);
      if (n === 0) break;
      done += n;
    }
    b.copy(buf, 0, offset - start, offset - start + buf.length);
  }

  // ---- writes -----------------------------------------------------------------------------

  async write(buf: Buffer, offset: number, _flags: WriteFlags): Promise<void> {
    if (this.direct) return this.writeDirect(buf, offset);
    if (this.batcher) {
      if (this.closed) throw closedError();
      await this.batcher.writes.run(buf, offset);
      return;
    }
    let done = 0;
    while (done < buf.length) {
      done += await writeAt(this.fd, done === 0 ? buf : buf.subarray(done), offset + done);
    }
  }

  /** The write fast path (BlockDriver.submitWrite): the batched lane, when there is one. */
  submitWrite(buf: Buffer, offset: number, done: WriteDone): boolean {
    if (this.direct || !this.batcher || this.closed) return false;
    this.batcher.writes.add(buf, offset, done);
    return true;
  }

  private async writeDirect(buf: Buffer, offset: number): Promise<void> {
    const start = Math.floor(offset / DIRECT_ALIGN) * DIRECT_ALIGN;
    const end = Math.ceil((offset + buf.length) / DIRECT_ALIGN) * DIRECT_ALIGN;
    const aligned = start === offset && end === offset + buf.length;
    const run = async (): Promise<void> => {
      const b = this.bounce(end - start);
      if (!aligned) {
        // Read-modify-write of the partial head/tail blocks.
        let got = 0;
        while (got < b.length) {
          const n = await readAt(this.fd, b.subarray(got), start + got);
          if (n === 0) break;
          got += n;
        }
      }
      buf.copy(b, offset - start);
      // Never write past the current EOF: trim the bounce buffer's padding beyond it by
      // writing the aligned part and then fixing the length.
      let done = 0;
      while (done < b.length) done += await writeAt(this.fd, b.subarray(done), start + done);
      if (end > this.length) await pFtruncate(this.fd, this.length);
    };
    if (aligned) return run();
    const p = this.rmwTail.then(run);
    this.rmwTail = p.catch(() => undefined);
    return p;
  }

  async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    this.forgetData();
    if (flags.mayUnmap && this.unmap) {
      try {
        this.native.punchHole(this.fd, offset, length);
        return;
      } catch (err) {
        if (!isNotSup(err)) throw err;
      }
    }
    this.native.zeroRange(this.fd, offset, length);
  }

  async discard(offset: number, length: number): Promise<void> {
    if (!this.unmap) return;
    this.forgetData();
    this.native.punchHole(this.fd, offset, length);
  }

  async flush(): Promise<void> {
    if (this.noFlush || this.closed) return;
    await pFdatasync(this.fd);
  }

  // ---- metadata ---------------------------------------------------------------------------

  async blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    const end = Math.min(offset + length, this.length);
    const out: BlockExtent[] = [];
    let pos = offset;
    // Bounded: a fragmented file gives at most this many extents per call; callers loop.
    while (pos < end && out.length < 1024) {
      const data = this.native.seekData(this.fd, pos);
      if (data < 0 || data >= end) {
        out.push({ offset: pos, length: end - pos, flags: EXTENT_ZERO | EXTENT_ALLOCATED, depth: 1 });
        break;
      }
      if (data > pos) {
        out.push({ offset: pos, length: data - pos, flags: EXTENT_ZERO | EXTENT_ALLOCATED, depth: 1 });
        pos = data;
      }
      let hole = this.native.seekHole(this.fd, pos);
      if (hole < 0 || hole > end) hole = end;
      if (hole <= pos) hole = end; // defensive: never loop without progress
      out.push({ offset: pos, length: hole - pos, flags: EXTENT_DATA | EXTENT_ALLOCATED, depth: 1 });
      pos = hole;
    }
    return out;
  }

  async truncate(size: number): Promise<void> {
    this.forgetData();
    await pFtruncate(this.fd, size);
    this.length = size;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.setPerms(0, PERM_ALL);
    const set = openImages.get(this.inode);
    set?.delete(this);
    if (set && set.size === 0) openImages.delete(this.inode);
    if (this.batcher) {
      await this.batcher.drain();
      this.batcher.close();
    }
    if (!this.readOnlyOpen && !this.noFlush) await pFsync(this.fd).catch(() => undefined);
    await pClose(this.fd);
    for (const r of this.retired.splice(0)) {
      if (r.batcher) {
        await r.batcher.drain();
        r.batcher.close();
      }
      if (r.writable && !this.noFlush) await pFsync(r.fd).catch(() => undefined);
      await pClose(r.fd).catch(() => undefined);
    }
  }

  /**
   * Reopen read-only or read-write (blockdev-reopen, snapshot commit): a new descriptor with the
   * new access mode takes the lock bytes this driver holds, then replaces the old one, whose
   * locks are dropped (OFD locks belong to the descriptor). The old descriptor stays open until
   * close() for requests already running on it. Throws QEMU's open error and changes nothing
   * when the file cannot be opened that way (EACCES, EROFS) or is no longer the same file.
   */
  async reopen(readOnly: boolean): Promise<void> {
    if (this.closed) throw closedError();
    if (readOnly === this.readOnlyOpen) return;
    let flags = readOnly ? fsc.O_RDONLY : fsc.O_RDWR;
    if (this.direct) flags |= this.native.O_DIRECT;
    let fd: number;
    try {
      fd = await pOpen(this.filename, flags);
    } catch (err) {
      throw openError(this.filename, err);
    }
    try {
      const st = await pFstat(fd);
      if (`${st.dev}:${st.ino}` !== this.inode) {
        throw new BlockError('OPEN_FAILED', 'EIO', `Could not reopen '${this.filename}': the file was replaced`);
      }
      if (this.locking === 'ofd') {
        for (const [bit] of PERM_NAMES) {
          const idx = Math.log2(bit);
          if (this.heldPerm & bit) this.native.ofdLock(fd, LOCK_BASE_PERM + idx, 1, 1);
          if (this.heldUnshared & bit) this.native.ofdLock(fd, LOCK_BASE_SHARED + idx, 1, 1);
        }
      }
    } catch (err) {
      await pClose(fd).catch(() => undefined);
      throw err instanceof BlockError ? err : openError(this.filename, err);
    }
    const old = { fd: this.fd, batcher: this.batcher, writable: !this.readOnlyOpen };
    if (this.locking === 'ofd') {
      for (const [bit] of PERM_NAMES) {
        const idx = Math.log2(bit);
        this.applyLockOn(old.fd, LOCK_BASE_PERM + idx, false, (this.heldPerm & bit) !== 0);
        this.applyLockOn(old.fd, LOCK_BASE_SHARED + idx, false, (this.heldUnshared & bit) !== 0);
      }
    }
    this.fd = fd;
    this.batcher =
      !this.direct && this.native.ioBatch ? new NativeBatcher(fd, this.native.ioBatch, this.native.writeLane) : undefined;
    this.readOnlyOpen = readOnly;
    this.retired.push(old);
  }

  describeFilename(): string {
    return this.filename;
  }

  jsonOptions(): Record<string, unknown> {
    return { driver: 'file', filename: this.filename };
  }

  async queryImage(): Promise<Record<string, unknown>> {
    const st = await pFstat(this.fd);
    return { 'actual-size': st.blocks * 512, 'dirty-flag': false };
  }

  // ---- image locking ----------------------------------------------------------------------

  checkPerms(perm: number, shared: number): void {
    if (this.locking === 'off') return;
    const unshared = ~shared & PERM_ALL;
    for (const [bit, name] of PERM_NAMES) {
      if (perm & bit && !(this.heldPerm & bit) && this.othersHold(LOCK_BASE_SHARED, bit)) {
        throw new BlockError('LOCKED', 'EAGAIN', `Failed to get "${name}" lock`);
      }
      if (unshared & bit && !(this.heldUnshared & bit) && this.othersHold(LOCK_BASE_PERM, bit)) {
        throw new BlockError('LOCKED', 'EAGAIN', `Failed to get shared "${name}" lock`);
      }
    }
  }

  private othersHold(base: number, bit: number): boolean {
    for (const other of openImages.get(this.inode) ?? []) {
      if (other === this) continue;
      const held = base === LOCK_BASE_PERM ? other.heldPerm : other.heldUnshared;
      if (held & bit) return true;
    }
    if (this.locking === 'ofd') {
      try {
        return this.native.ofdTest(this.fd, base + Math.log2(bit), 1, 2);
      } catch {
        return false;
      }
    }
    return false;
  }

  setPerms(perm: number, shared: number): void {
    const unshared = ~shared & PERM_ALL;
    if (this.locking === 'ofd' && !this.closed) {
      for (const [bit] of PERM_NAMES) {
        const idx = Math.log2(bit);
        this.applyLock(LOCK_BASE_PERM + idx, (perm & bit) !== 0, (this.heldPerm & bit) !== 0);
        this.applyLock(LOCK_BASE_SHARED + idx, (unshared & bit) !== 0, (this.heldUnshared & bit) !== 0);
      }
    }
    this.heldPerm = this.locking === 'off' ? 0 : perm;
    this.heldUnshared = this.locking === 'off' ? 0 : unshared;
  }

  private applyLock(byte: number, want: boolean, have: boolean): void {
    this.applyLockOn(this.fd, byte, want, have);
  }

  private applyLockOn(fd: number, byte: number, want: boolean, have: boolean): void {
    if (want === have) return;
    try {
      this.native.ofdLock(fd, byte, 1, want ? 1 : 0);
    } catch (err) {
      this.ctx.log.warn({ err, byte }, 'image lock update failed');
    }
  }
}

function closedError(): Error {
  const err = new Error('file is closed') as Error & { code: string };
  err.code = 'EBADF';
  return err;
}

function isNotSup(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === 'ENOTSUP' || code === 'EOPNOTSUPP';
}

function openError(filename: string, err: unknown): BlockError {
  const code = (err as { code?: string } | null)?.code;
  return new BlockError('OPEN_FAILED', code === 'ENOENT' ? 'ENOENT' : code === 'EACCES' ? 'EACCES' : 'EIO',
    `Could not open '${filename}': ${strerror(err)}`, { cause: err });
}
