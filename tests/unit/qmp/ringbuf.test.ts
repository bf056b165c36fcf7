import { describe, it, expect } from 'vitest';
import { RingBuffer, decodeBase64Lenient, decodeUtf8AsQemu, ringbufSizeValid } from '../../../src/qmp/ringbuf.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/ /g, ''), 'hex');

describe('RingBuffer', () => {
  it('keeps the newest bytes when a write overflows', () => {
    const r = new RingBuffer(8);
    r.write(Buffer.from('abcdefghijkl'));
    expect(r.read(100).toString()).toBe('efghijkl');
  });
  it('drops the oldest bytes across several writes', () => {
    const r = new RingBuffer(4);
    r.write(Buffer.from('ab'));
    r.write(Buffer.from('cd'));
    r.write(Buffer.from('ef'));
    expect(r.count).toBe(4);
    expect(r.read(3).toString()).toBe('cde');
    expect(r.read(3).toString()).toBe('f');
    expect(r.read(3).length).toBe(0);
  });
  it('reads in pieces split at every offset', () => {
    for (let split = 0; split <= 6; split++) {
      const r = new RingBuffer(16);
      r.write(Buffer.from('abc'));
      r.write(Buffer.from('def'));
      expect(r.read(split).toString() + r.read(100).toString()).toBe('abcdef');
    }
  });
  it('keeps nothing with a zero capacity', () => {
    const r = new RingBuffer(0);
    r.write(Buffer.from('abc'));
    expect(r.count).toBe(0);
  });
});

describe('ringbufSizeValid (QEMU: size & (size - 1) as uint64)', () => {
  it('takes powers of two and 0', () => {
    for (const n of [0, 1, 2, 1024, 65536, 2 ** 40]) expect(ringbufSizeValid(n)).toBe(true);
  });
  it('refuses other sizes, -1 included', () => {
    for (const n of [3, 1000, -1, -2]) expect(ringbufSizeValid(n)).toBe(false);
  });
  it('takes -2^63, a power of two as unsigned', () => expect(ringbufSizeValid(-(2n ** 63n))).toBe(true));
});

describe('decodeBase64Lenient (GLib after QEMU character check)', () => {
  it('decodes padded groups', () => expect(decodeBase64Lenient('/w==')).toEqual(Buffer.from([0xff])));
  it('refuses characters outside the alphabet, = and newline', () => {
    expect(() => decodeBase64Lenient('YW Jj')).toThrow('Base64 data contains invalid characters');
    expect(() => decodeBase64Lenient('!!!')).toThrow('Base64 data contains invalid characters');
  });
  it('skips newlines', () => expect(decodeBase64Lenient('YW\nJj').toString()).toBe('abc'));
  it('drops an incomplete last group', () => {
    expect(decodeBase64Lenient('YWJ').length).toBe(0);
    expect(decodeBase64Lenient('YWJjYQ').toString()).toBe('abc');
  });
  it('counts = as a zero digit anywhere', () => {
    expect(decodeBase64Lenient('====')).toEqual(Buffer.from([0]));
    expect(decodeBase64Lenient('a=bc')).toEqual(hex('6806dc'));
  });
  it('ends at a NUL like a C string', () => expect(decodeBase64Lenient('YWJj\0!!').toString()).toBe('abc'));
});

describe('decodeUtf8AsQemu (QEMU JSON writer on raw bytes)', () => {
  it('keeps valid text, astral characters included', () =>
    expect(decodeUtf8AsQemu(Buffer.from('x\u20ac\u{1F600}'))).toBe('x\u20ac\u{1F600}'));
  it('ends at the first zero byte', () => expect(decodeUtf8AsQemu(hex('61 00 62'))).toBe('a'));
  it('makes one U+FFFD of a stray continuation byte or FE/FF', () =>
    expect(decodeUtf8AsQemu(hex('80 ff 61'))).toBe('\ufffd\ufffda'));
  it('makes one U+FFFD of a truncated sequence and keeps what follows', () => {
    expect(decodeUtf8AsQemu(hex('e2 82 61'))).toBe('\ufffda');
    expect(decodeUtf8AsQemu(hex('68 c3'))).toBe('h\ufffd');
  });
  it('refuses overlong forms, surrogates, noncharacters and beyond U+10FFFF', () => {
    expect(decodeUtf8AsQemu(hex('e0 80 80'))).toBe('\ufffd');
    expect(decodeUtf8AsQemu(hex('ed a0 80'))).toBe('\ufffd');
    expect(decodeUtf8AsQemu(hex('ef bf bf'))).toBe('\ufffd');
    expect(decodeUtf8AsQemu(hex('f4 90 80 80'))).toBe('\ufffd');
  });
  it('takes C0 80 as U+0000 (modified UTF-8)', () => expect(decodeUtf8AsQemu(hex('c0 80 61'))).toBe('\u0000a'));
  it('keeps a noncharacter-adjacent code point such as U+EFFF', () =>
    expect(decodeUtf8AsQemu(hex('ee bf bf'))).toBe('\uefff'));
});
