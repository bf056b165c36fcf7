import { describe, expect, it } from 'vitest';
import { EventThrottle, type ThrottleTimers } from '../../../src/util/event-throttle.js';

/** Timers driven by the test: fire() runs what is due at `now`. */
class ManualTimers implements ThrottleTimers {
  now = 0;
  private next = 1;
  private readonly due = new Map<number, { at: number; fn: () => void }>();
  setTimeout(fn: () => void, ms: number): unknown {
    const id = this.next++;
    this.due.set(id, { at: this.now + ms, fn });
    return id;
  }
  clearTimeout(h: unknown): void {
    this.due.delete(h as number);
  }
  advance(ms: number): void {
    this.now += ms;
    for (const [id, t] of [...this.due]) {
      if (t.at <= this.now) {
        this.due.delete(id);
        t.fn();
      }
    }
  }
  get armed(): number {
    return this.due.size;
  }
}

function setup(): { t: EventThrottle<string>; timers: ManualTimers; sent: string[] } {
  const timers = new ManualTimers();
  const sent: string[] = [];
  return { t: new EventThrottle<string>((d) => sent.push(d), 1000, timers), timers, sent };
}

describe('EventThrottle (QEMU monitor event rate limiting)', () => {
  it('sends the first event of a key at once', () => {
    const { t, sent } = setup();
    t.push('a', 'a1');
    expect(sent).toEqual(['a1']);
  });

  it('keeps only the last event of a burst and sends it when the period ends', () => {
    const { t, timers, sent } = setup();
    t.push('a', 'a1');
    t.push('a', 'a2');
    t.push('a', 'a3');
    expect(sent).toEqual(['a1']);
    timers.advance(999);
    expect(sent).toEqual(['a1']);
    timers.advance(1);
    expect(sent).toEqual(['a1', 'a3']);
  });

  it('opens a new period after a delayed event, and closes a period with nothing pending', () => {
    const { t, timers, sent } = setup();
    t.push('a', 'a1');
    t.push('a', 'a2');
    timers.advance(1000);
    t.push('a', 'a3');
    expect(sent).toEqual(['a1', 'a2']);
    timers.advance(1000);
    expect(sent).toEqual(['a1', 'a2', 'a3']);
    timers.advance(1000);
    expect(timers.armed).toBe(0);
    t.push('a', 'a4');
    expect(sent).toEqual(['a1', 'a2', 'a3', 'a4']);
  });

  it('limits each key on its own', () => {
    const { t, sent } = setup();
    t.push('a', 'a1');
    t.push('b', 'b1');
    t.push('a', 'a2');
    expect(sent).toEqual(['a1', 'b1']);
  });

  it('sends a pending event at once on flush and forgets the key', () => {
    const { t, timers, sent } = setup();
    t.push('a', 'a1');
    t.push('a', 'a2');
    t.flush('a');
    expect(sent).toEqual(['a1', 'a2']);
    expect(timers.armed).toBe(0);
    t.push('a', 'a3');
    expect(sent).toEqual(['a1', 'a2', 'a3']);
  });

  it('drops pending events on close', () => {
    const { t, timers, sent } = setup();
    t.push('a', 'a1');
    t.push('a', 'a2');
    t.close();
    timers.advance(5000);
    expect(sent).toEqual(['a1']);
  });
});
