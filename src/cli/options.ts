/**
 * Pass 2 of the command line (qsd-cli.md §2): each option, strictly left to right, runs
 * at once through the same dispatcher as QMP (`--blockdev` → blockdev-add, `--export` →
 * block-export-add, `--nbd-server` → nbd-server-start, `--object` → object-add,
 * `--config` → its commands in order), or sets up chardevs and monitors.
 */
import { readFileSync } from 'node:fs';
import { CliError, DaemonError, strerror } from '../util/errors.js';
import type { Dispatcher } from '../qmp/dispatcher.js';
import type { SchemaRegistry, JsonSchema } from '../qmp/schema-registry.js';
import type { MonitorManager } from '../qmp/monitor-manager.js';
import type { ArgvItem } from './argv.js';
import { parseKeyval, type KeyvalTree } from './keyval.js';
import { keyvalToTyped } from './keyval-types.js';
import { parseJsonArgument } from './json-arg.js';
import { parseChardev, chardevHelpText, chardevKeysHelpText } from './chardev-opts.js';
import { objectListHelpText, objectTypeHelpText } from './object-help.js';
import { OBJECT_BAD_ID } from '../qmp/objects.js';

const ID_HINT = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.";

/** `--monitor` (QSD MonitorOptions), converted with the same keyval machinery. */
const MONITOR_OPTIONS: JsonSchema = {
  type: 'object',
  properties: {
    id: { type: 'string' },
    mode: { type: 'string', enum: ['readline', 'control'] },
    pretty: { type: 'boolean' },
    chardev: { type: 'string' },
  },
  required: ['chardev'],
  additionalProperties: false,
};

export interface Pass2Context {
  readonly dispatcher: Dispatcher;
  readonly schema: SchemaRegistry;
  readonly monitors: MonitorManager;
  /** A `blockd: <display>: warning: <msg>` line on stderr. */
  warn(display: string, message: string): void;
  /** A `blockd: <display>: info: <msg>` line on stderr. */
  info(display: string, message: string): void;
  /** Text on stdout (help listings). */
  stdout(text: string): void;
}

/** What the caller does after an option: continue, or exit with this code (help listings). */
export type OptionOutcome = { exit?: number };

const HELP_UNAVAILABLE = 'Help is not available for this option';

/** Parse keyval or JSON text into an untyped tree / JSON object. */
function parseArg(
  text: string,
  implied: string | undefined,
): { kind: 'json'; value: Record<string, unknown> } | { kind: 'keyval'; tree: KeyvalTree; help: boolean } {
  if (text.startsWith('{')) return { kind: 'json', value: parseJsonArgument(text) };
  const r = parseKeyval(text, implied);
  return { kind: 'keyval', tree: r.tree, help: r.help };
}

function requireCommand(ctx: Pass2Context, command: string): void {
  if (!ctx.dispatcher.has(command)) {
    throw new CliError(`this build does not support '${command}' yet`, 'UNSUPPORTED');
  }
}

/** keyval → typed arguments for `command` (or the given schema), JSON → as is. */
function commandArgs(
  ctx: Pass2Context,
  display: string,
  text: string,
  implied: string | undefined,
  schema: JsonSchema | undefined,
): Record<string, unknown> {
  const parsed = parseArg(text, implied);
  if (parsed.kind === 'json') return parsed.value;
  if (parsed.help) throw new CliError(HELP_UNAVAILABLE, 'HELP');
  if (schema === undefined) return parsed.tree;
  return keyvalToTyped(parsed.tree, schema, {
    deref: (n) => ctx.schema.deref(n),
    warn: (m) => ctx.warn(display, m),
  });
}

async function execute(ctx: Pass2Context, command: string, args: Record<string, unknown>): Promise<unknown> {
  const r = await ctx.dispatcher.execute(command, args, 'cli');
  for (const fn of r.after) await fn();
  return r.value;
}

/**
 * `--nbd-server` takes NbdServerOptions, whose `addr` is the flat SocketAddress
 * (`addr.type=unix,addr.path=P`); nbd-server-start wants the legacy `{type, data}` form.
 */
function nbdServerSchema(schema: SchemaRegistry): JsonSchema | undefined {
  const base = schema.argumentsSchema('nbd-server-start');
  if (base === undefined) return undefined;
  const props = { ...(base.properties ?? {}) };
  props.addr = { $ref: '../types/SocketAddress.json' };
  return { ...base, properties: props };
}

function flatToLegacy(args: Record<string, unknown>): Record<string, unknown> {
  const addr = args.addr;
  if (typeof addr !== 'object' || addr === null || Array.isArray(addr)) return args;
  const { type, ...data } = addr as Record<string, unknown>;
  return { ...args, addr: { type, data } };
}

async function nbdServer(ctx: Pass2Context, item: ArgvOption): Promise<void> {
  requireCommand(ctx, 'nbd-server-start');
  const text = item.value ?? '';
  const args = commandArgs(ctx, item.display, text, undefined, nbdServerSchema(ctx.schema));
  try {
    await execute(ctx, 'nbd-server-start', flatToLegacy(args));
  } catch (err) {
    // Errors about the translated address name the flat member, as QSD does.
    if (err instanceof DaemonError && err.message.includes("'addr.data.")) {
      throw new CliError(err.message.replace("'addr.data.", "'addr."), 'NBD_SERVER');
    }
    throw err;
  }
}

type ArgvOption = Extract<ArgvItem, { kind: 'option' }>;

/**
 * `--object`: `help` / `TYPE,help` listings (exit 0; an unknown TYPE lists the types, as QSD
 * does), otherwise object-add with the same schema and errors.
 */
async function object(ctx: Pass2Context, item: ArgvOption): Promise<OptionOutcome> {
  const text = item.value ?? '';
  const parsed = parseArg(text, 'qom-type');
  if (parsed.kind === 'keyval' && parsed.help) {
    const t = parsed.tree['qom-type'];
    ctx.stdout((typeof t === 'string' ? objectTypeHelpText(ctx.schema, t) : undefined) ?? objectListHelpText());
    return { exit: 0 };
  }
  requireCommand(ctx, 'object-add');
  const args = commandArgs(ctx, item.display, text, 'qom-type', ctx.schema.argumentsSchema('object-add'));
  try {
    await execute(ctx, 'object-add', args);
  } catch (err) {
    // On the command line QSD adds a hint line under this one error.
    if (err instanceof DaemonError && err.code === OBJECT_BAD_ID) {
      throw new CliError(`${err.message}\n${ID_HINT}`, OBJECT_BAD_ID);
    }
    throw err;
  }
  return {};
}

function monitor(ctx: Pass2Context, item: ArgvOption): void {
  const text = item.value ?? '';
  const parsed = parseArg(text, 'chardev');
  let opts: Record<string, unknown>;
  if (parsed.kind === 'json') {
    opts = parsed.value;
    // The JSON form has real JSON types: check them like QMP would.
    for (const [k, v] of Object.entries(opts)) {
      const want = k === 'pretty' ? 'boolean' : 'string';
      if (!['id', 'mode', 'pretty', 'chardev'].includes(k)) {
        throw new CliError(`Parameter '${k}' is unexpected`, 'MONITOR');
      }
      if (typeof v !== want) throw new CliError(`Invalid parameter type for '${k}', expected: ${want}`, 'MONITOR');
    }
    if (opts.chardev === undefined) throw new CliError("Parameter 'chardev' is missing", 'MONITOR');
    if (opts.mode !== undefined && opts.mode !== 'readline' && opts.mode !== 'control') {
      throw new CliError(`Parameter 'mode' does not accept value '${String(opts.mode)}'`, 'MONITOR');
    }
  } else {
    if (parsed.help) throw new CliError(HELP_UNAVAILABLE, 'HELP');
    opts = keyvalToTyped(parsed.tree, MONITOR_OPTIONS, { deref: (n) => n });
  }
  if (opts.mode === 'readline') throw new CliError('Only QMP is supported', 'MONITOR');
  ctx.monitors.attach(opts.chardev as string, {
    ...(opts.pretty === true ? { pretty: true } : {}),
    ...(typeof opts.id === 'string' ? { id: opts.id } : {}),
  });
}

async function chardev(ctx: Pass2Context, item: ArgvOption): Promise<OptionOutcome> {
  const r = parseChardev(item.value ?? '', (m) => ctx.warn(item.display, m));
  if (r.kind === 'help') {
    if (r.backend === undefined) {
      ctx.stdout(chardevHelpText());
      return { exit: 0 };
    }
    ctx.stdout(chardevKeysHelpText());
    // QSD 7.2 exits 1 after listing a backend's keys.
    return { exit: 1 };
  }
  const taken = ctx.monitors.chardev(r.spec.id);
  if (taken !== undefined) {
    // QSD 7.2: two sockets collide in the yank registry first, anything else in /chardevs.
    const sockets = taken.backend === 'socket' && (r.spec.backend ?? 'socket') === 'socket';
    throw new CliError(
      sockets ? 'duplicate yank instance' : `attempt to add duplicate property '${r.spec.id}' to object (type 'container')`,
      'CHARDEV',
    );
  }
  await ctx.monitors.addChardev(r.spec, {
    onWaiting: (addr) => ctx.info(item.display, `QEMU waiting for connection on: ${addr}`),
  });
  return {};
}

/** `-T`: accepted and ignored (blockd has no trace events), except `help`. */
function trace(ctx: Pass2Context, item: ArgvOption): OptionOutcome {
  const first = (item.value ?? '').split(',')[0] ?? '';
  if (first === 'help' || first === 'enable=help' || first === '?') {
    ctx.stdout('');
    return { exit: 0 };
  }
  return {};
}

/** `--config FILE.json`: `[{"execute": NAME, "arguments": {...}}, ...]` run in order. */
async function config(ctx: Pass2Context, item: ArgvOption): Promise<void> {
  const path = item.value ?? '';
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new CliError(`Could not open '${path}': ${strerror(err)}`, 'CONFIG');
  }
  let list: unknown;
  try {
    list = JSON.parse(text) as unknown;
  } catch (err) {
    throw new CliError(`JSON parse error, ${(err as Error).message}`, 'CONFIG');
  }
  if (!Array.isArray(list)) {
    throw new CliError('expected a JSON array of {"execute", "arguments"} objects', 'CONFIG');
  }
  for (const [i, entry] of list.entries()) {
    const e = entry as { execute?: unknown; arguments?: unknown } | null;
    if (typeof e !== 'object' || e === null || Array.isArray(e) || typeof e.execute !== 'string') {
      throw new CliError(`entry ${i}: expected {"execute": NAME, "arguments": {...}}`, 'CONFIG');
    }
    const args = e.arguments ?? {};
    if (typeof args !== 'object' || args === null || Array.isArray(args)) {
      throw new CliError(`${e.execute}: Invalid parameter type for 'arguments', expected: object`, 'CONFIG');
    }
    try {
      await execute(ctx, e.execute, args as Record<string, unknown>);
    } catch (err) {
      const msg = err instanceof Error ? err.message : String(err);
      throw new CliError(`${e.execute}: ${msg}`, 'CONFIG');
    }
  }
}

/** An option that is one QMP command: syntax and help first, then "not supported", then run. */
async function mapped(ctx: Pass2Context, item: ArgvOption, command: string, implied: string): Promise<void> {
  const text = item.value ?? '';
  if (text.startsWith('{')) parseJsonArgument(text);
  else if (parseKeyval(text, implied).help) throw new CliError(HELP_UNAVAILABLE, 'HELP');
  requireCommand(ctx, command);
  await execute(ctx, command, commandArgs(ctx, item.display, text, implied, ctx.schema.argumentsSchema(command)));
}

/**
 * Run one pass-2 item. Throws on failure; the caller prints
 * `blockd: <display>: <message>` and exits 1 at once.
 */
export async function runPass2Item(ctx: Pass2Context, item: ArgvItem): Promise<OptionOutcome> {
  if (item.kind === 'argument') throw new CliError('Unexpected argument', 'ARGUMENT');
  const text = item.value ?? '';
  switch (item.name) {
    case 'trace':
      return trace(ctx, item);
    case 'blockdev':
      await mapped(ctx, item, 'blockdev-add', 'driver');
      return {};
    case 'export':
      await mapped(ctx, item, 'block-export-add', 'type');
      return {};
    case 'nbd-server':
      if (text.startsWith('{')) parseJsonArgument(text);
      else if (parseKeyval(text).help) throw new CliError(HELP_UNAVAILABLE, 'HELP');
      await nbdServer(ctx, item);
      return {};
    case 'object':
      return object(ctx, item);
    case 'monitor':
      monitor(ctx, item);
      return {};
    case 'chardev':
      return chardev(ctx, item);
    case 'config':
      await config(ctx, item);
      return {};
    default:
      // Pass-1 options (help, version, daemonize, pidfile, log-*, demo) were handled already.
      return {};
  }
}
