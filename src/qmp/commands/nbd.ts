import type { CommandDef } from '../types.js';

export const nbdCommands: readonly CommandDef[] = [];
