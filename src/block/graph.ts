import type { Logger } from '../util/logger.js';

/** Placeholder until the block-core issue lands: the node graph. */
export class BlockGraph {
  constructor(readonly log: Logger) {}

  /** Close every node, flushing metadata. */
  async closeAll(): Promise<void> {}
}
