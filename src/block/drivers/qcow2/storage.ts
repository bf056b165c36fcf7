/**
 * The qcow2 driver's view of its `file` child: reads past EOF return zeroes (images need not end
 * on a cluster boundary), writes past EOF grow the file first (in chunks, because a resize drains
 * the child's in-flight I/O), and a small async mutex used for metadata updates.
 */
import type { BlockIO, WriteDone } from '../../types.js';

/** A FIFO async mutex. */
export class Mutex {
  private tail: Promise<void> = Promise.resolve();
  private held = 0;

  get locked(): boolean {
    return this.held > 0;
  }

  async run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.tail;
    let release!: () => void;
    this.tail = new Promise<void>((r) => (release = r));
    this.held++;
    try {
      await prev;
      return await fn();
    } finally {
      this.held--;
      release();
    }
  }
}

/** Per-key serialisation (allocating writes to one guest cluster). */
export class KeyedLocks {
  private readonly tails = new Map<number, Promise<void>>();

  async run<T>(key: number, fn: () => Promise<T>): Promise<T> {
    const prev = this.tails.get(key);
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    this.tails.set(key, mine);
    try {
      if (prev) await prev;
      return await fn();
    } finally {
      if (this.tails.get(key) === mine) this.tails.delete(key);
      release();
    }
  }
}

export class Storage {
  private growing: Promise<void> | undefined;
  /**
   * Every byte at or past this offset lies past the file's end at open and was never written
   * by us (file growth is sparse), so it reads as zeroes: a new cluster there needs no zero
   * fill around partial data. Only ever moves up (except on shrink), so it is conservative.
   */
  private zeroFrom: number;
  /**
   * Reads and writes in flight per epoch (0/1). ioBarrier() flips the epoch and waits until the
   * old one has drained: every read and write issued before the barrier has then completed. The
   * counters are kept from the request's own promise (one reaction, bound callbacks, no closure).
   */
  private inflight0 = 0;
  private inflight1 = 0;
  private epoch = 0;
  private drainedOld: (() => void) | undefined;
  private barrierTail: Promise<void> = Promise.resolve();
  private readonly settle0 = (): void => {
    if (--this.inflight0 === 0 && this.epoch === 1) this.wakeBarrier();
  };
  private readonly settle1 = (): void => {
    if (--this.inflight1 === 0 && this.epoch === 0) this.wakeBarrier();
  };

  constructor(
    private readonly io: () => BlockIO,
    private readonly clusterSize: number,
  ) {
    this.zeroFrom = io().size();
  }

  /**
   * Claim `[offset, offset+length)` for new content: true when it still reads as zeroes
   * (nothing was written there), false when it may hold old data. Either way later writes
   * there do not count as new (the caller owns the range now).
   */
  claimZero(offset: number, length: number): boolean {
    const fresh = offset >= this.zeroFrom;
    if (offset + length > this.zeroFrom) this.zeroFrom = offset + length;
    return fresh;
  }

  size(): number {
    return this.io().size();
  }

  /** Read; the part past EOF reads as zeroes. */
  read(buf: Buffer, offset: number): Promise<void> {
    const size = this.io().size();
    const n = Math.max(0, Math.min(buf.length, size - offset));
    if (n < buf.length) buf.fill(0, n);
    if (n <= 0) return Promise.resolve();
    return this.track(this.io().read(n === buf.length ? buf : buf.subarray(0, n), offset));
  }

  /** Write, growing the file first when the range ends past EOF. */
  write(buf: Buffer, offset: number): Promise<void> {
    const end = offset + buf.length;
    if (end > this.zeroFrom) this.zeroFrom = end;
    const io = this.io();
    return this.track(
      this.growing === undefined && io.size() >= end
        ? io.write(buf, offset)
        : this.ensureSize(end).then(() => this.io().write(buf, offset)),
    );
  }

  /**
   * write()'s callback form (BlockIO.submitWrite), for a range inside the file as it is now:
   * false (nothing done) while the file grows, past its end, or when the file node refuses.
   * The write counts in the current epoch until `done` is called, as write()'s promise does.
   */
  submitWrite(buf: Buffer, offset: number, done: WriteDone): boolean {
    const end = offset + buf.length;
    const io = this.io();
    if (this.growing !== undefined || io.size() < end || !io.submitWrite) return false;
    const settle = this.enterEpoch();
    const ok = io.submitWrite(buf, offset, (err) => {
      settle();
      done(err);
    });
    if (!ok) {
      // Refused synchronously: the epoch cannot have changed, so this only undoes the count.
      settle();
      return false;
    }
    if (end > this.zeroFrom) this.zeroFrom = end;
    return true;
  }

  /** Count one request in the current epoch; the function to call once it has settled. */
  private enterEpoch(): () => void {
    if (this.epoch === 0) {
      this.inflight0++;
      return this.settle0;
    }
    this.inflight1++;
    return this.settle1;
  }

  /** Count `p` in the current epoch until it settles (see ioBarrier). */
  private track(p: Promise<void>): Promise<void> {
    const settle = this.enterEpoch();
    p.then(settle, settle);
    return p;
  }

  /**
   * Resolves once every read and write issued before the call has completed (successfully or
   * not). The qcow2 driver waits for this before it lowers refcounts, so that an overwrite still
   * in flight to a host cluster whose mapping was just dropped cannot land after the cluster has
   * been handed to someone else, and a read still in flight there cannot return the next owner's
   * data. (Reads served synchronously from the page cache never overlap a refcount change.)
   */
  ioBarrier(): Promise<void> {
    const p = this.barrierTail.then(() => this.flipEpoch());
    this.barrierTail = p;
    return p;
  }

  private flipEpoch(): Promise<void> | undefined {
    const old = this.epoch;
    this.epoch = old ^ 1;
    if ((old === 0 ? this.inflight0 : this.inflight1) === 0) return undefined;
    return new Promise<void>((r) => (this.drainedOld = r));
  }

  private wakeBarrier(): void {
    const w = this.drainedOld;
    if (w) {
      this.drainedOld = undefined;
      w();
    }
  }

  /** Make the file at least `end` bytes long (sparse growth in chunks). */
  async ensureSize(end: number): Promise<void> {
    while (this.io().size() < end) {
      if (this.growing) {
        await this.growing;
        continue;
      }
      const cur = this.io().size();
      const chunk = Math.min(64 << 20, Math.max(1 << 20, Math.floor(cur / 8)));
      const target = Math.ceil((Math.max(end, cur + chunk)) / this.clusterSize) * this.clusterSize;
      this.growing = this.io().truncate(target);
      try {
        await this.growing;
      } finally {
        this.growing = undefined;
      }
    }
  }

  /** Set the exact file length (shrinking the unused tail on close). */
  async truncate(size: number): Promise<void> {
    await this.io().truncate(size);
    if (size < this.zeroFrom) this.zeroFrom = size;
  }

  flush(): Promise<void> {
    return this.io().flush();
  }

  async discard(offset: number, length: number): Promise<void> {
    const size = this.io().size();
    const n = Math.min(length, size - offset);
    if (n > 0) await this.io().discard(offset, n);
  }
}
