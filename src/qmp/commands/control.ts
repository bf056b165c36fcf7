import type { CommandDef } from '../types.js';

export const controlCommands: readonly CommandDef[] = [];
