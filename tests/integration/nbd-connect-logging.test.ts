/**
 * Per-connection log records: at info level every NBD client leaves "client connected" and
 * "client disconnected" (the export's records, with its connection count) in the log; at warn
 * level (what the benchmark runs with) neither is written. The connect path only builds these
 * records when info is on.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BIN, buildDist, cleanupProcesses, tempDir } from '../helpers/blockd-process.js';
import { execFileP, requireTool } from '../helpers/nbd-tools.js';

interface LogRecord {
  level: number;
  msg: string;
  conn?: number;
  client?: string;
  connections?: number;
}

/** Run blockd serving a null export, connect `clients` times with nbdinfo, stop it; its log. */
async function logOf(level: string, nbdinfo: string, clients: number): Promise<LogRecord[]> {
  const dir = tempDir('blockd-connlog-');
  const sock = join(dir, 'nbd.sock');
  const child = spawn(
    BIN,
    [
      '--log-level', level,
      '--blockdev', 'driver=null-co,node-name=n,size=1048576',
      '--nbd-server', `addr.type=unix,addr.path=${sock}`,
      '--export', 'type=nbd,id=e,node-name=n,name=x',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, BLOCKD_DAEMONIZED_CHILD: '' } },
  );
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((r) => child.on('close', () => r()));
  try {
    for (let i = 0; i < 1500 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 10));
    for (let i = 0; i < clients; i++) await execFileP(nbdinfo, ['--size', `nbd+unix:///x?socket=${sock}`]);
  } finally {
    child.kill('SIGTERM');
    await exited;
  }
  return stderr
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as LogRecord);
}

describe('per-connection logging', () => {
  beforeAll(() => buildDist(), 120_000);
  afterEach(() => cleanupProcesses());

  it('logs every client connect and disconnect at info level', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo) return ctx.skip();
    const log = await logOf('info', nbdinfo, 3);
    const connected = log.filter((r) => r.msg === 'client connected');
    const disconnected = log.filter((r) => r.msg === 'client disconnected');
    expect(connected).toHaveLength(3);
    expect(disconnected).toHaveLength(3);
    for (const r of [...connected, ...disconnected]) {
      expect(r.client).toBe('unix');
      expect(typeof r.conn).toBe('number');
    }
    // One client at a time: each sees itself as the only connection.
    expect(connected.map((r) => r.connections)).toEqual([1, 1, 1]);
    expect(new Set(connected.map((r) => r.conn)).size).toBe(3);
    expect(disconnected.map((r) => r.conn)).toEqual(connected.map((r) => r.conn));
  }, 60_000);

  it('writes no per-connection records at warn level', async (ctx) => {
    const nbdinfo = requireTool('nbdinfo');
    if (!nbdinfo) return ctx.skip();
    const log = await logOf('warn', nbdinfo, 2);
    expect(log.filter((r) => /client (connected|disconnected)/.test(r.msg))).toEqual([]);
  }, 60_000);
});
