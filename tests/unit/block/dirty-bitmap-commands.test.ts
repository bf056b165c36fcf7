import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Services } from '../../../src/qmp/services.js';
import { SchemaRegistry } from '../../../src/qmp/schema-registry.js';
import { ALL_COMMANDS } from '../../../src/qmp/commands/index.js';
import type { CommandContext } from '../../../src/qmp/types.js';
import { silentLogger } from '../../../src/util/logger.js';
import { DaemonError } from '../../../src/util/errors.js';

const reg = SchemaRegistry.load();
const byName = new Map(ALL_COMMANDS.map((c) => [c.name, c]));

type Reply = { return: unknown } | { error: { class: string; desc: string } };

describe('dirty bitmap commands', () => {
  let svc: Services;
  let ctx: CommandContext;

  async function qmp(name: string, args: Record<string, unknown> = {}): Promise<Reply> {
    try {
      reg.validateArguments(name, args);
      const c = byName.get(name);
      if (!c) throw new Error(`no handler for ${name}`);
      return { return: await c.run(args, ctx) };
    } catch (e) {
      if (e instanceof DaemonError) return { error: { class: e.qmpClass, desc: e.message } };
      throw e;
    }
  }
  async function ok(name: string, args: Record<string, unknown> = {}): Promise<unknown> {
    const r = await qmp(name, args);
    if ('error' in r) throw new Error(`${name} failed: ${r.error.desc}`);
    return r.return;
  }
  async function err(name: string, args: Record<string, unknown>): Promise<string> {
    const r = await qmp(name, args);
    if (!('error' in r)) throw new Error(`${name} unexpectedly succeeded`);
    return r.error.desc;
  }
  async function bitmaps(node: string): Promise<unknown> {
    const all = (await ok('query-named-block-nodes')) as Array<Record<string, unknown>>;
    return all.find((n) => n['node-name'] === node)?.['dirty-bitmaps'];
  }

  beforeEach(async () => {
    svc = new Services(silentLogger());
    ctx = { services: svc, log: svc.log, origin: 'qmp', afterReply: () => undefined };
    await ok('blockdev-add', { driver: 'null-co', 'node-name': 'n0', size: 100352 });
    await ok('blockdev-add', { driver: 'null-co', 'node-name': 'n1', size: 1 << 20, 'read-only': true });
  });

  afterEach(async () => {
    await svc.shutdown();
  });

  it('has a schema for every bitmap and transaction command', () => {
    for (const n of [
      'block-dirty-bitmap-add',
      'block-dirty-bitmap-remove',
      'block-dirty-bitmap-clear',
      'block-dirty-bitmap-enable',
      'block-dirty-bitmap-disable',
      'block-dirty-bitmap-merge',
      'x-debug-block-dirty-bitmap-sha256',
      'transaction',
    ]) {
      expect(reg.hasCommand(n)).toBe(true);
      expect(byName.has(n)).toBe(true);
    }
  });

  it('leaves dirty-bitmaps out of query-named-block-nodes for a node without bitmaps', async () => {
    expect(await bitmaps('n0')).toBeUndefined();
  });

  it('adds a bitmap with the default 64 KiB granularity and lists it newest first', async () => {
    await ok('block-dirty-bitmap-add', { node: 'n0', name: 'a' });
    await ok('block-dirty-bitmap-add', { node: 'n0', name: 'b', granularity: 512, disabled: true });
    expect(await bitmaps('n0')).toEqual([
      { name: 'b', recording: false, persistent: false, busy: false, granularity: 512, count: 0 },
      { name: 'a', recording: true, persistent: false, busy: false, granularity: 65536, count: 0 },
    ]);
  });

  it('refuses bad add arguments with the texts of qemu-storage-daemon', async () => {
    expect(await err('block-dirty-bitmap-add', { node: 'zz', name: '' })).toBe('Bitmap name cannot be empty');
    expect(await err('block-dirty-bitmap-add', { node: 'zz', name: 'a' })).toBe(
      "Cannot find device='zz' nor node-name='zz'",
    );
    for (const g of [0, 100, 256, 3072]) {
      expect(await err('block-dirty-bitmap-add', { node: 'n0', name: 'a', granularity: g })).toBe(
        'Granularity must be power of 2 and at least 512',
      );
    }
    expect(await err('block-dirty-bitmap-add', { node: 'n0', name: 'a', persistent: true })).toBe(
      "Can't store persistent bitmaps to n0: Operation not supported",
    );
    expect(await err('block-dirty-bitmap-add', { node: 'n0', name: 'x'.repeat(1024) })).toBe(
      `Bitmap name too long: ${'x'.repeat(1024)}`,
    );
    await ok('block-dirty-bitmap-add', { node: 'n0', name: 'x'.repeat(1023) });
    await ok('block-dirty-bitmap-add', { node: 'n0', name: 'a', granularity: 2 ** 31 });
    expect(await err('block-dirty-bitmap-add', { node: 'n0', name: 'a' })).toBe('Bitmap already exists: a');
  });

  it('accepts a bitmap on a read-only node', async () => {
    await ok('block-dirty-bitmap-add', { node: 'n1', name: 'r' });
    expect(await bitmaps('n1')).toHaveLength(1);
  });

  it('names an unknown node and an unknown bitmap the way qemu-storage-daemon does', async () => {
    for (const c of [
      'block-dirty-bitmap-remove',
      'block-dirty-bitmap-clear',
      'block-dirty-bitmap-enable',
      'block-dirty-bitmap-disable',
      'x-debug-block-dirty-bitmap-sha256',
    ]) {
      expect(await err(c, { node: 'zz', name: 'a' })).toBe("Node 'zz' not found");
      expect(await err(c, { node: 'n0', name: 'zz' })).toBe("Dirty bitmap 'zz' not found");
    }
    await ok('block-dirty-bitmap-add', { node: 'n0', name: 'a' });
    expect(await err('block-dirty-bitmap-merge', { node: 'n0', target: 'zz', bitmaps: ['a'] })).toBe(
      "Dirty bitmap 'zz' not found",
    );
    expect(await err('block-dirty-bitmap-merge', { node: 'n0', target: 'a', bitmaps: ['zz'] })).toBe(
      "Dirty bitmap 'zz' not found",
    );
    expect(
      await err('block-dirty-bitmap-merge', { node: 'n0', target: 'a', bitmaps: [{ node: 'zz', name: 'a' }] }),
    ).toBe("Node 'zz' not found");
  });

  it('records writes only while enabled, and clears', async () => {
    await ok('block-dirty-bitmap-add', { node: 'n0', name: 'a', granularity: 4096 });
    const io = svc.graph.find('n0').io;
    await io.write(Buffer.alloc(1, 1), 5000);
    await ok('block-dirty-bitmap-disable', { node: 'n0', name: 'a' });
    await ok('block-dirty-bitmap-disable', { node: 'n0', name: 'a' });
    await io.write(Buffer.alloc(1, 1), 50000);
    expect(((await bitmaps('n0')) as Array<{ count: number }>)[0]!.count).toBe(4096);
    await ok('block-dirty-bitmap-enable', { node: 'n0', name: 'a' });
    await io.writeZeroes(50000, 10);
    expect(((await bitmaps('n0')) as Array<{ count: number }>)[0]!.count).toBe(8192);
    await ok('block-dirty-bitmap-clear', { node: 'n0', name: 'a' });
    expect(((await bitmaps('n0')) as Array<{ count: number }>)[0]!.count).toBe(0);
  });

  it('removes a bitmap', async () => {
    await ok('block-dirty-bitmap-add', { node: 'n0', name: 'a' });
    await ok('block-dirty-bitmap-remove', { node: 'n0', name: 'a' });
    expect(await bitmaps('n0')).toBeUndefined();
  });

  it('hashes the bits like qemu-storage-daemon after the same writes', async () => {
    await ok('block-dirty-bitmap-add', { node: 'n0', name: 'b', granularity: 512 });
    const io = svc.graph.find('n0').io;
    await io.write(Buffer.alloc(1, 1), 0);
    await io.write(Buffer.alloc(100, 1), 70000);
    await io.write(Buffer.alloc(1, 1), 100351);
    await io.writeZeroes(8192, 512);
    expect(await ok('x-debug-block-dirty-bitmap-sha256', { node: 'n0', name: 'b' })).toEqual({
      sha256: '5cbd68e6c93d01a02002cb8153d5924602330dcb8ca368b95f6d44cba85fb656',
    });
  });

  it('merges across granularities and refuses bitmaps of different sizes', async () => {
    await ok('block-dirty-bitmap-add', { node: 'n0', name: 'b', granularity: 512 });
    await svc.graph.find('n0').io.write(Buffer.alloc(1, 1), 0);
    await ok('block-dirty-bitmap-add', { node: 'n0', name: 'm', granularity: 1 << 20, disabled: true });
    await ok('block-dirty-bitmap-merge', { node: 'n0', target: 'm', bitmaps: ['b', { node: 'n0', name: 'b' }] });
    expect(((await bitmaps('n0')) as Array<{ count: number }>)[0]!.count).toBe(1 << 20);
    await ok('block-dirty-bitmap-add', { node: 'n1', name: 'r' });
    expect(await err('block-dirty-bitmap-merge', { node: 'n0', target: 'm', bitmaps: [{ node: 'n1', name: 'r' }] })).toBe(
      "Bitmaps are of different sizes (destination size is 100352, source size is 1048576) and can't be merged",
    );
  });

  it('answers an empty merge list with an error instead of crashing', async () => {
    await ok('block-dirty-bitmap-add', { node: 'n0', name: 'a' });
    expect(await err('block-dirty-bitmap-merge', { node: 'n0', target: 'a', bitmaps: [] })).toBe(
      "Parameter 'bitmaps' must not be empty",
    );
  });

  it('refuses to change a busy bitmap', async () => {
    await ok('block-dirty-bitmap-add', { node: 'n0', name: 'a' });
    const { bitmapsOf } = await import('../../../src/block/dirty-bitmap-set.js');
    bitmapsOf(svc.graph.find('n0')).find('a').setBusy(true);
    const busy = "Bitmap 'a' is currently in use by another operation and cannot be used";
    for (const c of [
      'block-dirty-bitmap-remove',
      'block-dirty-bitmap-clear',
      'block-dirty-bitmap-enable',
      'block-dirty-bitmap-disable',
    ]) {
      expect(await err(c, { node: 'n0', name: 'a' })).toBe(busy);
    }
    expect(await err('block-dirty-bitmap-merge', { node: 'n0', target: 'a', bitmaps: ['a'] })).toBe(busy);
    expect(await ok('x-debug-block-dirty-bitmap-sha256', { node: 'n0', name: 'a' })).toHaveProperty('sha256');
  });

  describe('transaction', () => {
    const act = (type: string, data: Record<string, unknown>): Record<string, unknown> => ({ type, data });

    it('succeeds with no actions', async () => {
      expect(await ok('transaction', { actions: [] })).toEqual({});
    });

    it('rolls back every action when a later one fails', async () => {
      await ok('block-dirty-bitmap-add', { node: 'n0', name: 'keep', granularity: 512 });
      await svc.graph.find('n0').io.write(Buffer.alloc(1, 1), 0);
      expect(
        await err('transaction', {
          actions: [
            act('block-dirty-bitmap-add', { node: 'n0', name: 't1' }),
            act('block-dirty-bitmap-clear', { node: 'n0', name: 'keep' }),
            act('block-dirty-bitmap-disable', { node: 'n0', name: 'keep' }),
            act('block-dirty-bitmap-add', { node: 'n0', name: 't1' }),
          ],
        }),
      ).toBe('Bitmap already exists: t1');
      expect(await bitmaps('n0')).toEqual([
        { name: 'keep', recording: true, persistent: false, busy: false, granularity: 512, count: 512 },
      ]);
    });

    it('lets later actions see earlier ones (add, clear, remove of one bitmap)', async () => {
      await ok('transaction', {
        actions: [
          act('block-dirty-bitmap-add', { node: 'n0', name: 't1' }),
          act('block-dirty-bitmap-clear', { node: 'n0', name: 't1' }),
          act('block-dirty-bitmap-remove', { node: 'n0', name: 't1' }),
        ],
      });
      expect(await bitmaps('n0')).toBeUndefined();
    });

    it('keeps a bitmap removed earlier in the transaction busy for later actions', async () => {
      await ok('block-dirty-bitmap-add', { node: 'n0', name: 'a' });
      expect(
        await err('transaction', {
          actions: [
            act('block-dirty-bitmap-remove', { node: 'n0', name: 'a' }),
            act('block-dirty-bitmap-clear', { node: 'n0', name: 'a' }),
          ],
        }),
      ).toBe("Bitmap 'a' is currently in use by another operation and cannot be used");
      expect(await bitmaps('n0')).toEqual([
        { name: 'a', recording: true, persistent: false, busy: false, granularity: 65536, count: 0 },
      ]);
    });

    it('undoes a merge when the abort action follows', async () => {
      await ok('block-dirty-bitmap-add', { node: 'n0', name: 'src', granularity: 512 });
      await svc.graph.find('n0').io.write(Buffer.alloc(1, 1), 0);
      await ok('block-dirty-bitmap-add', { node: 'n0', name: 'dst', disabled: true });
      expect(
        await err('transaction', {
          actions: [act('block-dirty-bitmap-merge', { node: 'n0', target: 'dst', bitmaps: ['src'] }), act('abort', {})],
        }),
      ).toBe('Transaction aborted using Abort action');
      expect(((await bitmaps('n0')) as Array<{ name: string; count: number }>)[0]).toMatchObject({
        name: 'dst',
        count: 0,
      });
    });

    it('refuses completion-mode grouped for bitmap actions', async () => {
      expect(
        await err('transaction', {
          actions: [act('block-dirty-bitmap-add', { node: 'n0', name: 't2' })],
          properties: { 'completion-mode': 'grouped' },
        }),
      ).toBe("Action 'block-dirty-bitmap-add' does not support Transaction property completion-mode = grouped");
      expect(await bitmaps('n0')).toBeUndefined();
    });

    it('reports bad action arguments with the paths qemu-storage-daemon prints', async () => {
      expect(await err('transaction', { actions: [{ type: 'abort' }] })).toBe("Parameter 'actions[0].data' is missing");
      expect(await err('transaction', { actions: [{ type: 'bogus', data: {} }] })).toBe(
        "Parameter 'type' does not accept value 'bogus'",
      );
      expect(
        await err('transaction', { actions: [act('block-dirty-bitmap-add', { node: 'n0', name: 'x', bogus: 1 })] }),
      ).toBe("Parameter 'actions[0].data.bogus' is unexpected");
      expect(await err('block-dirty-bitmap-merge', { node: 'n0', target: 'x', bitmaps: [5] })).toBe(
        "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
      );
      expect(await err('block-dirty-bitmap-add', { node: 'n0', name: 'x', granularity: 2 ** 32 })).toBe(
        "Parameter 'granularity' expects uint32_t",
      );
    });

    it('names transaction actions blockd does not implement yet', async () => {
      expect(await err('transaction', { actions: [act('drive-backup', { device: 'n0' })] })).toBe(
        "Transaction action 'drive-backup' is not supported by blockd",
      );
    });

    it('validates action data against the command schema', async () => {
      expect(
        await err('transaction', { actions: [act('block-dirty-bitmap-add', { node: 'n0' })] }),
      ).toMatch(/name' is missing/);
    });
  });
});
