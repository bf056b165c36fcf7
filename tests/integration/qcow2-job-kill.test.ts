/**
 * SIGKILL in the middle of a backup or a mirror into a fresh qcow2 target (issue 12): blockd
 * runs as a child process, the job copies a patterned source under a speed limit, and the
 * daemon is killed once the job has copied a given amount. Afterwards `qemu-img check` finds the
 * target and the source clean (no corruption and no leaked clusters, as with QSD), the source
 * keeps its data and every cluster the target shows holds the source's data.
 *
 * The kill points differ per case: with 64 KiB clusters the whole 32 MiB disk has one L2 table
 * (allocated by the first copied chunk); with 4 KiB clusters an L2 table covers 2 MiB, so the
 * copy links new L2 tables, writes refcount blocks and fills more than one refcount block while
 * several chunks are in flight.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { buildDist, cleanupProcesses, startBlockd, tempDir } from '../helpers/blockd-process.js';
import { QmpTestClient } from '../helpers/qmp-client.js';
import { contentOf, MiB, qemuImg, qemuTools } from '../helpers/qcow2.js';

const tools = qemuTools();
const SIZE = 32 * MiB;
const PATTERN = 0x5a;

interface Case {
  job: 'backup' | 'mirror';
  clusterSize: number;
  /** Kill once the job reports at least this many bytes copied. */
  killAt: number;
}

const CASES: Case[] = [
  { job: 'backup', clusterSize: 65536, killAt: 1 * MiB },
  { job: 'backup', clusterSize: 65536, killAt: 6 * MiB },
  { job: 'mirror', clusterSize: 65536, killAt: 2 * MiB },
  { job: 'backup', clusterSize: 4096, killAt: 3 * MiB },
  { job: 'backup', clusterSize: 4096, killAt: 9 * MiB },
  { job: 'mirror', clusterSize: 4096, killAt: 5 * MiB },
];

interface CheckResult {
  code: number;
  report: { 'check-errors'?: number; corruptions?: number; leaks?: number; 'leaks-fixed'?: number };
  text: string;
}

function checkJson(img: string): CheckResult {
  const r = spawnSync('qemu-img', ['check', '--output=json', img], { encoding: 'utf8' });
  let report: CheckResult['report'] = {};
  try {
    report = JSON.parse(r.stdout) as CheckResult['report'];
  } catch {
    // reported through `text`
  }
  return { code: r.status ?? -1, report, text: `${r.stdout}${r.stderr}`.slice(0, 2000) };
}

/** Bounded poll (the bound is generous; the test fails when it is reached). */
async function until<T>(what: string, fn: () => Promise<T | undefined> | T | undefined): Promise<T> {
  for (let i = 0; i < 3000; i++) {
    const v = await fn();
    if (v !== undefined) return v;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`timed out waiting for ${what}`);
}

describe.skipIf(!tools)('SIGKILL during a job into a fresh qcow2 target', () => {
  beforeAll(() => buildDist(), 180_000);
  afterEach(() => cleanupProcesses());
  afterAll(() => cleanupProcesses());

  it.each(CASES)(
    '$job, $clusterSize-byte target clusters, killed after $killAt bytes: target and source check clean',
    async ({ job, clusterSize, killAt }) => {
      const dir = tempDir('blockd-job-kill-');
      const src = join(dir, 'src.qcow2');
      const tgt = join(dir, 'tgt.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', src, String(SIZE));
      execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P ${PATTERN} 0 ${SIZE}`, src], { stdio: 'ignore' });
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${clusterSize}`, tgt, String(SIZE));

      const sock = join(dir, 'qmp.sock');
      const pidfile = join(dir, 'pid');
      const { child, done } = startBlockd([
        '--pidfile', pidfile,
        '--chardev', `socket,id=m,path=${sock},server=on,wait=off`,
        '--monitor', 'm',
      ]);
      await until('the pidfile', () => (existsSync(pidfile) ? true : undefined));
      const qmp = await QmpTestClient.connect({ path: sock }, { negotiate: true });
      const ok = async (name: string, args: Record<string, unknown>): Promise<unknown> => {
        const r = await qmp.cmd(name, args);
        expect(r.error, `${name}: ${JSON.stringify(r.error)}`).toBeUndefined();
        return r.return;
      };
      for (const [node, filename] of [['src', src], ['tgt', tgt]]) {
        await ok('blockdev-add', { driver: 'qcow2', 'node-name': node, file: { driver: 'file', filename } });
      }
      const common = { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', speed: 8 * MiB };
      await ok(job === 'backup' ? 'blockdev-backup' : 'blockdev-mirror', common);
      const offset = await until('the job to copy enough', async () => {
        const jobs = (await ok('query-block-jobs', {})) as { offset: number; len: number }[];
        const o = jobs[0]?.offset ?? 0;
        return o >= killAt ? o : undefined;
      });
      expect(offset).toBeLessThan(SIZE); // still mid-copy
      child.kill('SIGKILL');
      const r = await done;
      qmp.close();
      expect(r.code).toBeNull();

      const t = checkJson(tgt);
      expect(t.code, t.text).toBe(0);
      expect(t.report.corruptions ?? 0, t.text).toBe(0);
      expect(t.report.leaks ?? 0, t.text).toBe(0);
      expect(t.report['check-errors'] ?? 0, t.text).toBe(0);
      const s = checkJson(src);
      expect(s.code, s.text).toBe(0);

      const srcData = contentOf(src, dir);
      expect(srcData.equals(Buffer.alloc(SIZE, PATTERN))).toBe(true);
      // What the target shows is either copied data or still unallocated (zero).
      const tgtData = contentOf(tgt, dir);
      const zero = Buffer.alloc(clusterSize);
      const full = Buffer.alloc(clusterSize, PATTERN);
      for (let off = 0; off < SIZE; off += clusterSize) {
        const c = tgtData.subarray(off, off + clusterSize);
        if (!c.equals(full)) expect(c.equals(zero), `target cluster at ${off}`).toBe(true);
      }
    },
    60_000,
  );
});
