/**
 * Job control: query-jobs and job-{cancel,pause,resume,complete,finalize,dismiss} for every job,
 * and the legacy block-job-* commands plus query-block-jobs, which only see block jobs (a
 * `create` job is not one: block-job-* answer DeviceNotActive "Block job 'X' not found").
 */
import { QmpError } from '../../util/errors.js';
import { defineCommand, type CommandDef } from '../types.js';

interface IdArgs {
  id: string;
}

interface DeviceArgs {
  device: string;
}

interface BlockJobCancelArgs {
  device: string;
  force?: boolean;
}

interface SetSpeedArgs {
  device: string;
  speed: number;
}

export const jobCommands: readonly CommandDef[] = [
  defineCommand('query-jobs', (_args, ctx) => ctx.services.jobs.list().map((j) => j.info())),
  defineCommand<IdArgs>('job-cancel', async (args, ctx) => {
    const jobs = ctx.services.jobs;
    const job = jobs.get(args.id);
    await jobs.verb(job, () => jobs.userCancel(job, true));
    return {};
  }),
  defineCommand<IdArgs>('job-pause', async (args, ctx) => {
    const jobs = ctx.services.jobs;
    const job = jobs.get(args.id);
    await jobs.verb(job, () => jobs.userPause(job));
    return {};
  }),
  defineCommand<IdArgs>('job-resume', async (args, ctx) => {
    const jobs = ctx.services.jobs;
    const job = jobs.get(args.id);
    await jobs.verb(job, () => jobs.userResume(job));
    return {};
  }),
  defineCommand<IdArgs>('job-complete', async (args, ctx) => {
    const jobs = ctx.services.jobs;
    const job = jobs.get(args.id);
    await jobs.verb(job, () => jobs.userComplete(job));
    return {};
  }),
  defineCommand<IdArgs>('job-finalize', async (args, ctx) => {
    await ctx.services.jobs.finalize(args.id);
    return {};
  }),
  defineCommand<IdArgs>('job-dismiss', (args, ctx) => {
    ctx.services.jobs.dismiss(args.id);
    return {};
  }),

  defineCommand('query-block-jobs', (_args, ctx) => ctx.services.jobs.listBlockJobs().map((j) => j.blockInfo())),
  defineCommand<BlockJobCancelArgs>('block-job-cancel', async (args, ctx) => {
    const jobs = ctx.services.jobs;
    const job = jobs.getBlockJob(args.device);
    const force = args.force ?? false;
    if (job.userPaused && !force) {
      throw new QmpError(`The block job for device '${args.device}' is currently paused`);
    }
    await jobs.verb(job, () => jobs.userCancel(job, force));
    return {};
  }),
  defineCommand<DeviceArgs>('block-job-pause', async (args, ctx) => {
    const jobs = ctx.services.jobs;
    const job = jobs.getBlockJob(args.device);
    await jobs.verb(job, () => jobs.userPause(job));
    return {};
  }),
  defineCommand<DeviceArgs>('block-job-resume', async (args, ctx) => {
    const jobs = ctx.services.jobs;
    const job = jobs.getBlockJob(args.device);
    await jobs.verb(job, () => jobs.userResume(job));
    return {};
  }),
  defineCommand<DeviceArgs>('block-job-complete', async (args, ctx) => {
    const jobs = ctx.services.jobs;
    const job = jobs.getBlockJob(args.device);
    await jobs.verb(job, () => jobs.userComplete(job));
    return {};
  }),
  defineCommand<IdArgs>('block-job-finalize', async (args, ctx) => {
    ctx.services.jobs.getBlockJob(args.id);
    await ctx.services.jobs.finalize(args.id);
    return {};
  }),
  defineCommand<IdArgs>('block-job-dismiss', (args, ctx) => {
    ctx.services.jobs.getBlockJob(args.id);
    ctx.services.jobs.dismiss(args.id);
    return {};
  }),
  defineCommand<SetSpeedArgs>('block-job-set-speed', async (args, ctx) => {
    const jobs = ctx.services.jobs;
    const job = jobs.getBlockJob(args.device);
    await jobs.verb(job, () => jobs.setSpeed(job, args.speed));
    return {};
  }),
];
