import { describe, expect, it } from 'vitest';
import { ThrottleState, THROTTLE_BUCKETS, bucketWait, type ThrottleLimitsConfig } from '../../../src/block/throttle.js';
import { ThrottleGroups, type ThrottleClock } from '../../../src/block/throttle-group.js';

type Limits = Partial<Record<(typeof THROTTLE_BUCKETS)[number], { avg: number; max?: number; burstLength?: number }>>;

function config(limits: Limits, opSize = 0): ThrottleLimitsConfig {
  const buckets = {} as Record<(typeof THROTTLE_BUCKETS)[number], { avg: number; max: number; burstLength: number }>;
  for (const b of THROTTLE_BUCKETS) {
    const l = limits[b];
    buckets[b] = { avg: l?.avg ?? 0, max: l?.max ?? 0, burstLength: l?.burstLength ?? 1 };
  }
  return { buckets, opSize };
}

const SEC = 1e9;

/** Virtual time: timers run in time order, each followed by the microtasks it caused. */
class FakeClock implements ThrottleClock {
  t = 0;
  private seq = 0;
  private readonly timers = new Map<number, { at: number; fn: () => void }>();
  now(): number {
    return this.t;
  }
  setTimer(fn: () => void, ms: number): unknown {
    const id = ++this.seq;
    this.timers.set(id, { at: this.t + ms * 1e6, fn });
    return id;
  }
  clearTimer(h: unknown): void {
    this.timers.delete(h as number);
  }
  async runUntil(end: number): Promise<void> {
    for (;;) {
      await settle();
      let next: [number, { at: number; fn: () => void }] | undefined;
      for (const e of this.timers) if (!next || e[1].at < next[1].at) next = e;
      if (!next || next[1].at > end) break;
      this.timers.delete(next[0]);
      this.t = next[1].at;
      next[1].fn();
    }
    this.t = end;
  }
}

async function settle(): Promise<void> {
  for (let i = 0; i < 20; i++) await Promise.resolve();
}

function groupWith(limits: Limits, opSize = 0) {
  const clock = new FakeClock();
  const groups = new ThrottleGroups(clock);
  groups.limitsOf = (id) => (id === 'g' ? config(limits, opSize) : undefined);
  return { clock, groups, group: groups.acquire('g') };
}

/**
 * `clients` closed-loop clients doing `bytes`-sized requests for `seconds` of virtual time;
 * returns the completion times (ns). Use a group once: clients still queued at the end stay.
 */
async function drive(
  clock: FakeClock,
  group: ReturnType<ThrottleGroups['acquire']>,
  opts: { write: boolean; bytes: number; clients: number; seconds: number },
): Promise<number[]> {
  const end = clock.t + opts.seconds * SEC;
  const times: number[] = [];
  let stop = false;
  for (let i = 0; i < opts.clients; i++) {
    void (async () => {
      while (!stop) {
        const p = group.intercept(opts.write, opts.bytes);
        if (p) await p;
        if (stop) break;
        times.push(clock.t);
        await Promise.resolve();
      }
    })();
  }
  await clock.runUntil(end);
  stop = true;
  return times;
}

const between = (times: number[], from: number, to: number): number =>
  times.filter((t) => t >= from * SEC && t < to * SEC).length;

describe('throttle buckets (QEMU leaky bucket)', () => {
  it('lets a tenth of a second of I/O through at once without a burst rate, then waits for the excess', () => {
    const clock = { t: 0 };
    const s = new ThrottleState(config({ 'iops-total': { avg: 100 } }), () => clock.t);
    for (let i = 0; i < 11; i++) {
      expect(s.waitTime(false)).toBe(0);
      s.account(false, 4096);
    }
    // Level 11, bucket 10: one operation too many at 100/s is 10 ms.
    expect(s.waitTime(false)).toBeCloseTo(10e6, 3);
    clock.t = 10e6;
    expect(s.waitTime(false)).toBe(0);
  });

  it('counts a request larger than iops-size as several operations', () => {
    const clock = { t: 0 };
    const s = new ThrottleState(config({ 'iops-total': { avg: 10 } }, 4096), () => clock.t);
    s.account(true, 4096 * 5);
    // Level 5, bucket 1: 4 operations of excess at 10/s.
    expect(s.waitTime(true)).toBeCloseTo(0.4 * SEC, 3);
  });

  it('checks only the buckets of the request direction', () => {
    const s = new ThrottleState(config({ 'bps-write': { avg: 1000 } }), () => 0);
    s.account(true, 10_000);
    expect(s.waitTime(true)).toBeGreaterThan(0);
    expect(s.waitTime(false)).toBe(0);
    expect(s.enabled(false)).toBe(false);
    expect(s.enabled(true)).toBe(true);
  });

  it('holds a burst to max per second within its burst bucket', () => {
    const b = { avg: 100, max: 1000, burstLength: 2, level: 0, burstLevel: 150 };
    // Burst bucket max/10 = 100: 50 units of excess at 1000/s.
    expect(bucketWait(b)).toBeCloseTo(50e6, 3);
    // Main bucket max*burstLength = 2000: full at 2100, 100 units of excess at avg.
    expect(bucketWait({ ...b, level: 2100, burstLevel: 0 })).toBeCloseTo(1 * SEC, 3);
  });
});

describe('throttle group', () => {
  it('holds iops to the limit over ten virtual seconds', async () => {
    const { clock, group } = groupWith({ 'iops-total': { avg: 200 } });
    const done = (await drive(clock, group, { write: false, bytes: 4096, clients: 8, seconds: 10 })).length;
    // 200/s for 10 s, plus the initial tenth of a second.
    expect(done).toBeGreaterThanOrEqual(2000);
    expect(done).toBeLessThanOrEqual(2000 * 1.02 + 21);
  });

  it('holds iops whose interval is not a whole number of milliseconds', async () => {
    const { clock, group } = groupWith({ 'iops-total': { avg: 300 } });
    const times = await drive(clock, group, { write: false, bytes: 4096, clients: 4, seconds: 10 });
    expect(between(times, 1, 10)).toBeGreaterThanOrEqual(9 * 300 * 0.99);
    expect(between(times, 1, 10)).toBeLessThanOrEqual(9 * 300 * 1.01);
  });

  it('holds bps to the limit for large writes', async () => {
    const { clock, group } = groupWith({ 'bps-write': { avg: 10 * 1024 * 1024 } });
    const done = (await drive(clock, group, { write: true, bytes: 256 * 1024, clients: 4, seconds: 10 })).length;
    const rate = (done * 256 * 1024) / 10;
    expect(rate / (10 * 1024 * 1024)).toBeGreaterThan(0.98);
    expect(rate / (10 * 1024 * 1024)).toBeLessThan(1.03);
  });

  it('allows a burst at max for burst-length seconds, then avg', async () => {
    const { clock, group } = groupWith({ 'iops-total': { avg: 100, max: 1000, burstLength: 2 } });
    const times = await drive(clock, group, { write: false, bytes: 512, clients: 8, seconds: 10 });
    // At most max per second (within the burst bucket, max / 10) while bursting.
    expect(between(times, 0, 1)).toBeGreaterThan(900);
    expect(between(times, 0, 1)).toBeLessThanOrEqual(1000 + 100 + 1);
    expect(between(times, 1, 2)).toBeGreaterThan(900);
    expect(between(times, 1, 2)).toBeLessThanOrEqual(1000 + 1);
    // The main bucket (max * burst-length = 2000) fills at max - avg per second, so the burst
    // ends a little after 2 s; from then on avg holds.
    expect(times.length).toBeLessThanOrEqual(2000 + 100 + 10 * 100 + 1);
    expect(between(times, 4, 10)).toBeGreaterThanOrEqual(6 * 100 - 1);
    expect(between(times, 4, 10)).toBeLessThanOrEqual(6 * 100 + 1);
  });

  it('shares the limit between every node of the group', async () => {
    const { clock, groups, group } = groupWith({ 'iops-total': { avg: 100 } });
    const other = groups.acquire('g');
    expect(other).toBe(group);
    const [a, b] = (
      await Promise.all([
        drive(clock, group, { write: false, bytes: 512, clients: 2, seconds: 10 }),
        drive(clock, other, { write: true, bytes: 512, clients: 2, seconds: 10 }),
      ])
    ).map((t) => t.length) as [number, number];
    expect(a + b).toBeLessThanOrEqual(1000 * 1.02 + 11);
    expect(a + b).toBeGreaterThanOrEqual(1000);
    // Reads and writes wait for the same total bucket: neither starves.
    expect(Math.min(a, b)).toBeGreaterThan(400);
  });

  it('keeps reads flowing while writes wait for a write limit', async () => {
    const { clock, group } = groupWith({ 'iops-write': { avg: 1 } });
    group.intercept(true, 512);
    group.intercept(true, 512);
    const waiting = group.intercept(true, 512);
    expect(waiting).toBeInstanceOf(Promise);
    expect(group.intercept(false, 512)).toBeUndefined();
    expect(group.queued).toEqual({ reads: 0, writes: 2 });
    await clock.runUntil(3 * SEC);
    expect(group.queued.writes).toBe(0);
  });

  it('re-examines waiting requests when the limits change', async () => {
    const { clock, group } = groupWith({ 'iops-total': { avg: 1 } });
    group.intercept(false, 1);
    group.intercept(false, 1);
    let released = false;
    void group.intercept(false, 1)?.then(() => (released = true));
    await settle();
    expect(released).toBe(false);
    group.configure(config({ 'iops-total': { avg: 1000 } }));
    await settle();
    expect(released).toBe(true);
    expect(clock.t).toBe(0);
  });

  it('lets every waiting request go on drain and throttles nothing until the drain ends', async () => {
    const { clock, group } = groupWith({ 'iops-total': { avg: 1 } });
    group.intercept(false, 1);
    let released = 0;
    for (let i = 0; i < 3; i++) void group.intercept(i % 2 === 0, 1)?.then(() => released++);
    group.beginDrain();
    await settle();
    expect(released).toBe(3);
    expect(group.intercept(false, 1)).toBeUndefined();
    group.endDrain();
    expect(group.intercept(false, 1)).toBeInstanceOf(Promise);
    expect(clock.t).toBe(0);
  });

  it('forgets a group when its last node leaves and refuses unknown ones', () => {
    const { groups, group } = groupWith({ 'iops-total': { avg: 1 } });
    expect(groups.inUse('g')).toBe(true);
    groups.release(group);
    expect(groups.inUse('g')).toBe(false);
    expect(() => groups.acquire('nope')).toThrow("Throttle group 'nope' does not exist");
  });
});
