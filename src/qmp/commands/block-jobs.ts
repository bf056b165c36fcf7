/**
 * The data-moving block jobs: blockdev-backup, blockdev-mirror (later commit, stream). Handlers check the
 * arguments in QSD's order, set the job up, start it and reply once the job first yields (so a
 * job with nothing to do has ended before the reply, as in QSD).
 */
import { BlockError, QmpError } from '../../util/errors.js';
import { BackupJob, type BackupSync, type BitmapMode } from '../../block/backup.js';
import { jobClusterSize, type OnError } from '../../block/block-job.js';
import { bitmapsOf, CHECK_ALLOW_RO, defaultGranularity, type NamedBitmap } from '../../block/dirty-bitmap-set.js';
import { MIRROR_DEFAULT_BUF, MirrorJob, type MirrorSync } from '../../block/mirror.js';
import type { BlockNode } from '../../block/types.js';
import { defineCommand, type CommandContext, type CommandDef } from '../types.js';

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

async function blockdevBackup(a: BackupArgs, ctx: CommandContext): Promise<void> {
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
  if (a['filter-node-name'] !== undefined) {
    throw new QmpError("Parameter 'filter-node-name' is not supported by blockd");
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
    },
    cluster,
  );
  driver.attach();
  let job;
  try {
    job = jobs.start(id, driver, {
      autoFinalize: a['auto-finalize'] ?? true,
      autoDismiss: a['auto-dismiss'] ?? true,
      speed: a.speed ?? 0,
      drainedStart: true,
    });
  } catch (err) {
    driver.clean();
    throw err;
  }
  await job.firstYield;
}

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

async function blockdevMirror(a: MirrorArgs, ctx: CommandContext): Promise<void> {
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
  defineCommand<MirrorArgs>('blockdev-mirror', async (a, ctx) => {
    await blockdevMirror(a, ctx);
    return {};
  }),
  defineCommand<BackupArgs>('blockdev-backup', async (a, ctx) => {
    await blockdevBackup(a, ctx);
    return {};
  }),
];
