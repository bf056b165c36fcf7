/**
 * Graph commands: x-debug-query-block-graph, blockdev-reopen, x-blockdev-change, x-blockdev-set-iothread.
 */
import { BlockError, QmpError } from '../../util/errors.js';
import { defineCommand, type CommandDef } from '../types.js';

interface ChangeArgs {
  parent: string;
  child?: string;
  node?: string;
}

interface SetIothreadArgs {
  'node-name': string;
  iothread: string | null;
  force?: boolean;
}

interface ReopenArgs {
  options: Record<string, unknown>[];
}

export const graphCommands: readonly CommandDef[] = [
  defineCommand('x-debug-query-block-graph', (_args, ctx) => {
    // QEMU lists the block jobs oldest first after the backends (block_job_next).
    const jobs = [...ctx.services.jobs.listBlockJobs()].reverse().flatMap((j) => {
      const edges = j.driver.debugEdges?.();
      return edges ? [{ id: j.id, edges }] : [];
    });
    return ctx.services.graph.debugGraph(jobs);
  }),
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
  // QEMU's qmp_x_blockdev_set_iothread. blockd runs every node on its one event loop: the checks
  // are QSD's, the move itself changes nothing.
  defineCommand<SetIothreadArgs>('x-blockdev-set-iothread', (a, ctx) => {
    const node = ctx.services.graph.get(a['node-name']);
    if (!node) throw new QmpError(`Failed to find node with node-name='${a['node-name']}'`);
    if (a.force !== true && node.parents.some((u) => u.spec.kind !== 'node')) {
      throw new QmpError(
        `Node ${a['node-name']} is associated with a BlockBackend and could be in use (use force=true to override this check)`,
      );
    }
    if (a.iothread !== null && !ctx.services.objects.isIothread(a.iothread)) {
      throw new QmpError(`Cannot find iothread ${a.iothread}`);
    }
    return {};
  }),
  defineCommand<ReopenArgs>('blockdev-reopen', async (args, ctx) => {
    await ctx.services.graph.reopen(args.options);
    return {};
  }),
];
