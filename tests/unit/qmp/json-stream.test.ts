import { describe, it, expect } from 'vitest';
import {
  JsonStreamParser,
  encodeMessage,
  formatDouble,
  type JsonStreamResult,
} from '../../../src/qmp/json-stream.js';

function parseAll(input: Buffer | string): JsonStreamResult[] {
  return new JsonStreamParser().push(input);
}
const errs = (input: Buffer | string): string[] =>
  parseAll(input).map((r) => (r.ok ? 'OK' : r.error));

const CORPUS = Buffer.concat([
  Buffer.from('{"execute":"qmp_capabilities"}\n  {"execute": "x", "arguments": {"a": [1, 2.5, -0.0, true, null]}, "id": "\\u00e9\\ud83d\\ude00"}'),
  Buffer.from("{'execute':'q\\'s'}[1,]\x01{\"a\":1]}"),
  Buffer.from([0x7b, 0x22, 0x61, 0x22, 0x3a, 0x22, 0xc3, 0xbf, 0x22, 0x7d]),
  Buffer.from('{"x": 01} 123 "s" {"id": 9007199254740993} {"k":tru}  '),
]);

describe('JsonStreamParser', () => {
  it('parses several objects from one chunk', () => {
    const r = parseAll('{"a":1}{"b":2} {"c":3}\n');
    expect(r).toEqual([
      { ok: true, value: { a: 1 } },
      { ok: true, value: { b: 2 } },
      { ok: true, value: { c: 3 } },
    ]);
  });

  it('gives the same results when the input is split at every byte offset', () => {
    const whole = parseAll(CORPUS);
    expect(whole.length).toBeGreaterThan(8);
    for (let cut = 1; cut < CORPUS.length; cut++) {
      const p = new JsonStreamParser();
      const got = [...p.push(CORPUS.subarray(0, cut)), ...p.push(CORPUS.subarray(cut))];
      expect(got).toEqual(whole);
    }
  });

  it('gives the same results when fed one byte at a time', () => {
    const p = new JsonStreamParser();
    const got: JsonStreamResult[] = [];
    for (let i = 0; i < CORPUS.length; i++) got.push(...p.push(CORPUS.subarray(i, i + 1)));
    expect(got).toEqual(parseAll(CORPUS));
  });

  it('accepts single-quoted strings and the \\\' escape', () => {
    expect(parseAll("{'execute':'a\"b\\''}")).toEqual([{ ok: true, value: { execute: 'a"b\'' } }]);
  });

  it('reports QEMU parse error details', () => {
    expect(errs('{"execute":foo}')).toEqual(["JSON parse error, invalid keyword 'foo'"]);
    expect(errs('{"execute":"a\\xb"}')).toEqual(['JSON parse error, invalid escape sequence in string']);
    expect(errs('}')).toEqual(['JSON parse error, expecting value']);
    expect(errs('{"a":1,}')).toEqual(['JSON parse error, expecting value']);
    expect(errs('{"execute" "x"}')).toEqual(['JSON parse error, missing : in object pair']);
    expect(errs('{1:2}')).toEqual(['JSON parse error, key is not a string in object']);
    expect(errs('{"a":1 "b":2}')).toEqual(['JSON parse error, expected separator in dict']);
    expect(errs('[1 2]')).toEqual(['JSON parse error, expected separator in list']);
    expect(errs('"\\ud800"')).toEqual(['JSON parse error, \\ud800 is not a valid Unicode character']);
    expect(errs('"\\u12"')).toEqual(['JSON parse error, \\u12" is not a valid Unicode character']);
    expect(errs(Buffer.from([0x22, 0xc3, 0x22]))).toEqual(['JSON parse error, invalid UTF-8 sequence in string']);
  });

  it('resynchronises after a lexical error like QEMU', () => {
    expect(errs('{"id":01}')).toEqual(["JSON parse error, stray '01'", 'JSON parse error, expecting value']);
    expect(errs('{"id":-}')).toEqual(["JSON parse error, stray '-}'"]);
    expect(errs('\x00{"a":1}')).toEqual(["JSON parse error, stray ''", 'OK']);
    expect(errs(Buffer.from('{"id":"\xff"}', 'latin1'))).toEqual([
      "JSON parse error, stray '\"\uFFFD'",
      'JSON parse error, expecting value',
    ]);
    expect(errs('{"a":1]}')).toEqual([
      'JSON parse error, expected separator in dict',
      'JSON parse error, expecting value',
    ]);
  });

  it('accepts the overlong NUL and rejects noncharacters', () => {
    expect(parseAll(Buffer.from([0x22, 0xc0, 0x80, 0x22]))).toEqual([{ ok: true, value: '\0' }]);
    expect(errs('"\\ufffe"')).toEqual(['JSON parse error, \\ufffe is not a valid Unicode character']);
  });

  it('keeps integers exact up to uint64 and turns larger ones into doubles', () => {
    const r = parseAll('[9007199254740993, 18446744073709551615, 18446744073709551616, -0, 1.5e3]');
    expect(r).toEqual([
      { ok: true, value: [9007199254740993n, 18446744073709551615n, 18446744073709551616, 0, 1500] },
    ]);
  });

  it('refuses nesting deeper than 1024', () => {
    expect(errs('['.repeat(1024) + ']'.repeat(1024))).toEqual(['OK']);
    const r = errs('['.repeat(1025) + ']');
    expect(r[0]).toBe('JSON nesting depth limit exceeded');
  });

  it('stops a token at 64 MiB without holding the whole input', () => {
    const p = new JsonStreamParser();
    const chunk = Buffer.alloc(1024 * 1024, 0x61);
    const out: JsonStreamResult[] = [...p.push('"')];
    for (let i = 0; i < 70; i++) out.push(...p.push(chunk));
    expect(out).toEqual([{ ok: false, error: 'JSON token size limit exceeded' }]);
  });

  it('stops a message at 2 Mi tokens', () => {
    const p = new JsonStreamParser();
    const r = p.push('[' + '1,'.repeat(1024 * 1024 + 10));
    expect(r[0]).toEqual({ ok: false, error: 'JSON token count limit exceeded' });
  });

  it('reports premature EOI at end of input', () => {
    const p = new JsonStreamParser();
    expect(p.push('{"a": 12')).toEqual([]);
    expect(p.end()).toEqual([{ ok: false, error: 'JSON parse error, premature EOI' }]);
    const q = new JsonStreamParser();
    expect([...q.push('12'), ...q.end()]).toEqual([{ ok: true, value: 12 }]);
  });
});

describe('QMP encoder', () => {
  it('uses QEMU spacing and CRLF', () => {
    expect(encodeMessage({ return: {}, id: 1 })).toBe('{"return": {}, "id": 1}\r\n');
    expect(encodeMessage({ a: [1, 'x'], b: [] })).toBe('{"a": [1, "x"], "b": []}\r\n');
  });

  it('writes pure ASCII with uppercase \\u escapes', () => {
    expect(encodeMessage('\u00ff\u20ac\u{1f600}\x7f\x01/\n"\\')).toBe(
      '"\\u00FF\\u20AC\\uD83D\\uDE00\\u007F\\u0001/\\n\\"\\\\"\r\n',
    );
  });

  it('formats doubles like %.17g and bigints exactly', () => {
    expect(formatDouble(0.1)).toBe('0.10000000000000001');
    expect(formatDouble(1.5e-7)).toBe('1.4999999999999999e-07');
    expect(formatDouble(1e20)).toBe('1e+20');
    expect(formatDouble(1.2345678901234568e22)).toBe('1.2345678901234568e+22');
    expect(formatDouble(5e-324)).toBe('4.9406564584124654e-324');
    expect(formatDouble(-0)).toBe('-0');
    expect(formatDouble(Infinity)).toBe('inf');
    expect(formatDouble(123456789012.5)).toBe('123456789012.5');
    expect(encodeMessage([18446744073709551615n, 1500])).toBe('[18446744073709551615, 1500]\r\n');
  });

  it('pretty-prints with 4-space indent and CRLF', () => {
    expect(encodeMessage({ return: {}, id: { a: [], c: [1] } }, true)).toBe(
      '{\r\n    "return": {\r\n    },\r\n    "id": {\r\n        "a": [\r\n        ],\r\n        "c": [\r\n            1\r\n        ]\r\n    }\r\n}\r\n',
    );
  });
});
