/**
 * Command-line scanning like qemu-storage-daemon's use of glibc getopt_long with the
 * option string "-hT:V": long options by any unique prefix, `--opt=V` and `--opt V`,
 * clustered short options (`-hV`, `-Tfoo`), non-option arguments returned in place
 * (they are errors in pass 2), and `--` ending the scan (what follows is ignored).
 * Error texts are glibc's, prefixed with our program name by the caller.
 */
import { CliError } from '../util/errors.js';

export type OptionName =
  | 'blockdev'
  | 'chardev'
  | 'config'
  | 'daemonize'
  | 'demo'
  | 'export'
  | 'help'
  | 'log-level'
  | 'log-pretty'
  | 'monitor'
  | 'nbd-server'
  | 'object'
  | 'pidfile'
  | 'trace'
  | 'version';

interface OptionSpec {
  name: OptionName;
  hasArg: boolean;
  short?: string;
}

/** In the order getopt lists them when a prefix is ambiguous. */
export const OPTIONS: readonly OptionSpec[] = [
  { name: 'blockdev', hasArg: true },
  { name: 'chardev', hasArg: true },
  { name: 'config', hasArg: true },
  { name: 'daemonize', hasArg: false },
  { name: 'demo', hasArg: false },
  { name: 'export', hasArg: true },
  { name: 'help', hasArg: false, short: 'h' },
  { name: 'log-level', hasArg: true },
  { name: 'log-pretty', hasArg: false },
  { name: 'monitor', hasArg: true },
  { name: 'nbd-server', hasArg: true },
  { name: 'object', hasArg: true },
  { name: 'pidfile', hasArg: true },
  { name: 'trace', hasArg: true, short: 'T' },
  { name: 'version', hasArg: false, short: 'V' },
];

/** One item of the command line, in order. */
export type ArgvItem =
  | {
      kind: 'option';
      name: OptionName;
      /** The argument, for options that take one. */
      value?: string;
      /**
       * How the option was typed, for error messages: `--blockdev ARG`, `--block=ARG`,
       * `-T ARG` (QEMU prints the argv words that made the option, joined by a space).
       */
      display: string;
    }
  | { kind: 'argument'; value: string };

/**
 * Scan `args` (without the node and script paths). Throws `CliError` with getopt's
 * message (`unrecognized option '--bogus'`, ...) at the first error.
 */
export function scanArgv(args: readonly string[]): ArgvItem[] {
  const out: ArgvItem[] = [];
  let i = 0;
  // getopt reports errors as it goes: `-h` or `-V` before a bad option still wins.
  const early = (): boolean =>
    out.some((it) => it.kind === 'option' && (it.name === 'help' || it.name === 'version'));
  while (i < args.length && !early()) {
    const word = args[i] as string;
    i++;
    if (word === '--') break;
    if (word.startsWith('--')) {
      const body = word.slice(2);
      const eq = body.indexOf('=');
      const name = eq < 0 ? body : body.slice(0, eq);
      const spec = findLong(name, word);
      if (eq >= 0) {
        if (!spec.hasArg) {
          throw new CliError(`option '--${spec.name}' doesn't allow an argument`, 'GETOPT');
        }
        out.push({ kind: 'option', name: spec.name, value: body.slice(eq + 1), display: word });
      } else if (spec.hasArg) {
        const v = args[i];
        if (v === undefined) {
          throw new CliError(`option '--${spec.name}' requires an argument`, 'GETOPT');
        }
        i++;
        out.push({ kind: 'option', name: spec.name, value: v, display: `${word} ${v}` });
      } else {
        out.push({ kind: 'option', name: spec.name, display: word });
      }
      continue;
    }
    if (word.startsWith('-') && word.length > 1) {
      // A cluster of short options; one taking an argument ends the cluster.
      for (let j = 1; j < word.length; j++) {
        const c = word[j] as string;
        const spec = OPTIONS.find((o) => o.short === c);
        if (spec === undefined) throw new CliError(`invalid option -- '${c}'`, 'GETOPT');
        if (!spec.hasArg) {
          out.push({ kind: 'option', name: spec.name, display: `-${c}` });
          if (early()) break;
          continue;
        }
        const rest = word.slice(j + 1);
        if (rest !== '') {
          out.push({ kind: 'option', name: spec.name, value: rest, display: word });
        } else {
          const v = args[i];
          if (v === undefined) {
            throw new CliError(`option requires an argument -- '${c}'`, 'GETOPT');
          }
          i++;
          out.push({ kind: 'option', name: spec.name, value: v, display: `${word} ${v}` });
        }
        break;
      }
      continue;
    }
    out.push({ kind: 'argument', value: word });
  }
  return out;
}

function findLong(name: string, word: string): OptionSpec {
  const exact = OPTIONS.find((o) => o.name === name);
  if (exact !== undefined) return exact;
  const matches = OPTIONS.filter((o) => o.name.startsWith(name));
  if (matches.length === 1 && matches[0] !== undefined) return matches[0];
  if (matches.length === 0) throw new CliError(`unrecognized option '${word}'`, 'GETOPT');
  const list = matches.map((o) => `'--${o.name}'`).join(' ');
  throw new CliError(`option '--${name}' is ambiguous; possibilities: ${list}`, 'GETOPT');
}

/** What pass 1 decides before anything is created. */
export interface Pass1 {
  /** `-h` or `-V` came first: print this and exit 0. */
  early?: 'help' | 'version';
  daemonize: boolean;
  pidfile?: string;
  logLevel?: string;
  logPretty: boolean;
  demo: boolean;
  /** Everything, in order, for pass 2. */
  items: ArgvItem[];
}

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

/**
 * Pass 1 (qsd-cli.md §2): getopt errors, `-h`/`-V` (the first one wins, like QSD),
 * `--daemonize`, `--pidfile` (the last one wins) and the blockd logging options.
 */
export function pass1(args: readonly string[]): Pass1 {
  const items = scanArgv(args);
  const r: Pass1 = { daemonize: false, logPretty: false, demo: false, items };
  for (const it of items) {
    if (it.kind !== 'option') continue;
    switch (it.name) {
      case 'help':
      case 'version':
        r.early ??= it.name;
        // QSD exits at the first of them, before looking at the rest.
        return r;
      case 'daemonize':
        r.daemonize = true;
        break;
      case 'pidfile':
        r.pidfile = it.value;
        break;
      case 'log-level':
        if (it.value === undefined || !LOG_LEVELS.includes(it.value)) {
          throw new CliError(
            `${it.display}: Parameter 'log-level' expects one of ${LOG_LEVELS.join(', ')}`,
            'CLI',
          );
        }
        r.logLevel = it.value;
        break;
      case 'log-pretty':
        r.logPretty = true;
        break;
      case 'demo':
        r.demo = true;
        break;
      default:
        break;
    }
  }
  return r;
}
