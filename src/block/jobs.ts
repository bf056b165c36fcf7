/**
 * Generic jobs (QEMU's job.c model): states, verbs and JOB_STATUS_CHANGE events in QSD's order.
 * A job runs `run(job, signal)`; success goes waiting -> pending -> concluded (auto-finalize),
 * failure or cancel goes aborting -> concluded with `error`; dismiss (or auto-dismiss) -> null.
 */
import { BlockError } from '../util/errors.js';

export type JobStatus =
  | 'undefined'
  | 'created'
  | 'running'
  | 'paused'
  | 'ready'
  | 'standby'
  | 'waiting'
  | 'pending'
  | 'aborting'
  | 'concluded'
  | 'null';

export type JobType =
  | 'commit'
  | 'stream'
  | 'mirror'
  | 'backup'
  | 'create'
  | 'amend'
  | 'snapshot-load'
  | 'snapshot-save'
  | 'snapshot-delete';

export type JobVerb = 'cancel' | 'pause' | 'resume' | 'set-speed' | 'complete' | 'finalize' | 'dismiss';

/** Where each verb is allowed (QSD 7.2). */
const VERB_STATES: Record<JobVerb, readonly JobStatus[]> = {
  cancel: ['created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending'],
  pause: ['created', 'running', 'paused', 'ready', 'standby'],
  resume: ['created', 'running', 'paused', 'ready', 'standby'],
  'set-speed': ['created', 'running', 'paused', 'ready', 'standby'],
  complete: ['ready'],
  finalize: ['pending'],
  dismiss: ['concluded'],
};

/** Emits a QMP event (the composition root wires this to the event bus). */
export type JobEventSink = (event: string, data: Record<string, unknown>) => void;

export interface JobOptions {
  autoFinalize?: boolean;
  autoDismiss?: boolean;
}

export class Job {
  status: JobStatus = 'undefined';
  currentProgress = 0;
  totalProgress = 1;
  error: string | undefined;
  readonly abort = new AbortController();
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
  /** Resolves when the job reached `concluded`. */
  readonly done: Promise<void>;
  private resolveDone!: () => void;

  constructor(
    readonly id: string,
    readonly type: JobType,
    private readonly manager: JobManager,
    opts: JobOptions,
  ) {
    this.autoFinalize = opts.autoFinalize ?? true;
    this.autoDismiss = opts.autoDismiss ?? true;
    this.done = new Promise((r) => (this.resolveDone = r));
  }

  setStatus(s: JobStatus): void {
    this.status = s;
    this.manager.emitStatus(this);
    if (s === 'concluded') this.resolveDone();
  }

  /** query-jobs entry, QSD's member order. */
  info(): Record<string, unknown> {
    return {
      'current-progress': this.currentProgress,
      status: this.status,
      'total-progress': this.totalProgress,
      type: this.type,
      id: this.id,
      ...(this.error !== undefined ? { error: this.error } : {}),
    };
  }
}

const JOB_ID_RE = /^[A-Za-z][A-Za-z0-9._-]*$/;

export class JobManager {
  private readonly jobs = new Map<string, Job>();

  constructor(private readonly emit: JobEventSink) {}

  emitStatus(job: Job): void {
    this.emit('JOB_STATUS_CHANGE', { status: job.status, id: job.id });
  }

  /** Newest first, as query-jobs lists them. */
  list(): Job[] {
    return [...this.jobs.values()].reverse();
  }

  get(id: string): Job {
    const j = this.jobs.get(id);
    if (!j) throw new BlockError('JOB_NOT_FOUND', 'ENOENT', 'Job not found');
    return j;
  }

  checkId(id: string): void {
    if (!JOB_ID_RE.test(id)) throw new BlockError('BAD_OPTION', 'EINVAL', `Invalid job ID '${id}'`);
    if (this.jobs.has(id)) throw new BlockError('BAD_OPTION', 'EINVAL', `Job ID '${id}' already in use`);
  }

  /**
   * Create and start a job: `created` and `running` are emitted now (before the command's reply),
   * the body runs on the next turn of the event loop.
   */
  start(id: string, type: JobType, run: (job: Job, signal: AbortSignal) => Promise<void>, opts: JobOptions = {}): Job {
    this.checkId(id);
    const job = new Job(id, type, this, opts);
    this.jobs.set(id, job);
    job.setStatus('created');
    job.setStatus('running');
    setImmediate(() => {
      void (async () => {
        try {
          await run(job, job.abort.signal);
          if (job.abort.signal.aborted) throw new BlockError('CANCELLED', 'ECANCELED', 'Job was cancelled');
          job.currentProgress = job.totalProgress;
          job.setStatus('waiting');
          job.setStatus('pending');
          if (job.autoFinalize) this.conclude(job);
        } catch (err) {
          job.error = err instanceof Error ? err.message : String(err);
          job.currentProgress = job.totalProgress;
          job.setStatus('aborting');
          this.conclude(job);
        }
      })();
    });
    return job;
  }

  private conclude(job: Job): void {
    job.setStatus('concluded');
    if (job.autoDismiss) this.remove(job);
  }

  private remove(job: Job): void {
    job.setStatus('null');
    this.jobs.delete(job.id);
  }

  private checkVerb(job: Job, verb: JobVerb): void {
    if (!VERB_STATES[verb].includes(job.status)) {
      throw new BlockError(
        'JOB_STATE',
        'EBUSY',
        `Job '${job.id}' in state '${job.status}' cannot accept command verb '${verb}'`,
      );
    }
  }

  dismiss(id: string): void {
    const job = this.get(id);
    this.checkVerb(job, 'dismiss');
    this.remove(job);
  }

  finalize(id: string): void {
    const job = this.get(id);
    this.checkVerb(job, 'finalize');
    this.conclude(job);
  }

  cancel(id: string): void {
    const job = this.get(id);
    this.checkVerb(job, 'cancel');
    job.abort.abort();
  }

  /** Shutdown: cancel running jobs, wait for them, dismiss everything (QSD emits `null` for each). */
  async closeAll(): Promise<void> {
    for (const j of this.jobs.values()) {
      if (j.status === 'pending') this.conclude(j);
      else if (j.status !== 'concluded') j.abort.abort();
    }
    await Promise.all([...this.jobs.values()].map((j) => j.done));
    for (const j of this.list()) this.remove(j);
  }
}
