/**
 * Runs QMP commands: schema validation (ajv via SchemaRegistry), then the handler.
 * Used by every monitor session and by the command line (`--blockdev`, `--export`,
 * `--nbd-server`, `--config`), so it knows nothing about monitors.
 *
 * Like QSD's main loop, commands run one at a time across the whole process: a single
 * FIFO serialises them whatever monitor (or the CLI) they come from.
 */
import type { Logger } from '../util/logger.js';
import { DaemonError, QmpError } from '../util/errors.js';
import type { CommandDef, CommandContext, CommandOrigin } from './types.js';
import type { Services } from './services.js';
import type { SchemaRegistry } from './schema-registry.js';

export type AfterReply = () => void | Promise<void>;

export interface ExecuteResult {
  /** The `return` value (`{}` when the handler returned nothing). */
  value: unknown;
  /** Hooks to run once the reply has been written (in order). */
  after: AfterReply[];
}

const BY_SERVICES = new WeakMap<Services, Dispatcher>();

/** The dispatcher built for these services (control commands use it for introspection). */
export function dispatcherOf(services: Services): Dispatcher | undefined {
  return BY_SERVICES.get(services);
}

export class Dispatcher {
  private readonly handlers = new Map<string, CommandDef>();
  private readonly log: Logger;
  private tail: Promise<unknown> = Promise.resolve();

  constructor(
    readonly services: Services,
    commands: readonly CommandDef[],
    readonly schema: SchemaRegistry,
  ) {
    this.log = services.log.child({ component: 'qmp' });
    for (const c of commands) {
      if (this.handlers.has(c.name)) throw new Error(`duplicate QMP handler ${c.name}`);
      this.handlers.set(c.name, c);
    }
    const cov = this.coverage();
    if (cov.missingSchema.length > 0 || cov.missingHandler.length > 0) {
      this.log.warn(cov, 'QMP handlers and schema files do not match');
    }
    BY_SERVICES.set(services, this);
  }

  /** Handlers without a schema file and schema files without a handler. */
  coverage(): { missingSchema: string[]; missingHandler: string[] } {
    return {
      missingSchema: [...this.handlers.keys()].filter((n) => !this.schema.hasCommand(n)).sort(),
      missingHandler: this.schema.commandNames().filter((n) => !this.handlers.has(n)),
    };
  }

  /** A command that can run: it has both a handler and a schema. */
  has(name: string): boolean {
    return this.handlers.has(name) && this.schema.hasCommand(name);
  }

  /** Names of every runnable command, sorted. */
  commandNames(): string[] {
    return [...this.handlers.keys()].filter((n) => this.schema.hasCommand(n)).sort();
  }

  /** Whether `exec-oob` may run this command (schema `"allow-oob": true`). */
  allowsOob(name: string): boolean {
    return this.has(name) && this.schema.commandSchema(name)['allow-oob'] === true;
  }

  /** Check `args` against the command's schema only (throws QmpError like execute would). */
  validate(name: string, args: Record<string, unknown>): void {
    this.schema.validateArguments(name, args);
  }

  /**
   * Validate and run one command, after every command queued before it has finished.
   * Throws a DaemonError (QmpError for unknown commands and bad arguments).
   */
  execute(name: string, args: Record<string, unknown>, origin: CommandOrigin): Promise<ExecuteResult> {
    const run = this.tail.then(() => this.run(name, args, origin));
    this.tail = run.catch(() => undefined);
    return run;
  }

  private async run(
    name: string,
    args: Record<string, unknown>,
    origin: CommandOrigin,
  ): Promise<ExecuteResult> {
    const def = this.handlers.get(name);
    if (def === undefined || !this.schema.hasCommand(name)) {
      throw new QmpError(`The command ${name} has not been found`, 'CommandNotFound');
    }
    this.schema.validateArguments(name, args);
    const after: AfterReply[] = [];
    const log = this.log.child({ command: name, origin });
    const ctx: CommandContext = {
      services: this.services,
      log,
      origin,
      afterReply: (fn) => {
        after.push(fn);
      },
    };
    log.debug({ args }, 'QMP command');
    try {
      const value: unknown = await def.run(args, ctx);
      return { value: value === undefined ? {} : value, after };
    } catch (err) {
      if (err instanceof DaemonError) {
        log.debug({ err }, 'QMP command failed');
        throw err;
      }
      log.error({ err }, 'QMP command failed unexpectedly');
      const text = err instanceof Error ? err.message : String(err);
      throw new QmpError(text === '' ? `Command ${name} failed` : text);
    }
  }
}
