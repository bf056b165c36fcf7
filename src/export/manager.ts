import type { Logger } from '../util/logger.js';
import type { EventBus } from '../util/events.js';
import type { BlockGraph } from '../block/graph.js';

/** Placeholder until the NBD issue lands: the export registry. */
export class ExportManager {
  constructor(
    readonly graph: BlockGraph,
    readonly events: EventBus,
    readonly log: Logger,
  ) {}

  /** Delete every export (emitting BLOCK_EXPORT_DELETED) and stop the NBD server. */
  async closeAll(): Promise<void> {}
}
