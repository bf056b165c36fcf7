/**
 * Job commands through QMP on create jobs (in-process daemon): cancel while writing, the legacy
 * block-job-* commands that do not see create jobs, qcow2 created on an inline `file`
 * (temporary node) with each preallocation mode, checked by qemu-img.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { Daemon as InProcessDaemon } from '../helpers/in-process-daemon.js';
import { check, have, MiB, qemuImg, rm, tmp } from '../helpers/qcow2.js';

class Daemon extends InProcessDaemon {
  jobEvents(id: string): string[] {
    return this.events
      .filter((e) => e.event === 'JOB_STATUS_CHANGE' && e.data['id'] === id)
      .map((e) => String(e.data['status']));
  }

  /** Resolves with the query-jobs entry once the job concluded. */
  async concluded(id: string): Promise<Record<string, unknown>> {
    if (!this.jobEvents(id).includes('concluded')) {
      await new Promise<void>((resolve) => {
        const off = this.svc.events.subscribe((e) => {
          if (e.event === 'JOB_STATUS_CHANGE' && e.data['id'] === id && e.data['status'] === 'concluded') {
            off();
            resolve();
          }
        });
      });
    }
    const jobs = (await this.ok('query-jobs')) as Record<string, unknown>[];
    const j = jobs.find((x) => x['id'] === id);
    if (!j) throw new Error(`no job ${id}`);
    return j;
  }

  async create(id: string, options: Record<string, unknown>): Promise<Record<string, unknown>> {
    await this.ok('blockdev-create', { 'job-id': id, options });
    const j = await this.concluded(id);
    await this.ok('job-dismiss', { id });
    return j;
  }
}

describe('job commands on create jobs', () => {
  let dir: string;
  let d: Daemon;
  beforeEach(() => {
    dir = tmp('blockd-jobs-');
    d = new Daemon();
  });
  afterEach(async () => {
    await d.svc.shutdown();
    rm(dir);
  });

  it('stops a preallocation=full create on job-cancel and reports Operation canceled', async () => {
    const path = join(dir, 'big.img');
    await d.ok('blockdev-create', {
      'job-id': 'b',
      options: { driver: 'file', filename: path, size: 4096 * MiB, preallocation: 'full' },
    });
    await d.ok('job-cancel', { id: 'b' });
    const j = await d.concluded('b');
    expect(j).toEqual({ 'current-progress': 1, status: 'concluded', 'total-progress': 1, type: 'create', id: 'b', error: 'Operation canceled' });
    expect(d.jobEvents('b')).toEqual(['created', 'running', 'aborting', 'concluded']);
  });

  it('answers query-block-jobs with no create jobs', async () => {
    await d.ok('blockdev-create', { 'job-id': 'c', options: { driver: 'file', filename: join(dir, 'a'), size: 0 } });
    expect(await d.ok('query-block-jobs')).toEqual([]);
    await d.concluded('c');
  });

  it('answers block-job-* on a create job with DeviceNotActive', async () => {
    await d.ok('blockdev-create', { 'job-id': 'c2', options: { driver: 'file', filename: join(dir, 'b'), size: 0 } });
    await d.concluded('c2');
    for (const [cmd, args] of [
      ['block-job-cancel', { device: 'c2' }],
      ['block-job-pause', { device: 'c2' }],
      ['block-job-set-speed', { device: 'c2', speed: 1 }],
      ['block-job-dismiss', { id: 'c2' }],
    ] as const) {
      expect(await d.qmp(cmd, args)).toEqual({ error: { class: 'DeviceNotActive', desc: "Block job 'c2' not found" } });
    }
  });

  it('fails before the reply when the file cannot be created', async () => {
    const r = await d.qmp('blockdev-create', {
      'job-id': 'f',
      options: { driver: 'file', filename: join(dir, 'no', 'such', 'dir'), size: 0 },
    });
    expect(r).toEqual({ return: {} });
    expect(d.jobEvents('f')).toEqual(['created', 'running', 'aborting', 'concluded']);
  });

  it('refuses file preallocation=metadata after emptying the file', async () => {
    const j = await d.create('m', { driver: 'file', filename: join(dir, 'm'), size: MiB, preallocation: 'metadata' });
    expect(j['error']).toBe('Unsupported preallocation mode: metadata');
    expect(statSync(join(dir, 'm')).size).toBe(0);
  });

  it('refuses blockdev-create for drivers without image creation', async () => {
    expect(await d.err('blockdev-create', { 'job-id': 'r', options: { driver: 'raw' } })).toBe(
      'Driver does not support blockdev-create',
    );
  });

  it.skipIf(!have('qemu-img'))('formats an inline file node and closes it again', async () => {
    const path = join(dir, 'inline.qcow2');
    expect((await d.create('f', { driver: 'file', filename: path, size: 0 }))['error']).toBeUndefined();
    const j = await d.create('q', {
      driver: 'qcow2',
      file: { driver: 'file', filename: path, 'node-name': 'tmpfile' },
      size: 8 * MiB,
    });
    expect(j['error']).toBeUndefined();
    expect(await d.ok('query-named-block-nodes')).toEqual([]);
    expect(check(path).code).toBe(0);
  });

  it('reports an inline file that cannot be opened as the job error', async () => {
    const j = await d.create('q', {
      driver: 'qcow2',
      file: { driver: 'file', filename: join(dir, 'missing.qcow2') },
      size: MiB,
    });
    expect(j['error']).toBe(`Could not open '${join(dir, 'missing.qcow2')}': No such file or directory`);
  });

  for (const mode of ['metadata', 'falloc', 'full'] as const) {
    it.skipIf(!have('qemu-img'))(`creates qcow2 with preallocation=${mode} that maps like qemu-img's`, async () => {
      const ours = join(dir, `ours-${mode}.qcow2`);
      const ref = join(dir, `ref-${mode}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `preallocation=${mode}`, ref, String(3 * MiB));
      await d.create('f', { driver: 'file', filename: ours, size: 0 });
      const j = await d.create('q', { driver: 'qcow2', file: { driver: 'file', filename: ours }, size: 3 * MiB, preallocation: mode });
      expect(j['error']).toBeUndefined();
      expect(check(ours).code).toBe(0);
      expect(qemuImg('map', '--output=json', ours)).toBe(qemuImg('map', '--output=json', ref));
      expect(statSync(ours).size).toBe(statSync(ref).size);
    });
  }

  it('cancels a running create at shutdown and dismisses every job', async () => {
    await d.ok('blockdev-create', {
      'job-id': 'b',
      options: { driver: 'file', filename: join(dir, 'big'), size: 4096 * MiB, preallocation: 'full' },
    });
    await d.svc.shutdown();
    expect(d.jobEvents('b')).toEqual(['created', 'running', 'aborting', 'concluded', 'null']);
    expect(existsSync(join(dir, 'big'))).toBe(true);
  });
});
