import { describe, it, expect } from 'vitest';
import { parseKeyval } from '../../../src/cli/keyval.js';

const tree = (s: string, implied?: string): unknown => parseKeyval(s, implied).tree;
const err = (s: string, implied?: string): string => {
  try {
    parseKeyval(s, implied);
  } catch (e) {
    return (e as Error).message;
  }
  return 'no error';
};

describe('keyval parser', () => {
  it('parses flat key=value pairs into strings', () => {
    expect(tree('driver=file,filename=/x')).toEqual({ driver: 'file', filename: '/x' });
  });
  it('assigns a bare first element to the implied key', () => {
    expect(tree('null-co,node-name=n', 'driver')).toEqual({ driver: 'null-co', 'node-name': 'n' });
  });
  it('accepts the explicit form of the implied key', () => {
    expect(tree('driver=null-co', 'driver')).toEqual({ driver: 'null-co' });
  });
  it('builds nested objects from dotted keys', () => {
    expect(tree('file.driver=file,file.filename=x')).toEqual({ file: { driver: 'file', filename: 'x' } });
  });
  it('builds arrays from digit fragments', () => {
    expect(tree('bitmaps.0=b1,bitmaps.1=b2')).toEqual({ bitmaps: ['b1', 'b2'] });
  });
  it('builds arrays of objects', () => {
    expect(tree('bitmaps.0.node=n,bitmaps.0.name=b')).toEqual({ bitmaps: [{ node: 'n', name: 'b' }] });
  });
  it('accepts list indexes in any order', () => {
    expect(tree('a.1=y,a.0=x')).toEqual({ a: ['x', 'y'] });
  });
  it('turns ,, into a literal comma in values', () => {
    expect(tree('filename=DIR/we,,ird.qcow2')).toEqual({ filename: 'DIR/we,ird.qcow2' });
  });
  it('keeps = inside a value', () => {
    expect(tree('identity=CN=client')).toEqual({ identity: 'CN=client' });
  });
  it('allows a trailing comma', () => {
    expect(tree('a=1,')).toEqual({ a: '1' });
  });
  it('lets the last value of a repeated key win', () => {
    expect(tree('name=x,name=y')).toEqual({ name: 'y' });
  });
  it('gives an empty string for an empty value', () => {
    expect(tree('backing=')).toEqual({ backing: '' });
  });
  it('parses an empty string as an empty object', () => {
    expect(tree('')).toEqual({});
  });
  it('accepts a downstream __RFQDN_ prefix', () => {
    expect(tree('__com.redhat_x=1')).toEqual({ '__com.redhat_x': '1' });
  });
  it('reports a bare help element', () => {
    expect(parseKeyval('secret,help', 'qom-type')).toEqual({ tree: { 'qom-type': 'secret' }, help: true });
  });
  it('reports ? as help', () => {
    expect(parseKeyval('?', 'qom-type').help).toBe(true);
  });
  it('refuses an escaped comma right after the implied value', () => {
    expect(err('null-co,,node-name=n', 'driver')).toBe("Invalid parameter ''");
  });
  it('refuses an empty key', () => {
    expect(err('null-co,=x', 'driver')).toBe("Invalid parameter ''");
  });
  it("refuses a bare element that is not first with Expected '='", () => {
    expect(err('null-co,node-name', 'driver')).toBe("Expected '=' after parameter 'node-name'");
  });
  it('refuses a bare first element without an implied key', () => {
    expect(err('addr')).toBe("Expected '=' after parameter 'addr'");
  });
  it('refuses a digit first fragment', () => {
    expect(err('0=1')).toBe("Invalid parameter '0'");
  });
  it('refuses an empty fragment between dots', () => {
    expect(err('a..b=1')).toBe("Invalid parameter 'a..b'");
  });
  it('refuses a trailing dot', () => {
    expect(err('a.=1')).toBe("Invalid parameter 'a.'");
  });
  it('refuses a leading dot', () => {
    expect(err('.a=1')).toBe("Invalid parameter '.a'");
  });
  it('refuses a key with invalid characters', () => {
    expect(err('a$b=1')).toBe("Invalid parameter 'a$b'");
  });
  it('refuses a single fragment of 128 characters as too long', () => {
    const k = 'x'.repeat(128);
    expect(err(`${k}=1`)).toBe(`Parameter '${k}' is too long`);
  });
  it('refuses a long inner fragment as a too long fragment', () => {
    const k = 'x'.repeat(128);
    expect(err(`y.${k}=1`)).toBe(`Parameter fragment '${k}' is too long`);
  });
  it('accepts a fragment of 127 characters', () => {
    const k = 'x'.repeat(127);
    expect(tree(`${k}=1`)).toEqual({ [k]: '1' });
  });
  it('refuses a value then an object at the same path', () => {
    expect(err('node-name=a,node-name.x=1')).toBe("Parameters 'node-name.*' used inconsistently");
  });
  it('refuses an object then a value at the same path', () => {
    expect(err('node-name.x=1,node-name=a')).toBe("Parameters 'node-name.*' used inconsistently");
  });
  it('names the inner prefix in deep conflicts', () => {
    expect(err('a.b=1,a.b.c=2')).toBe("Parameters 'a.b.*' used inconsistently");
  });
  it('refuses mixing list indexes and names', () => {
    expect(err('a.0=1,a.x=2')).toBe("Parameters 'a.*' used inconsistently");
  });
  it('refuses mixing names and list indexes', () => {
    expect(err('a.x=1,a.0=2')).toBe("Parameters 'a.*' used inconsistently");
  });
  it('reports a missing first list element', () => {
    expect(err('bitmaps.1=x')).toBe("Parameter 'bitmaps.0' missing");
  });
  it('reports a gap in a list', () => {
    expect(err('a.0=1,a.2=1')).toBe("Parameter 'a.1' missing");
  });
  it('reads a leading-zero index as its number', () => {
    expect(err('a.01=x')).toBe("Parameter 'a.0' missing");
  });
  it('reports gaps in nested lists with the full prefix', () => {
    expect(err('x.a.1=1')).toBe("Parameter 'x.a.0' missing");
  });
});
