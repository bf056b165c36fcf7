/**
 * Graph commands: x-debug-query-block-graph.
 */
import { defineCommand, type CommandDef } from '../types.js';

export const graphCommands: readonly CommandDef[] = [
  defineCommand('x-debug-query-block-graph', (_args, ctx) => ctx.services.graph.debugGraph()),
];
