/**
 * Throttle groups (QEMU's block/throttle-groups.c, simplified): every `throttle` node naming a
 * group shares its ThrottleState, so the limits hold for the sum of their I/O. Reads and writes
 * queue separately, first come first served across all member nodes (QEMU round-robins between
 * members; with one FIFO per direction the order is arrival order, which is as fair).
 *
 * A request goes at once, without allocating anything, when nothing of its direction is queued
 * and the buckets allow it; otherwise it waits in the queue and a timer lets the head through as
 * soon as the buckets have leaked enough.
 *
 * The limits come from the object registry (qmp/objects.ts) through `limitsOf`, since this layer
 * may not import qmp; `update` applies a later change of them.
 */
import { BlockError } from '../util/errors.js';
import { ThrottleState, type ThrottleLimitsConfig } from './throttle.js';

/** Clock (ns) and timers, injectable for tests. */
export interface ThrottleClock {
  now(): number;
  setTimer(fn: () => void, ms: number): unknown;
  clearTimer(handle: unknown): void;
}

const REAL_CLOCK: ThrottleClock = {
  now: () => performance.now() * 1e6,
  setTimer: (fn, ms) => {
    const t = setTimeout(fn, ms);
    // Queued requests keep their clients waiting, not the process alive.
    t.unref();
    return t;
  },
  clearTimer: (h) => clearTimeout(h as ReturnType<typeof setTimeout>),
};

interface Waiter {
  bytes: number;
  resolve: () => void;
}

/** One group: shared buckets, one queue and one timer per direction. */
export class ThrottleGroup {
  private readonly state: ThrottleState;
  /** [reads, writes]. */
  private readonly queues: [Waiter[], Waiter[]] = [[], []];
  private readonly timers: [unknown, unknown] = [undefined, undefined];
  /** Member nodes. */
  users = 0;
  /** While > 0 the limits are off (QEMU: io_limits_disabled while a member is drained). */
  private drains = 0;

  constructor(
    readonly name: string,
    config: ThrottleLimitsConfig,
    private readonly clock: ThrottleClock,
  ) {
    this.state = new ThrottleState(config, () => clock.now());
  }

  /** Requests waiting now (reads, writes). */
  get queued(): { reads: number; writes: number } {
    return { reads: this.queues[0].length, writes: this.queues[1].length };
  }

  /**
   * Let a request of `bytes` through: undefined when it may go now (it is accounted), otherwise
   * a promise that resolves when it may.
   */
  intercept(write: boolean, bytes: number): Promise<void> | undefined {
    const dir = write ? 1 : 0;
    if (this.drains > 0 || (this.queues[dir].length === 0 && this.state.waitTime(write) === 0)) {
      this.state.account(write, bytes);
      return undefined;
    }
    return new Promise<void>((resolve) => {
      this.queues[dir].push({ bytes, resolve });
      this.release(dir);
    });
  }

  /**
   * Drain (QEMU's throttle_co_drain_begin): every waiting request goes now and new ones pass
   * unthrottled (still accounted) until the matching `endDrain`. Used while an export's clients
   * are cut off, so that removing an export or shutting down does not wait for the limits.
   */
  beginDrain(): void {
    if (this.drains++ > 0) return;
    for (const dir of [0, 1] as const) {
      if (this.timers[dir] !== undefined) {
        this.clock.clearTimer(this.timers[dir]);
        this.timers[dir] = undefined;
      }
      const q = this.queues[dir];
      for (const w of q.splice(0)) {
        this.state.account(dir === 1, w.bytes);
        w.resolve();
      }
    }
  }

  endDrain(): void {
    if (this.drains > 0) this.drains--;
  }

  /** New limits: levels start over, waiting requests are re-examined. */
  configure(config: ThrottleLimitsConfig): void {
    this.state.configure(config);
    for (const dir of [0, 1] as const) {
      if (this.timers[dir] !== undefined) {
        this.clock.clearTimer(this.timers[dir]);
        this.timers[dir] = undefined;
      }
      this.release(dir);
    }
  }

  /**
   * Let queued requests of one direction go while the buckets allow; arm the timer for the rest.
   * When the timer fires, the head goes without a new check (as in QEMU, whose timer wakes the
   * request): reads and writes sharing a total limit wait for the same moment, and checking again
   * would let whichever timer runs first starve the other direction. The overshoot is accounted,
   * so the next wait is longer by as much.
   */
  private release(dir: 0 | 1, timerFired = false): void {
    if (this.timers[dir] !== undefined) return;
    const write = dir === 1;
    const q = this.queues[dir];
    let free = timerFired;
    while (q.length > 0) {
      const wait = free ? 0 : this.state.waitTime(write);
      free = false;
      if (wait > 0) {
        this.timers[dir] = this.clock.setTimer(
          () => {
            this.timers[dir] = undefined;
            this.release(dir, true);
          },
          // Whole milliseconds, rounded up from whole microseconds (no 10.000001 ms = 11 ms).
          Math.max(1, Math.ceil(Math.round(wait / 1e3) / 1e3)),
        );
        return;
      }
      const w = q.shift()!;
      this.state.account(write, w.bytes);
      w.resolve();
    }
  }
}

/** The groups of one graph, by object id. */
export class ThrottleGroups {
  /** The checked limits of the throttle-group object `id` (none: no such object). */
  limitsOf: ((id: string) => ThrottleLimitsConfig | undefined) | undefined;
  private readonly groups = new Map<string, ThrottleGroup>();

  constructor(private readonly clock: ThrottleClock = REAL_CLOCK) {}

  /** A throttle node joins group `id` (QEMU: `Throttle group 'X' does not exist`). */
  acquire(id: string): ThrottleGroup {
    let g = this.groups.get(id);
    if (!g) {
      const cfg = this.limitsOf?.(id);
      if (!cfg) throw new BlockError('NOT_FOUND', 'ENOENT', `Throttle group '${id}' does not exist`);
      g = new ThrottleGroup(id, cfg, this.clock);
      this.groups.set(id, g);
    }
    g.users++;
    return g;
  }

  /** A throttle node leaves its group. */
  release(group: ThrottleGroup): void {
    if (--group.users <= 0 && this.groups.get(group.name) === group) this.groups.delete(group.name);
  }

  /** Whether a throttle node uses group `id` (object-del refuses then). */
  inUse(id: string): boolean {
    return (this.groups.get(id)?.users ?? 0) > 0;
  }

  /** The limits of `id` changed (qom-set limits). */
  update(id: string, config: ThrottleLimitsConfig): void {
    this.groups.get(id)?.configure(config);
  }
}
