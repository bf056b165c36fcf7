import { describe, it, expect, beforeEach, afterEach, afterAll } from 'vitest';
import { mkdtempSync, rmSync, existsSync, cpSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import net from 'node:net';
import { silentLogger } from '../../src/util/logger.js';
import { Services } from '../../src/qmp/services.js';
import { Dispatcher } from '../../src/qmp/dispatcher.js';
import { SchemaRegistry } from '../../src/qmp/schema-registry.js';
import { MonitorManager } from '../../src/qmp/monitor-manager.js';
import { ALL_COMMANDS } from '../../src/qmp/commands/index.js';
import { defineCommand } from '../../src/qmp/types.js';
import type { ChardevSocketOptions } from '../../src/qmp/chardev.js';
import { QmpTestClient } from '../helpers/qmp-client.js';

// The repository schema plus one test-only command that emits an event while it runs.
const schemaDir = mkdtempSync(join(tmpdir(), 'blockd-qmp-schema-'));
cpSync(fileURLToPath(new URL('../../schema/', import.meta.url)), schemaDir, { recursive: true });
writeFileSync(
  join(schemaDir, 'commands', 'x-test-slow.json'),
  JSON.stringify({ command: 'x-test-slow', description: 'test only' }),
);
const schema = SchemaRegistry.load(schemaDir);
afterAll(() => rmSync(schemaDir, { recursive: true, force: true }));
let dir: string;
let services: Services;
let manager: MonitorManager;
let sock: string;
let quitCalls: number;

function unixOpts(id: string, path: string, extra: Partial<ChardevSocketOptions> = {}): ChardevSocketOptions {
  return { id, addr: { type: 'unix', path }, server: true, wait: false, websocket: false, multiClient: false, ...extra };
}

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), 'blockd-qmp-'));
  sock = join(dir, 'qmp.sock');
  const log = silentLogger();
  services = new Services(log);
  quitCalls = 0;
  const slow = defineCommand('x-test-slow', async (_a, ctx) => {
    await new Promise((r) => setTimeout(r, 50));
    ctx.services.events.emit('BLOCK_EXPORT_DELETED', { id: 'e' });
    return { done: true };
  });
  const dispatcher = new Dispatcher(services, [...ALL_COMMANDS, slow], schema);
  manager = new MonitorManager(services, dispatcher, log);
  services.onQuit = async () => {
    quitCalls++;
    await manager.close();
  };
  await manager.addChardev(unixOpts('m', sock));
  manager.attach('m');
});

afterEach(async () => {
  await manager.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('QMP monitor over a unix socket', () => {
  it('greets with the QEMU level and the oob capability', async () => {
    const c = await QmpTestClient.connect({ path: sock });
    expect(c.greeting).toEqual({
      QMP: { version: { qemu: { micro: 0, minor: 2, major: 7 }, package: expect.stringMatching(/^blockd /) }, capabilities: ['oob'] },
    });
    c.close();
  });

  it('refuses commands before negotiation, echoing the id', async () => {
    const c = await QmpTestClient.connect({ path: sock });
    expect(await c.cmd('query-version', undefined, 1)).toEqual({
      id: 1,
      error: { class: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" },
    });
    c.close();
  });

  it('reports bad qmp_capabilities arguments like QEMU and stays negotiating', async () => {
    const c = await QmpTestClient.connect({ path: sock });
    expect((await c.cmd('qmp_capabilities', { enable: ['foo'] }, 'a')).error?.desc).toBe(
      "Parameter 'null' does not accept value 'foo'",
    );
    expect((await c.cmd('qmp_capabilities', { enable: 'oob' })).error?.desc).toBe(
      "Invalid parameter type for 'enable', expected: array",
    );
    expect(await c.cmd('qmp_capabilities')).toEqual({ return: {} });
    expect(await c.cmd('qmp_capabilities', undefined, null)).toEqual({
      id: null,
      error: { class: 'CommandNotFound', desc: 'Capabilities negotiation is already complete, command ignored' },
    });
    c.close();
  });

  it('answers query-version, query-commands and unknown commands', async () => {
    const c = await QmpTestClient.connect({ path: sock }, { negotiate: true });
    const v = await c.cmd('query-version', undefined, { a: [1] });
    expect(v.id).toEqual({ a: [1] });
    expect(v.return).toMatchObject({ qemu: { major: 7, minor: 2 } });
    const cmds = (await c.cmd('query-commands')).return as Array<{ name: string }>;
    expect(cmds.map((x) => x.name)).toContain('qmp_capabilities');
    expect((await c.cmd('query-commands', { x: 1 })).error?.desc).toBe("Parameter 'x' is unexpected");
    expect(await c.cmd('nope', undefined, true)).toEqual({
      id: true,
      error: { class: 'CommandNotFound', desc: 'The command nope has not been found' },
    });
    c.close();
  });

  it('writes exact bytes for envelope errors and parse errors', async () => {
    const c = await QmpTestClient.connect({ path: sock });
    const raw = net.connect({ path: sock });
    const chunks: string[] = [];
    raw.setEncoding('utf8');
    raw.on('data', (d: string) => chunks.push(d));
    const expected =
      '{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}\r\n' +
      '{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member \'foo\' is unexpected"}}\r\n' +
      '{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member \'arguments\' must be an object"}}\r\n' +
      '{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member \'execute\' must be a string"}}\r\n' +
      '{"id": 1, "error": {"class": "GenericError", "desc": "QMP input lacks member \'execute\'"}}\r\n' +
      '{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword \'foo\'"}}\r\n' +
      '{"id": 1500, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with \'qmp_capabilities\'"}}\r\n';
    c.close();
    await new Promise((r) => raw.once('connect', r));
    raw.write(
      '[1,2] {"execute":"query-version","arguments":{},"id":1,"foo":2}' +
        '{"execute":"query-version","arguments":[],"id":1}{"foo":2,"execute":1,"id":1}{"id":1}' +
        '{"execute":foo}{"execute":"query-version","id":1.5e3}',
    );
    await expect.poll(() => chunks.join('').split('\r\n').length, { timeout: 5000 }).toBeGreaterThan(8);
    const all = chunks.join('');
    expect(all.slice(all.indexOf('\r\n') + 2)).toBe(expected);
    raw.destroy();
  });

  it('answers 1000 commands sent in one write, in order', async () => {
    const c = await QmpTestClient.connect({ path: sock }, { negotiate: true });
    let batch = '';
    for (let i = 0; i < 1000; i++) batch += JSON.stringify({ execute: 'query-version', id: i });
    c.send(batch);
    for (let i = 0; i < 1000; i++) expect((await c.next()).id).toBe(i);
    c.close();
  });

  it('serves one client at a time and greets the next when the first leaves', async () => {
    const a = await QmpTestClient.connect({ path: sock });
    const b = await QmpTestClient.connectRaw({ path: sock });
    await a.cmd('qmp_capabilities');
    expect(b.greeting).toBeUndefined();
    a.close();
    b.greeting = await b.next();
    expect(b.greeting).toHaveProperty('QMP');
    b.close();
  });

  it('delivers events only to negotiated sessions, before the reply', async () => {
    await manager.addChardev(unixOpts('m2', join(dir, 'm2.sock'), { multiClient: true }));
    manager.attach('m2');
    const a = await QmpTestClient.connect({ path: join(dir, 'm2.sock') }, { negotiate: true });
    const b = await QmpTestClient.connect({ path: join(dir, 'm2.sock') });
    const r = await a.cmd('x-test-slow', undefined, 7);
    expect(r).toEqual({ return: { done: true }, id: 7 });
    expect(a.events.map((e) => e.event)).toEqual(['BLOCK_EXPORT_DELETED']);
    expect(b.events).toEqual([]);
    a.close();
    b.close();
  });

  it('survives a client that disconnects mid-command', async () => {
    const a = await QmpTestClient.connect({ path: sock }, { negotiate: true });
    a.send('{"execute":"x-test-slow"}');
    a.close();
    const b = await QmpTestClient.connect({ path: sock }, { negotiate: true });
    expect((await b.cmd('query-version')).return).toBeDefined();
    b.close();
  });

  it('answers garbage and deep nesting with errors and keeps serving', async () => {
    const c = await QmpTestClient.connect({ path: sock }, { negotiate: true });
    c.send('\x01');
    expect((await c.next()).error).toEqual({ class: 'GenericError', desc: "JSON parse error, stray '\u0001'" });
    c.send('['.repeat(1025));
    expect((await c.next()).error).toEqual({ class: 'GenericError', desc: 'JSON nesting depth limit exceeded' });
    c.send('\n');
    expect((await c.cmd('query-version', undefined, 'ok')).id).toBe('ok');
    c.close();
  });

  it('answers a 100 MiB line without newline with an error, in bounded memory', async () => {
    const other = await QmpTestClient.connect({ path: join(dir, 'other.sock') }).catch(() => undefined);
    expect(other).toBeUndefined();
    await manager.addChardev(unixOpts('o', join(dir, 'other.sock')));
    manager.attach('o');
    const watcher = await QmpTestClient.connect({ path: join(dir, 'other.sock') }, { negotiate: true });
    const c = await QmpTestClient.connect({ path: sock }, { negotiate: true });
    const before = process.memoryUsage();
    c.send('{"execute": "');
    const mib = Buffer.alloc(1024 * 1024, 0x61);
    for (let i = 0; i < 100; i++) c.send(mib);
    expect((await c.next()).error).toEqual({ class: 'GenericError', desc: 'JSON token size limit exceeded' });
    const after = process.memoryUsage();
    const grown = after.heapUsed + after.arrayBuffers - (before.heapUsed + before.arrayBuffers);
    expect(grown).toBeLessThan(400 * 1024 * 1024);
    expect((await watcher.cmd('query-version', undefined, 'w')).id).toBe('w');
    c.close();
    watcher.close();
  });

  it('refuses a second monitor on one chardev and unknown chardevs', () => {
    expect(() => manager.attach('m')).toThrow("Device 'm' is in use");
    expect(() => manager.attach('zz')).toThrow('chardev "zz" not found');
  });

  it('quits: replies {} then closes monitors and removes the socket file', async () => {
    const c = await QmpTestClient.connect({ path: sock }, { negotiate: true });
    expect(await c.cmd('quit', undefined, 5)).toEqual({ return: {}, id: 5 });
    await c.waitClosed();
    expect(quitCalls).toBe(1);
    expect(existsSync(sock)).toBe(false);
  });

  it('describes the schema with query-qmp-schema', async () => {
    const c = await QmpTestClient.connect({ path: sock }, { negotiate: true });
    const info = (await c.cmd('query-qmp-schema')).return as Array<Record<string, unknown>>;
    const cap = info.find((e) => e.name === 'qmp_capabilities');
    expect(cap).toMatchObject({ 'meta-type': 'command', 'ret-type': '0' });
    const arg = info.find((e) => e.name === cap?.['arg-type']);
    expect(arg).toMatchObject({ 'meta-type': 'object', members: [{ name: 'enable', default: null }] });
    expect(info.find((e) => e.name === '0')).toEqual({ name: '0', 'meta-type': 'object', members: [] });
    expect(info.find((e) => e.name === 'str')).toEqual({ name: 'str', 'meta-type': 'builtin', 'json-type': 'string' });
    c.close();
  });
});

describe('QMP over other transports', () => {
  it('serves TCP on port 0', async () => {
    const cd = await manager.addChardev({
      id: 't', addr: { type: 'inet', host: '127.0.0.1', port: '0' }, server: true, wait: false, websocket: false, multiClient: false,
    });
    manager.attach('t');
    const c = await QmpTestClient.connect({ port: cd.port ?? 0 }, { negotiate: true });
    expect((await c.cmd('query-version')).return).toBeDefined();
    c.close();
  });

  it('answers 100 commands carried in one WebSocket frame, in order', async () => {
    const cd = await manager.addChardev({
      id: 'w', addr: { type: 'inet', host: '127.0.0.1', port: '0' }, server: true, wait: false, websocket: true, multiClient: false,
    });
    manager.attach('w');
    const c = await QmpTestClient.connect({ ws: `ws://127.0.0.1:${cd.port ?? 0}/` }, { negotiate: true });
    let batch = '';
    for (let i = 0; i < 100; i++) batch += JSON.stringify({ execute: 'query-version', id: i });
    c.send(batch);
    for (let i = 0; i < 100; i++) expect((await c.next()).id).toBe(i);
    c.close();
  });

  it('connects out in client mode and greets the listener', async () => {
    const listenPath = join(dir, 'client.sock');
    const got = new Promise<string>((resolve) => {
      const srv = net.createServer((s) => {
        s.setEncoding('utf8');
        s.once('data', (d: string) => {
          resolve(d);
          s.destroy();
          srv.close();
        });
      });
      srv.listen(listenPath);
    });
    await new Promise((r) => setTimeout(r, 20));
    await manager.addChardev({ id: 'cl', addr: { type: 'unix', path: listenPath }, server: false, wait: false, websocket: false, multiClient: false });
    manager.attach('cl');
    expect(await got).toMatch(/^\{"QMP": \{"version"/);
  });

  it('reports a failed client connect like QSD', async () => {
    const p = join(dir, 'nobody.sock');
    await expect(
      manager.addChardev({ id: 'cl2', addr: { type: 'unix', path: p }, server: false, wait: false, websocket: false, multiClient: false }),
    ).rejects.toThrow(`Failed to connect to '${p}': No such file or directory`);
  });

  it('waits for the first client with wait=on and reports the address', async () => {
    const p = join(dir, 'wait.sock');
    let waitingFor = '';
    const opened = manager.addChardev(unixOpts('wt', p, { wait: true }), {
      onWaiting: (a) => {
        waitingFor = a;
      },
    });
    await expect.poll(() => waitingFor).toBe(`disconnected:unix:${p},server=on`);
    const raw = net.connect({ path: p });
    await opened;
    manager.attach('wt');
    const first = await new Promise<string>((r) => raw.once('data', (d) => r(d.toString())));
    expect(first).toMatch(/^\{"QMP"/);
    raw.destroy();
  });
});
