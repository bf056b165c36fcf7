import { createRequire } from 'node:module';
import type { Logger } from '../util/logger.js';
import { EventBus } from '../util/events.js';
import { BlockGraph } from '../block/graph.js';
import { ExportManager } from '../export/manager.js';
import { NbdBlockDriver } from '../export/nbd-driver.js';
import { JobManager } from '../block/jobs.js';
import { ObjectRegistry } from './objects.js';
import { QomTree, type QomChardev } from './qom.js';
import type { MonitorManager } from './monitor-manager.js';

const require = createRequire(import.meta.url);
const pkg = require('../../package.json') as { version: string };

/** The QEMU QMP level whose behaviour we follow (qemu-storage-daemon 7.2). */
export const QEMU_LEVEL = { major: 7, minor: 2, micro: 0 } as const;
export const BLOCKD_VERSION: string = pkg.version;

/**
 * Everything a command handler can reach. Built once by the composition root
 * (cli/) and shared by every monitor and by the command line.
 */
export class Services {
  readonly events = new EventBus();
  readonly graph: BlockGraph;
  readonly exports: ExportManager;
  /** User-creatable objects (object-add, --object): secrets, iothreads, TLS credentials, ... */
  readonly objects: ObjectRegistry;
  /** The QOM view (qom-* commands) over the objects and chardevs. */
  readonly qom: QomTree;
  /**
   * The chardev registry (chardev-add, query-chardev, ringbuf-*): the MonitorManager sets
   * itself here when it is built; without one (in-process tests) there are no chardevs.
   */
  chardevs: MonitorManager | undefined;
  /** Set by the composition root: the chardevs as QOM sees them (`/chardevs`). */
  qomChardevs: () => readonly QomChardev[] = () => [];
  /** Jobs (blockdev-create, ...): JOB_STATUS_CHANGE events go to the bus. */
  readonly jobs = new JobManager((event, data) => this.events.emit(event, data));
  private shuttingDown: Promise<void> | undefined;
  /**
   * Set by the composition root: what `quit` does once its `{}` reply is written
   * (close monitors and chardevs, remove the pidfile, exit 0). QMP never exits by itself.
   */
  onQuit: (() => void | Promise<void>) | undefined;

  constructor(readonly log: Logger) {
    this.graph = new BlockGraph(log.child({ component: 'block' }));
    this.graph.eventSink = (event, data) => this.events.emit(event, data);
    this.graph.registerDriver('nbd', (ctx, o) => NbdBlockDriver.open(ctx, o, (id) => this.objects.tlsCreds(id)));
    this.exports = new ExportManager(this.graph, this.events, log);
    this.objects = new ObjectRegistry(log);
    this.graph.throttleGroups.limitsOf = (id) => this.objects.throttleLimits(id);
    this.objects.throttleGroups = this.graph.throttleGroups;
    this.qom = new QomTree({ objects: this.objects, chardevs: () => this.qomChardevs() });
    this.exports.tlsCredsLookup = (id) => this.objects.tlsCreds(id);
    this.exports.authzLookup = (id, identity) => this.objects.authzCheck(id, identity);
  }

  /**
   * Tear everything down in QSD's order: exports (one BLOCK_EXPORT_DELETED each),
   * jobs, nodes (metadata flushed). Idempotent: later callers share the first run.
   */
  shutdown(): Promise<void> {
    this.shuttingDown ??= (async () => {
      await this.exports.closeAll();
      await this.jobs.closeAll();
      await this.graph.closeAll();
      this.objects.clear();
    })();
    return this.shuttingDown;
  }
}
