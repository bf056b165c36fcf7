/**
 * QMP control commands: qmp_capabilities, query-version, query-commands,
 * query-qmp-schema, quit (qmp.md §3.1), and cont (blockd extension: resumes exports stopped by an
 * error policy).
 */
import { QmpError } from '../../util/errors.js';
import { defineCommand, type CommandDef } from '../types.js';
import { QEMU_LEVEL, BLOCKD_VERSION, type Services } from '../services.js';
import { dispatcherOf, type Dispatcher } from '../dispatcher.js';
import { buildSchemaInfo, type SchemaInfo } from '../introspect.js';

/** The `query-version` result (also the greeting's `version`). */
export function versionInfo(): { qemu: { micro: number; minor: number; major: number }; package: string } {
  return {
    qemu: { micro: QEMU_LEVEL.micro, minor: QEMU_LEVEL.minor, major: QEMU_LEVEL.major },
    package: `blockd ${BLOCKD_VERSION}`,
  };
}

function dispatcher(services: Services): Dispatcher {
  const d = dispatcherOf(services);
  if (d === undefined) throw new QmpError('No QMP dispatcher is available');
  return d;
}

const schemaCache = new WeakMap<Dispatcher, SchemaInfo[]>();

export const controlCommands: readonly CommandDef[] = [
  // The monitor owns the negotiation state; reaching the handler means the arguments passed.
  defineCommand<{ enable?: string[] }>('qmp_capabilities', () => ({})),
  defineCommand('query-version', () => versionInfo()),
  defineCommand('query-commands', (_a, ctx) =>
    dispatcher(ctx.services)
      .commandNames()
      .map((name) => ({ name })),
  ),
  defineCommand('query-qmp-schema', (_a, ctx) => {
    const d = dispatcher(ctx.services);
    let info = schemaCache.get(d);
    if (info === undefined) {
      info = buildSchemaInfo(d.schema, d.commandNames());
      schemaCache.set(d, info);
    }
    return info;
  }),
  defineCommand('cont', (_a, ctx) => {
    // QEMU's cont (qapi/misc.json, like quit) resets the io-status of every BlockBackend and
    // block job, then runs the VM: here, the exports stopped by an error policy go on.
    ctx.services.jobs.resetIoStatus();
    ctx.services.exports.resumeAll();
    return {};
  }),
  defineCommand('quit', async (_a, ctx) => {
    // Exports and jobs go first so their events precede the reply, as in QSD 7.2.
    await ctx.services.shutdown();
    ctx.afterReply(async () => {
      await ctx.services.onQuit?.();
    });
    return {};
  }),
];
