/**
 * Start-up readiness (issue 11): a client that connects the moment a socket appears sees the
 * complete command-line state. QSD processes its whole command line before its main loop runs;
 * blockd holds its monitors (no greeting) and its NBD clients (no handshake) until every
 * --blockdev, --object, --nbd-server and --export has been set up.
 */
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { buildDist, cleanupProcesses, startBlockd, tempDir } from '../helpers/blockd-process.js';
import { QmpTestClient } from '../helpers/qmp-client.js';
import { RawNbdClient } from '../helpers/nbd-raw-client.js';
import { execFileP, requireTool } from '../helpers/nbd-tools.js';
import { NBD_REP_ACK } from '../../src/nbd/protocol.js';

const STARTS = 25;

/** Poll (every millisecond, at most `ms`) until `path` exists. */
async function appears(path: string, ms = 15000): Promise<void> {
  const end = Date.now() + ms;
  while (!existsSync(path)) {
    if (Date.now() > end) throw new Error(`${path} did not appear`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

interface Chain {
  dir: string;
  base: string;
  top: string;
}

async function makeChain(): Promise<Chain> {
  const dir = tempDir('blockd-ready-');
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', base, '64M']);
  await execFileP('qemu-io', ['-c', 'write -q -P 0x5a 0 1M', base]);
  await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  return { dir, base, top };
}

function daemonArgs(c: Chain, qmp: string, nbd: string): string[] {
  return [
    '--chardev', `socket,id=mon0,path=${qmp},server=on,wait=off`,
    '--monitor', 'mon0',
    '--blockdev', `driver=file,node-name=base-file,filename=${c.base}`,
    '--blockdev', 'driver=qcow2,node-name=base,file=base-file',
    '--blockdev', `driver=file,node-name=top-file,filename=${c.top}`,
    '--blockdev', 'driver=qcow2,node-name=top,file=top-file,backing=base',
    '--nbd-server', `addr.type=unix,addr.path=${nbd}`,
    '--export', 'type=nbd,id=e,node-name=top,name=e,writable=on',
    '--export', 'type=nbd,id=e2,node-name=base,name=e2',
  ];
}

/** A raw NBD client that connects as soon as the socket exists and asks for export e2. */
async function earlyNbd(path: string): Promise<boolean> {
  await appears(path);
  const c = await RawNbdClient.connect(path);
  try {
    const replies = await c.handshake('e2');
    return replies.at(-1)?.type === NBD_REP_ACK;
  } finally {
    c.sock.destroy();
  }
}

async function oneStart(c: Chain, n: number, env: Record<string, string>): Promise<void> {
  const qmp = join(c.dir, `qmp${n}.sock`);
  const nbd = join(c.dir, `nbd${n}.sock`);
  const { done } = startBlockd(daemonArgs(c, qmp, nbd), { env });
  const early = earlyNbd(nbd);
  await appears(qmp);
  const q = await QmpTestClient.connect({ path: qmp }, { negotiate: true });
  const nodes = await q.cmd('query-named-block-nodes');
  const names = (nodes.return as Array<{ 'node-name': string }>).map((x) => x['node-name']).sort();
  expect(names, `start ${n}`).toEqual(['base', 'base-file', 'top', 'top-file']);
  const exps = await q.cmd('query-block-exports');
  expect((exps.return as Array<{ id: string }>).map((x) => x.id).sort(), `start ${n}`).toEqual(['e', 'e2']);
  // The first connection of a real client, right after the greeting.
  const info = await execFileP('nbdinfo', ['--size', `nbd+unix:///e?socket=${nbd}`]);
  expect(info.stdout.trim()).toBe(String(64 * 1024 * 1024));
  expect(await early, `start ${n}: early raw NBD client`).toBe(true);
  await q.cmd('quit');
  const r = await done;
  expect(r.code, r.stderr).toBe(0);
}

describe('start-up readiness', () => {
  beforeAll(() => buildDist(), 120_000);
  afterEach(() => cleanupProcesses());

  for (const [label, env] of [
    ['native addon', {}],
    ['pure-JS fallback (no addon)', { BLOCKD_NO_ADDON: '1' }],
  ] as const) {
    it(`shows every node and export at the first QMP reply and serves the first NBD client, ${STARTS} starts (${label})`, async (ctx) => {
      if (requireTool('qemu-img') === undefined || requireTool('nbdinfo') === undefined) return ctx.skip();
      const chain = await makeChain();
      for (let n = 0; n < STARTS; n++) await oneStart(chain, n, env);
    }, 180_000);
  }

  it('leaves no socket or pidfile behind when a start-up option fails, with the message and code of QSD', async () => {
    const dir = tempDir('blockd-ready-');
    const { done } = startBlockd([
      '--chardev', `socket,id=m,path=${join(dir, 'qmp.sock')},server=on,wait=off`,
      '--monitor', 'm',
      '--nbd-server', `addr.type=unix,addr.path=${join(dir, 'nbd.sock')}`,
      '--pidfile', join(dir, 'pid'),
      '--blockdev', `driver=file,node-name=f,filename=${join(dir, 'missing.img')}`,
    ], { cwd: dir });
    const r = await done;
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(
      `blockd: --blockdev driver=file,node-name=f,filename=${join(dir, 'missing.img')}: ` +
        `Could not open '${join(dir, 'missing.img')}': No such file or directory\n`,
    );
    expect(readdirSync(dir)).toEqual([]);
  });
});
