/**
 * The native socket layer parks a closed client's poll handle and restarts it for the next
 * client that gets the same fd number (native/netio.c, g_spares). Clients come and go here
 * in every order, with the test's own sockets and files (same process, same event loop)
 * taking the freed fd numbers in between: every client must be served, none may hang, and
 * no socket may be left open.
 */
import { closeSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { NbdServer } from '../../src/nbd/server.js';
import { NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE, NBD_REP_ACK } from '../../src/nbd/protocol.js';
import { silentLogger } from '../../src/util/logger.js';
import { MemoryBackend } from '../helpers/nbd-memory-backend.js';
import { RawNbdClient } from '../helpers/nbd-raw-client.js';
import { nativeAddon } from '../../src/block/native.js';
import { netIoBindingFrom } from '../../src/nbd/native-transport.js';

const NETIO = netIoBindingFrom(nativeAddon());

let dir: string | undefined;
let server: NbdServer | undefined;
const open: RawNbdClient[] = [];

afterEach(async () => {
  for (const c of open.splice(0)) c.close();
  await server?.close();
  server = undefined;
  if (dir) rmSync(dir, { recursive: true, force: true });
  dir = undefined;
});

/** Write a pattern for client `k` at its own 4 KiB block and read it back; then DISC. */
async function exercise(c: RawNbdClient, k: number): Promise<void> {
  const data = Buffer.alloc(4096, (k * 37 + 11) & 0xff);
  c.request(NBD_CMD_WRITE, k * 4096, 4096, 0, 1n, data);
  const w = await c.reply();
  expect(w?.kind === 'simple' && w.error).toBe(0);
  c.request(NBD_CMD_READ, k * 4096, 4096, 0, 2n);
  const r = await c.reply();
  expect(r?.kind === 'simple' && r.error).toBe(0);
  expect((await c.read(4096))?.equals(data)).toBe(true);
}

async function disconnect(c: RawNbdClient): Promise<void> {
  c.request(NBD_CMD_DISC, 0, 0, 0, 9n);
  expect(await c.waitClosed()).toBe(true);
}

describe.skipIf(!NETIO)('native socket layer: reused poll handles', () => {
  it('serves clients that come and go in any order, with fd numbers taken by others in between', async () => {
    dir = mkdtempSync(join(tmpdir(), 'nbd-reuse-'));
    const path = join(dir, 'nbd.sock');
    server = new NbdServer({ backend: new MemoryBackend([{ name: 'n', size: 1 << 20 }]), log: silentLogger(), netio: NETIO });
    await server.listen({ type: 'unix', path });
    const before = NETIO!.netOpenCount();
    const connect = async (): Promise<RawNbdClient> => {
      const c = await RawNbdClient.connect(path);
      open.push(c);
      const go = await c.handshake('n', { structured: false });
      expect(go.at(-1)?.type).toBe(NBD_REP_ACK);
      return c;
    };
    let k = 0;
    for (let round = 0; round < 12; round++) {
      // One after another: the server's fd number comes free and is taken again at once.
      for (let i = 0; i < 4; i++) {
        const c = await connect();
        await exercise(c, k++ % 200);
        await disconnect(c);
      }
      // Overlapping clients; the middle one leaves first, then a new one arrives.
      const a = await connect();
      const b = await connect();
      const m = await connect();
      await disconnect(b);
      const d = await connect();
      for (const c of [a, m, d]) await exercise(c, k++ % 200);
      // A file of our own and a client abandoned without DISC take fd numbers in between.
      const fd = openSync(path.replace(/nbd\.sock$/, `f${round}`), 'w');
      m.close();
      const e = await connect();
      closeSync(fd);
      await exercise(e, k++ % 200);
      for (const c of [a, d, e]) await disconnect(c);
    }
    for (let i = 0; i < 100 && (server.connectionCount > 0 || NETIO!.netOpenCount() > before); i++) {
      await new Promise((r) => setTimeout(r, 10));
    }
    expect(server.connectionCount).toBe(0);
    expect(NETIO!.netOpenCount()).toBe(before);
  }, 60_000);
});
