/**
 * Snapshot commands: blockdev-snapshot and blockdev-snapshot-sync (external: an overlay on top
 * of a node), and their `transaction` actions. Each command is its action's prepare followed by
 * its commit, as in QEMU (blockdev.c external_snapshot_*): prepare makes the graph change,
 * abort undoes it, commit reopens the old node read-only.
 */
import { BlockError, QmpError } from '../../util/errors.js';
import { createQcow2, checkQcow2Create } from '../../block/drivers/qcow2/create.js';
import { openCreateFile } from '../../block/drivers/file-create.js';
import { appendOverlay, checkOverlay, checkSnapshotSource } from '../../block/snapshot-external.js';
import type { BlockGraph } from '../../block/graph.js';
import { permsOf } from '../../block/node.js';
import { PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED, type BlockNode } from '../../block/types.js';
import { closeSync } from 'node:fs';
import { defineCommand, type CommandContext, type CommandDef } from '../types.js';
import { registerTransactionAction, type PreparedAction, type TransactionActionDef } from './transaction.js';

interface SnapshotArgs {
  node: string;
  overlay: string;
}

interface SnapshotSyncArgs {
  device?: string;
  'node-name'?: string;
  'snapshot-file': string;
  'snapshot-node-name'?: string;
  format?: string;
  mode?: 'existing' | 'absolute-paths';
}

/** Formats QEMU knows: anything else is an unknown format. */
const QEMU_FORMATS = [
  'blkdebug', 'blklogwrites', 'blkverify', 'bochs', 'cloop', 'compress', 'copy-before-write',
  'copy-on-read', 'dmg', 'file', 'luks', 'nbd', 'null-aio', 'null-co', 'nvme', 'parallels',
  'preallocate', 'qcow', 'qcow2', 'qed', 'quorum', 'raw', 'replication', 'snapshot-access',
  'throttle', 'vdi', 'vhdx', 'vmdk', 'vpc', 'vvfat',
];

/** QEMU's bdrv_lookup_bs(device, node-name): qemu-storage-daemon has no named backends. */
function lookup(graph: BlockGraph, device: string | undefined, nodeName: string | undefined): BlockNode {
  const n = nodeName !== undefined ? graph.get(nodeName) : undefined;
  if (n) return n;
  throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Cannot find device='${device ?? ''}' nor node-name='${nodeName ?? ''}'`);
}

/** The old node's checks (op blockers), then a flush if it is writable. */
async function prepareSource(node: BlockNode): Promise<void> {
  checkSnapshotSource(node);
  if (!node.readOnly) await node.io.flush();
}

/**
 * Attach and return the transaction hooks: abort undoes the graph change, commit reopens the
 * old node read-only, clean lets go of an implicit overlay that nothing uses (QEMU unrefs it:
 * a snapshot of a node without users leaves only the file behind).
 */
function attach(ctx: CommandContext, node: BlockNode, overlay: BlockNode, implicit: boolean): PreparedAction {
  checkOverlay(overlay);
  const undo = appendOverlay(node, overlay);
  const graph = ctx.services.graph;
  return {
    abort: () => undo(),
    clean: async () => {
      if (implicit) await graph.releaseUnused(overlay);
    },
    // QEMU ignores a failure here: the snapshot stands, the old node just stays writable.
    commit: async () => {
      try {
        await ctx.services.graph.setReadOnly(node, true);
      } catch (err) {
        ctx.log.warn({ err, node: node.name }, 'snapshot: could not reopen the old node read-only');
      }
    },
  };
}

async function prepareSnapshot(a: SnapshotArgs, ctx: CommandContext): Promise<PreparedAction> {
  const graph = ctx.services.graph;
  const node = lookup(graph, a.node, a.node);
  await prepareSource(node);
  const overlay = graph.get(a.overlay);
  if (!overlay) {
    throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Cannot find device='${a.overlay}' nor node-name='${a.overlay}'`);
  }
  return attach(ctx, node, overlay, false);
}

/**
 * bdrv_img_create for the overlay: a qcow2 image of the old node's size (rounded up to 512
 * bytes) with the old node's file name and driver as backing file and format. The file is
 * opened through a `file` node so that an image another user holds is refused by its lock.
 */
async function createOverlay(graph: BlockGraph, filename: string, format: string, old: BlockNode): Promise<void> {
  if (!QEMU_FORMATS.includes(format)) throw new QmpError(`Unknown file format '${format}'`);
  if (format !== 'qcow2') throw new QmpError(`blockd creates overlays in the qcow2 format only, not '${format}'`);
  const opts = {
    size: Math.ceil(old.size() / 512) * 512,
    backingFile: old.driver.describeFilename(),
    backingFmt: old.driverName,
  };
  if (opts.backingFile === filename) {
    throw new QmpError('Error: Trying to create an image with the same filename as the backing file');
  }
  checkQcow2Create(opts);
  closeSync(openCreateFile(filename));
  const file = await graph.openTemporary({ driver: 'file', filename });
  try {
    const user = file.attach({
      name: 'an unnamed block device',
      kind: 'backend',
      perm: permsOf(PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE),
      shared: permsOf(PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED),
    });
    try {
      await createQcow2(user.io, opts, new AbortController().signal);
    } finally {
      user.detach();
    }
  } finally {
    await graph.closeTemporary(file);
  }
}

async function prepareSnapshotSync(a: SnapshotSyncArgs, ctx: CommandContext): Promise<PreparedAction> {
  const graph = ctx.services.graph;
  const node = lookup(graph, a.device, a['node-name']);
  await prepareSource(node);
  const newName = a['snapshot-node-name'];
  if (a['node-name'] !== undefined && newName === undefined) throw new QmpError('New overlay node-name missing');
  if (newName !== undefined && graph.get(newName)) throw new QmpError('New overlay node-name already in use');
  const format = a.format ?? 'qcow2';
  if ((a.mode ?? 'absolute-paths') !== 'existing') await createOverlay(graph, a['snapshot-file'], format, node);
  else if (!QEMU_FORMATS.includes(format)) throw new QmpError(`Unknown driver '${format}'`);
  const overlay = await graph.addImplicit({
    driver: format,
    'node-name': newName,
    file: { driver: 'file', filename: a['snapshot-file'] },
    backing: null,
    ...(node.readOnly ? { 'read-only': true } : {}),
  });
  try {
    return attach(ctx, node, overlay, true);
  } catch (err) {
    await graph.releaseUnused(overlay);
    throw err;
  }
}

async function now(p: Promise<PreparedAction>): Promise<Record<string, never>> {
  const prepared = await p;
  await prepared.commit?.();
  await prepared.clean?.();
  return {};
}

export const snapshotTransactionActions: readonly TransactionActionDef[] = [
  { type: 'blockdev-snapshot', prepare: (d, ctx) => prepareSnapshot(d as unknown as SnapshotArgs, ctx) },
  { type: 'blockdev-snapshot-sync', prepare: (d, ctx) => prepareSnapshotSync(d as unknown as SnapshotSyncArgs, ctx) },
];
for (const a of snapshotTransactionActions) registerTransactionAction(a);

export const snapshotCommands: readonly CommandDef[] = [
  defineCommand<SnapshotArgs>('blockdev-snapshot', (a, ctx) => now(prepareSnapshot(a, ctx))),
  defineCommand<SnapshotSyncArgs>('blockdev-snapshot-sync', (a, ctx) => now(prepareSnapshotSync(a, ctx))),
];
