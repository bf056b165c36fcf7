#!/usr/bin/env node
// Throttle benchmark: a throttle node (driver=throttle over null-co) exported over NBD, limits
// from a throttle-group object, driven by fio's nbd engine (qemu-img bench when fio is missing);
// prints the achieved rate against the limit for blockd and, when installed, qemu-storage-daemon.
// Usage: npm run build && npm run bench:throttle [-- SECONDS]   (default 10 s per case)
// Not a pass/fail test: the numbers depend on the machine; "within 5 %" is printed per case.
import { execFile, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';

const run = promisify(execFile);
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const BLOCKD = join(ROOT, 'bin', 'blockd');
const SECONDS = Number(process.argv[2] ?? 10);
const MiB = 1024 * 1024;

/** Each case: throttle-group limits, the fio job, and which number the limit applies to. */
const CASES = [
  { name: 'iops-total 2000, 4k randread qd16', limits: { 'iops-total': 2000 }, rw: 'randread', bs: '4k', depth: 16, measure: 'iops', limit: 2000 },
  { name: 'iops-write 500, 4k randwrite qd8', limits: { 'iops-write': 500 }, rw: 'randwrite', bs: '4k', depth: 8, measure: 'iops', limit: 500 },
  { name: 'bps-total 50 MiB/s, 64k write qd8', limits: { 'bps-total': 50 * MiB }, rw: 'write', bs: '64k', depth: 8, measure: 'bw', limit: 50 * MiB },
  { name: 'bps-read 20 MiB/s, 256k read qd4', limits: { 'bps-read': 20 * MiB }, rw: 'read', bs: '256k', depth: 4, measure: 'bw', limit: 20 * MiB },
  {
    // A burst: the bucket holds max * max-length operations, so a run of SECONDS averages about
    // (max * length + avg * SECONDS) / SECONDS (the burst bucket's max / 10 on top).
    name: 'iops-total 200, burst 1000 for 2 s, 4k randread qd16 (expected average)',
    limits: { 'iops-total': 200, 'iops-total-max': 1000, 'iops-total-max-length': 2 },
    rw: 'randread',
    bs: '4k',
    depth: 16,
    measure: 'iops',
    limit: (1000 * 2 + 200 * SECONDS) / SECONDS,
  },
];

async function have(tool) {
  try {
    await run('sh', ['-c', `command -v ${tool}`]);
    return true;
  } catch {
    return false;
  }
}

async function waitFor(path, proc) {
  for (let i = 0; i < 1500; i++) {
    if (existsSync(path)) return;
    if (proc.exitCode !== null) throw new Error(`daemon exited with ${proc.exitCode}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`${path} did not appear`);
}

async function startDaemon(binary, dir, limits) {
  const sock = join(dir, 'nbd.sock');
  const pid = join(dir, 'daemon.pid');
  const lim = Object.entries(limits)
    .map(([k, v]) => `,limits.${k}=${v}`)
    .join('');
  const args = [
    '--object', `throttle-group,id=tg${lim}`,
    '--blockdev', 'driver=null-co,node-name=n0,size=1073741824',
    '--blockdev', 'driver=throttle,node-name=t0,throttle-group=tg,file=n0',
    '--nbd-server', `addr.type=unix,addr.path=${sock}`,
    '--export', 'type=nbd,id=e0,node-name=t0,name=x,writable=on',
    '--pidfile', pid,
  ];
  const proc = spawn(binary, args, { stdio: ['ignore', 'ignore', 'inherit'] });
  try {
    await waitFor(pid, proc);
  } catch (err) {
    proc.kill('SIGKILL');
    throw err;
  }
  return { proc, uri: `nbd+unix:///x?socket=${sock}` };
}

async function stopDaemon(d) {
  if (d.proc.exitCode !== null) return;
  const done = new Promise((r) => d.proc.once('exit', r));
  d.proc.kill('SIGTERM');
  await done;
}

async function fio(uri, c) {
  const { stdout } = await run('fio', [
    '--name=throttle', '--ioengine=nbd', `--uri=${uri}`, `--rw=${c.rw}`, `--bs=${c.bs}`,
    `--iodepth=${c.depth}`, '--size=1g', `--runtime=${SECONDS}`, '--time_based', '--output-format=json',
  ], { maxBuffer: 64 * MiB });
  // The nbd engine prints "fio: connected to NBD server" before the JSON document.
  const job = JSON.parse(stdout.slice(stdout.indexOf('{'))).jobs[0];
  const r = job.read;
  const w = job.write;
  return {
    iops: r.iops + w.iops,
    bw: r.bw_bytes + w.bw_bytes,
  };
}

/** Fallback: qemu-img bench for about SECONDS at the limit (count = limit * SECONDS). */
async function qemuImgBench(uri, c) {
  const bs = c.bs.endsWith('k') ? Number(c.bs.slice(0, -1)) * 1024 : Number(c.bs);
  const count = c.measure === 'bw' ? Math.ceil((c.limit * SECONDS) / bs) : Math.ceil(c.limit * SECONDS);
  const write = c.rw.includes('write') ? ['-w'] : [];
  const t0 = performance.now();
  await run('qemu-img', ['bench', '-f', 'raw', '-c', String(count), '-d', String(c.depth), '-s', String(bs), ...write, uri]);
  const secs = (performance.now() - t0) / 1000;
  return { iops: count / secs, bw: (count * bs) / secs };
}

function fmt(measure, v) {
  return measure === 'bw' ? `${(v / MiB).toFixed(2)} MiB/s` : `${v.toFixed(1)} IOPS`;
}

const useFio = await have('fio');
if (!useFio && !(await have('qemu-img'))) {
  process.stderr.write('neither fio nor qemu-img is installed\n');
  process.exit(2);
}
const daemons = [['blockd', BLOCKD]];
if (await have('qemu-storage-daemon')) daemons.push(['qemu-storage-daemon', 'qemu-storage-daemon']);
const driver = useFio ? 'fio (nbd engine)' : 'qemu-img bench';
process.stdout.write(`throttle benchmark: ${driver}, ${SECONDS} s per case, throttle over null-co\n`);

const results = [];
for (const c of CASES) {
  for (const [name, binary] of daemons) {
    const dir = mkdtempSync(join(tmpdir(), 'throttle-bench-'));
    const d = await startDaemon(binary, dir, c.limits);
    try {
      const got = useFio ? await fio(d.uri, c) : await qemuImgBench(d.uri, c);
      const achieved = got[c.measure];
      const ratio = achieved / c.limit;
      const row = { case: c.name, daemon: name, limit: c.limit, achieved, ratio, within5: Math.abs(ratio - 1) <= 0.05 };
      results.push(row);
      process.stdout.write(
        `${c.name.padEnd(60)} ${name.padEnd(20)} limit ${fmt(c.measure, c.limit).padStart(14)}  ` +
          `achieved ${fmt(c.measure, achieved).padStart(14)}  ${(ratio * 100).toFixed(1).padStart(6)} %` +
          `  ${row.within5 ? 'within 5 %' : 'OUTSIDE 5 %'}\n`,
      );
    } finally {
      await stopDaemon(d);
      rmSync(dir, { recursive: true, force: true });
    }
  }
}
process.stdout.write(`${JSON.stringify(results)}\n`);
