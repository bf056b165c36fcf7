/**
 * The filter node a block job inserts while it runs (src/block/job-filter.ts), on null-co nodes
 * in an in-process daemon: listed under its name, users moved onto it and back, kept alive when
 * a node added above it goes away, QSD's errors for names. iotests/tests/job-filters compares
 * the same with QSD.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Daemon } from '../helpers/in-process-daemon.js';

const SIZE = 64 * 1024 * 1024;

interface NodeInfo {
  'node-name': string;
  drv: string;
  ro: boolean;
  file: string;
  backing_file?: string;
  image: { format: string; 'backing-image'?: { filename: string } };
}

async function nodes(d: Daemon): Promise<NodeInfo[]> {
  return (await d.ok('query-named-block-nodes')) as NodeInfo[];
}

/** Each block-driver edge of x-debug-query-block-graph as `parent -role-> child`. */
async function edges(d: Daemon): Promise<string[]> {
  const g = (await d.ok('x-debug-query-block-graph')) as {
    nodes: { id: number; name: string; type: string }[];
    edges: { parent: number; child: number; name: string }[];
  };
  const names = new Map(g.nodes.filter((n) => n.type === 'block-driver').map((n) => [n.id, n.name]));
  return g.edges
    .filter((e) => names.has(e.parent))
    .map((e) => `${names.get(e.parent)} -${e.name}-> ${names.get(e.child)}`)
    .sort();
}

describe('job filter nodes', () => {
  let d: Daemon;
  beforeEach(async () => {
    d = new Daemon();
    for (const name of ['src', 'tgt']) {
      await d.ok('blockdev-add', { driver: 'null-co', 'node-name': name, size: SIZE });
    }
    await d.ok('blockdev-add', { driver: 'raw', 'node-name': 'top', file: 'src' });
  });
  afterEach(async () => {
    await d.shutdown();
  });

  const backup = (extra: Record<string, unknown> = {}): Promise<unknown> =>
    d.qmp('blockdev-backup', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', speed: 1, ...extra });

  it('lists a backup copy-before-write node under filter-node-name and moves the source users onto it', async () => {
    await backup({ 'filter-node-name': 'cbw' });
    const all = await nodes(d);
    const f = all.find((n) => n['node-name'] === 'cbw');
    const src = all.find((n) => n['node-name'] === 'src');
    expect(f).toMatchObject({ drv: 'copy-before-write', ro: false, file: src?.file });
    expect(f?.backing_file).toBeUndefined();
    expect(await edges(d)).toEqual(['cbw -file-> src', 'cbw -target-> tgt', 'top -file-> cbw']);
    await d.ok('job-cancel', { id: 'j' });
    await waitNull(d, 'j');
    expect((await nodes(d)).map((n) => n['node-name']).sort()).toEqual(['src', 'tgt', 'top']);
    expect(await edges(d)).toEqual(['top -file-> src']);
  });

  it('names the filter automatically without filter-node-name', async () => {
    await backup();
    const f = (await nodes(d)).find((n) => n.drv === 'copy-before-write');
    expect(f?.['node-name']).toMatch(/^#block\d+$/);
    await d.ok('job-cancel', { id: 'j' });
    await waitNull(d, 'j');
    expect((await nodes(d)).some((n) => n.drv === 'copy-before-write')).toBe(false);
  });

  it('keeps the filter while its job runs when a node added above it is deleted', async () => {
    await d.ok('blockdev-del', { 'node-name': 'top' }); // the filter's only parent will be r
    await backup({ 'filter-node-name': 'cbw' });
    await d.ok('blockdev-add', { driver: 'raw', 'node-name': 'r', file: 'cbw' });
    await d.ok('blockdev-del', { 'node-name': 'r' });
    expect((await nodes(d)).some((n) => n['node-name'] === 'cbw')).toBe(true);
    const busy = "Node 'cbw' is busy: block device is in use by block job: backup";
    expect(await d.err('blockdev-del', { 'node-name': 'cbw' })).toBe(busy);
    expect(await d.err('block-stream', { 'job-id': 's', device: 'cbw' })).toBe(busy);
    await d.ok('job-cancel', { id: 'j' });
    await waitNull(d, 'j');
    expect((await nodes(d)).some((n) => n['node-name'] === 'cbw')).toBe(false);
  });

  it("refuses a taken or invalid filter name with QSD's errors and starts no job", async () => {
    expect(await d.err('blockdev-backup', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', 'filter-node-name': 'tgt' })).toBe(
      "Could not create node: Duplicate nodes with node-name='tgt'",
    );
    expect(await d.err('blockdev-backup', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', 'filter-node-name': '1x' })).toBe(
      "Could not create node: Invalid node-name: '1x'",
    );
    expect(await d.err('blockdev-mirror', { 'job-id': 'j', device: 'top', target: 'tgt', sync: 'full', 'filter-node-name': 'src' })).toBe(
      "Duplicate nodes with node-name='src'",
    );
    expect(await d.ok('query-jobs')).toEqual([]);
    expect(await edges(d)).toEqual(['top -file-> src']);
  });
});

/** Resolves once job `id` sent JOB_STATUS_CHANGE null (bounded by the test's timeout). */
async function waitNull(d: Daemon, id: string): Promise<void> {
  const seen = (): boolean =>
    d.events.some((e) => e.event === 'JOB_STATUS_CHANGE' && e.data['id'] === id && e.data['status'] === 'null');
  if (seen()) return;
  await new Promise<void>((resolve) => {
    const off = d.svc.events.subscribe((e) => {
      if (e.event === 'JOB_STATUS_CHANGE' && e.data['id'] === id && e.data['status'] === 'null') {
        off();
        resolve();
      }
    });
  });
}
