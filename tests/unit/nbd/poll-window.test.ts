import { describe, expect, it } from 'vitest';
import { PollWindow, pollWindowMs } from '../../../src/nbd/native-transport.js';

describe('adaptive polling window ceiling (BLOCKD_NBD_POLL_US)', () => {
  it('defaults to 64 µs', () => {
    expect(pollWindowMs(undefined)).toBe(0.064);
    expect(pollWindowMs('')).toBe(0.064);
  });

  it('takes microseconds, capped at one second', () => {
    expect(pollWindowMs('100')).toBe(0.1);
    expect(pollWindowMs('5000000')).toBe(1000);
  });

  it('is off for 0, negative and non-numeric values', () => {
    expect(pollWindowMs('0')).toBe(0);
    expect(pollWindowMs('-5')).toBe(0);
    expect(pollWindowMs('fast')).toBe(0);
  });
});

describe('PollWindow', () => {
  const missAll = (w: PollWindow, gap: number, n: number): void => {
    for (let i = 0; i < n; i++) w.woke(gap);
  };

  it('starts at the ceiling; its floor is an eighth of it', () => {
    const w = new PollWindow(0.064);
    expect(w.ms).toBe(0.064);
    expect(w.minMs).toBe(0.008);
  });

  it('keeps the window for a few gaps a little past the ceiling (a QD1 client in wake-up latency)', () => {
    const w = new PollWindow(0.064);
    missAll(w, 0.1, PollWindow.MISSES - 1);
    expect(w.ms).toBe(0.064);
    // a request caught while polling starts the count again
    w.hit();
    missAll(w, 0.1, PollWindow.MISSES - 1);
    expect(w.ms).toBe(0.064);
    // and so does a gap within the ceiling
    w.woke(0.05);
    missAll(w, 0.2, PollWindow.MISSES - 1);
    expect(w.ms).toBe(0.064);
  });

  it('halves after MISSES such wake-ups in a row (a client slower than the ceiling), down to an eighth', () => {
    const w = new PollWindow(0.064);
    missAll(w, 0.1, PollWindow.MISSES);
    expect(w.ms).toBe(0.032);
    missAll(w, 0.1, PollWindow.MISSES);
    expect(w.ms).toBe(0.016);
    missAll(w, 0.1, 4 * PollWindow.MISSES);
    expect(w.ms).toBe(0.008);
  });

  it('halves at once for a gap over four times the ceiling (a client that sends now and then)', () => {
    const w = new PollWindow(0.064);
    w.woke(1);
    expect(w.ms).toBe(0.032);
    w.woke(0.3);
    expect(w.ms).toBe(0.016);
  });

  it('doubles back, up to the ceiling, when a longer window would have caught the requests', () => {
    const w = new PollWindow(0.064);
    missAll(w, 1, 4);
    expect(w.ms).toBe(0.008);
    w.woke(0.01); // 10 µs: past the 8 µs window, within the ceiling
    expect(w.ms).toBe(0.016);
    w.woke(0.05);
    expect(w.ms).toBe(0.032);
    w.woke(0.04);
    expect(w.ms).toBe(0.064);
    w.woke(0.06);
    expect(w.ms).toBe(0.064);
  });

  it('keeps the window when the gap was within it', () => {
    const w = new PollWindow(0.064);
    w.woke(1);
    w.woke(0.02); // 20 µs against a 32 µs window
    expect(w.ms).toBe(0.032);
  });
});
