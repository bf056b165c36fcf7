import type { Logger } from '../util/logger.js';
import type { Services } from './services.js';

/** Where a command came from: a QMP monitor, or the command line / --config (same code path). */
export type CommandOrigin = 'qmp' | 'cli';

export interface CommandContext {
  readonly services: Services;
  readonly log: Logger;
  readonly origin: CommandOrigin;
  /**
   * Run `fn` once the reply to this command has been written (used by `quit`:
   * events, then `{}`, then exit). On the CLI path it runs right after the handler.
   */
  afterReply(fn: () => void | Promise<void>): void;
}

/**
 * One QMP command. `args` has already been validated against
 * `schema/commands/<name>.json` (defaults are NOT filled in: absent = default),
 * so handlers may cast it to their own argument interface.
 */
export interface CommandDef {
  readonly name: string;
  run(args: Record<string, unknown>, ctx: CommandContext): unknown;
}

/** Helper for typed handlers: `defineCommand<MyArgs>('name', (a, ctx) => ...)`. */
export function defineCommand<A>(
  name: string,
  run: (args: A, ctx: CommandContext) => unknown,
): CommandDef {
  return { name, run: run as (args: Record<string, unknown>, ctx: CommandContext) => unknown };
}
