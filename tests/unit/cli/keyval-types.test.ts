import { describe, it, expect } from 'vitest';
import { parseKeyval } from '../../../src/cli/keyval.js';
import {
  keyvalToTyped,
  parseCInteger,
  parseSize,
  parseBool,
} from '../../../src/cli/keyval-types.js';
import { ARGS, NEEDS, deref } from './fixtures/schemas.js';
import type { JsonSchema } from '../../../src/qmp/schema-registry.js';

const conv = (s: string, schema: JsonSchema = ARGS, warn?: (m: string) => void): Record<string, unknown> =>
  keyvalToTyped(parseKeyval(s).tree, schema, { deref, ...(warn ? { warn } : {}) });
const err = (s: string, schema: JsonSchema = ARGS): string => {
  try {
    conv(s, schema);
  } catch (e) {
    return (e as Error).message;
  }
  return 'no error';
};

describe('C integer syntax', () => {
  it('reads decimal', () => expect(parseCInteger('42')).toBe(42n));
  it('reads 0x hex', () => expect(parseCInteger('0x10')).toBe(16n));
  it('reads leading-zero octal', () => expect(parseCInteger('010')).toBe(8n));
  it('skips leading white space', () => expect(parseCInteger(' 7')).toBe(7n));
  it('refuses trailing white space', () => expect(parseCInteger('7 ')).toBeUndefined());
  it('refuses 8 in octal', () => expect(parseCInteger('08')).toBeUndefined());
  it('refuses an empty string', () => expect(parseCInteger('')).toBeUndefined());
  it('reads a negative number', () => expect(parseCInteger('-5')).toBe(-5n));
});

describe('size syntax', () => {
  it('reads a binary k suffix', () => expect(parseSize('4k')).toBe(4096n));
  it('reads an upper-case G suffix', () => expect(parseSize('1G')).toBe(1n << 30n));
  it('reads a fraction with a suffix', () => expect(parseSize('1.5k')).toBe(1536n));
  it('refuses a fraction without a suffix', () => expect(parseSize('0.5')).toBeUndefined());
  it('reads hex without suffix', () => expect(parseSize('0x10')).toBe(16n));
  it('reads a leading zero as decimal', () => expect(parseSize('010')).toBe(10n));
  it('refuses 16E as too large', () => expect(parseSize('16E')).toBeUndefined());
  it('accepts 15E', () => expect(parseSize('15E')).toBe(15n << 60n));
  it('refuses kB', () => expect(parseSize('4kB')).toBeUndefined());
  it('refuses a negative size', () => expect(parseSize('-1')).toBeUndefined());
});

describe('boolean syntax', () => {
  it.each(['on', 'yes', 'true', 'y'])('reads %s as true', (w) => expect(parseBool(w)).toBe(true));
  it.each(['off', 'no', 'false', 'n'])('reads %s as false', (w) => expect(parseBool(w)).toBe(false));
  it('refuses upper case', () => expect(parseBool('ON')).toBeUndefined());
});

describe('keyval type conversion', () => {
  it('keeps strings as strings', () => expect(conv('name=x')).toEqual({ name: 'x' }));
  it('converts integers with base 0', () => expect(conv('count=0x10')).toEqual({ count: 16 }));
  it('converts octal integers', () => expect(conv('count=010')).toEqual({ count: 8 }));
  it('refuses unit suffixes on integers', () =>
    expect(err('count=1M')).toBe("Parameter 'count' expects integer"));
  it('refuses an empty integer', () => expect(err('count=')).toBe("Parameter 'count' expects integer"));
  it('reports a narrow integer out of range with its C type', () =>
    expect(err('small=256')).toBe("Parameter 'small' expects uint8_t"));
  it('reports a negative uint32 as out of range', () =>
    expect(err('port=-1')).toBe("Parameter 'port' expects uint32_t"));
  it('reports an int32 out of range', () => expect(err('i32=2147483648')).toBe("Parameter 'i32' expects int32_t"));
  it('keeps -1 for uint64 (the same bits as QEMU)', () => expect(conv('big=-1')).toEqual({ big: -1 }));
  it('wraps uint64 values above 2^63 to their int64 bits', () =>
    expect(conv('big=18446744073709551615')).toEqual({ big: -1 }));
  it('converts sizes with suffixes', () => expect(conv('len=4k')).toEqual({ len: 4096 }));
  it('refuses a bad size', () => expect(err('len=abc')).toBe("Parameter 'len' expects size"));
  it('converts numbers', () => expect(conv('ratio=1.5')).toEqual({ ratio: 1.5 }));
  it('refuses a bad number', () => expect(err('ratio=x')).toBe("Parameter 'ratio' expects number"));
  it('converts booleans', () => expect(conv('read-only=on')).toEqual({ 'read-only': true }));
  it('refuses a bad boolean', () =>
    expect(err('read-only=ON')).toBe("Parameter 'read-only' expects 'on' or 'off'"));
  it('accepts a listed enum value', () => expect(conv('mode=unmap')).toEqual({ mode: 'unmap' }));
  it('refuses an unlisted enum value', () =>
    expect(err('mode=x')).toBe("Parameter 'mode' does not accept value 'x'"));
  it('picks the string branch of an alternate for a string', () =>
    expect(conv('file=node0')).toEqual({ file: 'node0' }));
  it('picks the object branch of an alternate and its union case', () =>
    expect(conv('file.driver=file,file.filename=/x')).toEqual({ file: { driver: 'file', filename: '/x' } }));
  it('converts union case members', () =>
    expect(conv('file.driver=null-co,file.size=0x100')).toEqual({ file: { driver: 'null-co', size: 256 } }));
  it('refuses a list for an alternate with the alternate name', () =>
    expect(err('file.0=x')).toBe("Invalid parameter type for 'file', expected: ChildRef"));
  it('reports unknown members of a union case with the full path', () =>
    expect(err('file.driver=file,file.filename=a,file.bogus=1')).toBe("Parameter 'file.bogus' is unexpected"));
  it('treats a tag without a case as having no extra members', () =>
    expect(err('file.driver=raw,file.x=1')).toBe("Parameter 'file.x' is unexpected"));
  it('reports a missing nested member with the full path', () =>
    expect(err('addr.type=unix,path=/x')).toBe("Parameter 'addr.path' is missing"));
  it('reports a missing member before a later bad value', () =>
    expect(err('addr.type=unix,addr.tight=maybe')).toBe("Parameter 'addr.path' is missing"));
  it('reports a bad nested boolean with the full path', () =>
    expect(err('addr.type=unix,addr.path=/p,addr.tight=maybe')).toBe(
      "Parameter 'addr.tight' expects 'on' or 'off'",
    ));
  it('names only the member in a nested enum error, like QEMU', () =>
    expect(err('addr.type=bogus')).toBe("Parameter 'type' does not accept value 'bogus'"));
  it('refuses a string for an object', () =>
    expect(err('addr=foo')).toBe("Invalid parameter type for 'addr', expected: object"));
  it('refuses a string for a list', () =>
    expect(err('list=1')).toBe("Invalid parameter type for 'list', expected: array"));
  it('refuses an object for a scalar', () =>
    expect(err('name.x=1')).toBe("Parameters 'name.*' are unexpected"));
  it('converts list items', () => expect(conv('list.0=1,list.1=0x2')).toEqual({ list: [1, 2] }));
  it('reports unexpected top-level members', () => expect(err('bogus=1')).toBe("Parameter 'bogus' is unexpected"));
  it('reports a bad value before an unexpected member', () =>
    expect(err('bogus=1,count=abc')).toBe("Parameter 'count' expects integer"));
  it('reports a missing required member', () => expect(err('b=1', NEEDS)).toBe("Parameter 'a' is missing"));
  it('turns an empty value of an alternate with a null branch into null with a warning', () => {
    const warnings: string[] = [];
    expect(conv('backing=', ARGS, (m) => warnings.push(m))).toEqual({ backing: null });
    expect(warnings).toEqual(['Use of "backing": "" is deprecated; use "backing": null instead']);
  });
  it('reads backing=null as a node name', () => expect(conv('backing=null')).toEqual({ backing: 'null' }));
  it('parses a string for an alternate without a string branch by its scalar branches', () =>
    expect(conv('either=on')).toEqual({ either: true }));
  it('keeps untyped members as they are', () =>
    expect(conv('anything.a=1')).toEqual({ anything: { a: '1' } }));
});
