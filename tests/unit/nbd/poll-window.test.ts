import { describe, expect, it } from 'vitest';
import { pollWindowMs } from '../../../src/nbd/native-transport.js';

describe('adaptive polling window (BLOCKD_NBD_POLL_US)', () => {
  it('defaults to 32 µs, as QEMU iothreads poll-max-ns', () => {
    expect(pollWindowMs(undefined)).toBe(0.032);
    expect(pollWindowMs('')).toBe(0.032);
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
