/**
 * Rate limiting of one QMP event per key, the way QEMU's monitor does it (monitor/monitor.c,
 * `monitor_qapi_event_queue`): the first event of a key goes out at once and opens a window of
 * `periodMs`; events arriving inside the window replace each other, and the last of them goes
 * out when the window ends, which opens the next window. A window that ends with nothing
 * pending closes, so the next event goes out at once again.
 */

/** The timer functions used; injectable for tests. */
export interface ThrottleTimers {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

const NODE_TIMERS: ThrottleTimers = {
  setTimeout: (fn, ms) => {
    const t = setTimeout(fn, ms);
    // A pending event must not keep the process alive at exit.
    t.unref();
    return t;
  },
  clearTimeout: (h) => clearTimeout(h as NodeJS.Timeout),
};

interface Window<T> {
  timer: unknown;
  pending: T | undefined;
}

export class EventThrottle<T> {
  private readonly windows = new Map<string, Window<T>>();

  constructor(
    private readonly send: (data: T) => void,
    private readonly periodMs = 1000,
    private readonly timers: ThrottleTimers = NODE_TIMERS,
  ) {}

  /** Send `data` now, or keep it as the pending event of `key`'s open window. */
  push(key: string, data: T): void {
    const w = this.windows.get(key);
    if (w) {
      w.pending = data;
      return;
    }
    this.send(data);
    this.open(key);
  }

  /** Send `key`'s pending event now (its source is going away) and close its window. */
  flush(key: string): void {
    const w = this.windows.get(key);
    if (!w) return;
    this.timers.clearTimeout(w.timer);
    this.windows.delete(key);
    if (w.pending !== undefined) this.send(w.pending);
  }

  /** Drop every window and pending event (shutdown). */
  close(): void {
    for (const w of this.windows.values()) this.timers.clearTimeout(w.timer);
    this.windows.clear();
  }

  private open(key: string): void {
    const w: Window<T> = { timer: undefined, pending: undefined };
    w.timer = this.timers.setTimeout(() => this.expire(key, w), this.periodMs);
    this.windows.set(key, w);
  }

  private expire(key: string, w: Window<T>): void {
    if (this.windows.get(key) !== w) return;
    this.windows.delete(key);
    const data = w.pending;
    if (data === undefined) return;
    this.send(data);
    this.open(key);
  }
}
