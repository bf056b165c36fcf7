/**
 * Graph commands: x-debug-query-block-graph, blockdev-reopen, x-blockdev-change.
 */
import { BlockError, QmpError } from '../../util/errors.js';
import { defineCommand, type CommandDef } from '../types.js';

interface ChangeArgs {
  parent: string;
  child?: string;
  node?: string;
}

interface ReopenArgs {
  options: Record<string, unknown>[];
}

export const graphCommands: readonly CommandDef[] = [
  defineCommand('x-debug-query-block-graph', (_args, ctx) => ctx.services.graph.debugGraph()),
  // QEMU's qmp_x_blockdev_change; only quorum implements bdrv_add_child/bdrv_del_child.
  defineCommand<ChangeArgs>('x-blockdev-change', (a, ctx) => {
    const graph = ctx.services.graph;
    const parent = graph.get(a.parent);
    if (!parent) throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Cannot find device='${a.parent}' nor node-name='${a.parent}'`);
    if ((a.child === undefined) === (a.node === undefined)) {
      throw new QmpError(a.child !== undefined ? 'The parameters child and node are in conflict' : 'Either child or node must be specified');
    }
    if (a.child !== undefined) {
      if (!parent.children.some((c) => c.name === a.child)) {
        throw new QmpError(`Node '${a.parent}' does not have child '${a.child}'`);
      }
      throw new QmpError(`The node ${a.parent} does not support removing a child`);
    }
    const node = graph.get(a.node ?? '');
    if (!node) throw new QmpError(`Node '${a.node ?? ''}' not found`);
    throw new QmpError(`The node ${a.parent} does not support adding a child`);
  }),
  defineCommand<ReopenArgs>('blockdev-reopen', async (args, ctx) => {
    await ctx.services.graph.reopen(args.options);
    return {};
  }),
];
