/**
 * QEMU's I/O throttling algorithm (util/throttle.c): six leaky buckets (bps and iops, each total,
 * read and write). A bucket's level rises by what a request costs when it is let through and
 * leaks at `avg` units per second; a request may go when every bucket that applies to it is at
 * most "full". Full means `avg / 10` (a tenth of a second of I/O) without a burst rate, or
 * `max * burstLength` with one, in which case a second bucket level leaking at `max` keeps the
 * burst itself at `max` per second (within `max / 10`).
 *
 * The clock is injected (nanoseconds, any origin) so that tests can drive the algorithm without
 * real time. Nothing here queues or sleeps: throttle-group.ts does that.
 */

/** One bucket's settings (units per second: bytes for bps, operations for iops). */
export interface ThrottleBucketLimits {
  avg: number;
  /** Burst rate (0 = none). */
  max: number;
  /** How many seconds a burst at `max` may last (1 = no long burst). */
  burstLength: number;
}

/** The bucket names, in QEMU's order. */
export const THROTTLE_BUCKETS = ['bps-total', 'bps-read', 'bps-write', 'iops-total', 'iops-read', 'iops-write'] as const;
export type ThrottleBucketName = (typeof THROTTLE_BUCKETS)[number];

/** A throttle group's limits (structurally the object registry's checked `ThrottleConfig`). */
export interface ThrottleLimitsConfig {
  buckets: Readonly<Record<ThrottleBucketName, Readonly<ThrottleBucketLimits>>>;
  /** iops-size: a request larger than this costs size / opSize operations (0 = always 1). */
  opSize: number;
}

const NS_PER_SECOND = 1e9;

interface Bucket extends ThrottleBucketLimits {
  level: number;
  burstLevel: number;
}

/** Buckets that apply to a read (total + read) and to a write (total + write), bps then iops. */
const READ_BUCKETS = [0, 1, 3, 4] as const;
const WRITE_BUCKETS = [0, 2, 3, 5] as const;

/** The state of one throttle group: bucket levels and the time of the last leak. */
export class ThrottleState {
  private buckets: Bucket[] = [];
  private opSize = 0;
  private previousLeak: number;

  constructor(
    config: ThrottleLimitsConfig,
    private readonly now: () => number,
  ) {
    this.previousLeak = now();
    this.configure(config);
  }

  /** New limits; levels start empty again (QEMU's throttle_config). */
  configure(config: ThrottleLimitsConfig): void {
    this.buckets = THROTTLE_BUCKETS.map((name) => {
      const b = config.buckets[name];
      return { avg: b.avg, max: b.max, burstLength: b.burstLength, level: 0, burstLevel: 0 };
    });
    this.opSize = config.opSize;
    this.previousLeak = this.now();
  }

  /** Whether any limit applies to reads (`write` false) or writes. */
  enabled(write: boolean): boolean {
    for (const i of write ? WRITE_BUCKETS : READ_BUCKETS) if (this.buckets[i]!.avg > 0) return true;
    return false;
  }

  /**
   * How long (ns) a request of this direction has to wait before it may go; 0 = now. Leaks the
   * buckets up to the current time first.
   */
  waitTime(write: boolean): number {
    this.leak();
    let wait = 0;
    for (const i of write ? WRITE_BUCKETS : READ_BUCKETS) {
      const w = bucketWait(this.buckets[i]!);
      if (w > wait) wait = w;
    }
    return wait;
  }

  /** Charge a request that is let through (QEMU's throttle_account). */
  account(write: boolean, bytes: number): void {
    const units = this.opSize > 0 && bytes > this.opSize ? bytes / this.opSize : 1;
    const [bpsTotal, bpsDir, iopsTotal, iopsDir] = write ? WRITE_BUCKETS : READ_BUCKETS;
    fill(this.buckets[bpsTotal]!, bytes);
    fill(this.buckets[bpsDir]!, bytes);
    fill(this.buckets[iopsTotal]!, units);
    fill(this.buckets[iopsDir]!, units);
  }

  private leak(): void {
    const t = this.now();
    const delta = t - this.previousLeak;
    this.previousLeak = t;
    if (delta <= 0) return;
    for (const b of this.buckets) {
      b.level = Math.max(b.level - (b.avg * delta) / NS_PER_SECOND, 0);
      if (b.burstLength > 1) b.burstLevel = Math.max(b.burstLevel - (b.max * delta) / NS_PER_SECOND, 0);
    }
  }
}

function fill(b: Bucket, amount: number): void {
  b.level += amount;
  if (b.burstLength > 1) b.burstLevel += amount;
}

/** QEMU's throttle_compute_wait for one bucket, in ns. */
export function bucketWait(b: Bucket): number {
  if (!b.avg) return 0;
  let bucketSize: number;
  let burstBucketSize: number;
  if (!b.max) {
    // Without a burst rate, still let a tenth of a second of I/O through at once; otherwise
    // every other request would wait.
    bucketSize = b.avg / 10;
    burstBucketSize = 0;
  } else {
    bucketSize = b.max * b.burstLength;
    burstBucketSize = b.max / 10;
  }
  const extra = b.level - bucketSize;
  if (extra > 0) return (extra * NS_PER_SECOND) / b.avg;
  if (b.burstLength > 1) {
    const burstExtra = b.burstLevel - burstBucketSize;
    if (burstExtra > 0) return (burstExtra * NS_PER_SECOND) / b.max;
  }
  return 0;
}
