/**
 * `--demo`: the daemon doing its main job with nothing to prepare. A QMP socket, and when
 * this build has blockdev-add, nbd-server-start and block-export-add: a 1 GiB sparse raw
 * scratch image (in a temporary directory removed at exit) exported writable over NBD on
 * a unix socket, plus 127.0.0.1:10809 (the NBD port) when it is free. Everything is built
 * with the same QMP commands a client would send; the addresses and example client
 * commands are printed on stdout.
 *
 * blockd has one NBD server per process (like QSD), so the TCP address is a plain byte
 * forwarder to the unix socket: clients see the very same server.
 */
import net from 'node:net';
import { mkdtempSync, rmSync, openSync, ftruncateSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Logger } from '../util/logger.js';
import type { Dispatcher } from '../qmp/dispatcher.js';
import type { MonitorManager } from '../qmp/monitor-manager.js';

export const DEMO_NBD_PORT = 10809;
const DEMO_SIZE = 1024 * 1024 * 1024;

export interface DemoDeps {
  dispatcher: Dispatcher;
  monitors: MonitorManager;
  log: Logger;
  stdout: (text: string) => void;
}

export interface Demo {
  readonly dir: string;
  readonly qmpPath: string;
  readonly nbdPath?: string;
  readonly tcpPort?: number;
  close(): Promise<void>;
}

async function exec(d: Dispatcher, name: string, args: Record<string, unknown>): Promise<void> {
  const r = await d.execute(name, args, 'cli');
  for (const fn of r.after) await fn();
}

function forwardTcp(port: number, unixPath: string, log: Logger): Promise<net.Server | undefined> {
  return new Promise((resolve) => {
    const srv = net.createServer((client) => {
      const upstream = net.connect({ path: unixPath });
      client.on('error', () => upstream.destroy());
      upstream.on('error', () => client.destroy());
      client.pipe(upstream).pipe(client);
    });
    srv.once('error', (err) => {
      log.warn({ err, port }, 'demo: TCP port not available, NBD only on the unix socket');
      resolve(undefined);
    });
    srv.listen({ host: '127.0.0.1', port }, () => resolve(srv));
  });
}

export async function startDemo(deps: DemoDeps): Promise<Demo> {
  const { dispatcher, monitors, log } = deps;
  const dir = mkdtempSync(join(tmpdir(), 'blockd-demo-'));
  const qmpPath = join(dir, 'qmp.sock');
  let tcp: net.Server | undefined;
  const close = async (): Promise<void> => {
    if (tcp !== undefined) await new Promise<void>((r) => tcp?.close(() => r()));
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    await monitors.addChardev({
      id: 'demo-qmp',
      backend: 'socket',
      addr: { type: 'unix', path: qmpPath },
      server: true,
      wait: false,
      websocket: false,
      multiClient: true,
    });
    monitors.attach('demo-qmp', {});

    const lines = [
      `blockd ${process.pid}: demo daemon running (stop it with Ctrl-C or SIGTERM)`,
      '',
      `QMP monitor:  unix socket ${qmpPath}`,
      `  try:  socat - UNIX-CONNECT:${qmpPath}`,
      `        then type {"execute":"qmp_capabilities"} and {"execute":"query-block-exports"}`,
    ];

    const canExport = ['blockdev-add', 'nbd-server-start', 'block-export-add'].every((c) =>
      dispatcher.has(c),
    );
    let nbdPath: string | undefined;
    let tcpPort: number | undefined;
    if (canExport) {
      const image = join(dir, 'scratch.raw');
      const fd = openSync(image, 'wx', 0o600);
      try {
        ftruncateSync(fd, DEMO_SIZE);
      } finally {
        closeSync(fd);
      }
      nbdPath = join(dir, 'nbd.sock');
      await exec(dispatcher, 'blockdev-add', { driver: 'file', 'node-name': 'scratch', filename: image });
      await exec(dispatcher, 'nbd-server-start', { addr: { type: 'unix', data: { path: nbdPath } } });
      await exec(dispatcher, 'block-export-add', {
        type: 'nbd',
        id: 'scratch',
        'node-name': 'scratch',
        name: 'scratch',
        writable: true,
        description: 'blockd demo: 1 GiB scratch disk',
      });
      tcp = await forwardTcp(DEMO_NBD_PORT, nbdPath, log);
      if (tcp !== undefined) tcpPort = DEMO_NBD_PORT;
      const unixUri = `nbd+unix:///scratch?socket=${nbdPath}`;
      lines.push(
        '',
        `NBD export 'scratch' (1 GiB, writable, image ${image}):`,
        `  unix:  ${unixUri}`,
        ...(tcpPort !== undefined ? [`  tcp:   nbd://127.0.0.1:${tcpPort}/scratch`] : []),
        `  try:  nbdinfo '${unixUri}'`,
        `        qemu-img info '${unixUri}'`,
        `        qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' '${unixUri}'`,
      );
    } else {
      lines.push('', 'NBD: this build cannot export yet (blockdev-add/nbd-server-start/block-export-add missing)');
    }
    deps.stdout(`${lines.join('\n')}\n`);
    return {
      dir,
      qmpPath,
      ...(nbdPath !== undefined ? { nbdPath } : {}),
      ...(tcpPort !== undefined ? { tcpPort } : {}),
      close,
    };
  } catch (err) {
    await close();
    throw err;
  }
}
