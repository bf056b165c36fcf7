import { describe, it, expect } from 'vitest';
import { fileURLToPath } from 'node:url';
import { silentLogger } from '../../../src/util/logger.js';
import { Services } from '../../../src/qmp/services.js';
import { Dispatcher } from '../../../src/qmp/dispatcher.js';
import { SchemaRegistry } from '../../../src/qmp/schema-registry.js';
import { ALL_COMMANDS } from '../../../src/qmp/commands/index.js';
import { defineCommand } from '../../../src/qmp/types.js';
import { BlockError, QmpError } from '../../../src/util/errors.js';

const fixtures = SchemaRegistry.load(fileURLToPath(new URL('./fixtures/schema/', import.meta.url)));

function make(run: (a: Record<string, unknown>) => unknown): Dispatcher {
  return new Dispatcher(new Services(silentLogger()), [defineCommand('t-none', (a: Record<string, unknown>) => run(a))], fixtures);
}

describe('Dispatcher', () => {
  it('has a schema file for every handler and a handler for every schema file', () => {
    const d = new Dispatcher(new Services(silentLogger()), ALL_COMMANDS, SchemaRegistry.load());
    expect(d.coverage()).toEqual({ missingSchema: [], missingHandler: [] });
  });

  it('returns {} when a handler returns nothing', async () => {
    const r = await make(() => undefined).execute('t-none', {}, 'cli');
    expect(r.value).toEqual({});
  });

  it('validates arguments before running the handler', async () => {
    let ran = false;
    const d = make(() => {
      ran = true;
    });
    await expect(d.execute('t-none', { x: 1 }, 'qmp')).rejects.toThrow("Parameter 'x' is unexpected");
    expect(ran).toBe(false);
  });

  it('reports an unknown command as CommandNotFound', async () => {
    await expect(make(() => 1).execute('t-addr', {}, 'qmp')).rejects.toMatchObject({
      qmpClass: 'CommandNotFound',
      message: 'The command t-addr has not been found',
    });
  });

  it('passes DaemonErrors through and maps other exceptions to GenericError', async () => {
    const e = new BlockError('X', 'EIO', "Node 'a' is busy");
    await expect(make(() => Promise.reject(e)).execute('t-none', {}, 'qmp')).rejects.toBe(e);
    const mapped = make(() => {
      throw new TypeError('boom');
    }).execute('t-none', {}, 'qmp');
    await expect(mapped).rejects.toBeInstanceOf(QmpError);
    await expect(mapped).rejects.toMatchObject({ qmpClass: 'GenericError', message: 'boom' });
  });

  it('runs commands one at a time in submission order', async () => {
    const log: string[] = [];
    const d = make(async (a) => {
      log.push(`start`);
      await new Promise((r) => setTimeout(r, 5));
      log.push(`end`);
      return a;
    });
    await Promise.all([d.execute('t-none', {}, 'qmp'), d.execute('t-none', {}, 'qmp')]);
    expect(log).toEqual(['start', 'end', 'start', 'end']);
  });
});
