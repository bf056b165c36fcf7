import { describe, expect, it } from 'vitest';
import { JobManager, type Job, type JobDriver } from '../../../src/block/jobs.js';

interface Ev {
  event: string;
  data: Record<string, unknown>;
}

function manager(): { m: JobManager; evs: Ev[]; statuses: (id: string) => string[] } {
  const evs: Ev[] = [];
  const m = new JobManager((event, data) => evs.push({ event, data }));
  const statuses = (id: string): string[] =>
    evs.filter((e) => e.event === 'JOB_STATUS_CHANGE' && e.data['id'] === id).map((e) => String(e.data['status']));
  return { m, evs, statuses };
}

/** A body that finishes when `finish()` is called, or stops when its signal fires. */
function controllable(type: JobDriver['type'] = 'create', extra: Partial<JobDriver> = {}) {
  let finish!: (err?: Error) => void;
  const driver: JobDriver = {
    type,
    ...extra,
    run: (_job, signal) =>
      new Promise<void>((resolve, reject) => {
        finish = (err) => (err ? reject(err) : resolve());
        signal.addEventListener('abort', () => reject(signal.reason as Error));
      }),
  };
  return { driver, finish: (err?: Error) => finish(err) };
}

/** A block job whose body loops on pause points until cancelled or told to stop. */
function loopingBlockJob(extra: Partial<JobDriver> = {}) {
  let stop = false;
  const driver: JobDriver = {
    type: 'backup',
    blockJob: true,
    ...extra,
    run: async (job: Job) => {
      while (!stop && !job.forceCancelled) await job.sleep();
    },
  };
  return { driver, stop: () => (stop = true) };
}

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

describe('JobManager', () => {
  it('emits created and running at start, then waiting, pending, concluded when the body succeeds', async () => {
    const { m, statuses } = manager();
    const c = controllable();
    const job = m.start('j', c.driver, { autoDismiss: false });
    expect(statuses('j')).toEqual(['created', 'running']);
    c.finish();
    await job.whenCompleted();
    expect(statuses('j')).toEqual(['created', 'running', 'waiting', 'pending', 'concluded']);
  });

  it('fails a job whose body throws synchronously before start returns', () => {
    const { m, statuses } = manager();
    const job = m.start(
      'j',
      {
        type: 'create',
        run: () => {
          throw new Error('Image size must be a multiple of 512 bytes');
        },
      },
      { autoDismiss: false },
    );
    expect(statuses('j')).toEqual(['created', 'running', 'aborting', 'concluded']);
    expect(job.info()['error']).toBe('Image size must be a multiple of 512 bytes');
  });

  it('dismisses at once with auto-dismiss', async () => {
    const { m, statuses } = manager();
    const c = controllable();
    const job = m.start('j', c.driver);
    c.finish();
    await job.whenCompleted();
    expect(statuses('j').at(-1)).toBe('null');
    expect(m.list()).toEqual([]);
  });

  it('reports Operation canceled for a job cancelled while running and aborts its body', async () => {
    const { m, statuses } = manager();
    const c = controllable();
    const job = m.start('j', c.driver, { autoDismiss: false });
    m.cancel('j');
    await job.whenCompleted();
    expect(statuses('j')).toEqual(['created', 'running', 'aborting', 'concluded']);
    expect(job.error).toBe('Operation canceled');
  });

  it('refuses to cancel a concluded job with the verb error', async () => {
    const { m } = manager();
    const c = controllable();
    const job = m.start('j', c.driver, { autoDismiss: false });
    c.finish();
    await job.whenCompleted();
    expect(() => m.cancel('j')).toThrow("Job 'j' in state 'concluded' cannot accept command verb 'cancel'");
  });

  it('says Job not found for an unknown id', () => {
    const { m } = manager();
    expect(() => m.pause('x')).toThrow('Job not found');
  });

  it('refuses a second pause and a resume without pause', () => {
    const { m } = manager();
    m.start('j', controllable().driver);
    expect(() => m.resume('j')).toThrow("Can't resume a job that was not paused");
    m.pause('j');
    expect(() => m.pause('j')).toThrow('Job is already paused');
    m.resume('j');
  });

  it('keeps a pause of a job without pause points until it concludes, then refuses resume by state', async () => {
    const { m, statuses } = manager();
    const c = controllable();
    const job = m.start('j', c.driver, { autoDismiss: false });
    m.pause('j');
    expect(job.status).toBe('running');
    c.finish();
    await job.whenCompleted();
    expect(statuses('j').at(-1)).toBe('concluded');
    expect(() => m.resume('j')).toThrow("Job 'j' in state 'concluded' cannot accept command verb 'resume'");
  });

  it('parks a job at its pause point and resumes it', async () => {
    const { m, statuses } = manager();
    const b = loopingBlockJob();
    const job = m.start('b', b.driver, { autoDismiss: false });
    await tick();
    m.pause('b');
    await tick();
    expect(job.status).toBe('paused');
    expect(job.blockInfo()['paused']).toBe(true);
    m.resume('b');
    await tick();
    expect(job.status).toBe('running');
    b.stop();
    job.wake();
    await job.whenCompleted();
    expect(statuses('b')).toEqual(['created', 'running', 'paused', 'running', 'waiting', 'pending', 'concluded']);
  });

  it('sends BLOCK_JOB_CANCELLED before concluded for a cancelled block job', async () => {
    const { m, evs } = manager();
    const job = m.start('b', loopingBlockJob().driver, { autoDismiss: false });
    await tick();
    m.cancel('b');
    await job.whenCompleted();
    const names = evs.map((e) => (e.event === 'JOB_STATUS_CHANGE' ? String(e.data['status']) : e.event));
    expect(names.slice(-3)).toEqual(['aborting', 'BLOCK_JOB_CANCELLED', 'concluded']);
  });

  it('sends BLOCK_JOB_COMPLETED for a block job that finished', async () => {
    const { m, evs } = manager();
    const b = loopingBlockJob();
    const job = m.start('b', b.driver);
    await tick();
    b.stop();
    job.wake();
    await job.whenCompleted();
    await tick();
    const ev = evs.find((e) => e.event === 'BLOCK_JOB_COMPLETED');
    expect(ev?.data).toEqual({ type: 'backup', device: 'b', len: 0, offset: 0, speed: 0 });
  });

  it('creates and drops a job started with a negative speed, with QSD\'s error', () => {
    const { m, statuses } = manager();
    expect(() => m.start('b', loopingBlockJob().driver, { speed: -1 })).toThrow(
      "Parameter 'speed' expects a non-negative value",
    );
    expect(statuses('b')).toEqual(['created', 'null']);
    expect(m.list()).toEqual([]);
  });

  it('goes running, paused, running at a drained start', () => {
    const { m, statuses } = manager();
    m.start('b', loopingBlockJob().driver, { drainedStart: true });
    expect(statuses('b')).toEqual(['created', 'running', 'paused', 'running']);
  });

  it('resolves firstYield once the body parks, and a verb that woke an idle job after its next yield', async () => {
    const { m, statuses } = manager();
    const b = loopingBlockJob();
    const job = m.start('b', b.driver, { autoDismiss: false });
    await job.firstYield;
    expect(job.idle).toBe(true);
    await m.verb(job, () => m.userCancel(job, true));
    // The woken body ended and the job concluded before the verb resolved.
    expect(statuses('b').slice(-2)).toEqual(['aborting', 'concluded']);
  });

  it('does not wait in a verb that did not wake the job', async () => {
    const { m } = manager();
    const c = controllable('backup', { blockJob: true });
    const job = m.start('b', c.driver, { autoDismiss: false });
    // Busy (not idle): set-speed returns at once.
    await m.verb(job, () => m.setSpeed(job, 5));
    expect(job.speed).toBe(5);
    c.finish();
    await job.whenCompleted();
  });

  it('waits in pending with BLOCK_JOB_PENDING when auto-finalize is off, until finalize', async () => {
    const { m, evs, statuses } = manager();
    const b = loopingBlockJob();
    const job = m.start('b', b.driver, { autoFinalize: false, autoDismiss: false });
    await tick();
    b.stop();
    job.wake();
    await job.whenCompleted();
    expect(job.status).toBe('pending');
    expect(evs.some((e) => e.event === 'BLOCK_JOB_PENDING')).toBe(true);
    await m.finalize('b');
    expect(statuses('b').slice(-2)).toEqual(['pending', 'concluded']);
  });

  it('aborts a pending job on cancel', async () => {
    const { m, statuses } = manager();
    const b = loopingBlockJob();
    const job = m.start('b', b.driver, { autoFinalize: false, autoDismiss: false });
    await tick();
    b.stop();
    job.wake();
    await job.whenCompleted();
    m.cancel('b');
    expect(statuses('b').slice(-3)).toEqual(['pending', 'aborting', 'concluded']);
    expect(job.error).toBe('Operation canceled');
  });

  it('refuses complete outside ready and without a complete hook', async () => {
    const { m } = manager();
    const b = loopingBlockJob();
    const job = m.start('b', b.driver);
    await tick();
    expect(() => m.complete('b')).toThrow("Job 'b' in state 'running' cannot accept command verb 'complete'");
    job.transitionToReady();
    expect(() => m.complete('b')).toThrow("The active block job 'b' cannot be completed");
  });

  it('completes a ready job through its complete hook and sends BLOCK_JOB_READY', async () => {
    const { m, evs } = manager();
    let done = false;
    const driver: JobDriver = {
      type: 'mirror',
      blockJob: true,
      complete: () => (done = true),
      run: async (job) => {
        job.transitionToReady();
        while (!done) await job.sleep();
      },
    };
    const job = m.start('mj', driver, { autoDismiss: false });
    expect(evs.some((e) => e.event === 'BLOCK_JOB_READY')).toBe(true);
    m.complete('mj');
    await job.whenCompleted();
    expect(job.status).toBe('concluded');
  });

  it('parks a ready job in standby when paused', async () => {
    const { m } = manager();
    const driver: JobDriver = {
      type: 'mirror',
      blockJob: true,
      run: async (job) => {
        job.transitionToReady();
        while (!job.forceCancelled) await job.sleep();
      },
    };
    const job = m.start('mj', driver);
    m.pause('mj');
    await tick();
    expect(job.status).toBe('standby');
    m.cancel('mj');
    await job.whenCompleted();
  });

  it('checks set-speed: verb, then a negative speed', async () => {
    const { m } = manager();
    const job = m.start('b', loopingBlockJob().driver);
    expect(() => m.setSpeed(job, -1)).toThrow("Parameter 'speed' expects a non-negative value");
    m.setSpeed(job, 1000);
    expect(job.blockInfo()['speed']).toBe(1000);
  });

  it('lists only block jobs in listBlockJobs and refuses create jobs as block jobs', () => {
    const { m } = manager();
    m.start('c', controllable().driver);
    m.start('b', loopingBlockJob().driver);
    expect(m.listBlockJobs().map((j) => j.id)).toEqual(['b']);
    expect(() => m.getBlockJob('c')).toThrow("Block job 'c' not found");
  });

  it('closes everything newest first: running ones cancelled, concluded ones dismissed', async () => {
    const { m, statuses, evs } = manager();
    const c1 = controllable();
    const j1 = m.start('old', c1.driver, { autoDismiss: false });
    c1.finish();
    await j1.whenCompleted();
    m.start('new', controllable().driver, { autoDismiss: false });
    await m.closeAll();
    expect(statuses('new').slice(-3)).toEqual(['aborting', 'concluded', 'null']);
    const nulls = evs.filter((e) => e.data['status'] === 'null').map((e) => e.data['id']);
    expect(nulls).toEqual(['new', 'old']);
    expect(m.list()).toEqual([]);
  });

  it('refuses malformed and duplicate job ids', () => {
    const { m } = manager();
    expect(() => m.start('1x', controllable().driver)).toThrow("Invalid job ID '1x'");
    m.start('a', controllable().driver);
    expect(() => m.start('a', controllable().driver)).toThrow("Job ID 'a' already in use");
  });
});
