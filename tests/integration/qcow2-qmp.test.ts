/**
 * qcow2 through QMP: blockdev-create jobs (events in QSD's order), images that qemu-img accepts,
 * backing chains in query-named-block-nodes, blockdev-snapshot moving users onto the overlay,
 * block_resize, and qemu:allocation-depth equal to qemu-storage-daemon's over NBD.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Daemon as InProcessDaemon } from '../helpers/in-process-daemon.js';
import { check, contentOf, firstDiff, have, MiB, qemuImg, qemuIo, qemuTools, rm, tmp } from '../helpers/qcow2.js';

const tools = qemuTools();
class Daemon extends InProcessDaemon {
  jobEvents(id: string): string[] {
    return this.events
      .filter((e) => e.event === 'JOB_STATUS_CHANGE' && e.data['id'] === id)
      .map((e) => String(e.data['status']));
  }
  async waitJob(id: string): Promise<Record<string, unknown>> {
    for (let i = 0; i < 2000; i++) {
      const jobs = (await this.ok('query-jobs')) as Record<string, unknown>[];
      const j = jobs.find((x) => x['id'] === id);
      if (j && j['status'] === 'concluded') return j;
      await sleep(5);
    }
    throw new Error(`job ${id} did not conclude`);
  }
  /** blockdev-create file + qcow2 at `path`, ending with both jobs dismissed. */
  async createQcow2(path: string, opts: Record<string, unknown>): Promise<void> {
    await this.ok('blockdev-create', { 'job-id': 'cf', options: { driver: 'file', filename: path, size: 0 } });
    await this.waitJob('cf');
    await this.ok('job-dismiss', { id: 'cf' });
    await this.ok('blockdev-add', { driver: 'file', 'node-name': 'proto', filename: path });
    await this.ok('blockdev-create', { 'job-id': 'cq', options: { driver: 'qcow2', file: 'proto', ...opts } });
    const j = await this.waitJob('cq');
    await this.ok('job-dismiss', { id: 'cq' });
    await this.ok('blockdev-del', { 'node-name': 'proto' });
    if (j['error'] !== undefined) throw new Error(String(j['error']));
  }
}

describe.skipIf(!tools)('qcow2 QMP commands', () => {
  let dir: string;
  let d: Daemon;
  beforeEach(() => {
    dir = tmp();
    d = new Daemon();
  });
  afterEach(async () => {
    await d.svc.shutdown();
    rm(dir);
  });

  it('emits the blockdev-create job events in QSD order and lists the job until dismissed', async () => {
    const path = join(dir, 'a.qcow2');
    await d.ok('blockdev-create', { 'job-id': 'c1', options: { driver: 'file', filename: path, size: 0 } });
    expect(d.jobEvents('c1')).toEqual(['created', 'running']);
    const j = await d.waitJob('c1');
    expect(j).toEqual({ 'current-progress': 1, status: 'concluded', 'total-progress': 1, type: 'create', id: 'c1' });
    expect(d.jobEvents('c1')).toEqual(['created', 'running', 'waiting', 'pending', 'concluded']);
    await d.ok('job-dismiss', { id: 'c1' });
    expect(d.jobEvents('c1').at(-1)).toBe('null');
    expect(await d.ok('query-jobs')).toEqual([]);
  });

  it('refuses to dismiss an unknown job', async () => {
    expect(await d.qmp('job-dismiss', { id: 'nope' })).toEqual({ error: { class: 'GenericError', desc: 'Job not found' } });
  });

  it('reports a failed create in query-jobs with aborting then concluded', async () => {
    const path = join(dir, 'a.qcow2');
    await d.createQcow2(path, { size: MiB });
    await d.ok('blockdev-add', { driver: 'file', 'node-name': 'f', filename: path });
    await d.ok('blockdev-create', { 'job-id': 'bad', options: { driver: 'qcow2', file: 'f', size: 1000 } });
    const j = await d.waitJob('bad');
    expect(j['error']).toBe('Image size must be a multiple of 512 bytes');
    expect(d.jobEvents('bad')).toEqual(['created', 'running', 'aborting', 'concluded']);
  });

  const createVariants: [string, Record<string, unknown>][] = [
    ['defaults', {}],
    ['version v2', { version: 'v2' }],
    ['4 KiB clusters, 8-bit refcounts, lazy refcounts', { 'cluster-size': 4096, 'refcount-bits': 8, 'lazy-refcounts': true }],
    ['metadata preallocation', { preallocation: 'metadata', 'cluster-size': 65536 }],
    ['extended L2', { 'extended-l2': true }],
  ];
  for (const [name, opts] of createVariants) {
    it(`creates an image qemu-img accepts and that takes writes (${name})`, async () => {
      const path = join(dir, 'a.qcow2');
      await d.createQcow2(path, { size: 3 * MiB, ...opts });
      expect(check(path).code).toBe(0);
      await d.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: path } });
      const node = d.svc.graph.find('q');
      await node.io.write(Buffer.alloc(100000, 3), 1000000);
      await d.ok('blockdev-del', { 'node-name': 'q' });
      const c = check(path);
      expect(c.code, c.out).toBe(0);
      const expected = Buffer.alloc(3 * MiB);
      expected.fill(3, 1000000, 1100000);
      expect(firstDiff(contentOf(path, dir), expected)).toBe(-1);
    });
  }

  it('creates an overlay with a backing file that qemu-img reads through', async () => {
    const base = join(dir, 'base.qcow2');
    qemuImg('create', '-f', 'qcow2', base, '2M');
    qemuIo(base, 'qcow2', 'write -P 9 0 2M');
    const top = join(dir, 'top.qcow2');
    await d.createQcow2(top, { size: 2 * MiB, 'backing-file': 'base.qcow2', 'backing-fmt': 'qcow2' });
    expect(firstDiff(contentOf(top, dir), Buffer.alloc(2 * MiB, 9))).toBe(-1);
  });

  it('shows every layer of a chain in query-named-block-nodes', async () => {
    const base = join(dir, 'base.raw');
    const mid = join(dir, 'mid.qcow2');
    const top = join(dir, 'top.qcow2');
    qemuImg('create', '-f', 'raw', base, '1M');
    qemuImg('create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', mid, '1M');
    qemuImg('create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top, '1M');
    await d.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: top } });
    const nodes = (await d.ok('query-named-block-nodes')) as Record<string, unknown>[];
    expect(nodes).toHaveLength(6);
    const t = nodes.find((n) => n['node-name'] === 'top') as Record<string, unknown>;
    expect(t['backing_file_depth']).toBe(2);
    expect(t['backing_file']).toBe(mid);
    const img = t['image'] as Record<string, unknown>;
    expect(Object.keys(img)[0]).toBe('backing-image');
    expect(img['backing-filename']).toBe('mid.qcow2');
    expect(img['full-backing-filename']).toBe(mid);
    expect(img['backing-filename-format']).toBe('qcow2');
    const bi = img['backing-image'] as Record<string, unknown>;
    expect((bi['backing-image'] as Record<string, unknown>)['format']).toBe('raw');
    const mids = nodes.filter((n) => n['drv'] === 'qcow2' && n['node-name'] !== 'top');
    expect(String(mids[0]?.['node-name'])).toMatch(/^#block\d+$/);
    expect(mids[0]?.['ro']).toBe(true);
    const flat = (await d.ok('query-named-block-nodes', { flat: true })) as Record<string, unknown>[];
    const tf = flat.find((n) => n['node-name'] === 'top') as Record<string, unknown>;
    expect((tf['image'] as Record<string, unknown>)['backing-image']).toBeUndefined();
  });

  it('opens no backing with backing null and refuses a backing loop', async () => {
    const a = join(dir, 'a.qcow2');
    qemuImg('create', '-u', '-f', 'qcow2', '-b', 'missing.qcow2', '-F', 'qcow2', a, '1M');
    const r = await d.qmp('blockdev-add', { driver: 'qcow2', 'node-name': 'a', file: { driver: 'file', filename: a } });
    expect('error' in r && r.error.desc).toMatch(/^Could not open backing file: Could not open '.*missing.qcow2': No such file or directory/);
    await d.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'a', backing: null, file: { driver: 'file', filename: a } });
    const b = join(dir, 'b.qcow2');
    qemuImg('create', '-f', 'qcow2', b, '1M');
    await d.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'b', backing: 'a', file: { driver: 'file', filename: b } });
    expect(await d.qmp('blockdev-snapshot', { node: 'b', overlay: 'a' })).toMatchObject({ error: { class: 'GenericError' } });
    expect(await d.qmp('blockdev-del', { 'node-name': 'a' })).toEqual({
      error: { class: 'GenericError', desc: "Node 'a' is busy: node is used as backing hd of 'b'" },
    });
  });

  it('moves the users of a node onto the overlay with blockdev-snapshot', async () => {
    const base = join(dir, 'base.qcow2');
    const over = join(dir, 'over.qcow2');
    qemuImg('create', '-f', 'qcow2', base, '1M');
    qemuIo(base, 'qcow2', 'write -P 5 0 1M');
    qemuImg('create', '-f', 'qcow2', over, '1M');
    await d.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'base', file: { driver: 'file', filename: base } });
    const user = d.svc.graph.find('base').attach({
      name: 'an unnamed block device',
      kind: 'backend',
      perm: { consistentRead: true, write: true },
      shared: { consistentRead: true, write: true, writeUnchanged: true, resize: true },
    });
    await d.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'over', backing: null, file: { driver: 'file', filename: over } });
    await d.ok('blockdev-snapshot', { node: 'base', overlay: 'over' });
    expect(user.node.name).toBe('over');
    await user.io.write(Buffer.alloc(4096, 6), 8192);
    expect(await d.qmp('blockdev-snapshot', { node: 'base', overlay: 'over' })).toEqual({
      error: { class: 'GenericError', desc: "Node 'base' is busy: node is used as backing hd of 'over'" },
    });
    user.detach();
    await d.ok('blockdev-del', { 'node-name': 'over' });
    await d.ok('blockdev-del', { 'node-name': 'base' });
    expect(check(over).code).toBe(0);
    const expected = Buffer.alloc(MiB, 5);
    expected.fill(6, 8192, 12288);
    qemuImg('rebase', '-u', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', over);
    expect(firstDiff(contentOf(over, dir), expected)).toBe(-1);
    expect(firstDiff(contentOf(base, dir), Buffer.alloc(MiB, 5))).toBe(-1);
  });

  it('resizes with block_resize and reports QSD errors', async () => {
    const a = join(dir, 'a.qcow2');
    qemuImg('create', '-f', 'qcow2', a, '1M');
    await d.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'a', file: { driver: 'file', filename: a } });
    expect(await d.qmp('block_resize', { size: 1000 })).toEqual({
      error: { class: 'GenericError', desc: "Cannot find device='' nor node-name=''" },
    });
    expect(await d.qmp('block_resize', { 'node-name': 'x', size: 1000 })).toEqual({
      error: { class: 'GenericError', desc: "Cannot find device='' nor node-name='x'" },
    });
    expect(await d.qmp('block_resize', { 'node-name': 'a', size: 1000 })).toEqual({
      error: { class: 'GenericError', desc: 'The new size must be a multiple of 512' },
    });
    await d.ok('block_resize', { 'node-name': 'a', size: 3 * MiB });
    expect(d.svc.graph.find('a').size()).toBe(3 * MiB);
    await d.ok('blockdev-del', { 'node-name': 'a' });
    expect(qemuImg('info', '--output=json', a)).toContain('"virtual-size": 3145728');
  });
});

const nbdTools = tools && have('nbdinfo') && have('qemu-storage-daemon');

describe.skipIf(!nbdTools)('qemu:allocation-depth of a chain', () => {
  it('equals qemu-storage-daemon for the same three-level chain', async () => {
    const dir = tmp();
    const d = new Daemon();
    const base = join(dir, 'base.qcow2');
    const mid = join(dir, 'mid.qcow2');
    const top = join(dir, 'top.qcow2');
    qemuImg('create', '-f', 'qcow2', base, '4M');
    qemuIo(base, 'qcow2', 'write -P 1 0 1M', 'write -P 1 3M 64k');
    qemuImg('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', mid, '4M');
    qemuIo(mid, 'qcow2', 'write -P 2 512k 1M', 'write -z 2M 128k');
    qemuImg('create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top, '5M');
    qemuIo(top, 'qcow2', 'write -P 3 64k 64k', 'write -z 3M 64k', 'write -P 3 4M 64k');
    const map = (sock: string): string =>
      execFileSync('nbdinfo', ['--map=qemu:allocation-depth', `nbd+unix:///top?socket=${sock}`], { encoding: 'utf8' });
    const addArgs = { driver: 'qcow2', 'node-name': 'top', 'read-only': true, file: { driver: 'file', filename: top } };

    const qsdSock = join(dir, 'qsd.sock');
    const qsdPid = join(dir, 'qsd.pid');
    const qsd = spawn('qemu-storage-daemon', [
      '--blockdev', JSON.stringify(addArgs),
      '--nbd-server', `addr.type=unix,addr.path=${qsdSock}`,
      '--export', 'type=nbd,id=e,node-name=top,name=top,allocation-depth=on',
      '--pidfile', qsdPid,
    ], { stdio: 'ignore' });
    try {
      // The pidfile means QSD has set up its whole command line (its socket file exists a
      // moment before it listens, so polling for the socket could race).
      for (let i = 0; i < 400 && !existsSync(qsdPid); i++) await sleep(10);
      const theirs = map(qsdSock);
      qsd.kill('SIGTERM');
      const ourSock = join(dir, 'ours.sock');
      await d.ok('blockdev-add', addArgs);
      await d.ok('nbd-server-start', { addr: { type: 'unix', data: { path: ourSock } } });
      await d.ok('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'top', name: 'top', 'allocation-depth': true });
      const ours = await new Promise<string>((resolve, reject) => {
        const p = spawn('nbdinfo', ['--map=qemu:allocation-depth', `nbd+unix:///top?socket=${ourSock}`]);
        let out = '';
        p.stdout.on('data', (b: Buffer) => (out += b.toString()));
        p.on('error', reject);
        p.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`nbdinfo exited ${code}`))));
      });
      expect(ours).toBe(theirs);
    } finally {
      if (qsd.exitCode === null) qsd.kill('SIGKILL');
      await d.svc.shutdown();
      rm(dir);
    }
  });
});
