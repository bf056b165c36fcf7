import { describe, expect, it } from 'vitest';
import { SchemaRegistry } from '../../../src/qmp/schema-registry.js';
import { blockCommands } from '../../../src/qmp/commands/block.js';

const reg = SchemaRegistry.load();

function errorOf(cmd: string, args: unknown): string | undefined {
  try {
    reg.validateArguments(cmd, args);
    return undefined;
  } catch (e) {
    return (e as Error).message;
  }
}

describe('block command schemas', () => {
  it('has a schema for every block command', () => {
    for (const c of blockCommands) expect(reg.hasCommand(c.name)).toBe(true);
  });

  it('accepts a raw node over an inline file node', () => {
    expect(
      errorOf('blockdev-add', {
        driver: 'raw',
        'node-name': 'r',
        file: { driver: 'file', filename: '/x', locking: 'off' },
        offset: 512,
      }),
    ).toBeUndefined();
  });

  it('accepts a child given by node name', () => {
    expect(errorOf('blockdev-add', { driver: 'raw', 'node-name': 'r', file: 'f' })).toBeUndefined();
  });

  it('refuses an unknown driver the way QEMU does', () => {
    expect(errorOf('blockdev-add', { driver: 'bogus', 'node-name': 'r' })).toBe(
      "Parameter 'driver' does not accept value 'bogus'",
    );
  });

  it('refuses a member the driver does not have', () => {
    expect(errorOf('blockdev-add', { driver: 'null-co', 'node-name': 'n', filename: '/x' })).toMatch(
      /filename/,
    );
  });

  it('refuses a child of the wrong JSON type', () => {
    expect(errorOf('blockdev-add', { driver: 'raw', 'node-name': 'r', file: 5 })).toBe(
      "Invalid parameter type for 'file', expected: BlockdevRef",
    );
  });

  it('requires node-name for blockdev-del', () => {
    expect(errorOf('blockdev-del', {})).toBe("Parameter 'node-name' is missing");
  });
});
