/**
 * Graph commands: x-debug-query-block-graph, blockdev-reopen.
 */
import { defineCommand, type CommandDef } from '../types.js';

interface ReopenArgs {
  options: Record<string, unknown>[];
}

export const graphCommands: readonly CommandDef[] = [
  defineCommand('x-debug-query-block-graph', (_args, ctx) => ctx.services.graph.debugGraph()),
  defineCommand<ReopenArgs>('blockdev-reopen', async (args, ctx) => {
    await ctx.services.graph.reopen(args.options);
    return {};
  }),
];
