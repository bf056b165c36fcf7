/**
 * Dirty bitmap commands: block-dirty-bitmap-{add,remove,clear,enable,disable,merge} and
 * x-debug-block-dirty-bitmap-sha256. Each command (except sha256) is also a transaction action:
 * `prepare` does the change and returns how to commit or undo it, so `transaction` can roll a
 * group back and later actions see earlier ones' effects. Texts and check order are QSD 7.2's.
 */
import { BlockError, QmpError } from '../../util/errors.js';
import type { BlockGraph } from '../../block/graph.js';
import type { BlockNode } from '../../block/types.js';
import { isValidGranularity, type DirtyBitmap } from '../../block/dirty-bitmap.js';
import {
  CHECK_ALLOW_RO,
  CHECK_BUSY,
  CHECK_DEFAULT,
  CHECK_INCONSISTENT,
  CHECK_RO,
  bitmapsOf,
  defaultGranularity,
  isPersistentBitmapDriver,
  type NamedBitmap,
} from '../../block/dirty-bitmap-set.js';
import { defineCommand, type CommandContext, type CommandDef } from '../types.js';
import { registerTransactionAction, type PreparedAction, type TransactionActionDef } from './transaction.js';

export interface BitmapAddArgs {
  node: string;
  name: string;
  granularity?: number;
  persistent?: boolean;
  disabled?: boolean;
}

export interface BitmapArgs {
  node: string;
  name: string;
}

export interface BitmapMergeArgs {
  node: string;
  target: string;
  bitmaps: Array<string | { node: string; name: string }>;
}

/** Node lookup of every bitmap command but add: `Node 'X' not found`. */
function nodeOf(graph: BlockGraph, name: string): BlockNode {
  const n = graph.get(name);
  if (!n) throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Node '${name}' not found`);
  return n;
}

/** Look a bitmap up (`Node 'X' not found`, `Dirty bitmap 'Y' not found`). */
export function lookupBitmap(graph: BlockGraph, node: string, name: string): NamedBitmap {
  return bitmapsOf(nodeOf(graph, node)).find(name);
}

const NOOP: PreparedAction = {};

export async function prepareAdd(a: BitmapAddArgs, ctx: CommandContext): Promise<PreparedAction> {
  if (a.name === '') throw new QmpError('Bitmap name cannot be empty');
  const node = ctx.services.graph.find(a.node);
  let granularity = a.granularity;
  if (granularity === undefined) granularity = await defaultGranularity(node);
  else if (!isValidGranularity(granularity)) {
    throw new QmpError('Granularity must be power of 2 and at least 512');
  }
  const persistent = a.persistent ?? false;
  if (persistent) {
    const d = node.driver;
    if (!isPersistentBitmapDriver(d)) {
      throw new QmpError(`Can't store persistent bitmaps to ${node.name}: Operation not supported`);
    }
    d.canStoreBitmap(a.name, granularity);
  }
  const set = bitmapsOf(node);
  const bm = set.add({ name: a.name, granularity, persistent, disabled: a.disabled ?? false });
  return { abort: () => set.delete(bm) };
}

export function prepareRemove(a: BitmapArgs, ctx: CommandContext): PreparedAction {
  const node = nodeOf(ctx.services.graph, a.node);
  const set = bitmapsOf(node);
  const bm = set.find(a.name);
  bm.check(CHECK_BUSY | CHECK_RO);
  // Until commit the bitmap stays visible but busy and not recording (QEMU), so later actions
  // of the same transaction cannot use it.
  const wasRecording = bm.recording;
  bm.setBusy(true);
  bm.recording = false;
  return {
    commit: async () => {
      set.delete(bm);
      // A persistent bitmap leaves the image at once, as in QSD.
      const d = node.driver;
      if (bm.persistent && isPersistentBitmapDriver(d)) await d.removeStoredBitmap?.(bm.name);
    },
    abort: () => {
      bm.setBusy(false);
      bm.recording = wasRecording;
    },
  };
}

export function prepareClear(a: BitmapArgs, ctx: CommandContext): PreparedAction {
  const bm = lookupBitmap(ctx.services.graph, a.node, a.name);
  bm.check(CHECK_DEFAULT);
  if (bm.bits.dirtyBits === 0) return NOOP;
  const backup = bm.bits.clone();
  bm.bits.clear();
  return { abort: () => restore(bm.bits, backup) };
}

function prepareRecording(a: BitmapArgs, ctx: CommandContext, on: boolean): PreparedAction {
  const bm = lookupBitmap(ctx.services.graph, a.node, a.name);
  bm.check(CHECK_ALLOW_RO);
  const was = bm.recording;
  bm.recording = on;
  return { abort: () => void (bm.recording = was) };
}

export function prepareMerge(a: BitmapMergeArgs, ctx: CommandContext): PreparedAction {
  const graph = ctx.services.graph;
  const targetNode = nodeOf(graph, a.node);
  const target = bitmapsOf(targetNode).find(a.target);
  if (a.bitmaps.length === 0) throw new QmpError("Parameter 'bitmaps' must not be empty");
  const sources: NamedBitmap[] = [];
  for (const s of a.bitmaps) {
    const src = typeof s === 'string' ? bitmapsOf(targetNode).find(s) : lookupBitmap(graph, s.node, s.name);
    // QSD 7.2 refuses a busy source too (e.g. a bitmap exported over NBD).
    src.check(CHECK_BUSY | CHECK_INCONSISTENT);
    if (src.bits.size !== target.bits.size) {
      throw new QmpError(
        `Bitmaps are of different sizes (destination size is ${target.bits.size}, source size is ` +
          `${src.bits.size}) and can't be merged`,
      );
    }
    sources.push(src);
  }
  target.check(CHECK_DEFAULT);
  const backup = target.bits.clone();
  for (const src of sources) if (src !== target) target.bits.merge(src.bits);
  return { abort: () => restore(target.bits, backup) };
}

function restore(bits: DirtyBitmap, backup: DirtyBitmap): void {
  if (backup.size !== bits.size) backup.resize(bits.size);
  bits.copyFrom(backup);
}

/** Run a prepared action to completion (the non-transactional command path). */
async function now(p: PreparedAction | Promise<PreparedAction>): Promise<Record<string, never>> {
  const prepared = await p;
  await prepared.commit?.();
  await prepared.clean?.();
  return {};
}

/** The bitmap actions of `transaction`. */
export const bitmapTransactionActions: readonly TransactionActionDef[] = [
  { type: 'block-dirty-bitmap-add', prepare: (d, ctx) => prepareAdd(d as unknown as BitmapAddArgs, ctx) },
  { type: 'block-dirty-bitmap-remove', prepare: (d, ctx) => prepareRemove(d as unknown as BitmapArgs, ctx) },
  { type: 'block-dirty-bitmap-clear', prepare: (d, ctx) => prepareClear(d as unknown as BitmapArgs, ctx) },
  {
    type: 'block-dirty-bitmap-enable',
    prepare: (d, ctx) => prepareRecording(d as unknown as BitmapArgs, ctx, true),
  },
  {
    type: 'block-dirty-bitmap-disable',
    prepare: (d, ctx) => prepareRecording(d as unknown as BitmapArgs, ctx, false),
  },
  { type: 'block-dirty-bitmap-merge', prepare: (d, ctx) => prepareMerge(d as unknown as BitmapMergeArgs, ctx) },
];

// Registered from this side only: transaction.ts knows no action module (no import cycle).
for (const a of bitmapTransactionActions) registerTransactionAction(a);

export const bitmapCommands: readonly CommandDef[] = [
  defineCommand<BitmapAddArgs>('block-dirty-bitmap-add', (a, ctx) => now(prepareAdd(a, ctx))),
  defineCommand<BitmapArgs>('block-dirty-bitmap-remove', (a, ctx) => now(prepareRemove(a, ctx))),
  defineCommand<BitmapArgs>('block-dirty-bitmap-clear', (a, ctx) => now(prepareClear(a, ctx))),
  defineCommand<BitmapArgs>('block-dirty-bitmap-enable', (a, ctx) => now(prepareRecording(a, ctx, true))),
  defineCommand<BitmapArgs>('block-dirty-bitmap-disable', (a, ctx) => now(prepareRecording(a, ctx, false))),
  defineCommand<BitmapMergeArgs>('block-dirty-bitmap-merge', (a, ctx) => now(prepareMerge(a, ctx))),
  defineCommand<BitmapArgs>('x-debug-block-dirty-bitmap-sha256', (a, ctx) => ({
    sha256: lookupBitmap(ctx.services.graph, a.node, a.name).bits.sha256(),
  })),
];

