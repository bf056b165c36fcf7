import { pino, destination, type Logger, type LevelWithSilent } from 'pino';

export type { Logger };

export interface LoggerOptions {
  level?: LevelWithSilent;
  pretty?: boolean;
  /** Destination fd; default 2 (stderr), because stdout may carry a QMP stdio monitor. */
  fd?: number;
}

/**
 * Build the root logger. Only `cli/` calls this; every other module receives a
 * logger and derives children with context (`component`, `export`, `node`, `conn`).
 */
export function createLogger(opts: LoggerOptions = {}): Logger {
  const level = opts.level ?? 'info';
  const fd = opts.fd ?? 2;
  if (opts.pretty) {
    return pino({
      level,
      transport: { target: 'pino-pretty', options: { destination: fd, colorize: false } },
    });
  }
  return pino({ level, base: { pid: process.pid } }, destination({ fd, sync: true }));
}

/** A logger that discards everything (tests, library use). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
