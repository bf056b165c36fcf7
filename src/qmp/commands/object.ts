import type { CommandDef } from '../types.js';
import { defineCommand } from '../types.js';
import type { ObjectAddArgs } from '../objects.js';

/** object-add / object-del (schema/commands/object-*.json); the rules live in qmp/objects.ts. */
export const objectCommands: readonly CommandDef[] = [
  defineCommand<ObjectAddArgs>('object-add', async (a, ctx) => {
    await ctx.services.objects.add(a);
    return {};
  }),
  defineCommand<{ id: string }>('object-del', (a, ctx) => {
    ctx.services.objects.delete(a.id);
    return {};
  }),
];
