import { describe, it, expect } from 'vitest';
import { parseJsonArgument } from '../../../src/cli/json-arg.js';

const err = (s: string): string => {
  try {
    parseJsonArgument(s);
  } catch (e) {
    return (e as Error).message;
  }
  return 'no error';
};

describe('JSON option arguments', () => {
  it('parses an object with real JSON types', () =>
    expect(parseJsonArgument('{"a":1,"b":true,"c":null,"d":[1,"x"],"e":{"f":-1.5}}')).toEqual({
      a: 1, b: true, c: null, d: [1, 'x'], e: { f: -1.5 },
    }));
  it('accepts single-quoted strings', () =>
    expect(parseJsonArgument("{'driver':'null-co','x':'say \"hi\"'}")).toEqual({ driver: 'null-co', x: 'say "hi"' }));
  it('accepts \\u escapes including surrogate pairs', () =>
    expect(parseJsonArgument('{"a":"\\u0041\\ud83d\\ude00"}')).toEqual({ a: 'A\u{1F600}' }));
  it('accepts an escaped single quote', () => expect(parseJsonArgument("{'a':'it\\'s'}")).toEqual({ a: "it's" }));
  it('reports premature end of input', () => expect(err('{"a":1')).toBe('JSON parse error, premature EOI'));
  it('reports an unterminated object after a key', () => expect(err('{"a"')).toBe('JSON parse error, premature EOI'));
  it('reports a trailing comma as expecting value', () =>
    expect(err('{"driver":"null-co",}')).toBe('JSON parse error, expecting value'));
  it('reports a missing value', () => expect(err('{"a":}')).toBe('JSON parse error, expecting value'));
  it('reports a missing colon', () => expect(err('{"a" 1}')).toBe('JSON parse error, missing : in object pair'));
  it('reports a missing comma in a dict', () =>
    expect(err('{"a":1 "b":2}')).toBe('JSON parse error, expected separator in dict'));
  it('reports a missing comma in a list', () =>
    expect(err('{"a":[1 2]}')).toBe('JSON parse error, expected separator in list'));
  it('reports an invalid keyword', () => expect(err('{"a":tru}')).toBe("JSON parse error, invalid keyword 'tru'"));
  it('reports a bare word key as an invalid keyword', () => expect(err('{a:1}')).toBe("JSON parse error, invalid keyword 'a'"));
  it('reports a non-string key', () => expect(err('{1:2}')).toBe('JSON parse error, key is not a string in object'));
  it('reports a duplicate key', () => expect(err('{"a":1,"a":2}')).toBe('JSON parse error, duplicate key'));
  it('reports an invalid escape', () =>
    expect(err('{"a":"\\x"}')).toBe('JSON parse error, invalid escape sequence in string'));
  it('reports a lone surrogate', () =>
    expect(err('{"a":"\\ud800"}')).toBe('JSON parse error, \\ud800 is not a valid Unicode character'));
  it('reports a leading-zero number as stray', () => expect(err('{"a":01}')).toBe("JSON parse error, stray '01'"));
  it('reports an unterminated string as stray', () => expect(err('{"a":"b')).toBe("JSON parse error, stray '\"b'"));
  it('refuses text after the object', () => expect(err('{"a":1} x')).toBe('Expecting at most one JSON value'));
  it('refuses a second object', () => expect(err('{}{}')).toBe('Expecting at most one JSON value'));
  it('does not let __proto__ keys change the prototype', () => {
    const o = parseJsonArgument('{"__proto__":{"polluted":1}}');
    expect(Object.getPrototypeOf(o)).toBe(Object.prototype);
    expect(Object.keys(o)).toEqual(['__proto__']);
  });
});

describe('JSON numbers', () => {
  it('reports a dangling minus with the next character', () => expect(err('{"a":-}')).toBe("JSON parse error, stray '-}'"));
  it('reports an incomplete exponent with the next character', () =>
    expect(err('{"a":-1.5e}')).toBe("JSON parse error, stray '-1.5e}'"));
  it('reads exponents', () => expect(parseJsonArgument('{"a":1e3}')).toEqual({ a: 1000 }));
});
