import type { CommandDef } from '../types.js';

export const blockCommands: readonly CommandDef[] = [];
