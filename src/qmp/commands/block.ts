/**
 * Block node commands: blockdev-add, blockdev-del, query-named-block-nodes, query-block.
 * Wire-shaped arguments stay as they are: the graph takes BlockdevOptions directly.
 */
import { defineCommand, type CommandDef } from '../types.js';

interface BlockdevDelArgs {
  'node-name': string;
}

interface QueryNamedBlockNodesArgs {
  flat?: boolean;
}

export const blockCommands: readonly CommandDef[] = [
  defineCommand<Record<string, unknown>>('blockdev-add', async (args, ctx) => {
    await ctx.services.graph.add(args);
    return {};
  }),
  defineCommand<BlockdevDelArgs>('blockdev-del', async (args, ctx) => {
    await ctx.services.graph.del(args['node-name']);
    return {};
  }),
  defineCommand<QueryNamedBlockNodesArgs>('query-named-block-nodes', (args, ctx) =>
    ctx.services.graph.queryNamedBlockNodes(args.flat ?? false),
  ),
  defineCommand('query-block', () => []),
];
