import { describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { ObjectRegistry } from '../../../src/qmp/objects.js';
import { QomTree, listTypeProperties, listTypes, type QomChardev } from '../../../src/qmp/qom.js';

async function tree(chardevs: QomChardev[] = []): Promise<{ qom: QomTree; objects: ObjectRegistry }> {
  const objects = new ObjectRegistry(pino({ level: 'silent' }));
  await objects.add({ 'qom-type': 'iothread', id: 'io0', 'poll-max-ns': 10 });
  await objects.add({ 'qom-type': 'secret', id: 's0', data: 'hello' });
  await objects.add({ 'qom-type': 'throttle-group', id: 'tg', limits: { 'iops-total': 100 } });
  return { qom: new QomTree({ objects, chardevs: () => chardevs }), objects };
}

describe('QOM tree', () => {
  it('resolves absolute paths with empty components skipped, and partial paths that match once', async () => {
    const { qom } = await tree();
    expect(qom.get('//objects/io0/', 'type')).toBe('iothread');
    expect(qom.get('io0', 'type')).toBe('iothread');
    expect(qom.get('objects/io0', 'type')).toBe('iothread');
    expect(qom.get('objects', 'io0')).toBe('/objects/io0');
    expect(() => qom.get('', 'type')).toThrow("Device '' not found");
    expect(() => qom.get('/objects/io0/..', 'type')).toThrow("Device '/objects/io0/..' not found");
  });

  it('calls a partial path ambiguous in qom-list and not found in qom-get', async () => {
    const { qom } = await tree([{ id: 'io0', qomType: 'chardev-socket', connected: false, addr: { type: 'unix', path: '/x' } }]);
    expect(() => qom.list('io0')).toThrow("Path 'io0' is ambiguous");
    expect(() => qom.get('io0', 'type')).toThrow("Device 'io0' not found");
    expect(qom.get('/chardevs/io0', 'addr')).toEqual({ type: 'unix', path: '/x' });
  });

  it('lists children after the type properties, and reflects object-del', async () => {
    const { qom, objects } = await tree();
    expect(qom.list('/objects').map((p) => `${p.name}:${p.type}`)).toEqual([
      'type:string', 'io0:child<iothread>', 's0:child<secret>', 'tg:child<throttle-group>',
    ]);
    objects.delete('s0');
    expect(qom.list('/objects').map((p) => p.name)).toEqual(['type', 'io0', 'tg']);
  });

  it('keeps a stored thread-pool value that fails the pool check, as QEMU does', async () => {
    const { qom } = await tree();
    expect(() => qom.set('/objects/io0', 'thread-pool-min', 100)).toThrow('bad thread-pool-min/thread-pool-max values');
    expect(qom.get('/objects/io0', 'thread-pool-min')).toBe(100);
    expect(qom.get('/objects/io0', 'poll-max-ns')).toBe(10);
    expect(qom.get('/objects/io0', 'poll-grow')).toBe(0);
  });

  it('merges throttle limits over the current ones and refuses x-* after creation', async () => {
    const { qom, objects } = await tree();
    qom.set('/objects/tg', 'limits', { 'bps-read': 4096 });
    expect(objects.throttleLimits('tg')?.buckets['iops-total'].avg).toBe(100);
    expect(objects.throttleLimits('tg')?.buckets['bps-read'].avg).toBe(4096);
    expect(qom.get('/objects/tg', 'x-bps-read')).toBe(4096);
    expect(() => qom.set('/objects/tg', 'limits', { 'bps-total': 1 })).toThrow('cannot be used at the same time');
    expect(() => qom.set('/objects/tg', 'limits', { nope: 1 })).toThrow("Parameter 'limits.nope' is unexpected");
    expect(() => qom.set('/objects/tg', 'x-iops-total', 1)).toThrow('Property cannot be set after initialization');
  });

  it('reads a secret\'s data back as given but does not change the loaded secret', async () => {
    const { qom, objects } = await tree();
    qom.set('s0', 'data', 'bye');
    expect(qom.get('s0', 'data')).toBe('bye');
    expect(objects.secretValue('s0').toString()).toBe('hello');
    expect(() => qom.set('s0', 'loaded', false)).toThrow("Property 'secret.loaded' is not writable");
  });
});

describe('QOM types', () => {
  it('lists concrete types unless abstract is asked for, and follows parents and interfaces', () => {
    expect(listTypes('event-loop-base', false).map((t) => t.name)).toEqual(['iothread', 'main-loop']);
    expect(listTypes('authz', true)).toContainEqual({ name: 'authz', abstract: true, parent: 'object' });
    expect(listTypes('user-creatable', false).map((t) => t.name)).toContain('throttle-group');
    expect(listTypes('nope', true)).toEqual([]);
  });

  it('refuses interfaces and unknown types in qom-list-properties', () => {
    expect(() => listTypeProperties('user-creatable')).toThrow("Parameter 'typename' expects a QOM type");
    expect(() => listTypeProperties('nope')).toThrow("Class 'nope' not found");
    expect(listTypeProperties('authz-simple')).toEqual([{ name: 'type', type: 'string' }, { name: 'identity', type: 'string' }]);
  });
});
