import { describe, it, expect, beforeAll, afterEach } from 'vitest';
import { join } from 'node:path';
import {
  buildDist,
  cleanupProcesses,
  runBlockd,
  tempDir as tempDirIn,
  type Run,
} from '../helpers/blockd-process.js';

beforeAll(buildDist, 120_000);
afterEach(cleanupProcesses);

const tempDir = (): string => tempDirIn('blockd-cli-object-');
const run = (args: string[]): Promise<Run> => runBlockd(args);

describe('--object', () => {
  it('lists the creatable types and exits 0 for --object help', async () => {
    const r = await run(['--object', 'help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^List of user creatable objects:\n {2}authz-list\n/);
    expect(r.stdout).toContain('  iothread\n');
  });

  it('lists the properties of a type and exits 0 for --object TYPE,help', async () => {
    const r = await run(['--object', 'iothread,id=x,help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(
      'iothread options:\n  aio-max-batch=<int>\n  poll-grow=<int>\n  poll-max-ns=<int>\n  poll-shrink=<int>\n' +
        '  thread-pool-max=<int>\n  thread-pool-min=<int>\n',
    );
  });

  it('lists the types for an unknown type with help, as QSD does', async () => {
    const r = await run(['--object', 'bogus,help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^List of user creatable objects:\n/);
  });

  it('runs object-add and goes on with the next option', async () => {
    const r = await run(['--object', 'secret,id=s0,data=x', '--object', '{"qom-type":"iothread","id":"io0"}', 'extra']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe('blockd: extra: Unexpected argument\n');
  });

  it('prints the object-add error and exits 1', async () => {
    const r = await run(['--object', 'secret,id=s']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe("blockd: --object secret,id=s: Either 'file' or 'data' must be provided\n");
  });

  it('adds QSD\'s hint line under a malformed id', async () => {
    const r = await run(['--object', 'secret,id=1s,data=x']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(
      "blockd: --object secret,id=1s,data=x: Parameter 'id' expects an identifier\n" +
        "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n",
    );
  });

  it('converts keyval members with the object schema', async () => {
    const r = await run(['--object', 'throttle-group,id=t,limits.iops-total=10,limits.iops-read=3']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(
      'blockd: --object throttle-group,id=t,limits.iops-total=10,limits.iops-read=3: ' +
        'bps/iops/max total values and read/write values cannot be used at the same time\n',
    );
  });

  it('refuses a duplicate id across options', async () => {
    const r = await run(['--object', 'iothread,id=a', '--object', 'secret,id=a,data=x']);
    expect(r.stderr).toBe(
      "blockd: --object secret,id=a,data=x: attempt to add duplicate property 'a' to object (type 'container')\n",
    );
  });

  it('lets an export name an iothread created earlier', async () => {
    const dir = tempDir();
    const r = await run([
      '--object', 'iothread,id=io0',
      '--blockdev', 'null-co,node-name=n0',
      '--nbd-server', `addr.type=unix,addr.path=${join(dir, 'nbd.sock')}`,
      '--export', 'nbd,id=e0,node-name=n0,iothread=io0,fixed-iothread=on',
      'extra',
    ]);
    expect(r.stderr).toBe('blockd: extra: Unexpected argument\n');
  });

  it('refuses --nbd-server with client-endpoint TLS credentials', async () => {
    const dir = tempDir();
    const nbd = `addr.type=unix,addr.path=${join(dir, 'nbd.sock')},tls-creds=t0`;
    const r = await run(['--object', 'tls-creds-anon,id=t0,endpoint=client', '--nbd-server', nbd]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`blockd: --nbd-server ${nbd}: Expected TLS credentials for a server endpoint\n`);
  });
});
