/**
 * Snapshot commands: blockdev-snapshot and blockdev-snapshot-sync (external: an overlay on top
 * of a node), blockdev-snapshot-internal-sync and blockdev-snapshot-delete-internal-sync
 * (internal: qcow2 snapshot table), and the `transaction` actions. Each command is its action's
 * prepare followed by its commit, as in QEMU (blockdev.c external_snapshot_*,
 * internal_snapshot_*): prepare makes the change, abort undoes it, commit finishes it.
 */
import { BlockError, QmpError } from '../../util/errors.js';
import { createQcow2, checkQcow2Create } from '../../block/drivers/qcow2/create.js';
import { openCreateFile } from '../../block/drivers/file-create.js';
import { appendOverlay, checkOverlay, checkSnapshotSource } from '../../block/snapshot-external.js';
import type { BlockGraph } from '../../block/graph.js';
import { permsOf } from '../../block/node.js';
import { PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED, type BlockNode } from '../../block/types.js';
import { closeSync } from 'node:fs';
import {
  createInternalSnapshot,
  deleteInternalSnapshot,
  findSnapshot,
  listInternalSnapshots,
  type SnapshotEntry,
} from '../../block/drivers/qcow2/snapshot-write.js';
import { setBackingFile } from '../../block/drivers/qcow2/header-write.js';
import { backingOf } from '../../block/drivers/qcow2/backing.js';
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

/** Formats QEMU 7.2 can create (bdrv_img_create needs create options), and those with a backing file. */
const CREATABLE = ['file', 'luks', 'nbd', 'parallels', 'qcow', 'qcow2', 'qed', 'raw', 'vdi', 'vhdx', 'vmdk', 'vpc'];
const WITH_BACKING = ['qcow', 'qcow2', 'qed', 'vmdk'];

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
  if (!CREATABLE.includes(format)) throw new QmpError(`Format driver '${format}' does not support image creation`);
  if (!WITH_BACKING.includes(format)) throw new QmpError(`Backing file not supported for file format '${format}'`);
  if (format === 'vmdk' && old.driverName !== 'vmdk') throw new QmpError('backing_file must be a vmdk image');
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
    // QEMU opens it with BDRV_O_NO_BACKING; only drivers with a backing member take the option.
    ...(format === 'qcow2' ? { backing: null } : {}),
    ...(node.readOnly ? { 'read-only': true } : {}),
  });
  try {
    return attach(ctx, node, overlay, true);
  } catch (err) {
    await graph.releaseUnused(overlay);
    throw err;
  }
}

interface InternalArgs {
  device: string;
  name: string;
}

interface InternalDeleteArgs {
  device: string;
  id?: string;
  name?: string;
}

/** QEMU's qmp_get_root_bs: a node that no other node uses (exports and jobs may). */
function rootNode(graph: BlockGraph, device: string): BlockNode {
  const n = lookup(graph, device, device);
  if (n.parents.some((u) => u.spec.kind === 'node')) throw new QmpError('Need a root block node');
  return n;
}

function fileOf(node: BlockNode): BlockNode {
  const f = node.children.find((c) => c.name === 'file')?.user.node;
  if (!f) throw new BlockError('NO_CHILD', 'EIO', `node '${node.name}' has no 'file' child`);
  return f;
}

/** QEMU's SnapshotInfo of a table entry, QAPI member order. */
function snapshotInfo(e: SnapshotEntry): Record<string, unknown> {
  return {
    id: e.id,
    name: e.name,
    'vm-state-size': e.vmStateSize,
    'date-sec': e.dateSec,
    'date-nsec': e.dateNsec,
    'vm-clock-sec': Number(e.vmClockNsec / 1_000_000_000n),
    'vm-clock-nsec': Number(e.vmClockNsec % 1_000_000_000n),
    ...(e.icount !== undefined ? { icount: e.icount } : {}),
  };
}

function errText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Delete `sn` from the image of `node` (closed and opened again around the table edit). */
async function deleteOnNode(graph: BlockGraph, node: BlockNode, sn: SnapshotEntry): Promise<void> {
  await graph.reopenDriver(node, node.readOnly, (file) => deleteInternalSnapshot(file, sn));
}

async function prepareInternal(a: InternalArgs, ctx: CommandContext): Promise<PreparedAction> {
  const graph = ctx.services.graph;
  const node = rootNode(graph, a.device);
  checkSnapshotSource(node);
  if (node.readOnly) throw new QmpError(`Device '${a.device}' is read only`);
  if (node.driverName !== 'qcow2') {
    throw new QmpError(`Block format '${node.driverName}' used by device '${a.device}' does not support internal snapshots`);
  }
  if (a.name === '') throw new QmpError('Name is empty');
  if (findSnapshot(await listInternalSnapshots(fileOf(node).io), undefined, a.name)) {
    throw new QmpError(`Snapshot with name '${a.name}' already exists on device '${a.device}'`);
  }
  const ms = Date.now();
  let created: SnapshotEntry | undefined;
  try {
    await graph.reopenDriver(node, false, async (file) => {
      created = await createInternalSnapshot(file, {
        name: a.name,
        dateSec: Math.floor(ms / 1000),
        dateNsec: (ms % 1000) * 1e6,
        // qemu-storage-daemon runs no guest: its virtual clock is the host clock.
        vmClockNsec: BigInt(ms) * 1_000_000n,
      });
    });
  } catch (err) {
    throw new QmpError(`Failed to create snapshot '${a.name}' on device '${a.device}': ${errText(err)}`);
  }
  return {
    abort: async () => {
      if (!created) return;
      try {
        await deleteOnNode(graph, node, created);
      } catch (err) {
        ctx.log.error(
          { err },
          `Failed to delete snapshot with id '${created.id}' and name '${created.name}' on device '${a.device}' in abort`,
        );
      }
    },
  };
}

async function deleteInternal(a: InternalDeleteArgs, ctx: CommandContext): Promise<Record<string, unknown>> {
  const graph = ctx.services.graph;
  const node = rootNode(graph, a.device);
  if (a.id === undefined && a.name === undefined) throw new QmpError('Name or id must be provided');
  checkSnapshotSource(node);
  if (node.driverName !== 'qcow2') throw new QmpError('Failed to get a snapshot list: Operation not supported');
  const sn = findSnapshot(await listInternalSnapshots(fileOf(node).io), a.id, a.name);
  if (!sn) {
    throw new QmpError(
      `Snapshot with id '${a.id ?? 'null'}' and name '${a.name ?? 'null'}' does not exist on device '${a.device}'`,
    );
  }
  if (node.readOnly) throw new QmpError(`Device '${a.device}' is read only`);
  await deleteOnNode(graph, node, sn);
  return snapshotInfo(sn);
}

interface ChangeBackingArgs {
  device: string;
  'image-node-name': string;
  'backing-file': string;
}

/**
 * change-backing-file (QEMU's qmp_change_backing_file): rewrite the backing file name in the
 * header of `image-node-name`, a node in the backing chain of the root node `device`; the
 * graph is not changed. A read-only image is made writable for the edit and read-only again.
 * As QEMU 7.2, the backing format recorded is the image's own format.
 */
async function changeBackingFile(a: ChangeBackingArgs, ctx: CommandContext): Promise<Record<string, never>> {
  const graph = ctx.services.graph;
  const root = rootNode(graph, a.device);
  const name = a['image-node-name'];
  const image = graph.get(name);
  if (!image) throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Cannot find device='' nor node-name='${name}'`);
  if (!backingOf(image)) throw new QmpError('not allowing backing file change on an image without a backing file');
  checkSnapshotSource(root);
  let inChain = false;
  const seen = new Set<BlockNode>();
  for (let n: BlockNode | undefined = root; n && !seen.has(n); n = backingOf(n)) {
    seen.add(n);
    if (n === image) inChain = true;
  }
  if (!inChain) throw new QmpError(`'${a.device}' and image file are not in the same chain`);
  const ro = image.readOnly;
  if (ro) await graph.setReadOnly(image, false);
  let failure: unknown;
  try {
    await graph.reopenDriver(image, false, (file) => setBackingFile(file, a['backing-file'], image.driverName));
  } catch (err) {
    failure = new QmpError(`Could not change backing file to '${a['backing-file']}': ${errText(err)}`);
  }
  if (ro) await graph.setReadOnly(image, true);
  if (failure) throw failure;
  return {};
}

interface AmendArgs {
  'job-id': string;
  'node-name': string;
  options: { driver: string; encrypt?: Record<string, unknown> };
  force?: boolean;
}

/** Drivers with an amend implementation in QEMU 7.2 (bdrv_co_amend). */
const AMEND_DRIVERS: readonly string[] = ['qcow2', 'luks'];

/**
 * x-blockdev-amend (QEMU's qmp_x_blockdev_amend): an `amend` job. QEMU 7.2's qcow2 amend
 * changes only encryption key slots, and blockd opens no encrypted image, so the body either
 * has nothing to do or fails with qcow2_co_amend's text.
 */
function amend(a: AmendArgs, ctx: CommandContext): Record<string, never> {
  const graph = ctx.services.graph;
  const node = graph.get(a['node-name']);
  if (!node) throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Cannot find device='' nor node-name='${a['node-name']}'`);
  if (node.driverName !== a.options.driver) throw new QmpError("x-blockdev-amend doesn't support changing the block driver");
  if (!AMEND_DRIVERS.includes(node.driverName)) throw new QmpError('Driver does not support x-blockdev-amend');
  const encrypt = a.options.encrypt !== undefined;
  ctx.services.jobs.start(
    a['job-id'],
    {
      type: 'amend',
      // One unit of progress, counted when the body ends (as QEMU's amend job).
      run: async (job) => {
        try {
          if (encrypt) throw new QmpError("image is not encrypted, can't amend");
        } finally {
          job.progress(1);
        }
      },
    },
    { autoFinalize: true, autoDismiss: false },
  );
  return {};
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
  { type: 'blockdev-snapshot-internal-sync', prepare: (d, ctx) => prepareInternal(d as unknown as InternalArgs, ctx) },
];
for (const a of snapshotTransactionActions) registerTransactionAction(a);

export const snapshotCommands: readonly CommandDef[] = [
  defineCommand<SnapshotArgs>('blockdev-snapshot', (a, ctx) => now(prepareSnapshot(a, ctx))),
  defineCommand<SnapshotSyncArgs>('blockdev-snapshot-sync', (a, ctx) => now(prepareSnapshotSync(a, ctx))),
  defineCommand<InternalArgs>('blockdev-snapshot-internal-sync', (a, ctx) => now(prepareInternal(a, ctx))),
  defineCommand<InternalDeleteArgs>('blockdev-snapshot-delete-internal-sync', (a, ctx) => deleteInternal(a, ctx)),
  defineCommand<ChangeBackingArgs>('change-backing-file', (a, ctx) => changeBackingFile(a, ctx)),
  defineCommand<AmendArgs>('x-blockdev-amend', (a, ctx) => amend(a, ctx)),
];
