/**
 * Generic jobs, following QEMU's job model (qapi/job.json JobStatus/JobVerb): a state table that
 * says which transitions may happen, a verb table that says in which states a user command is
 * accepted, and JOB_STATUS_CHANGE on every change, in QSD 7.2's order.
 *
 * Life of a job: undefined -> created -> running, then either
 *  - success: waiting -> pending -> (finalize: automatic or job-finalize) -> concluded
 *  - failure or cancel: aborting -> concluded, with `error` set ("Operation canceled" for a cancel)
 * and concluded -> null by job-dismiss (or at once with auto-dismiss).
 * A job that reports itself ready (mirror-like) goes running -> ready and waits for job-complete;
 * a pause request takes effect at the job's next pause point (running -> paused, ready -> standby).
 *
 * What a job does is its `JobDriver`; create jobs only need `run`. Block jobs (driver.blockJob)
 * also appear in query-block-jobs and send BLOCK_JOB_* events.
 */
import { BlockError } from '../util/errors.js';
import type { BlockNode } from './types.js';

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

/** Allowed transitions (QEMU's job state table, 7.2). */
const TRANSITIONS: Record<JobStatus, readonly JobStatus[]> = {
  undefined: ['created'],
  created: ['running', 'aborting', 'null'],
  running: ['paused', 'ready', 'waiting', 'aborting'],
  paused: ['running'],
  ready: ['standby', 'waiting', 'aborting'],
  standby: ['ready'],
  waiting: ['pending', 'aborting'],
  pending: ['aborting', 'concluded'],
  aborting: ['aborting', 'concluded'],
  concluded: ['null'],
  null: [],
};

/** Where each verb is accepted (QSD 7.2). */
const VERB_STATES: Record<JobVerb, readonly JobStatus[]> = {
  cancel: ['created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending'],
  pause: ['created', 'running', 'paused', 'ready', 'standby'],
  resume: ['created', 'running', 'paused', 'ready', 'standby'],
  'set-speed': ['created', 'running', 'paused', 'ready', 'standby'],
  complete: ['ready'],
  finalize: ['pending'],
  dismiss: ['concluded'],
};

/** States in which the job's body has finished (QEMU: job_is_completed). */
const COMPLETED: readonly JobStatus[] = ['waiting', 'pending', 'aborting', 'concluded', 'null'];

/** Emits a QMP event (the composition root wires this to the event bus). */
export type JobEventSink = (event: string, data: Record<string, unknown>) => void;

/** The error a job body throws when its AbortSignal fired; the job then reports "Operation canceled". */
export function jobCancelledError(): BlockError {
  return new BlockError('CANCELLED', 'ECANCELED', 'Operation canceled');
}

/** What a particular kind of job does. Every hook but `run` is optional. */
export interface JobDriver {
  readonly type: JobType;
  /** A block job: listed by query-block-jobs, found by block-job-*, sends BLOCK_JOB_* events. */
  readonly blockJob?: boolean;
  /**
   * The job's work. Called synchronously from `JobManager.start` once the job is `running`: a
   * function that throws before returning its promise fails the job before the starting command
   * replies (as QEMU's jobs that fail before their first yield). `signal` fires on a forced
   * cancel; the body should then stop and reject (any error) or resolve. Long bodies call
   * `job.pausePoint()` between steps if they can be paused.
   */
  run(job: Job, signal: AbortSignal): Promise<void>;
  /** job-complete in `ready` (mirror: pivot). Absent: "The active block job 'X' cannot be completed". */
  complete?(job: Job): void;
  /** A cancel request; returns whether it is forced (absent: always forced). */
  cancel?(job: Job, force: boolean): boolean;
  /** The new speed limit (bytes/s, 0 = unlimited) was set. */
  setSpeed?(job: Job, speed: number): void;
  /** Before the job parks at a pause point, and after it leaves it. */
  pause?(job: Job): void;
  resume?(job: Job): void;
  /** Finalization (QEMU's prepare/commit/abort/clean): prepare may throw to fail the job. */
  prepare?(job: Job): Promise<void> | void;
  commit?(job: Job): void;
  abort?(job: Job): void;
  clean?(job: Job): void;
  /**
   * The job's edges in x-debug-query-block-graph (QEMU's job->nodes), in the order the job took
   * them (QEMU's "main node" first). Absent: the job has no vertex (create jobs).
   */
  debugEdges?(): JobDebugEdge[];
}

/** One edge of a block-job vertex in x-debug-query-block-graph. */
export interface JobDebugEdge {
  name: string;
  node: BlockNode;
  perm: number;
  shared: number;
}

export interface JobOptions {
  autoFinalize?: boolean;
  autoDismiss?: boolean;
  /** Initial speed limit (bytes/s); negative: the job is created, then dropped with QSD's error. */
  speed?: number;
  /**
   * The job is set up inside a drained section (QEMU: block jobs that insert a filter or take
   * over a node): `running`, `paused`, `running` before the body starts.
   */
  drainedStart?: boolean;
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

export class Job {
  status: JobStatus = 'undefined';
  currentProgress = 0;
  totalProgress = 1;
  /** Bytes per second, 0 = unlimited (block jobs, block-job-set-speed). */
  speed = 0;
  /** query-block-jobs `io-status`: `failed` after an error stopped the job, until resumed. */
  ioStatus: 'ok' | 'failed' | 'nospace' = 'ok';
  error: string | undefined;
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
  /** Set by the user's pause (job-pause); cleared by resume or cancel. */
  userPaused = false;
  /** Pause requests outstanding (user and internal); the job parks at a pause point while > 0. */
  pauseCount = 0;
  /** Parked at a pause point. */
  paused = false;
  /** A cancel was requested (possibly a soft one). */
  cancelRequested = false;
  /** A forced cancel: the job ends with "Operation canceled". */
  forceCancelled = false;
  /** The body has returned; what is left is finalization. */
  bodyDone = false;
  private readonly abortController = new AbortController();
  private kick: (() => void) | undefined;
  private yieldWaiters: (() => void)[] = [];
  private readonly settled: Promise<void>;
  private resolveSettled!: () => void;

  constructor(
    readonly id: string,
    readonly driver: JobDriver,
    private readonly manager: JobManager,
    opts: JobOptions,
  ) {
    // Block jobs start with no work known (QEMU's progress meter); create jobs count one unit.
    if (driver.blockJob) this.totalProgress = 0;
    this.autoFinalize = opts.autoFinalize ?? true;
    this.autoDismiss = opts.autoDismiss ?? true;
    this.settled = new Promise((r) => (this.resolveSettled = r));
  }

  get type(): JobType {
    return this.driver.type;
  }

  /** Fires on a forced cancel. */
  get signal(): AbortSignal {
    return this.abortController.signal;
  }

  get isCompleted(): boolean {
    return COMPLETED.includes(this.status);
  }

  get isReady(): boolean {
    return this.status === 'ready' || this.status === 'standby';
  }

  /** Resolves once the body has finished and the job has left the running states. */
  whenCompleted(): Promise<void> {
    return this.settled;
  }

  /** Move to `s` (which must be allowed) and tell QMP clients. */
  transition(s: JobStatus): void {
    const from = this.status;
    if (!TRANSITIONS[from].includes(s)) {
      throw new BlockError('JOB_TRANSITION', 'EINVAL', `job '${this.id}': no transition from '${from}' to '${s}'`);
    }
    this.status = s;
    if (s !== from) this.manager.emit('JOB_STATUS_CHANGE', { id: this.id, status: s });
    if (COMPLETED.includes(s)) this.resolveSettled();
    if (s === 'paused' || s === 'standby' || s === 'concluded' || s === 'null') this.notifyYield();
  }

  /** Parked at a pause point or sleeping: a verb that wakes the job runs it to its next yield. */
  get idle(): boolean {
    return this.kick !== undefined;
  }

  /**
   * Resolves at the body's next yield: it parks (pause, sleep), starts waiting for I/O
   * (`yieldNow`), or the job concludes or waits for job-finalize. A command that wakes an idle
   * job awaits this before replying, so that what the job does before its next yield (QEMU runs
   * a woken coroutine at once) is seen before the reply, as in QSD.
   */
  nextYield(): Promise<void> {
    if (this.status === 'null') return Promise.resolve();
    return new Promise((r) => this.yieldWaiters.push(r));
  }

  /** Tell commands waiting in `nextYield` that the body yields now. */
  notifyYield(): void {
    const w = this.yieldWaiters;
    if (w.length === 0) return;
    this.yieldWaiters = [];
    for (const r of w) r();
  }

  /**
   * A yield point before real I/O: waiters of `nextYield` continue (their reply goes out) before
   * the body does anything else, even when the I/O would complete without blocking.
   */
  async yieldNow(): Promise<void> {
    this.notifyYield();
    await new Promise<void>((r) => setImmediate(r));
  }

  /** Refuse a verb the current state does not accept (QEMU's wording). */
  checkVerb(verb: JobVerb): void {
    if (!VERB_STATES[verb].includes(this.status)) {
      throw new BlockError(
        'JOB_STATE',
        'EPERM',
        `Job '${this.id}' in state '${this.status}' cannot accept command verb '${verb}'`,
      );
    }
  }

  /** Report progress: `done` more units of work, `remaining` left (optional). */
  progress(done: number, remaining?: number): void {
    this.currentProgress += done;
    if (remaining !== undefined) this.totalProgress = this.currentProgress + remaining;
  }

  /**
   * Park here while a pause is requested (running -> paused, ready -> standby), unless the job is
   * being cancelled. Bodies call it between units of work.
   */
  async pausePoint(): Promise<void> {
    if (this.pauseCount <= 0 || this.forceCancelled) return;
    this.driver.pause?.(this);
    while (this.pauseCount > 0 && !this.forceCancelled) {
      const back = this.status;
      this.transition(back === 'ready' ? 'standby' : 'paused');
      this.paused = true;
      await new Promise<void>((r) => {
        this.kick = r;
        this.notifyYield();
      });
      this.kick = undefined;
      this.paused = false;
      this.transition(back);
    }
    this.driver.resume?.(this);
  }

  /**
   * Wait until woken (pause, resume, cancel, complete) or `ms` elapsed, then pass a pause point.
   * For bodies that idle (a fleecing backup waits for guest writes). Returns at once if cancelled.
   * `pausePoint: false` returns to the caller on a pause request instead of parking (a copy loop
   * lets its chunks in flight finish before it parks).
   */
  async sleep(ms?: number, pausePoint = true): Promise<void> {
    if (this.forceCancelled) return;
    if (this.pauseCount <= 0) {
      await new Promise<void>((r) => {
        const timer = ms === undefined ? undefined : setTimeout(() => wake(), ms);
        const wake = (): void => {
          if (timer) clearTimeout(timer);
          this.kick = undefined;
          r();
        };
        this.kick = wake;
        this.notifyYield();
      });
    }
    if (pausePoint) await this.pausePoint();
  }

  /** Send a QMP event (block jobs: BLOCK_JOB_ERROR). */
  emitEvent(event: string, data: Record<string, unknown>): void {
    this.manager.emit(event, data);
  }

  /** The error policy said `stop`: pause as a user pause would (job-resume continues). */
  stopOnError(status: 'failed' | 'nospace'): void {
    this.ioStatus = status;
    if (this.userPaused) return;
    this.userPaused = true;
    this.pauseCount++;
  }

  /** Running -> ready (mirror reached sync); block jobs send BLOCK_JOB_READY. */
  transitionToReady(): void {
    this.transition('ready');
    if (this.driver.blockJob) this.manager.emit('BLOCK_JOB_READY', this.blockEventData());
  }

  /**
   * Resolves when the body first yields after start (set by JobManager.start): the starting
   * command replies then, as QSD replies once the new job's coroutine first yields.
   */
  firstYield: Promise<void> = Promise.resolve();

  /** How many times an idle body was woken (Manager.verb: did the verb wake it?). */
  wakes = 0;

  /** Wake a body parked in `sleep` or `pausePoint`. */
  wake(): void {
    if (!this.kick) return;
    this.wakes++;
    this.kick();
  }

  abortBody(): void {
    this.abortController.abort(jobCancelledError());
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

  /** query-block-jobs entry (BlockJobInfo, QEMU's member order). */
  blockInfo(): Record<string, unknown> {
    return {
      type: this.type,
      device: this.id,
      len: this.totalProgress,
      offset: this.currentProgress,
      busy: !this.paused && !this.isCompleted && this.kick === undefined,
      paused: this.pauseCount > 0,
      speed: this.speed,
      'io-status': this.ioStatus,
      ready: this.isReady,
      status: this.status,
      'auto-finalize': this.autoFinalize,
      'auto-dismiss': this.autoDismiss,
      ...(this.error !== undefined ? { error: this.error } : {}),
    };
  }

  /** Data of BLOCK_JOB_CANCELLED / _COMPLETED / _READY. */
  blockEventData(): Record<string, unknown> {
    return {
      type: this.type,
      device: this.id,
      len: this.totalProgress,
      offset: this.currentProgress,
      speed: this.speed,
    };
  }

  /** @internal called when `run` settles. */
  bodyFinished(err: unknown): void {
    this.bodyDone = true;
    // A body that stops because of a forced cancel just reports the cancel.
    if (err !== undefined && !(this.forceCancelled && this.signal.aborted)) this.error = errorText(err);
  }
}

const JOB_ID_RE = /^[A-Za-z][A-Za-z0-9._-]*$/;

export class JobManager {
  private readonly jobs = new Map<string, Job>();

  constructor(private readonly sink: JobEventSink) {}

  /** @internal */
  emit(event: string, data: Record<string, unknown>): void {
    this.sink(event, data);
  }

  /** Newest first, as query-jobs lists them. */
  list(): Job[] {
    return [...this.jobs.values()].reverse();
  }

  /** Block jobs only, newest first (query-block-jobs). */
  listBlockJobs(): Job[] {
    return this.list().filter((j) => j.driver.blockJob === true);
  }

  get(id: string): Job {
    const j = this.jobs.get(id);
    if (!j) throw new BlockError('JOB_NOT_FOUND', 'ENOENT', 'Job not found');
    return j;
  }

  /** The block job `id` (block-job-* commands): DeviceNotActive when there is none. */
  getBlockJob(id: string): Job {
    const j = this.jobs.get(id);
    if (!j || j.driver.blockJob !== true) {
      throw new BlockError('JOB_NOT_FOUND', 'ENOENT', `Block job '${id}' not found`, { qmpClass: 'DeviceNotActive' });
    }
    return j;
  }

  checkId(id: string): void {
    if (!JOB_ID_RE.test(id)) throw new BlockError('BAD_OPTION', 'EINVAL', `Invalid job ID '${id}'`);
    if (this.jobs.has(id)) throw new BlockError('BAD_OPTION', 'EINVAL', `Job ID '${id}' already in use`);
  }

  /**
   * Create and start a job: `created` and `running` are emitted now (before the command's reply)
   * and `driver.run` is called at once (see JobDriver.run for synchronous failures).
   */
  start(id: string, driver: JobDriver, opts: JobOptions = {}): Job {
    return this.launch(this.create(id, driver, opts), opts);
  }

  /**
   * The first half of `start`: the job exists in `created` (a transaction action prepares it so);
   * `launch` runs it, `dropCreated` takes it away again (`aborting`, `concluded`, `null`, as QSD
   * when a later action of the transaction fails).
   */
  create(id: string, driver: JobDriver, opts: JobOptions = {}): Job {
    this.checkId(id);
    const job = new Job(id, driver, this, opts);
    this.jobs.set(id, job);
    job.transition('created');
    if (opts.speed !== undefined) {
      if (opts.speed < 0) {
        this.remove(job);
        throw new BlockError('BAD_OPTION', 'EINVAL', "Parameter 'speed' expects a non-negative value");
      }
      job.speed = opts.speed;
    }
    return job;
  }

  /** Take a job made by `create` away without running it (its driver's `clean` is not called). */
  dropCreated(job: Job): void {
    if (job.status !== 'created') return;
    job.transition('aborting');
    job.transition('concluded');
    this.remove(job);
  }

  /**
   * Take a job made by `create` away after its setup failed (QEMU's job_early_fail): only `null`
   * follows `created`. The driver's `clean` is not called.
   */
  discardCreated(job: Job): void {
    if (job.status !== 'created') return;
    this.remove(job);
  }

  /** The second half of `start`: run a job made by `create`. */
  launch(job: Job, opts: JobOptions = {}): Job {
    const driver = job.driver;
    job.transition('running');
    if (opts.drainedStart) {
      job.transition('paused');
      job.transition('running');
    }
    job.firstYield = job.nextYield();
    let body: Promise<void>;
    try {
      body = driver.run(job, job.signal);
    } catch (err) {
      job.bodyFinished(err);
      this.completed(job);
      return job;
    }
    body.then(
      () => {
        job.bodyFinished(undefined);
        this.completed(job);
      },
      (err: unknown) => {
        job.bodyFinished(err);
        this.completed(job);
      },
    );
    return job;
  }

  // ---- user verbs -------------------------------------------------------------------------

  /**
   * Run a user verb on `job`; when the job was idle (sleeping or paused) and the verb woke it,
   * resolve only once it yields again (see Job.nextYield), as QSD answers after the woken job ran.
   */
  async verb(job: Job, fn: () => void): Promise<void> {
    const waiter = job.idle ? job.nextYield() : undefined;
    const wakes = job.wakes;
    fn();
    if (waiter && job.wakes !== wakes) await waiter;
  }

  /** job-cancel (force) / block-job-cancel. */
  cancel(id: string, force = true): void {
    this.userCancel(this.get(id), force);
  }

  userCancel(job: Job, force: boolean): void {
    job.checkVerb('cancel');
    this.doCancel(job, force);
  }

  pause(id: string): void {
    this.userPause(this.get(id));
  }

  userPause(job: Job): void {
    job.checkVerb('pause');
    if (job.userPaused) throw new BlockError('JOB_STATE', 'EBUSY', 'Job is already paused');
    job.userPaused = true;
    job.pauseCount++;
    // Wake an idle body so that it reaches its pause point now.
    if (!job.paused) job.wake();
  }

  resume(id: string): void {
    this.userResume(this.get(id));
  }

  /**
   * `cont`: every job's io-status back to ok (QEMU block_job_iostatus_reset). A job stopped by
   * an error stays paused until job-resume / block-job-resume.
   */
  resetIoStatus(): void {
    for (const j of this.jobs.values()) j.ioStatus = 'ok';
  }

  userResume(job: Job): void {
    if (!job.userPaused || job.pauseCount <= 0) {
      throw new BlockError('JOB_STATE', 'EINVAL', "Can't resume a job that was not paused");
    }
    job.checkVerb('resume');
    job.userPaused = false;
    job.ioStatus = 'ok';
    this.release(job);
  }

  complete(id: string): void {
    this.userComplete(this.get(id));
  }

  userComplete(job: Job): void {
    job.checkVerb('complete');
    if (job.cancelRequested || !job.driver.complete) {
      throw new BlockError('JOB_STATE', 'ENOTSUP', `The active block job '${job.id}' cannot be completed`);
    }
    job.driver.complete(job);
    job.wake();
  }

  async finalize(id: string): Promise<void> {
    const job = this.get(id);
    job.checkVerb('finalize');
    await this.doFinalize(job);
  }

  dismiss(id: string): void {
    const job = this.get(id);
    job.checkVerb('dismiss');
    this.remove(job);
  }

  /** block-job-set-speed. */
  setSpeed(job: Job, speed: number): void {
    job.checkVerb('set-speed');
    if (speed < 0) throw new BlockError('BAD_OPTION', 'EINVAL', "Parameter 'speed' expects a non-negative value");
    const old = job.speed;
    job.speed = speed;
    job.driver.setSpeed?.(job, speed);
    // A faster (or unlimited) job may have to leave its rate-limit sleep now.
    if (speed === 0 || speed > old) job.wake();
  }

  /** Shutdown: cancel every job (forced) and wait for it, then dismiss it; newest first, as QSD. */
  async closeAll(): Promise<void> {
    for (;;) {
      const job = this.list()[0];
      if (!job) return;
      if (job.status === 'concluded') {
        this.remove(job);
        continue;
      }
      this.doCancel(job, true);
      await job.whenCompleted();
      const now = job.status as JobStatus;
      if (now !== 'concluded' && now !== 'null') {
        // Left waiting/pending by a failed finalization: make sure it ends.
        this.abortCompleted(job);
      }
    }
  }

  // ---- the state machine ------------------------------------------------------------------

  private release(job: Job): void {
    job.pauseCount--;
    if (job.pauseCount === 0) job.wake();
  }

  private doCancel(job: Job, force: boolean): void {
    if (job.status === 'concluded') {
      this.remove(job);
      return;
    }
    const forced = job.driver.cancel ? job.driver.cancel(job, force) : true;
    if (job.userPaused) {
      job.userPaused = false;
      job.pauseCount--;
    }
    if (forced || !job.bodyDone) {
      job.cancelRequested = true;
      job.forceCancelled ||= forced;
    }
    if (job.bodyDone) {
      // Finished but not finalized (waiting/pending): abort it now.
      if (job.forceCancelled) this.abortCompleted(job);
    } else {
      if (job.forceCancelled) job.abortBody();
      job.wake();
    }
  }

  /** Set the error of a cancelled job and enter aborting (QEMU: job_update_rc). */
  private updateRc(job: Job): void {
    if (job.error === undefined && job.forceCancelled) job.error = jobCancelledError().message;
    if (job.error !== undefined) job.transition('aborting');
  }

  private completed(job: Job): void {
    this.updateRc(job);
    if (job.error !== undefined) {
      this.abortCompleted(job);
      return;
    }
    job.transition('waiting');
    job.transition('pending');
    if (!job.autoFinalize) {
      if (job.driver.blockJob) this.emit('BLOCK_JOB_PENDING', { type: job.type, id: job.id });
      job.notifyYield();
      return;
    }
    void this.doFinalize(job);
  }

  private async doFinalize(job: Job): Promise<void> {
    if (job.error === undefined && job.driver.prepare) {
      try {
        await job.driver.prepare(job);
      } catch (err) {
        job.error = errorText(err);
      }
      this.updateRc(job);
    }
    if (job.error !== undefined) {
      this.abortCompleted(job);
      return;
    }
    this.finalizeSingle(job);
  }

  /** Finalize a job whose body is done as failed or cancelled (QEMU: job_completed_txn_abort). */
  private abortCompleted(job: Job): void {
    if (job.status === 'concluded' || job.status === 'null') return;
    this.finalizeSingle(job);
  }

  private finalizeSingle(job: Job): void {
    this.updateRc(job);
    if (job.error === undefined) job.driver.commit?.(job);
    else job.driver.abort?.(job);
    job.driver.clean?.(job);
    if (job.driver.blockJob) {
      if (job.forceCancelled) this.emit('BLOCK_JOB_CANCELLED', job.blockEventData());
      else {
        this.emit('BLOCK_JOB_COMPLETED', {
          ...job.blockEventData(),
          ...(job.error !== undefined ? { error: job.error } : {}),
        });
      }
    }
    job.transition('concluded');
    if (job.autoDismiss) this.remove(job);
  }

  private remove(job: Job): void {
    job.transition('null');
    this.jobs.delete(job.id);
  }
}
