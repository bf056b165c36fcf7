import type { CommandDef } from '../types.js';
import { controlCommands } from './control.js';
import { blockCommands } from './block.js';
import { nbdCommands } from './nbd.js';
import { bitmapCommands } from './bitmap.js';
import { transactionCommands } from './transaction.js';
import { imageCommands } from './image.js';
import { jobCommands } from './job.js';
import { blockJobCommands } from './block-jobs.js';
import { objectCommands } from './object.js';
import { qomCommands } from './qom.js';
import { statsCommands } from './stats.js';
import { graphCommands } from './graph.js';
import { snapshotCommands } from './snapshot.js';
import { charCommands } from './char.js';

/** Every command handler; each must have a schema in schema/commands/<name>.json. */
export const ALL_COMMANDS: readonly CommandDef[] = [
  ...controlCommands,
  ...blockCommands,
  ...nbdCommands,
  ...bitmapCommands,
  ...transactionCommands,
  ...imageCommands,
  ...jobCommands,
  ...blockJobCommands,
  ...objectCommands,
  ...qomCommands,
  ...statsCommands,
  ...graphCommands,
  ...snapshotCommands,
  ...charCommands,
];
