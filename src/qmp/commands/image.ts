/**
 * Image commands: blockdev-create (a `create` job for `file` and `qcow2`), blockdev-snapshot,
 * block_resize, and the generic job commands query-jobs, job-dismiss, job-finalize, job-cancel.
 */
import { BlockError, QmpError } from '../../util/errors.js';
import { createFile, createQcow2 } from '../../block/drivers/qcow2/create.js';
import { PERM_ALL } from '../../block/types.js';
import { permsOf } from '../../block/node.js';
import { defineCommand, type CommandContext, type CommandDef } from '../types.js';

interface CreateArgs {
  'job-id': string;
  options: Record<string, unknown> & { driver: string };
}

interface SnapshotArgs {
  node: string;
  overlay: string;
}

interface ResizeArgs {
  device?: string;
  'node-name'?: string;
  size: number;
}

function num(v: unknown): number | undefined {
  return typeof v === 'number' ? v : undefined;
}

/** Start the job body for one blockdev-create driver (argument checks happen inside the job). */
function createBody(o: CreateArgs['options'], ctx: CommandContext): (signal: AbortSignal) => Promise<void> {
  switch (o.driver) {
    case 'file':
      return (signal) =>
        createFile(
          {
            filename: String(o['filename']),
            size: num(o['size']) ?? 0,
            ...(o['preallocation'] !== undefined ? { preallocation: o['preallocation'] as 'off' | 'falloc' | 'full' } : {}),
          },
          signal,
        );
    case 'qcow2': {
      const ref = o['file'];
      if (typeof ref !== 'string') {
        throw new QmpError("blockd: blockdev-create of qcow2 needs 'file' as the name of an existing node");
      }
      const node = ctx.services.graph.find(ref);
      // QEMU's create opens a BlockBackend with write+resize, sharing everything.
      const user = node.attach({
        name: 'an unnamed block device',
        kind: 'backend',
        perm: permsOf(0x1 | 0x2 | 0x8),
        shared: permsOf(PERM_ALL),
      });
      return async (signal) => {
        try {
          await createQcow2(
            user.io,
            {
              size: num(o['size']) ?? 0,
              ...(o['version'] !== undefined ? { version: o['version'] as 'v2' | 'v3' } : {}),
              ...(o['cluster-size'] !== undefined ? { clusterSize: num(o['cluster-size']) ?? 0 } : {}),
              ...(o['preallocation'] !== undefined
                ? { preallocation: o['preallocation'] as 'off' | 'metadata' | 'falloc' | 'full' }
                : {}),
              ...(o['lazy-refcounts'] !== undefined ? { lazyRefcounts: o['lazy-refcounts'] === true } : {}),
              ...(o['refcount-bits'] !== undefined ? { refcountBits: num(o['refcount-bits']) ?? 0 } : {}),
              ...(o['compression-type'] !== undefined
                ? { compressionType: o['compression-type'] as 'zlib' | 'zstd' }
                : {}),
              ...(typeof o['backing-file'] === 'string' ? { backingFile: o['backing-file'] } : {}),
              ...(typeof o['backing-fmt'] === 'string' ? { backingFmt: o['backing-fmt'] } : {}),
              ...(o['extended-l2'] !== undefined ? { extendedL2: o['extended-l2'] === true } : {}),
            },
            signal,
          );
        } finally {
          user.detach();
        }
      };
    }
    default:
      throw new QmpError('Driver does not support blockdev-create');
  }
}

export const imageCommands: readonly CommandDef[] = [
  defineCommand<CreateArgs>('blockdev-create', (args, ctx) => {
    ctx.services.jobs.checkId(args['job-id']);
    const body = createBody(args.options, ctx);
    ctx.services.jobs.start(args['job-id'], 'create', (_job, signal) => body(signal), {
      autoFinalize: true,
      autoDismiss: false,
    });
    return {};
  }),
  defineCommand<SnapshotArgs>('blockdev-snapshot', (args, ctx) => {
    ctx.services.graph.snapshot(args.node, args.overlay);
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
  defineCommand('query-jobs', (_args, ctx) => ctx.services.jobs.list().map((j) => j.info())),
  defineCommand<{ id: string }>('job-dismiss', (args, ctx) => {
    ctx.services.jobs.dismiss(args.id);
    return {};
  }),
  defineCommand<{ id: string }>('job-finalize', (args, ctx) => {
    ctx.services.jobs.finalize(args.id);
    return {};
  }),
];
