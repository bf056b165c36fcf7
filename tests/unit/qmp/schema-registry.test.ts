import { describe, it, expect } from 'vitest';
import { readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { SchemaRegistry } from '../../../src/qmp/schema-registry.js';
import { QmpError } from '../../../src/util/errors.js';

const FIXTURES = fileURLToPath(new URL('./fixtures/schema/', import.meta.url));
const reg = SchemaRegistry.load(FIXTURES);

function errorOf(cmd: string, args: unknown): string | undefined {
  try {
    reg.validateArguments(cmd, args);
    return undefined;
  } catch (err) {
    expect(err).toBeInstanceOf(QmpError);
    expect((err as QmpError).qmpClass).toBe('GenericError');
    return (err as Error).message;
  }
}

const unixAddr = { type: 'unix', data: { path: '/tmp/s' } };

describe('SchemaRegistry loading', () => {
  it('lists commands, events and types of a schema directory', () => {
    expect(reg.commandNames()).toEqual(['t-addr', 't-blockdev', 't-misc', 't-none']);
    expect(reg.eventNames()).toEqual(['T_EVENT']);
    expect(reg.hasCommand('t-addr')).toBe(true);
    expect(reg.hasCommand('nope')).toBe(false);
    expect(reg.type('BlockdevRef')['x-alternate']).toBe('BlockdevRef');
  });

  it('follows $ref by basename with deref', () => {
    const args = reg.argumentsSchema('t-blockdev');
    expect(args).toBeDefined();
    expect(reg.deref(args ?? {})['x-name']).toBe('BlockdevOptions');
    const plain = { type: 'string' };
    expect(reg.deref(plain)).toBe(plain);
  });

  it('loads and compiles every JSON file of the repository schema', () => {
    const real = SchemaRegistry.load();
    real.compileAll();
    const root = fileURLToPath(new URL('../../../schema/', import.meta.url));
    const count = (d: string): number =>
      readdirSync(d).reduce((n, f) => {
        const p = join(d, f);
        return n + (statSync(p).isDirectory() ? count(p) : f.endsWith('.json') ? 1 : 0);
      }, 0);
    const total = real.commandNames().length + real.eventNames().length + real.typeNames().length;
    expect(total).toBe(count(root));
    expect(real.hasCommand('qmp_capabilities')).toBe(true);
  });
});

describe('SchemaRegistry.validateArguments', () => {
  it('accepts valid arguments of a legacy union', () => {
    expect(errorOf('t-addr', { addr: unixAddr, 'max-connections': 4 })).toBeUndefined();
  });

  it('reports a missing required member with its full path', () => {
    expect(errorOf('t-addr', { addr: { type: 'unix' } })).toBe("Parameter 'addr.data' is missing");
    expect(errorOf('t-addr', {})).toBe("Parameter 'addr' is missing");
  });

  it('reports an unexpected member only after the declared members', () => {
    expect(errorOf('t-addr', { zz: 1, addr: { type: 'unix', data: { path: 'a' }, y: 2 } })).toBe(
      "Parameter 'addr.y' is unexpected",
    );
    expect(errorOf('t-addr', { zz: 1, addr: unixAddr })).toBe("Parameter 'zz' is unexpected");
  });

  it('reports a member of the wrong JSON type', () => {
    expect(errorOf('t-addr', { addr: { type: 'unix', data: { path: 1 } } })).toBe(
      "Invalid parameter type for 'addr.data.path', expected: string",
    );
    expect(errorOf('t-addr', { addr: 'x' })).toBe(
      "Invalid parameter type for 'addr', expected: object",
    );
  });

  it('reports an unknown enum value with the bare member name', () => {
    expect(errorOf('t-addr', { addr: { type: 'bogus' } })).toBe(
      "Parameter 'type' does not accept value 'bogus'",
    );
  });

  it('reports an integer out of range with the C type', () => {
    expect(errorOf('t-addr', { addr: unixAddr, 'max-connections': -1 })).toBe(
      "Parameter 'max-connections' expects uint32_t",
    );
    expect(errorOf('t-addr', { addr: unixAddr, 'max-connections': 2 ** 32 })).toBe(
      "Parameter 'max-connections' expects uint32_t",
    );
    expect(errorOf('t-misc', { i8: 128 })).toBe("Parameter 'i8' expects int8_t");
  });

  it('reports non-integral numbers the way QEMU does per integer kind', () => {
    expect(errorOf('t-misc', { i: 1.5 })).toBe("Invalid parameter type for 'i', expected: integer");
    expect(errorOf('t-misc', { u64: 1e30 })).toBe("Parameter 'u64' expects uint64");
    expect(errorOf('t-misc', { sz: 1.5 })).toBe("Parameter 'sz' expects uint64");
    expect(errorOf('t-misc', { u64: -1 })).toBeUndefined();
  });

  it('treats null for an optional member as a type error', () => {
    expect(errorOf('t-misc', { name: null })).toBe(
      "Invalid parameter type for 'name', expected: string",
    );
  });

  it('names list elements name[i] in paths and null in bare-name errors', () => {
    expect(errorOf('t-misc', { bitmaps: ['a', { node: 'n' }] })).toBe(
      "Parameter 'bitmaps[1].name' is missing",
    );
    expect(errorOf('t-misc', { caps: ['foo'] })).toBe("Parameter 'null' does not accept value 'foo'");
    expect(errorOf('t-misc', { bitmaps: [1] })).toBe(
      "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
    );
  });

  it('picks an alternate branch by JSON type and validates inside it', () => {
    expect(errorOf('t-misc', { backing: null })).toBeUndefined();
    expect(errorOf('t-misc', { backing: 'node0' })).toBeUndefined();
    expect(errorOf('t-misc', { backing: true })).toBe(
      "Invalid parameter type for 'backing', expected: BlockdevRefOrNull",
    );
    expect(errorOf('t-misc', { backing: { driver: 'file' } })).toBe(
      "Parameter 'backing.filename' is missing",
    );
  });

  it('validates a flat union: base members, then the variant, then extras', () => {
    expect(errorOf('t-blockdev', { driver: 'file', filename: 'f', 'node-name': 'a' })).toBeUndefined();
    expect(errorOf('t-blockdev', { driver: 'null-co' })).toBeUndefined();
    expect(errorOf('t-blockdev', { driver: 'null-co', filename: 'x' })).toBe(
      "Parameter 'filename' is unexpected",
    );
    expect(errorOf('t-blockdev', { filename: 'x' })).toBe("Parameter 'driver' is missing");
    expect(errorOf('t-blockdev', { driver: 'file', 'read-only': 'on' })).toBe(
      "Invalid parameter type for 'read-only', expected: boolean",
    );
    expect(errorOf('t-blockdev', { driver: 'file', filename: 'f', cache: { direct: 1 } })).toBe(
      "Invalid parameter type for 'cache.direct', expected: boolean",
    );
  });

  it('validates nested unions through alternates', () => {
    const ok = { driver: 'raw', 'node-name': 'r', file: { driver: 'file', filename: 'f' } };
    expect(errorOf('t-blockdev', ok)).toBeUndefined();
    expect(errorOf('t-blockdev', { ...ok, file: { driver: 'file', filename: 'f', bogus: 1 } })).toBe(
      "Parameter 'file.bogus' is unexpected",
    );
    expect(errorOf('t-blockdev', { driver: 'raw', file: { driver: 'bogus' } })).toBe(
      "Parameter 'driver' does not accept value 'bogus'",
    );
  });

  it('accepts a flat union case written inline', () => {
    expect(errorOf('t-addr', { addr: unixAddr, flat: { type: 'fd', str: '3' } })).toBeUndefined();
    expect(errorOf('t-addr', { addr: unixAddr, flat: { type: 'fd', str: '3', path: 'x' } })).toBe(
      "Parameter 'flat.path' is unexpected",
    );
  });

  it('refuses any argument of a command without arguments', () => {
    expect(errorOf('t-none', {})).toBeUndefined();
    expect(errorOf('t-none', { x: 1 })).toBe("Parameter 'x' is unexpected");
  });

  it('accepts any value for a member without a type', () => {
    expect(errorOf('t-misc', { anything: [1, { a: null }] })).toBeUndefined();
  });
});
