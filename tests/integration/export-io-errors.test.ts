/**
 * Export error policies (werror/rerror), BLOCK_IO_ERROR, io-status, cont and
 * x-block-export-resume, with real ENOSPC: the image lives on a 1 MiB tmpfs mounted in a private
 * mount namespace held by a `sleep` child (`unshare -m`), reached through /proc/PID/root. The
 * daemon runs in-process; qemu-io and a raw NBD client are the clients.
 */
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, truncateSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Daemon } from '../helpers/in-process-daemon.js';
import { RawNbdClient } from '../helpers/nbd-raw-client.js';
import { requireTool } from '../helpers/nbd-tools.js';
import { NBD_CMD_WRITE, NBD_ENOSPC } from '../../src/nbd/protocol.js';

const MiB = 1 << 20;

interface QemuIo {
  done: Promise<{ code: number | null; out: string }>;
  child: ChildProcess;
}

function qemuIo(uri: string, ...cmds: string[]): QemuIo {
  const args = ['-f', 'raw'];
  for (const c of cmds) args.push('-c', c);
  args.push(uri);
  const child = execFile('qemu-io', args, () => undefined);
  let out = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (out += d.toString()));
  const done = new Promise<{ code: number | null; out: string }>((resolve) =>
    child.on('close', (code) => resolve({ code, out })),
  );
  return { done, child };
}

/** Can this machine give us a private tmpfs? */
function canMountTmpfs(): boolean {
  const ns = process.geteuid?.() === 0 ? ['-m'] : ['-r', '-m'];
  const d = mkdtempSync(join(tmpdir(), 'blockd-ioerr-probe-'));
  try {
    const r = spawnSync('unshare', [...ns, 'mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', d]);
    return r.status === 0;
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
}

const TMPFS_OK = canMountTmpfs();
if (!TMPFS_OK && process.env.CI === 'true') throw new Error('a private tmpfs (unshare -m) is required under CI');

describe.skipIf(!TMPFS_OK)('export error policies on a full tmpfs', () => {
  let dir: string;
  let holder: ChildProcess;
  /** The tmpfs, as this process sees it. */
  let small: string;
  let sock: string;
  let d: Daemon;

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'blockd-ioerr-'));
    const mnt = join(dir, 'small');
    const ns = process.geteuid?.() === 0 ? ['-m'] : ['-r', '-m'];
    mkdirSync(mnt);
    holder = spawn('unshare', [...ns, 'sh', '-c', `mount -t tmpfs -o size=1m tmpfs ${mnt} && echo up && exec sleep 600`], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    await new Promise<void>((resolve, reject) => {
      holder.stdout!.once('data', () => resolve());
      holder.once('exit', (c) => reject(new Error(`tmpfs holder exited with ${c}`)));
    });
    small = `/proc/${holder.pid}/root${mnt}`;
    sock = join(dir, 'nbd.sock');
    d = new Daemon();
    await d.ok('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  });

  afterEach(async () => {
    await d.shutdown();
    if (holder.exitCode === null && holder.pid !== undefined) process.kill(holder.pid, 'SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  });

  /** An 8 MiB sparse raw image on the tmpfs, with `filler` KiB of the tmpfs used by another file. */
  async function image(node: string, fillerKiB: number): Promise<string> {
    const img = join(small, `${node}.raw`);
    writeFileSync(img, Buffer.alloc(0));
    truncateSync(img, 8 * MiB);
    if (fillerKiB > 0) writeFileSync(join(small, 'filler'), Buffer.alloc(fillerKiB * 1024, 1));
    await d.ok('blockdev-add', { driver: 'file', 'node-name': `${node}-file`, filename: img });
    await d.ok('blockdev-add', { driver: 'raw', 'node-name': node, file: `${node}-file` });
    return img;
  }

  async function exportInfo(id: string): Promise<Record<string, unknown>> {
    const all = (await d.ok('query-block-exports')) as Array<Record<string, unknown>>;
    const e = all.find((x) => x.id === id);
    if (!e) throw new Error(`no export ${id}`);
    return e;
  }

  /** Wait (bounded by the test timeout) until `n` BLOCK_IO_ERROR events were sent. */
  async function ioErrors(n: number): Promise<Array<Record<string, unknown>>> {
    for (;;) {
      const evs = d.events.filter((e) => e.event === 'BLOCK_IO_ERROR').map((e) => e.data);
      if (evs.length >= n) return evs;
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  it('holds a write that hits ENOSPC under werror=stop and completes it after the space is freed and the export resumed', async (ctx) => {
    if (!requireTool('qemu-io')) return ctx.skip();
    await image('r0', 512);
    await d.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'r0', name: 'x', writable: true, werror: 'stop' });
    const io = qemuIo(`nbd+unix:///x?socket=${sock}`, 'write -P 0x5a 0 1M');
    const [ev] = await ioErrors(1);
    expect(ev).toEqual({
      device: 'e0',
      'node-name': 'r0',
      operation: 'write',
      action: 'stop',
      nospace: true,
      reason: 'No space left on device',
    });
    const info = await exportInfo('e0');
    expect(info['io-status']).toBe('nospace');
    expect(info.werror).toBe('stop');
    expect(info.rerror).toBe('report');
    expect(io.child.exitCode).toBe(null);

    unlinkSync(join(small, 'filler'));
    expect(await d.ok('x-block-export-resume', { id: 'e0' })).toEqual({});
    const r = await io.done;
    expect(r.out).toContain('wrote 1048576/1048576 bytes at offset 0');
    expect(r.code).toBe(0);
    expect((await exportInfo('e0'))['io-status']).toBe('ok');
    const back = qemuIo(`nbd+unix:///x?socket=${sock}`, 'read -P 0x5a 0 1M', 'read -P 0 1M 7M');
    const rb = await back.done;
    expect(rb.out).toContain('read 1048576/1048576 bytes at offset 0');
    expect(rb.out).toContain('read 7340032/7340032 bytes at offset 1048576');
    expect(rb.out).not.toContain('Pattern verification failed');
    // One stop, no more: the retried write succeeded.
    expect(d.events.filter((e) => e.event === 'BLOCK_IO_ERROR')).toHaveLength(1);
  });

  it('frees the clusters of a qcow2 write that failed with ENOSPC: the image checks clean after stop and resume', async (ctx) => {
    if (!requireTool('qemu-io') || !requireTool('qemu-img')) return ctx.skip();
    const img = join(small, 'q0.qcow2');
    const made = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '8M']);
    expect(made.status).toBe(0);
    writeFileSync(join(small, 'filler'), Buffer.alloc(512 * 1024, 1));
    await d.ok('blockdev-add', { driver: 'file', 'node-name': 'q0-file', filename: img });
    await d.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'q0', file: 'q0-file' });
    await d.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'q0', name: 'x', writable: true, werror: 'stop' });
    // 512 KiB: with the filler gone it fits on the 1 MiB tmpfs next to the qcow2 metadata.
    const io = qemuIo(`nbd+unix:///x?socket=${sock}`, 'write -P 0x3c 0 512k');
    await ioErrors(1);
    unlinkSync(join(small, 'filler'));
    expect(await d.ok('cont')).toEqual({});
    const r = await io.done;
    expect(r.out).toContain('wrote 524288/524288 bytes at offset 0');
    await d.ok('block-export-del', { id: 'e0' });
    await d.ok('blockdev-del', { 'node-name': 'q0' });
    await d.ok('blockdev-del', { 'node-name': 'q0-file' });
    // Without the free, every cluster of the failed attempt stays counted and unreferenced.
    const check = spawnSync('qemu-img', ['check', '--output=json', img], { encoding: 'utf8' });
    expect(check.stdout).not.toContain('"leaks"');
    expect(check.status).toBe(0);
    const back = spawnSync('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0x3c 0 512k', '-c', 'read -P 0 512k 7680k', img], {
      encoding: 'utf8',
    });
    expect(back.stdout).not.toContain('Pattern verification failed');
    expect(back.stdout).toContain('read 7864320/7864320 bytes at offset 524288');
  });

  it('reports ENOSPC to the client and sends BLOCK_IO_ERROR with action report under werror=report', async (ctx) => {
    if (!requireTool('qemu-io')) return ctx.skip();
    await image('r0', 512);
    await d.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'r0', name: 'x', writable: true, werror: 'report' });
    const r = await qemuIo(`nbd+unix:///x?socket=${sock}`, 'write -P 1 0 1M').done;
    expect(r.out).toContain('write failed: No space left on device');
    const evs = await ioErrors(1);
    expect(evs[0]).toMatchObject({ device: 'e0', operation: 'write', action: 'report', nospace: true });
    expect((await exportInfo('e0'))['io-status']).toBe('ok');
  });

  it('sends no BLOCK_IO_ERROR for an export without werror/rerror (as qemu-storage-daemon)', async (ctx) => {
    if (!requireTool('qemu-io')) return ctx.skip();
    await image('r0', 512);
    await d.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'r0', name: 'x', writable: true });
    const r = await qemuIo(`nbd+unix:///x?socket=${sock}`, 'write -P 1 0 1M').done;
    expect(r.out).toContain('write failed: No space left on device');
    expect(d.events.filter((e) => e.event === 'BLOCK_IO_ERROR')).toEqual([]);
    const info = await exportInfo('e0');
    expect(info).toMatchObject({ werror: 'report', rerror: 'report', 'io-status': 'ok' });
  });

  it('tells the client a write succeeded under werror=ignore although nothing was written', async (ctx) => {
    if (!requireTool('qemu-io')) return ctx.skip();
    await image('r0', 512);
    await d.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'r0', name: 'x', writable: true, werror: 'ignore' });
    const r = await qemuIo(`nbd+unix:///x?socket=${sock}`, 'write -P 1 0 1M').done;
    expect(r.out).toContain('wrote 1048576/1048576 bytes at offset 0');
    const evs = await ioErrors(1);
    expect(evs[0]).toMatchObject({ action: 'ignore', nospace: true });
    const back = await qemuIo(`nbd+unix:///x?socket=${sock}`, 'read -P 1 0 1M').done;
    expect(back.out).toContain('Pattern verification failed');
  });

  it('keeps serving other exports while one is stopped, and cont resumes every stopped export', async (ctx) => {
    if (!requireTool('qemu-io')) return ctx.skip();
    await image('r0', 512);
    await d.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'r0', name: 'x', writable: true, werror: 'enospc' });
    // A second export on a node outside the tmpfs.
    const other = join(dir, 'other.raw');
    writeFileSync(other, Buffer.alloc(0));
    truncateSync(other, 4 * MiB);
    await d.ok('blockdev-add', { driver: 'raw', 'node-name': 'o0', file: { driver: 'file', filename: other } });
    await d.ok('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'o0', name: 'y', writable: true, werror: 'stop' });

    const held = qemuIo(`nbd+unix:///x?socket=${sock}`, 'write -P 3 0 1M');
    expect((await ioErrors(1))[0]).toMatchObject({ device: 'e0', action: 'stop' });
    const r = await qemuIo(`nbd+unix:///y?socket=${sock}`, 'write -P 4 0 1M', 'read -P 4 0 1M').done;
    expect(r.code).toBe(0);
    expect(r.out).toContain('read 1048576/1048576 bytes at offset 0');
    expect((await exportInfo('e1'))['io-status']).toBe('ok');
    expect(held.child.exitCode).toBe(null);

    unlinkSync(join(small, 'filler'));
    expect(await d.ok('cont')).toEqual({});
    expect((await held.done).code).toBe(0);
    expect((await exportInfo('e0'))['io-status']).toBe('ok');
  });

  it('stops again when a retried request fails again, and succeeds when resumed with space', async (ctx) => {
    if (!requireTool('qemu-io')) return ctx.skip();
    await image('r0', 512);
    await d.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'r0', name: 'x', writable: true, werror: 'stop' });
    const io = qemuIo(`nbd+unix:///x?socket=${sock}`, 'write -P 9 0 1M');
    await ioErrors(1);
    await d.ok('x-block-export-resume', { id: 'e0' });
    // Still no space: the retry fails and stops the export again.
    const evs = await ioErrors(2);
    expect(evs[1]).toMatchObject({ action: 'stop', nospace: true });
    expect((await exportInfo('e0'))['io-status']).toBe('nospace');
    unlinkSync(join(small, 'filler'));
    await d.ok('x-block-export-resume', { id: 'e0' });
    expect((await io.done).code).toBe(0);
  });

  it('drops the held requests of a client that disconnects, so that the export can be deleted safely', async () => {
    await image('r0', 512);
    await d.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'r0', name: 'x', writable: true, werror: 'stop' });
    const c = await RawNbdClient.connect(sock);
    await c.handshake('x');
    c.request(NBD_CMD_WRITE, 0, MiB, 0, 1n, Buffer.alloc(MiB, 7));
    await ioErrors(1);
    expect(await d.err('block-export-del', { id: 'e0' })).toBe("export 'e0' still in use");
    c.close();
    for (;;) {
      if ((await exportInfo('e0')).connections === 0) break;
      await new Promise((r) => setTimeout(r, 10));
    }
    // Still stopped (nobody resumed it), but nothing is held any more.
    expect((await exportInfo('e0'))['io-status']).toBe('nospace');
    expect(await d.ok('block-export-del', { id: 'e0' })).toEqual({});
    expect(d.events.map((e) => e.event)).toContain('BLOCK_EXPORT_DELETED');
  });

  it('cuts a held client off on block-export-del mode=hard', async (ctx) => {
    if (!requireTool('qemu-io')) return ctx.skip();
    await image('r0', 512);
    await d.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'r0', name: 'x', writable: true, werror: 'stop' });
    const io = qemuIo(`nbd+unix:///x?socket=${sock}`, 'write -P 9 0 1M');
    await ioErrors(1);
    expect(await d.ok('block-export-del', { id: 'e0', mode: 'hard' })).toEqual({});
    const r = await io.done;
    expect(r.out).not.toContain('wrote 1048576/1048576');
    for (;;) {
      if (d.events.some((e) => e.event === 'BLOCK_EXPORT_DELETED')) break;
      await new Promise((r2) => setTimeout(r2, 10));
    }
    expect(await d.ok('query-block-exports')).toEqual([]);
  });

  it('applies werror, not rerror, to writes: a raw NBD write gets NBD_ENOSPC under werror=report rerror=stop', async () => {
    await image('r0', 1000);
    await d.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'r0', name: 'x', writable: true, werror: 'report', rerror: 'stop' });
    const c = await RawNbdClient.connect(sock);
    await c.handshake('x', { structured: false });
    c.request(NBD_CMD_WRITE, 0, 256 * 1024, 0, 5n, Buffer.alloc(256 * 1024, 7));
    const rep = await c.reply();
    expect(RawNbdClient.errorOf(rep)?.error).toBe(NBD_ENOSPC);
    expect((await ioErrors(1))[0]).toMatchObject({ operation: 'write', action: 'report', nospace: true });
    expect((await exportInfo('e0'))['io-status']).toBe('ok');
    c.close();
  });

  it('rate-limits report events of an export to one a second, the last of a burst sent when the second is over', async () => {
    await image('r0', 1000);
    await d.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'r0', name: 'x', writable: true, werror: 'report' });
    const c = await RawNbdClient.connect(sock);
    await c.handshake('x', { structured: false });
    // The test drives the clock of the rate limit (only setTimeout is faked: I/O runs for real).
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    try {
      const ioErrs = (): unknown[] => d.events.filter((e) => e.event === 'BLOCK_IO_ERROR');
      for (let i = 0; i < 3; i++) {
        c.request(NBD_CMD_WRITE, i * 256 * 1024, 256 * 1024, 0, BigInt(i + 1), Buffer.alloc(256 * 1024, 7));
        expect(RawNbdClient.errorOf(await c.reply())?.error).toBe(NBD_ENOSPC);
      }
      expect(ioErrs()).toHaveLength(1);
      vi.advanceTimersByTime(1000);
      expect(ioErrs()).toHaveLength(2);
      vi.advanceTimersByTime(1000);
      expect(ioErrs()).toHaveLength(2);
    } finally {
      vi.useRealTimers();
      c.close();
    }
  });

  it('cont resets the io-status of a block job stopped by ENOSPC without resuming it, as in QEMU', async () => {
    const src = join(dir, 'src.raw');
    writeFileSync(src, Buffer.alloc(8 * MiB, 0x33));
    await d.ok('blockdev-add', { driver: 'raw', 'node-name': 's0', file: { driver: 'file', filename: src } });
    await image('t0', 1000);
    await d.ok('blockdev-backup', { 'job-id': 'j0', device: 's0', target: 't0', sync: 'full', 'on-target-error': 'stop' });
    for (;;) {
      if (d.events.some((e) => e.event === 'BLOCK_JOB_ERROR')) break;
      await new Promise((r) => setTimeout(r, 10));
    }
    const job = async (): Promise<Record<string, unknown>> =>
      ((await d.ok('query-block-jobs')) as Array<Record<string, unknown>>)[0]!;
    expect((await job())['io-status']).toBe('nospace');
    expect(await d.ok('cont')).toEqual({});
    const after = await job();
    expect(after['io-status']).toBe('ok');
    expect(after.paused).toBe(true);
    await d.ok('job-cancel', { id: 'j0' });
  });

  it('shuts down (quit) without waiting for a stopped export', async (ctx) => {
    if (!requireTool('qemu-io')) return ctx.skip();
    await image('r0', 512);
    await d.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'r0', name: 'x', writable: true, werror: 'stop' });
    const io = qemuIo(`nbd+unix:///x?socket=${sock}`, 'write -P 9 0 1M');
    await ioErrors(1);
    await d.ok('quit');
    expect(d.events.map((e) => e.event)).toContain('BLOCK_EXPORT_DELETED');
    const r = await io.done;
    expect(r.out).not.toContain('wrote 1048576/1048576');
  });
});

describe('werror/rerror validation', () => {
  it('refuses a value that is not a BlockdevOnError', async () => {
    const d = new Daemon();
    try {
      const desc = await d.err('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'n', werror: 'pause' });
      expect(desc).toBe("Parameter 'werror' does not accept value 'pause'");
    } finally {
      await d.shutdown();
    }
  });

  it('answers x-block-export-resume for an unknown export like block-export-del', async () => {
    const d = new Daemon();
    try {
      expect(await d.err('x-block-export-resume', { id: 'nope' })).toBe("Export 'nope' is not found");
      expect(await d.ok('cont')).toEqual({});
    } finally {
      await d.shutdown();
    }
  });
});
