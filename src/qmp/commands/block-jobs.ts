/**
 * The data-moving block jobs: blockdev-backup (also in transactions), drive-backup,
 * blockdev-mirror, block-commit (active and intermediate), block-stream. Handlers check the
 * arguments in QSD's order, set the job up, start it and reply once the job first yields (so a
 * job with nothing to do has ended before the reply, as in QSD).
 */
import { existsSync } from 'node:fs';
import { BlockError, QmpError } from '../../util/errors.js';
import { BackupJob, type BackupSync, type BitmapMode } from '../../block/backup.js';
import { jobClusterSize, type OnError } from '../../block/block-job.js';
import { bitmapsOf, CHECK_ALLOW_RO, defaultGranularity, type NamedBitmap } from '../../block/dirty-bitmap-set.js';
import { MIRROR_DEFAULT_BUF, MirrorJob, type MirrorSync } from '../../block/mirror.js';
import { StreamJob } from '../../block/stream.js';
import { IntermediateCommitJob } from '../../block/commit-intermediate.js';
import { backingOf } from '../../block/drivers/qcow2/backing.js';
import type { BlockNode } from '../../block/types.js';
import type { Job } from '../../block/jobs.js';
import { fillCreatedFile, openCreateFile } from '../../block/drivers/file-create.js';
import { createQcow2 } from '../../block/drivers/qcow2/create.js';
import { BLOCKDEV_DRIVERS } from '../../block/graph.js';
import { permsOf } from '../../block/node.js';
import { PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE } from '../../block/types.js';
import { defineCommand, type CommandContext, type CommandDef } from '../types.js';
import { registerTransactionAction, type PreparedAction, type TransactionActionDef } from './transaction.js';

interface BackupArgs {
  'job-id'?: string;
  device: string;
  sync: BackupSync;
  speed?: number;
  bitmap?: string;
  'bitmap-mode'?: BitmapMode;
  compress?: boolean;
  'on-source-error'?: OnError;
  'on-target-error'?: OnError;
  'auto-finalize'?: boolean;
  'auto-dismiss'?: boolean;
  'filter-node-name'?: string;
  'x-perf'?: { 'use-copy-range'?: boolean; 'max-workers'?: number; 'max-chunk'?: number };
  target: string;
}

/** Op blockers that do not keep a node from being a job target (QEMU unblocks them for backing nodes). */
function targetBlocker(node: BlockNode): string | undefined {
  for (const b of node.blockers) if (!b.startsWith('node is used as backing hd of')) return b;
  return undefined;
}

/** A backup set up (checks passed, permissions taken, job `created`): `start` or `drop` it. */
interface PreparedBackup {
  start(): Job;
  drop(): void;
}

async function blockdevBackup(a: BackupArgs, ctx: CommandContext): Promise<void> {
  const job = (await prepareBackup(a, ctx)).start();
  await job.firstYield;
}

async function prepareBackup(a: BackupArgs, ctx: CommandContext, onClean?: () => void): Promise<PreparedBackup> {
  const { graph, jobs } = ctx.services;
  const source = graph.find(a.device);
  const target = graph.find(a.target);
  let sync = a.sync;
  let mode = a['bitmap-mode'];
  let bitmap: NamedBitmap | undefined;
  if (a.bitmap !== undefined) {
    bitmap = bitmapsOf(source).get(a.bitmap);
    if (!bitmap) throw new QmpError(`Bitmap '${a.bitmap}' could not be found`);
    if (sync === 'incremental') {
      if (mode !== undefined && mode !== 'on-success') {
        throw new QmpError("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
      }
      mode = 'on-success';
      sync = 'bitmap';
    }
    if (mode === undefined) throw new QmpError('Bitmap sync mode must be given when providing a bitmap');
    bitmap.check(CHECK_ALLOW_RO);
  } else if (mode !== undefined) {
    throw new QmpError('Cannot specify bitmap sync mode without a bitmap');
  }
  if (source === target) throw new QmpError('Source and target cannot be the same');
  if ((sync === 'bitmap' || sync === 'incremental') && !bitmap) {
    throw new QmpError(`must provide a valid bitmap name for '${a.sync}' sync mode`);
  }
  if (bitmap && sync === 'none') throw new QmpError("sync mode 'none' does not produce meaningful bitmap outputs");
  if (source.size() !== target.size()) throw new QmpError('Source and target image have different sizes');
  // QEMU's BLOCK_OP_TYPE_BACKUP_SOURCE, then _TARGET (e.g. another job's filter node as source).
  const srcBlocked = targetBlocker(source);
  if (srcBlocked) throw new BlockError('BUSY', 'EBUSY', `Node '${source.name}' is busy: ${srcBlocked}`);
  const blocked = targetBlocker(target);
  if (blocked) throw new BlockError('BUSY', 'EBUSY', `Node '${target.name}' is busy: ${blocked}`);
  if (a.compress) throw new QmpError(`Compression is not supported for this drive ${target.name}`);
  const perf = a['x-perf'] ?? {};
  const workers = perf['max-workers'];
  if (workers !== undefined && (workers < 1 || workers > 0x7fffffff)) {
    throw new QmpError('max-workers must be between 1 and 2147483647');
  }
  const cluster = await jobClusterSize(target);
  const maxChunk = perf['max-chunk'];
  if (maxChunk !== undefined && (maxChunk < 0 || (maxChunk > 0 && maxChunk < cluster))) {
    throw new QmpError(`Required max-chunk (${maxChunk}) is less than backup cluster size (${cluster})`);
  }
  const id = a['job-id'] ?? '';
  jobs.checkId(id);
  const driver = new BackupJob(
    {
      source,
      target,
      sync,
      ...(bitmap ? { bitmap } : {}),
      ...(mode ? { bitmapMode: mode } : {}),
      onSourceError: a['on-source-error'] ?? 'report',
      onTargetError: a['on-target-error'] ?? 'report',
      ...(workers !== undefined ? { maxWorkers: workers } : {}),
      ...(maxChunk !== undefined ? { maxChunk } : {}),
      ...(onClean ? { onClean } : {}),
      filter: { graph, name: a['filter-node-name'] },
    },
    cluster,
  );
  driver.attach();
  const opts = {
    autoFinalize: a['auto-finalize'] ?? true,
    autoDismiss: a['auto-dismiss'] ?? true,
    speed: a.speed ?? 0,
    drainedStart: true,
  };
  let job: Job;
  try {
    job = jobs.create(id, driver, opts);
  } catch (err) {
    driver.clean();
    throw err;
  }
  return {
    start: () => jobs.launch(job, opts),
    drop: () => {
      jobs.dropCreated(job);
      driver.clean();
    },
  };
}

interface DriveBackupArgs extends Omit<BackupArgs, 'target'> {
  target: string;
  format?: string;
  mode?: 'existing' | 'absolute-paths';
}

/** Formats drive-backup can create and open. */
const DRIVE_FORMATS: readonly string[] = ['qcow2', 'raw'];

/**
 * drive-backup: create the target image (`mode: absolute-paths`, the default; sync=top gives it
 * the source's backing file, sync=none the source itself) or open an existing one, open it as an
 * automatically named node for the job's length, then run blockdev-backup on it.
 */
async function driveBackup(a: DriveBackupArgs, ctx: CommandContext): Promise<void> {
  const { graph } = ctx.services;
  const source = graph.find(a.device);
  const format = a.format ?? source.driverName;
  const backing = a.sync === 'top' ? backingOf(source) : a.sync === 'none' ? source : undefined;
  await createTargetImage(ctx, a.target, format, source.size(), backing, a.mode);
  const target = await graph.openTemporary({ driver: format, file: { driver: 'file', filename: a.target } });
  let prepared: PreparedBackup;
  try {
    prepared = await prepareBackup({ ...a, target: target.name }, ctx, () => {
      graph.closeTemporary(target).catch((err: unknown) => ctx.log.warn({ err }, 'closing the drive-backup target failed'));
    });
  } catch (err) {
    await graph.closeTemporary(target);
    throw err;
  }
  const job = prepared.start();
  await job.firstYield;
}

/**
 * `blockdev-backup` in a transaction: prepared (checked, permissions taken, bitmap frozen) with
 * the other actions, started when all of them succeeded, dropped when one failed. The action's
 * data is checked against the BlockdevBackup schema by the transaction command's validation.
 */
const backupAction: TransactionActionDef = {
  type: 'blockdev-backup',
  prepare: async (data, ctx): Promise<PreparedAction> => {
    const prepared = await prepareBackup(data as unknown as BackupArgs, ctx);
    let started = false;
    return {
      commit: () => {
        started = true;
        prepared.start();
      },
      abort: () => {
        if (!started) prepared.drop();
      },
    };
  },
};
registerTransactionAction(backupAction);

interface MirrorArgs {
  'job-id'?: string;
  device: string;
  target: string;
  replaces?: string;
  sync: BackupSync;
  speed?: number;
  granularity?: number;
  'buf-size'?: number;
  'on-source-error'?: OnError;
  'on-target-error'?: OnError;
  'filter-node-name'?: string;
  'copy-mode'?: 'background' | 'write-blocking';
  'auto-finalize'?: boolean;
  'auto-dismiss'?: boolean;
}

interface DriveMirrorArgs extends MirrorArgs {
  format?: string;
  'node-name'?: string;
  mode?: 'existing' | 'absolute-paths';
  unmap?: boolean;
}

/** Create (or check) the image file of a drive-* target: `backing` recorded for qcow2. */
async function createTargetImage(
  ctx: CommandContext,
  filename: string,
  format: string,
  size: number,
  backing: BlockNode | undefined,
  mode: 'existing' | 'absolute-paths' | undefined,
): Promise<void> {
  const { graph } = ctx.services;
  if (!(BLOCKDEV_DRIVERS as readonly string[]).includes(format)) throw new QmpError(`Unknown file format '${format}'`);
  if (!DRIVE_FORMATS.includes(format)) throw new QmpError(`Driver '${format}' is not supported by blockd`);
  if ((mode ?? 'absolute-paths') !== 'absolute-paths') {
    if (!existsSync(filename)) throw new QmpError(`Could not open '${filename}': No such file or directory`);
    return;
  }
  const fd = openCreateFile(filename);
  await fillCreatedFile(fd, { filename, size: format === 'raw' ? size : 0 });
  if (format !== 'qcow2') return;
  const file = await graph.openTemporary({ driver: 'file', filename });
  try {
    const user = file.attach({
      name: 'an unnamed block device',
      kind: 'backend',
      perm: permsOf(PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE),
      shared: permsOf(PERM_ALL),
    });
    try {
      await createQcow2(user.io, {
        size,
        ...(backing ? { backingFile: backing.driver.describeFilename(), backingFmt: backing.driverName } : {}),
      });
    } finally {
      user.detach();
    }
  } finally {
    await graph.closeTemporary(file);
  }
}

/**
 * drive-mirror: create the target image (sync=top: with the source's backing file, none: with the
 * source as backing) or open an existing one, open it as node `node-name` (or an automatic name),
 * and mirror onto it. After a pivot that moved users onto it the node stays; otherwise it is
 * closed when the job ends (QSD then no longer knows the node name either).
 */
async function driveMirror(a: DriveMirrorArgs, ctx: CommandContext): Promise<void> {
  const { graph } = ctx.services;
  const source = graph.find(a.device);
  const format = a.format ?? source.driverName;
  const backing = a.sync === 'top' ? backingOf(source) : a.sync === 'none' ? source : undefined;
  if (a['node-name'] !== undefined && graph.get(a['node-name'])) {
    throw new QmpError(`Duplicate nodes with node-name='${a['node-name']}'`);
  }
  await createTargetImage(ctx, a.target, format, source.size(), backing, a.mode);
  const target = await graph.openTemporary({
    driver: format,
    ...(a['node-name'] !== undefined ? { 'node-name': a['node-name'] } : {}),
    file: { driver: 'file', filename: a.target },
  });
  const close = (): void => {
    graph.closeTemporary(target).catch((err: unknown) => ctx.log.warn({ err }, 'closing the drive-mirror target failed'));
  };
  try {
    const { format: _f, 'node-name': _n, mode: _m, unmap: _u, ...rest } = a;
    // Like QEMU's reference counting: the node lives on only if users moved onto it.
    const created = (a.mode ?? 'absolute-paths') === 'absolute-paths';
    await blockdevMirror(
      { ...rest, target: target.name },
      ctx,
      (pivoted) => {
        if (!pivoted || target.parents.length === 0) close();
      },
      created && a.sync === 'full',
    );
  } catch (err) {
    await graph.closeTemporary(target);
    throw err;
  }
}

async function blockdevMirror(
  a: MirrorArgs,
  ctx: CommandContext,
  onClean?: (pivoted: boolean) => void,
  targetIsZero = false,
): Promise<void> {
  const { graph, jobs } = ctx.services;
  const source = graph.find(a.device);
  const target = graph.find(a.target);
  if (a.sync !== 'full' && a.sync !== 'top' && a.sync !== 'none') {
    throw new QmpError(`Sync mode '${a.sync}' not supported`);
  }
  const g = a.granularity ?? 0;
  if (g !== 0) {
    if (g < 512 || g > 64 * 1024 * 1024) {
      throw new QmpError("Parameter 'granularity' expects a value in range [512B, 64MB]");
    }
    if ((g & (g - 1)) !== 0) throw new QmpError("Parameter 'granularity' expects a power of 2");
  }
  if (a.replaces !== undefined && a.replaces !== a.device) {
    if (!graph.get(a.replaces)) throw new QmpError(`Failed to find node with node-name='${a.replaces}'`);
    throw new QmpError("Parameter 'replaces' naming another node than 'device' is not supported by blockd");
  }
  if (target.parents.length > 0) throw new QmpError('Need a root block node');
  if (source === target) throw new QmpError("Can't mirror node into itself");
  const blocked = targetBlocker(target);
  if (blocked) throw new BlockError('BUSY', 'EBUSY', `Node '${target.name}' is busy: ${blocked}`);
  if (a['copy-mode'] === 'write-blocking') {
    throw new QmpError("Parameter 'copy-mode' value 'write-blocking' is not supported by blockd");
  }
  const id = a['job-id'] ?? '';
  jobs.checkId(id);
  const granularity = g !== 0 ? g : await defaultGranularity(target);
  const buf = a['buf-size'] ?? 0;
  const driver = new MirrorJob({
    source,
    target,
    sync: a.sync as MirrorSync,
    granularity,
    bufSize: buf > 0 ? Math.max(buf, granularity) : MIRROR_DEFAULT_BUF,
    onSourceError: a['on-source-error'] ?? 'report',
    onTargetError: a['on-target-error'] ?? 'report',
    ...(a['filter-node-name'] !== undefined ? { filterNodeName: a['filter-node-name'] } : {}),
    graph,
    ...(onClean ? { onClean } : {}),
    ...(targetIsZero ? { targetIsZero } : {}),
  });
  driver.attach();
  let job;
  try {
    job = jobs.start(id, driver, {
      autoFinalize: a['auto-finalize'] ?? true,
      autoDismiss: a['auto-dismiss'] ?? true,
      speed: a.speed ?? 0,
    });
  } catch (err) {
    driver.clean();
    throw err;
  }
  await job.firstYield;
}

interface CommitArgs {
  'job-id'?: string;
  device: string;
  'base-node'?: string;
  base?: string;
  'top-node'?: string;
  top?: string;
  'backing-file'?: string;
  speed?: number;
  'on-error'?: OnError;
  'filter-node-name'?: string;
  'auto-finalize'?: boolean;
  'auto-dismiss'?: boolean;
}

/** The backing chain below `top` (top first). */
function chainOf(top: BlockNode): BlockNode[] {
  const out: BlockNode[] = [];
  for (let n: BlockNode | undefined = top; n && !out.includes(n); n = backingOf(n)) out.push(n);
  return out;
}

/** A layer of `chain` named by its image file name (QEMU's bdrv_find_backing_image). */
function byFilename(chain: BlockNode[], name: string): BlockNode | undefined {
  return chain.find((n) => n.driver.describeFilename() === name);
}

/**
 * block-commit of an intermediate layer (top below the active layer; src/block/commit-intermediate.ts):
 * the overlay of top is the layer of the device's chain whose backing top is.
 */
async function intermediateCommit(
  a: CommitArgs,
  ctx: CommandContext,
  device: BlockNode,
  chain: BlockNode[],
  top: BlockNode,
  base: BlockNode,
): Promise<void> {
  const { graph, jobs } = ctx.services;
  const overlay = chain.find((n) => backingOf(n) === top);
  if (!overlay) throw new QmpError(`Could not find overlay image for ${top.driver.describeFilename()}:`);
  const id = a['job-id'] ?? '';
  jobs.checkId(id);
  const baseWasReadOnly = base.readOnly;
  const driver = new IntermediateCommitJob({
    overlay,
    top,
    base,
    backingFile: a['backing-file'],
    onError: a['on-error'] ?? 'report',
    graph,
    baseWasReadOnly,
    device,
    filter: { graph, name: a['filter-node-name'] },
  });
  const opts = {
    autoFinalize: a['auto-finalize'] ?? true,
    autoDismiss: a['auto-dismiss'] ?? true,
    speed: a.speed ?? 0,
  };
  // QEMU's commit_start: the job exists (`created`) before the base is reopened and the
  // commit_top filter is inserted; a failure there ends it with `null` (job_early_fail).
  const job = jobs.create(id, driver, opts);
  try {
    // As QEMU: a read-only base is reopened read-write for the job, and read-only again after it.
    if (baseWasReadOnly) await graph.setReadOnly(base, false);
    driver.attach();
  } catch (err) {
    if (baseWasReadOnly && !base.readOnly) await graph.setReadOnly(base, true);
    jobs.discardCreated(job);
    throw err;
  }
  jobs.launch(job, opts);
  await job.firstYield;
}

async function blockCommit(a: CommitArgs, ctx: CommandContext): Promise<void> {
  const { graph, jobs } = ctx.services;
  const device = graph.get(a.device);
  if (!device) throw new QmpError(`Device '${a.device}' not found`, 'DeviceNotFound');
  const lookup = (name: string): BlockNode => {
    const n = graph.get(name);
    if (!n) throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Cannot find device='' nor node-name='${name}'`);
    return n;
  };
  const chain = chainOf(device);
  let top = device;
  if (a['top-node'] !== undefined) top = lookup(a['top-node']);
  else if (a.top !== undefined) {
    const t = byFilename(chain, a.top);
    if (!t) throw new QmpError(`Top image file ${a.top} not found`);
    top = t;
  }
  let base: BlockNode | undefined;
  if (a['base-node'] !== undefined) base = lookup(a['base-node']);
  else if (a.base !== undefined) {
    base = byFilename(chain, a.base);
    if (!base) throw new QmpError(`Can't find '${a.base}' in the backing chain`);
  } else {
    base = chain[chain.length - 1];
  }
  if (!base || base === top) throw new QmpError('cannot commit an image into itself');
  if (!chain.includes(top)) throw new QmpError(`'${top.name}' is not in this backing file chain`);
  const topChain = chainOf(top);
  const baseDepth = topChain.indexOf(base) + 1;
  if (baseDepth <= 0) throw new QmpError(`'${base.name}' is not in this backing file chain`);
  if (device.parents.some((u) => u.spec.kind === 'node')) throw new QmpError('Need a root block node');
  if (top !== device) {
    await intermediateCommit(a, ctx, device, chain, top, base);
    return;
  }
  if (a['backing-file'] !== undefined) {
    throw new QmpError("'backing-file' specified, but 'top' is the active layer");
  }
  const id = a['job-id'] ?? '';
  jobs.checkId(id);
  // QEMU reopens a read-only base read-write for the job; blockd cannot (yet): refuse up front.
  if (base.readOnly) throw new BlockError('READ_ONLY', 'EPERM', 'Block node is read-only');
  const onError = a['on-error'] ?? 'report';
  const driver = new MirrorJob({
    source: top,
    target: base,
    sync: 'full',
    granularity: await defaultGranularity(base),
    bufSize: MIRROR_DEFAULT_BUF,
    onSourceError: onError,
    onTargetError: onError,
    ...(a['filter-node-name'] !== undefined ? { filterNodeName: a['filter-node-name'] } : {}),
    graph,
    type: 'commit',
    commitBaseDepth: baseDepth,
  });
  driver.attach();
  let job;
  try {
    job = jobs.start(id, driver, {
      autoFinalize: a['auto-finalize'] ?? true,
      autoDismiss: a['auto-dismiss'] ?? true,
      speed: a.speed ?? 0,
    });
  } catch (err) {
    driver.clean();
    throw err;
  }
  await job.firstYield;
}

interface StreamArgs {
  'job-id'?: string;
  device: string;
  base?: string;
  'base-node'?: string;
  'backing-file'?: string;
  bottom?: string;
  speed?: number;
  'on-error'?: OnError;
  'filter-node-name'?: string;
  'auto-finalize'?: boolean;
  'auto-dismiss'?: boolean;
}

/**
 * block-stream (QEMU's qmp_block_stream, checks in its order): copy what the layers between
 * `device` and the base hold into `device`, then make the base its backing (src/block/stream.ts).
 */
async function blockStream(a: StreamArgs, ctx: CommandContext): Promise<void> {
  const { graph, jobs } = ctx.services;
  if (a.base !== undefined && a['base-node'] !== undefined) {
    throw new QmpError("'base' and 'base-node' cannot be specified at the same time");
  }
  if (a.base !== undefined && a.bottom !== undefined) {
    throw new QmpError("'base' and 'bottom' cannot be specified at the same time");
  }
  if (a.bottom !== undefined && a['base-node'] !== undefined) {
    throw new QmpError("'bottom' and 'base-node' cannot be specified at the same time");
  }
  const top = graph.get(a.device);
  if (!top) throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Cannot find device='${a.device}' nor node-name='${a.device}'`);
  const below = chainOf(top).slice(1);
  let base: BlockNode | undefined;
  let backingFile: string | undefined;
  if (a.base !== undefined) {
    base = byFilename(below, a.base);
    if (!base) throw new QmpError(`Can't find '${a.base}' in the backing chain`);
    backingFile = a.base;
  } else if (a['base-node'] !== undefined) {
    const name = a['base-node'];
    base = graph.get(name);
    if (!base) throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Cannot find device='' nor node-name='${name}'`);
    if (!below.includes(base)) throw new QmpError(`Node '${name}' is not a backing image of '${a.device}'`);
  } else if (a.bottom !== undefined) {
    // The lowest layer to stream (top itself included): the base is what lies below it.
    const bottom = graph.get(a.bottom);
    if (!bottom) throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Cannot find device='' nor node-name='${a.bottom}'`);
    if (!chainOf(top).includes(bottom)) {
      throw new QmpError(`Node '${a.bottom}' is not in a chain starting from '${a.device}'`);
    }
    base = backingOf(bottom);
  }
  for (const n of chainOf(top)) {
    if (n === base) break;
    const blocked = targetBlocker(n);
    if (blocked) throw new BlockError('BUSY', 'EBUSY', `Node '${n.name}' is busy: ${blocked}`);
  }
  if (a['backing-file'] !== undefined) {
    if (!base || a.bottom !== undefined) throw new QmpError('backing file specified, but streaming the entire chain');
    backingFile = a['backing-file'];
  }
  if (top.readOnly) throw new BlockError('READ_ONLY', 'EPERM', 'Block node is read-only');
  const id = a['job-id'] ?? '';
  jobs.checkId(id);
  const driver = new StreamJob({
    top,
    base,
    backingFile,
    onError: a['on-error'] ?? 'report',
    graph,
    filter: { graph, name: a['filter-node-name'] },
  });
  driver.attach();
  let job;
  try {
    job = jobs.start(id, driver, {
      autoFinalize: a['auto-finalize'] ?? true,
      autoDismiss: a['auto-dismiss'] ?? true,
      speed: a.speed ?? 0,
    });
  } catch (err) {
    driver.clean();
    throw err;
  }
  await job.firstYield;
}

export const blockJobCommands: readonly CommandDef[] = [
  defineCommand<StreamArgs>('block-stream', async (a, ctx) => {
    await blockStream(a, ctx);
    return {};
  }),
  defineCommand<CommitArgs>('block-commit', async (a, ctx) => {
    await blockCommit(a, ctx);
    return {};
  }),
  defineCommand<DriveBackupArgs>('drive-backup', async (a, ctx) => {
    await driveBackup(a, ctx);
    return {};
  }),
  defineCommand<DriveMirrorArgs>('drive-mirror', async (a, ctx) => {
    await driveMirror(a, ctx);
    return {};
  }),
  defineCommand<MirrorArgs>('blockdev-mirror', async (a, ctx) => {
    await blockdevMirror(a, ctx);
    return {};
  }),
  defineCommand<BackupArgs>('blockdev-backup', async (a, ctx) => {
    await blockdevBackup(a, ctx);
    return {};
  }),
];
