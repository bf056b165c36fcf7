/**
 * An in-process blockd for integration tests: Services driven through the real schema validation
 * and command handlers. Unlike Dispatcher.execute, an exception that is not a DaemonError is
 * rethrown instead of becoming a GenericError reply, so a handler bug fails the test loudly.
 * Events are recorded in `events`.
 */
import { Services } from '../../src/qmp/services.js';
import { SchemaRegistry } from '../../src/qmp/schema-registry.js';
import { ALL_COMMANDS } from '../../src/qmp/commands/index.js';
import type { CommandContext } from '../../src/qmp/types.js';
import { silentLogger } from '../../src/util/logger.js';
import { DaemonError } from '../../src/util/errors.js';
import type { QmpEvent } from '../../src/util/events.js';

const reg = SchemaRegistry.load();
const byName = new Map(ALL_COMMANDS.map((c) => [c.name, c]));

export type Reply = { return: unknown } | { error: { class: string; desc: string } };

/** An in-process blockd with a QMP-like call interface. */
export class Daemon {
  readonly svc = new Services(silentLogger());
  readonly events: QmpEvent[] = [];
  private readonly ctx: CommandContext = {
    services: this.svc,
    log: this.svc.log,
    origin: 'qmp',
    afterReply: () => undefined,
  };

  constructor() {
    this.svc.events.subscribe((e) => this.events.push(e));
  }

  async qmp(name: string, args: Record<string, unknown> = {}): Promise<Reply> {
    try {
      reg.validateArguments(name, args);
      const c = byName.get(name);
      if (!c) throw new Error(`no handler for ${name}`);
      return { return: await c.run(args, this.ctx) };
    } catch (e) {
      if (e instanceof DaemonError) return { error: { class: e.qmpClass, desc: e.message } };
      throw e;
    }
  }

  async ok(name: string, args: Record<string, unknown> = {}): Promise<unknown> {
    const r = await this.qmp(name, args);
    if ('error' in r) throw new Error(`${name} failed: ${r.error.desc}`);
    return r.return;
  }

  async err(name: string, args: Record<string, unknown>): Promise<string> {
    const r = await this.qmp(name, args);
    if (!('error' in r)) throw new Error(`${name} unexpectedly succeeded`);
    return r.error.desc;
  }

  async bitmaps(node: string): Promise<Array<Record<string, unknown>> | undefined> {
    const all = (await this.ok('query-named-block-nodes')) as Array<Record<string, unknown>>;
    return all.find((n) => n['node-name'] === node)?.['dirty-bitmaps'] as Array<Record<string, unknown>> | undefined;
  }

  shutdown(): Promise<void> {
    return this.svc.shutdown();
  }
}
