/**
 * What the data-moving block jobs share besides the copy loop: the on-source-error /
 * on-target-error policy with its BLOCK_JOB_ERROR event, and the cluster size a job copies in.
 */
import { DaemonError } from '../util/errors.js';
import { CopyError } from './job-copy.js';
import type { Job } from './jobs.js';
import type { BlockNode } from './types.js';

/** BlockdevOnError. */
export type OnError = 'report' | 'ignore' | 'enospc' | 'stop' | 'auto';

/** Smallest unit a job copies in (QEMU: 64 KiB, or the target's cluster size when larger). */
export const JOB_CLUSTER_MIN = 65536;

/** The target's cluster size, at least {@link JOB_CLUSTER_MIN}. */
export async function jobClusterSize(target: BlockNode): Promise<number> {
  let cs: unknown;
  try {
    cs = (await target.driver.queryImage?.())?.['cluster-size'];
  } catch {
    cs = undefined;
  }
  return typeof cs === 'number' && cs > JOB_CLUSTER_MIN ? cs : JOB_CLUSTER_MIN;
}

function isNoSpace(err: unknown): boolean {
  const cause = err instanceof CopyError ? err.cause : err;
  return cause instanceof DaemonError ? cause.errno === 'ENOSPC' : (cause as { code?: unknown })?.code === 'ENOSPC';
}

/**
 * Apply the error policy to a failed copy (QEMU's block_job_error_action): sends BLOCK_JOB_ERROR
 * with the action taken, pauses the job for `stop` (and `enospc` on ENOSPC), and says whether
 * the chunk is retried (`ignore`, `stop`) or the job fails (`report`).
 */
export function errorAction(
  job: Job,
  policy: { onSourceError: OnError; onTargetError: OnError },
  err: unknown,
): 'fail' | 'retry' {
  const operation = err instanceof CopyError ? err.operation : 'read';
  const p = operation === 'read' ? policy.onSourceError : policy.onTargetError;
  const nospace = isNoSpace(err);
  let action: 'ignore' | 'report' | 'stop';
  if (p === 'ignore') action = 'ignore';
  else if (p === 'stop' || (p === 'enospc' && nospace)) action = 'stop';
  else action = 'report';
  job.emitEvent('BLOCK_JOB_ERROR', { device: job.id, operation, action });
  if (action === 'stop') job.stopOnError(nospace ? 'nospace' : 'failed');
  return action === 'report' ? 'fail' : 'retry';
}
