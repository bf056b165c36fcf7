/**
 * I/O statistics and the write threshold: query-blockstats, block-set-write-threshold (and its
 * BLOCK_WRITE_THRESHOLD event).
 *
 * QSD 7.2 lists only named or device-attached BlockBackends without `query-nodes`; a storage
 * daemon has none (export BlockBackends are anonymous), so that answer is `[]` in both. With
 * `query-nodes` every node is listed in creation order with its primary child as `parent`.
 * QSD's node-level counters are all 0 but `wr_highest_offset` and the file driver's discard
 * counters (nothing accounts below a device model); blockd fills them from the node's
 * io.ts counters. Per-export counters are in query-block-exports' `statistics`. See docs/qmp.md.
 */
import { QmpError } from '../../util/errors.js';
import type { BlockNode, BlockStats } from '../../block/types.js';
import { MAX_OFFSET } from '../../block/io.js';
import { defineCommand, type CommandDef } from '../types.js';

interface QueryBlockstatsArgs {
  'query-nodes'?: boolean;
}

interface SetWriteThresholdArgs {
  'node-name': string;
  'write-threshold': number;
}

/** BlockDeviceStats of a node, in the member order QSD 7.2 prints. */
export function deviceStats(s: BlockStats): Record<string, unknown> {
  return {
    'unmap_operations': s.discardOps,
    'unmap_merged': 0,
    'flush_total_time_ns': 0,
    'wr_highest_offset': s.wrHighestOffset,
    'wr_total_time_ns': 0,
    'failed_wr_operations': s.failedWriteOps,
    'failed_rd_operations': s.failedReadOps,
    'wr_merged': 0,
    'wr_bytes': s.writeBytes + s.zeroBytes,
    'timed_stats': [],
    'failed_unmap_operations': s.failedDiscardOps,
    'failed_flush_operations': s.failedFlushOps,
    'account_invalid': false,
    'rd_total_time_ns': 0,
    'invalid_unmap_operations': s.invalidDiscardOps,
    'flush_operations': s.flushOps,
    'wr_operations': s.writeOps + s.zeroOps,
    'unmap_bytes': s.discardBytes,
    'rd_merged': 0,
    'rd_bytes': s.readBytes,
    'unmap_total_time_ns': 0,
    'invalid_flush_operations': 0,
    'account_failed': false,
    'rd_operations': s.readOps,
    'invalid_wr_operations': s.invalidWriteOps,
    'invalid_rd_operations': s.invalidReadOps,
  };
}

/** Drivers with driver-specific statistics (QEMU: raw-posix's BlockStatsSpecificFile). */
const FILE_LIKE = new Set(['file', 'host_device']);

/**
 * One BlockStats of a node (QEMU's bdrv_query_bds_stats at node level): the node's counters,
 * driver-specific statistics, and the primary child (`file`) as `parent`, recursively.
 */
export function nodeStats(node: BlockNode, depth = 0): Record<string, unknown> {
  const primary = node.children.find((c) => c.name === 'file');
  const out: Record<string, unknown> = {};
  if (primary && depth < 64) out['parent'] = nodeStats(primary.user.node, depth + 1);
  out['stats'] = deviceStats(node.io.stats);
  out['node-name'] = node.name;
  if (FILE_LIKE.has(node.driverName)) {
    const s = node.io.stats;
    out['driver-specific'] = {
      'discard-bytes-ok': s.driverDiscardBytesOk,
      'discard-nb-ok': s.driverDiscardOk,
      driver: node.driverName,
      'discard-nb-failed': s.driverDiscardFailed,
    };
  }
  return out;
}

export const statsCommands: readonly CommandDef[] = [
  defineCommand<QueryBlockstatsArgs>('query-blockstats', (args, ctx) => {
    if (!args['query-nodes']) return [];
    // graph.list() is newest first; QEMU walks its node list from the oldest.
    return ctx.services.graph
      .list()
      .reverse()
      .map((n) => nodeStats(n));
  }),
  defineCommand<SetWriteThresholdArgs>('block-set-write-threshold', (args, ctx) => {
    const name = args['node-name'];
    const node = ctx.services.graph.get(name);
    if (!node) throw new QmpError(`Device '${name}' not found`);
    // Offsets end at 2^53 in blockd: a larger threshold can never be passed, the largest safe one
    // neither.
    const threshold = Math.min(args['write-threshold'], MAX_OFFSET);
    const events = ctx.services.events;
    node.io.setWriteThreshold(threshold, (amount, at) =>
      events.emit('BLOCK_WRITE_THRESHOLD', {
        'node-name': name,
        'write-threshold': at,
        'amount-exceeded': amount,
      }),
    );
    return {};
  }),
];
