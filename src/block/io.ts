/**
 * The checked I/O wrapper of a node. Every upper layer (exports, jobs, parent nodes) goes
 * through it: it validates ranges and permissions, supplies fallbacks for what the driver
 * cannot do natively, runs write hooks (dirty bitmaps, write notifiers), counts statistics and
 * serialises resize against in-flight I/O. Everything else stays concurrent.
 *
 * Fast path: when no resize is pending and there are no async hooks, a request costs one
 * promise (the async method itself) on top of the driver's.
 */
import { BlockError, DaemonError, errnoOf } from '../util/errors.js';
import {
  EXTENT_ALLOCATED,
  EXTENT_DATA,
  type BlockDriver,
  type BlockExtent,
  type BlockIO,
  type BlockStats,
  type FileRange,
  type WriteDone,
  type WriteFlags,
  type WriteHook,
  type WriteThresholdListener,
  type ZeroFlags,
} from './types.js';

/** Largest offset or length we accept (2^53 - 1). */
export const MAX_OFFSET = Number.MAX_SAFE_INTEGER;
/** Chunk size for the write-zeroes fallback. */
export const ZERO_CHUNK = 1024 * 1024;

let zeroBuf: Buffer | undefined;
/** A shared, never-written buffer of zeroes (at most ZERO_CHUNK bytes long views). */
function zeroes(length: number): Buffer {
  zeroBuf ??= Buffer.alloc(ZERO_CHUNK);
  return length === ZERO_CHUNK ? zeroBuf : zeroBuf.subarray(0, length);
}

function emptyStats(): BlockStats {
  return {
    readOps: 0,
    readBytes: 0,
    writeOps: 0,
    writeBytes: 0,
    zeroOps: 0,
    zeroBytes: 0,
    discardOps: 0,
    discardBytes: 0,
    flushOps: 0,
    failedOps: 0,
    failedReadOps: 0,
    failedWriteOps: 0,
    failedDiscardOps: 0,
    failedFlushOps: 0,
    invalidReadOps: 0,
    invalidWriteOps: 0,
    invalidDiscardOps: 0,
    wrHighestOffset: 0,
    driverDiscardOk: 0,
    driverDiscardFailed: 0,
    driverDiscardBytesOk: 0,
  };
}

/** What a request is, for the range check's `invalid*` counters. */
const KIND_READ = 0;
const KIND_WRITE = 1;
const KIND_DISCARD = 2;
/** Block status: checked like a read, not counted. */
const KIND_STATUS = 3;
type RequestKind = typeof KIND_READ | typeof KIND_WRITE | typeof KIND_DISCARD | typeof KIND_STATUS;

/** What the wrapper needs to know about its node. */
export interface NodeIOOwner {
  readonly name: string;
  readonly readOnly: boolean;
  /** detect-zeroes: turn all-zero writes into write-zeroes (`unmap` also lets them punch holes). */
  readonly options?: { readonly detectZeroes: 'off' | 'on' | 'unmap'; readonly discard: 'ignore' | 'unmap' };
}

/** Whether `buf` is all zeroes (compared chunk-wise against the shared zero buffer). */
export function isZeroBuffer(buf: Buffer): boolean {
  for (let pos = 0; pos < buf.length; pos += ZERO_CHUNK) {
    const n = Math.min(ZERO_CHUNK, buf.length - pos);
    if (!buf.subarray(pos, pos + n).equals(zeroes(n))) return false;
  }
  return true;
}

/** Convert a driver or system error to a BlockError (keeps DaemonErrors as they are). */
export function toBlockError(err: unknown, what: string): DaemonError {
  if (err instanceof DaemonError) return err;
  const msg = err instanceof Error ? err.message : String(err);
  return new BlockError('IO', errnoOf(err), `${what}: ${msg}`, { cause: err });
}

function isNotSupported(err: unknown): boolean {
  if (err instanceof DaemonError) return err.errno === 'ENOTSUP';
  const code = (err as { code?: unknown } | null)?.code;
  return code === 'ENOTSUP' || code === 'EOPNOTSUPP';
}

export class NodeIO implements BlockIO {
  readonly stats: BlockStats = emptyStats();
  private readonly hooks: WriteHook[] = [];
  private inflight = 0;
  /** Set while a resize waits for or runs without in-flight I/O. */
  private gate: Promise<void> | undefined;
  private drained: (() => void) | undefined;
  private threshold = 0;
  private thresholdListener: WriteThresholdListener | undefined;

  constructor(
    private readonly owner: NodeIOOwner,
    private driver: BlockDriver,
  ) {}

  size(): number {
    return this.driver.getLength();
  }

  addWriteHook(hook: WriteHook): () => void {
    this.hooks.push(hook);
    return () => {
      const i = this.hooks.indexOf(hook);
      if (i >= 0) this.hooks.splice(i, 1);
    };
  }

  get writeThreshold(): number {
    return this.threshold;
  }

  setWriteThreshold(offset: number, onExceeded?: WriteThresholdListener): void {
    if (!Number.isSafeInteger(offset) || offset < 0) {
      throw new BlockError('RANGE', 'EINVAL', `invalid write threshold for '${this.owner.name}'`);
    }
    this.threshold = offset;
    this.thresholdListener = offset > 0 ? onExceeded : undefined;
  }

  /**
   * QEMU's bdrv_write_threshold_check_write: a write-like request ending past the threshold
   * disarms it and tells the listener once (before the driver sees the request).
   */
  private checkThreshold(offset: number, length: number): void {
    const end = offset + length;
    if (this.threshold === 0 || end <= this.threshold) return;
    const threshold = this.threshold;
    const listener = this.thresholdListener;
    this.threshold = 0;
    this.thresholdListener = undefined;
    listener?.(end - threshold, threshold);
  }

  // ---- checks ---------------------------------------------------------------------------

  private checkRange(offset: number, length: number, kind: RequestKind): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      this.countInvalid(kind);
      throw new BlockError('RANGE', 'EINVAL', `invalid request range on '${this.owner.name}'`);
    }
    if (offset + length > MAX_OFFSET) {
      this.countInvalid(kind);
      throw new BlockError('RANGE', 'EOVERFLOW', `request beyond 2^53 on '${this.owner.name}'`);
    }
    if (offset + length > this.driver.getLength()) {
      this.countInvalid(kind);
      throw kind === KIND_WRITE || kind === KIND_DISCARD
        ? new BlockError('RANGE', 'ENOSPC', `write past end of '${this.owner.name}'`)
        : new BlockError('RANGE', 'EINVAL', `request past end of '${this.owner.name}'`);
    }
  }

  private countInvalid(kind: RequestKind): void {
    if (kind === KIND_READ) this.stats.invalidReadOps++;
    else if (kind === KIND_WRITE) this.stats.invalidWriteOps++;
    else if (kind === KIND_DISCARD) this.stats.invalidDiscardOps++;
  }

  private checkWritable(): void {
    if (this.owner.readOnly) {
      throw new BlockError('READ_ONLY', 'EPERM', `Node '${this.owner.name}' is read-only`);
    }
  }

  private async runHooks(offset: number, length: number, kind: 'write' | 'zero' | 'discard'): Promise<void> {
    for (const h of this.hooks) {
      const r = h(offset, length, kind);
      if (r !== undefined) await r;
    }
  }

  private noteWriteEnd(end: number): void {
    if (end > this.stats.wrHighestOffset) this.stats.wrHighestOffset = end;
  }

  private enter(): void {
    this.inflight++;
  }

  private leave(): void {
    if (--this.inflight === 0 && this.drained) {
      const d = this.drained;
      this.drained = undefined;
      d();
    }
  }

  // ---- data path ------------------------------------------------------------------------

  tryReadSync(buf: Buffer, offset: number): boolean {
    if (this.gate || !this.driver.tryReadSync) return false;
    const length = buf.length;
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > this.driver.getLength()) {
      return false;
    }
    let ok = false;
    try {
      ok = this.driver.tryReadSync(buf, offset);
    } catch {
      return false;
    }
    if (ok) {
      this.stats.readOps++;
      this.stats.readBytes += length;
    }
    return ok;
  }

  fileRangeSync(offset: number, length: number, holes = false, lending = false): FileRange | undefined {
    if (this.gate || !this.driver.fileRangeSync) return undefined;
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length <= 0) {
      return undefined;
    }
    if (offset + length > this.driver.getLength()) return undefined;
    let r: FileRange | undefined;
    try {
      r = this.driver.fileRangeSync(offset, length, holes, lending);
    } catch {
      return undefined;
    }
    if (r) {
      // The read is done as far as blockstats go: counted as tryReadSync counts it.
      this.stats.readOps++;
      this.stats.readBytes += length;
    }
    return r;
  }

  imageIdentity(): string | undefined {
    return this.driver.imageIdentity?.();
  }

  isDataSync(offset: number, length: number): boolean {
    if (this.gate || !this.driver.isDataSync) return false;
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) return false;
    if (offset + length > this.driver.getLength()) return false;
    try {
      return this.driver.isDataSync(offset, length);
    } catch {
      return false;
    }
  }

  isZeroSync(offset: number, length: number): boolean {
    if (this.gate || !this.driver.isZeroSync) return false;
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length <= 0) return false;
    if (offset + length > this.driver.getLength()) return false;
    try {
      return this.driver.isZeroSync(offset, length);
    } catch {
      return false;
    }
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    if (this.gate) await this.gate;
    this.checkRange(offset, buf.length, KIND_READ);
    if (buf.length === 0) return;
    this.enter();
    try {
      await this.driver.read(buf, offset);
      this.stats.readOps++;
      this.stats.readBytes += buf.length;
    } catch (err) {
      this.stats.failedOps++;
      this.stats.failedReadOps++;
      throw toBlockError(err, `read from '${this.owner.name}'`);
    } finally {
      this.leave();
    }
  }

  async write(buf: Buffer, offset: number, flags: WriteFlags = {}): Promise<void> {
    if (this.gate) await this.gate;
    this.checkWritable();
    this.checkRange(offset, buf.length, KIND_WRITE);
    if (buf.length === 0) return;
    const dz = this.owner.options?.detectZeroes;
    if (dz !== undefined && dz !== 'off' && isZeroBuffer(buf)) {
      const mayUnmap = dz === 'unmap' && this.owner.options?.discard === 'unmap';
      return this.writeZeroes(offset, buf.length, { ...flags, mayUnmap });
    }
    if (this.threshold !== 0) this.checkThreshold(offset, buf.length);
    this.noteWriteEnd(offset + buf.length);
    this.enter();
    try {
      if (this.hooks.length) await this.runHooks(offset, buf.length, 'write');
      await this.driver.write(buf, offset, flags);
      if (flags.fua && !this.driver.caps.fua) await this.driver.flush();
      this.wrote(buf.length);
    } catch (err) {
      throw this.writeFailed(err);
    } finally {
      this.leave();
    }
  }

  /** blockstats of a completed write (write() and submitWrite()). */
  private wrote(length: number): void {
    this.stats.writeOps++;
    this.stats.writeBytes += length;
  }

  /** blockstats of a failed write, and its error as write() and submitWrite() report it. */
  private writeFailed(err: unknown): DaemonError {
    this.stats.failedOps++;
    this.stats.failedWriteOps++;
    return toBlockError(err, `write to '${this.owner.name}'`);
  }

  submitWrite(buf: Buffer, offset: number, done: WriteDone): boolean {
    const driver = this.driver;
    // Everything write() does besides the driver call must be absent: hooks (dirty bitmaps,
    // write notifiers), the threshold, detect-zeroes, a resize gate; errors are write()'s.
    if (this.gate || this.hooks.length !== 0 || this.threshold !== 0 || !driver.submitWrite) return false;
    const owner = this.owner;
    if (owner.readOnly) return false;
    const dz = owner.options?.detectZeroes;
    if (dz !== undefined && dz !== 'off') return false;
    const length = buf.length;
    if (length === 0 || !Number.isSafeInteger(offset) || offset < 0 || offset + length > driver.getLength()) {
      return false;
    }
    this.enter();
    let started = false;
    try {
      started = driver.submitWrite(buf, offset, (err) => {
        if (err === undefined) {
          this.wrote(length);
          this.leave();
          done();
          return;
        }
        const e = this.writeFailed(err);
        this.leave();
        done(e);
      });
    } catch {
      started = false;
    }
    if (!started) {
      this.leave();
      return false;
    }
    this.noteWriteEnd(offset + length);
    return true;
  }

  async writeZeroes(offset: number, length: number, flags: ZeroFlags = {}): Promise<void> {
    if (this.gate) await this.gate;
    this.checkWritable();
    this.checkRange(offset, length, KIND_WRITE);
    if (length === 0) return;
    const driver = this.driver;
    if (flags.noFallback && !driver.caps.writeZeroes) {
      throw new BlockError('NOT_SUPPORTED', 'ENOTSUP', `fast zeroing not supported by '${this.owner.name}'`);
    }
    if (this.threshold !== 0) this.checkThreshold(offset, length);
    this.noteWriteEnd(offset + length);
    this.enter();
    try {
      if (this.hooks.length) await this.runHooks(offset, length, 'zero');
      let done = false;
      if (driver.caps.writeZeroes && driver.writeZeroes) {
        try {
          await driver.writeZeroes(offset, length, flags);
          done = true;
        } catch (err) {
          if (!isNotSupported(err) || flags.noFallback) throw err;
        }
      }
      if (!done) {
        // Fallback: bounded chunks of a shared zero buffer, one at a time.
        for (let pos = offset; pos < offset + length; pos += ZERO_CHUNK) {
          const n = Math.min(ZERO_CHUNK, offset + length - pos);
          await driver.write(zeroes(n), pos, {});
        }
      }
      if (flags.fua && !(done && driver.caps.fua)) await driver.flush();
      this.stats.zeroOps++;
      this.stats.zeroBytes += length;
    } catch (err) {
      this.stats.failedOps++;
      this.stats.failedWriteOps++;
      throw toBlockError(err, `write zeroes to '${this.owner.name}'`);
    } finally {
      this.leave();
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    if (this.gate) await this.gate;
    this.checkWritable();
    this.checkRange(offset, length, KIND_DISCARD);
    if (length === 0) return;
    // QEMU's bdrv_co_pdiscard: a node opened with discard=ignore drops the request before
    // anything sees it (no write threshold, no dirty bit, no counter, nothing passed down).
    if (this.owner.options?.discard === 'ignore') return;
    if (this.threshold !== 0) this.checkThreshold(offset, length);
    this.enter();
    try {
      if (this.hooks.length) await this.runHooks(offset, length, 'discard');
      if (this.driver.caps.discard && this.driver.discard) {
        try {
          await this.driver.discard(offset, length);
          this.stats.driverDiscardOk++;
          this.stats.driverDiscardBytesOk += length;
        } catch (err) {
          this.stats.driverDiscardFailed++;
          // Discard is advisory: a driver that cannot do it for this range has done nothing wrong.
          if (!isNotSupported(err)) throw err;
        }
      }
      this.stats.discardOps++;
      this.stats.discardBytes += length;
    } catch (err) {
      this.stats.failedOps++;
      this.stats.failedDiscardOps++;
      throw toBlockError(err, `discard on '${this.owner.name}'`);
    } finally {
      this.leave();
    }
  }

  async flush(): Promise<void> {
    if (this.gate) await this.gate;
    this.enter();
    try {
      await this.driver.flush();
      this.stats.flushOps++;
    } catch (err) {
      this.stats.failedOps++;
      this.stats.failedFlushOps++;
      throw toBlockError(err, `flush of '${this.owner.name}'`);
    } finally {
      this.leave();
    }
  }

  async blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    if (this.gate) await this.gate;
    this.checkRange(offset, length, KIND_STATUS);
    if (length === 0) return [];
    const all: BlockExtent[] = [{ offset, length, flags: EXTENT_DATA | EXTENT_ALLOCATED, depth: 1 }];
    if (!this.driver.caps.blockStatus || !this.driver.blockStatus) return all;
    this.enter();
    try {
      const ext = await this.driver.blockStatus(offset, length);
      return sanitizeExtents(ext, offset, length) ?? all;
    } catch (err) {
      throw toBlockError(err, `block status of '${this.owner.name}'`);
    } finally {
      this.leave();
    }
  }

  /** Resize: waits for in-flight I/O to drain and holds new requests until done. */
  async truncate(size: number): Promise<void> {
    while (this.gate) await this.gate;
    this.checkWritable();
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new BlockError('RANGE', 'EINVAL', `invalid size for '${this.owner.name}'`);
    }
    if (!this.driver.caps.resize || !this.driver.truncate) {
      throw new BlockError('NOT_SUPPORTED', 'ENOTSUP', `Cannot resize '${this.owner.name}'`);
    }
    let open!: () => void;
    this.gate = new Promise<void>((r) => (open = r));
    try {
      if (this.inflight > 0) await new Promise<void>((r) => (this.drained = r));
      await this.driver.truncate(size);
    } catch (err) {
      throw toBlockError(err, `resize of '${this.owner.name}'`);
    } finally {
      this.gate = undefined;
      open();
    }
  }

  /**
   * Run `fn` with no request of this node in flight and new ones held until it ends (reopen
   * closes the driver and opens a new one: see `replaceDriver`).
   */
  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    while (this.gate) await this.gate;
    let open!: () => void;
    this.gate = new Promise<void>((r) => (open = r));
    try {
      if (this.inflight > 0) await new Promise<void>((r) => (this.drained = r));
      return await fn();
    } finally {
      this.gate = undefined;
      open();
    }
  }

  /** Graph-internal, inside `exclusive`: requests from now on go to `driver`. */
  replaceDriver(driver: BlockDriver): void {
    this.driver = driver;
  }
}

/**
 * Make a driver's extent list safe to hand on: contiguous from `offset`, inside the request,
 * non-empty, equal neighbours merged. Returns undefined when nothing usable came back. A list
 * that is already all of that (what the drivers return) is handed on as it is: a whole-image
 * map of a fragmented qcow2 image is thousands of extents, and copying them cost a third of a
 * millisecond per map plus the garbage.
 */
export function sanitizeExtents(ext: BlockExtent[], offset: number, length: number): BlockExtent[] | undefined {
  if (isSaneExtentList(ext, offset, offset + length)) return ext;
  const out: BlockExtent[] = [];
  let pos = offset;
  const end = offset + length;
  for (const e of ext) {
    if (pos >= end) break;
    if (e.offset !== pos || !(e.length > 0)) break;
    const len = Math.min(e.length, end - pos);
    const last = out[out.length - 1];
    if (last && last.flags === e.flags && last.depth === e.depth) last.length += len;
    else out.push({ offset: pos, length: len, flags: e.flags, depth: e.depth });
    pos += len;
  }
  return out.length ? out : undefined;
}

/** Whether `ext` is contiguous from `offset`, ends at or before `end`, non-empty, and has no equal neighbours. */
function isSaneExtentList(ext: readonly BlockExtent[], offset: number, end: number): boolean {
  if (ext.length === 0) return false;
  let pos = offset;
  let prev: BlockExtent | undefined;
  for (const e of ext) {
    if (e.offset !== pos || !(e.length > 0)) return false;
    if (prev !== undefined && prev.flags === e.flags && prev.depth === e.depth) return false;
    pos += e.length;
    prev = e;
  }
  return pos <= end;
}
