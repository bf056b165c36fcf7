import { describe, it, expect } from 'vitest';
import { fileURLToPath } from 'node:url';
import { SchemaRegistry } from '../../../src/qmp/schema-registry.js';
import { buildSchemaInfo } from '../../../src/qmp/introspect.js';

const FIXTURES = fileURLToPath(new URL('./fixtures/schema/', import.meta.url));

describe('buildSchemaInfo', () => {
  const info = buildSchemaInfo(SchemaRegistry.load(FIXTURES));
  const byName = (n: unknown): Record<string, unknown> | undefined => info.find((e) => e.name === n);

  it('keeps command and event names and uses "0" for no arguments', () => {
    expect(byName('t-none')).toEqual({ name: 't-none', 'meta-type': 'command', 'arg-type': '0', 'ret-type': '0' });
    expect(byName('T_EVENT')).toMatchObject({ 'meta-type': 'event' });
  });

  it('describes flat unions with tag and variants', () => {
    const cmd = byName('t-blockdev');
    const t = byName(cmd?.['arg-type']);
    expect(t).toMatchObject({ 'meta-type': 'object', tag: 'driver' });
    expect((t?.variants as Array<{ case: string }>).map((v) => v.case)).toEqual(['file', 'raw']);
    expect((t?.members as Array<Record<string, unknown>>)[1]).toEqual({ name: 'node-name', type: 'str', default: null });
  });

  it('describes enums, arrays and alternates', () => {
    const args = byName(byName('t-misc')?.['arg-type']);
    const members = args?.members as Array<{ name: string; type: string }>;
    const bitmaps = members.find((m) => m.name === 'bitmaps');
    expect(bitmaps?.type).toMatch(/^\[\d+\]$/);
    const arr = byName(bitmaps?.type);
    expect(byName(arr?.['element-type'])).toMatchObject({ 'meta-type': 'alternate' });
    const caps = byName(members.find((m) => m.name === 'caps')?.type);
    expect(byName(caps?.['element-type'])).toMatchObject({ 'meta-type': 'enum', values: ['oob'], members: [{ name: 'oob' }] });
    expect(members.find((m) => m.name === 'anything')?.type).toBe('any');
  });

  it('builds the schema of the real repository', () => {
    const real = buildSchemaInfo(SchemaRegistry.load());
    expect(real.find((e) => e.name === 'quit')).toMatchObject({ 'meta-type': 'command' });
  });
});
