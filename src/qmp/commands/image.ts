/**
 * Image commands: blockdev-create (a `create` job for `file` and `qcow2`), block_resize
 * (blockdev-snapshot is in snapshot.ts). The generic job commands are in job.ts.
 */
import { BlockError, QmpError } from '../../util/errors.js';
import { checkQcow2Create, createQcow2, type Qcow2CreateOptions } from '../../block/drivers/qcow2/create.js';
import { fillCreatedFile, openCreateFile, type FilePrealloc } from '../../block/drivers/file-create.js';
import type { JobDriver } from '../../block/jobs.js';
import { PERM_ALL, type BlockNode } from '../../block/types.js';
import { permsOf } from '../../block/node.js';
import { defineCommand, type CommandContext, type CommandDef } from '../types.js';

interface CreateArgs {
  'job-id': string;
  options: Record<string, unknown> & { driver: string };
}

interface ResizeArgs {
  device?: string;
  'node-name'?: string;
  size: number;
}

function num(v: unknown): number | undefined {
  return typeof v === 'number' ? v : undefined;
}

/** BlockdevCreateOptionsQcow2 (already schema-checked) as domain options. */
function qcow2Options(o: CreateArgs['options']): Qcow2CreateOptions {
  if (o['data-file'] !== undefined || o['data-file-raw'] !== undefined) {
    throw new BlockError('NOT_SUPPORTED', 'ENOTSUP', "blockd does not support qcow2 images with an external 'data-file'");
  }
  if (o['encrypt'] !== undefined) {
    throw new BlockError('NOT_SUPPORTED', 'ENOTSUP', 'blockd does not support encrypted qcow2 images');
  }
  return {
    size: num(o['size']) ?? 0,
    ...(o['version'] !== undefined ? { version: o['version'] as 'v2' | 'v3' } : {}),
    ...(o['cluster-size'] !== undefined ? { clusterSize: num(o['cluster-size']) ?? 0 } : {}),
    ...(o['preallocation'] !== undefined
      ? { preallocation: o['preallocation'] as 'off' | 'metadata' | 'falloc' | 'full' }
      : {}),
    ...(o['lazy-refcounts'] !== undefined ? { lazyRefcounts: o['lazy-refcounts'] === true } : {}),
    ...(o['refcount-bits'] !== undefined ? { refcountBits: num(o['refcount-bits']) ?? 0 } : {}),
    ...(o['compression-type'] !== undefined ? { compressionType: o['compression-type'] as 'zlib' | 'zstd' } : {}),
    ...(typeof o['backing-file'] === 'string' ? { backingFile: o['backing-file'] } : {}),
    ...(typeof o['backing-fmt'] === 'string' ? { backingFmt: o['backing-fmt'] } : {}),
    ...(o['extended-l2'] !== undefined ? { extendedL2: o['extended-l2'] === true } : {}),
  };
}

/** Format `node` as qcow2 through a BlockBackend-like user with write+resize, sharing everything. */
async function formatQcow2(node: BlockNode, opts: Qcow2CreateOptions, signal: AbortSignal): Promise<void> {
  const user = node.attach({
    name: 'an unnamed block device',
    kind: 'backend',
    perm: permsOf(0x1 | 0x2 | 0x8),
    shared: permsOf(PERM_ALL),
  });
  try {
    await createQcow2(user.io, opts, signal);
  } finally {
    user.detach();
  }
}

/**
 * The body of a create job. Not async on purpose: what QEMU checks before its first I/O (the
 * file of a node-name reference, option values, opening the host file) throws synchronously, so
 * the job fails before blockdev-create replies, in QSD's event order.
 */
function createBody(o: CreateArgs['options'], ctx: CommandContext, signal: AbortSignal): Promise<void> {
  switch (o.driver) {
    case 'file': {
      const fd = openCreateFile(String(o['filename']));
      return fillCreatedFile(
        fd,
        {
          filename: String(o['filename']),
          size: num(o['size']) ?? 0,
          ...(o['preallocation'] !== undefined ? { preallocation: o['preallocation'] as FilePrealloc } : {}),
          ...(o['nocow'] !== undefined ? { nocow: o['nocow'] === true } : {}),
          ...(o['extent-size-hint'] !== undefined ? { extentSizeHint: num(o['extent-size-hint']) ?? 0 } : {}),
        },
        signal,
      );
    }
    case 'qcow2': {
      const ref = o['file'];
      if (typeof ref === 'string') {
        const node = ctx.services.graph.find(ref);
        const opts = qcow2Options(o);
        checkQcow2Create(opts);
        return formatQcow2(node, opts, signal);
      }
      // Inline options: a temporary node, opened (asynchronously) for this job and closed after.
      return (async () => {
        const graph = ctx.services.graph;
        const node = await graph.openTemporary(ref as Record<string, unknown>);
        try {
          const opts = qcow2Options(o);
          checkQcow2Create(opts);
          await formatQcow2(node, opts, signal);
        } finally {
          await graph.closeTemporary(node);
        }
      })();
    }
    default:
      throw new QmpError('Driver does not support blockdev-create');
  }
}

/** Drivers blockd can create (others: "Driver does not support blockdev-create", before the job). */
const CREATE_DRIVERS: readonly string[] = ['file', 'qcow2'];

export const imageCommands: readonly CommandDef[] = [
  defineCommand<CreateArgs>('blockdev-create', (args, ctx) => {
    if (!CREATE_DRIVERS.includes(args.options.driver)) throw new QmpError('Driver does not support blockdev-create');
    const driver: JobDriver = {
      type: 'create',
      // One unit of progress, counted when the body ends however it ends (as QEMU's create job).
      run: (job, signal) => {
        try {
          return createBody(args.options, ctx, signal).finally(() => job.progress(1));
        } catch (err) {
          job.progress(1);
          throw err;
        }
      },
    };
    ctx.services.jobs.start(args['job-id'], driver, { autoFinalize: true, autoDismiss: false });
    return {};
  }),
  defineCommand<ResizeArgs>('block_resize', async (args, ctx) => {
    const dev = args.device ?? '';
    const name = args['node-name'];
    const node = name !== undefined && dev === '' ? ctx.services.graph.get(name) : undefined;
    if (!node) throw new BlockError('NODE_NOT_FOUND', 'ENOENT', `Cannot find device='${dev}' nor node-name='${name ?? ''}'`);
    if (args.size < 0) throw new QmpError("Parameter 'size' expects a >0 size");
    await node.io.truncate(args.size);
    return {};
  }),
];
