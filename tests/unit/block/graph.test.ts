import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync, writeFileSync, statSync, existsSync, chmodSync, truncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockGraph } from '../../../src/block/graph.js';
import { silentLogger } from '../../../src/util/logger.js';

let dir: string;
let g: BlockGraph;
let img: string;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'blockd-graph-'));
  img = join(dir, 'a.raw');
  writeFileSync(img, '');
  truncateSync(img, 1 << 20);
  g = new BlockGraph(silentLogger());
});

afterEach(async () => {
  await g.closeAll();
  rmSync(dir, { recursive: true, force: true });
});

async function msg(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    return (e as Error).message;
  }
  return 'no error';
}

const WRITER = {
  name: 'an unnamed block device',
  kind: 'backend' as const,
  perm: { consistentRead: true, write: true },
  shared: { consistentRead: true, write: true, writeUnchanged: true, resize: true },
};

describe('blockdev-add', () => {
  it('requires a node-name at the top level', async () => {
    expect(await msg(g.add({ driver: 'null-co' }))).toBe("'node-name' must be specified for the root node");
  });

  it('refuses invalid and too long node names', async () => {
    expect(await msg(g.add({ driver: 'null-co', 'node-name': '_x' }))).toBe("Invalid node-name: '_x'");
    expect(await msg(g.add({ driver: 'null-co', 'node-name': '1abc' }))).toBe("Invalid node-name: '1abc'");
    expect(await msg(g.add({ driver: 'null-co', 'node-name': '#block1' }))).toBe("Invalid node-name: '#block1'");
    expect(await msg(g.add({ driver: 'null-co', 'node-name': 'a'.repeat(32) }))).toBe('Node name too long');
  });

  it('accepts names with dots, dashes and underscores', async () => {
    await g.add({ driver: 'null-co', 'node-name': 'x_-.9' });
    expect(g.get('x_-.9')).toBeDefined();
  });

  it('refuses duplicate node names, also for inline children', async () => {
    await g.add({ driver: 'null-co', 'node-name': 'a' });
    expect(await msg(g.add({ driver: 'null-co', 'node-name': 'a' }))).toBe("Duplicate nodes with node-name='a'");
    expect(
      await msg(g.add({ driver: 'raw', 'node-name': 'r', file: { driver: 'file', filename: img, 'node-name': 'a' } })),
    ).toBe("Duplicate nodes with node-name='a'");
    expect(g.get('r')).toBeUndefined();
  });

  it('names unnamed inline children #block + counter + two digits', async () => {
    await g.add({ driver: 'raw', 'node-name': 'r', file: { driver: 'file', filename: img } });
    const names = g.list().map((n) => n.name);
    expect(names[1]).toMatch(/^#block0\d\d$/);
  });

  it('fails for a missing file with QSD text and creates nothing', async () => {
    const p = join(dir, 'none.raw');
    expect(await msg(g.add({ driver: 'file', 'node-name': 'f', filename: p }))).toBe(
      `Could not open '${p}': No such file or directory`,
    );
    expect(existsSync(p)).toBe(false);
    expect(g.list()).toHaveLength(0);
  });

  it('fails for a directory', async () => {
    expect(await msg(g.add({ driver: 'file', 'node-name': 'f', filename: dir }))).toBe(
      `Could not open '${dir}': Is a directory`,
    );
  });

  it.skipIf(process.getuid?.() === 0)('fails for a file without permission', async () => {
    chmodSync(img, 0);
    expect(await msg(g.add({ driver: 'file', 'node-name': 'f', filename: img }))).toBe(
      `Could not open '${img}': Permission denied`,
    );
  });

  it('fails for a reference to a node that does not exist', async () => {
    expect(await msg(g.add({ driver: 'raw', 'node-name': 'r', file: 'nope' }))).toBe(
      "Cannot find device='nope' nor node-name='nope'",
    );
  });

  it('requires the file child of raw', async () => {
    expect(await msg(g.add({ driver: 'raw', 'node-name': 'r' }))).toBe("Parameter 'file' is missing");
  });

  it('checks raw offset and size against the child without touching the file', async () => {
    await g.add({ driver: 'file', 'node-name': 'f', filename: img });
    expect(await msg(g.add({ driver: 'raw', 'node-name': 'r', file: 'f', offset: 2000000 }))).toBe(
      'Offset (2000000) cannot be greater than size of the containing file (1048576)',
    );
    expect(await msg(g.add({ driver: 'raw', 'node-name': 'r', file: 'f', offset: 1000, size: 1048576 }))).toBe(
      'The sum of offset (1000) and size (1048576) has to be smaller or equal to the  actual size of the containing file (1048576)',
    );
    expect(await msg(g.add({ driver: 'raw', 'node-name': 'r', file: 'f', size: 1000 }))).toBe(
      'Specified size is not multiple of 512',
    );
    expect(await msg(g.add({ driver: 'raw', 'node-name': 'r', file: 'f', offset: -1 }))).toBe(
      "Parameter 'offset' expects a non-negative number below 2^64",
    );
    expect(await msg(g.add({ driver: 'raw', 'node-name': 'r', file: 'f', offset: 2 ** 60 }))).toBe(
      "Parameter 'offset' expects a value below 2^53",
    );
    expect(statSync(img).size).toBe(1 << 20);
  });

  it('rejects negative null-co sizes cleanly instead of aborting', async () => {
    expect(await msg(g.add({ driver: 'null-co', 'node-name': 'n', size: -5 }))).toBe(
      "Parameter 'size' expects a non-negative number below 2^64",
    );
  });

  it('refuses force-share on a writable node', async () => {
    expect(await msg(g.add({ driver: 'file', 'node-name': 'f', filename: img, 'force-share': true }))).toBe(
      'force-share=on can only be used with read-only images',
    );
  });

  it('refuses aio=native without cache.direct', async () => {
    expect(await msg(g.add({ driver: 'file', 'node-name': 'f', filename: img, aio: 'native' }))).toBe(
      'aio=native was specified, but it requires cache.direct=on, which was not specified.',
    );
  });

  it('refuses drivers blockd does not implement', async () => {
    expect(await msg(g.add({ driver: 'vvfat', 'node-name': 'v' }))).toBe("Driver 'vvfat' is not supported by blockd");
  });

  it('refuses options it does not implement instead of ignoring them', async () => {
    expect(await msg(g.add({ driver: 'file', 'node-name': 'f', filename: img, 'pr-manager': 'x' }))).toBe(
      "Option 'pr-manager' is not supported by blockd",
    );
  });

  it('lets inline children inherit read-only and cache options', async () => {
    await g.add({
      driver: 'raw',
      'node-name': 'r',
      'read-only': true,
      cache: { 'no-flush': true },
      file: { driver: 'file', filename: img, 'node-name': 'f' },
    });
    const info = await g.queryNamedBlockNodes();
    const f = info.find((i) => i['node-name'] === 'f');
    expect(f?.['ro']).toBe(true);
    expect(f?.['cache']).toEqual({ 'no-flush': true, direct: false, writeback: true });
  });

  it('rounds null-co sizes up to 512 and defaults to 1 GiB', async () => {
    await g.add({ driver: 'null-co', 'node-name': 'a' });
    await g.add({ driver: 'null-co', 'node-name': 'b', size: 1001 });
    expect(g.find('a').size()).toBe(1 << 30);
    expect(g.find('b').size()).toBe(1024);
  });
});

describe('query-named-block-nodes', () => {
  it('describes a raw node with offset with a json: filename', async () => {
    await g.add({ driver: 'raw', 'node-name': 'rx', file: { driver: 'file', filename: img }, offset: 512, size: 4096 });
    const [rx] = await g.queryNamedBlockNodes();
    const file = `json:{"offset": 512, "driver": "raw", "size": 4096, "file": {"driver": "file", "filename": "${img}"}}`;
    expect(rx).toMatchObject({
      'node-name': 'rx',
      drv: 'raw',
      ro: false,
      file,
      encrypted: false,
      detect_zeroes: 'off',
      backing_file_depth: 0,
      bps: 0,
      iops_wr: 0,
      write_threshold: 0,
      image: { 'virtual-size': 4096, filename: file, format: 'raw', 'dirty-flag': false },
    });
  });

  it('describes null-co as null-co:// without options', async () => {
    await g.add({ driver: 'null-co', 'node-name': 'n' });
    const [n] = await g.queryNamedBlockNodes();
    expect(n?.['file']).toBe('null-co://');
    expect(n?.['image']).toEqual({ 'virtual-size': 1 << 30, filename: 'null-co://', format: 'null-co', 'actual-size': 0 });
  });
});

describe('blockdev-del', () => {
  it('fails for an unknown node', async () => {
    expect(await msg(g.del('x'))).toBe("Failed to find node with node-name='x'");
  });

  it('refuses a node an export uses', async () => {
    await g.add({ driver: 'null-co', 'node-name': 'n' });
    g.find('n').attach(WRITER);
    expect(await msg(g.del('n'))).toBe('Node n is in use');
  });

  it('refuses a node with an op blocker', async () => {
    await g.add({ driver: 'null-co', 'node-name': 'n' });
    g.find('n').blockers.add("node is used as backing hd of 'o'");
    expect(await msg(g.del('n'))).toBe("Node 'n' is busy: node is used as backing hd of 'o'");
  });

  it('refuses an inline child even with an explicit name', async () => {
    await g.add({ driver: 'raw', 'node-name': 'r', file: { driver: 'file', filename: img, 'node-name': 'f' } });
    expect(await msg(g.del('f'))).toBe('Node f is not owned by the monitor');
  });

  it('refuses a node another node uses as a child', async () => {
    await g.add({ driver: 'file', 'node-name': 'f', filename: img });
    await g.add({ driver: 'raw', 'node-name': 'r', file: 'f' });
    expect(await msg(g.del('f'))).toBe('Block device f is in use');
  });

  it('removes inline children with their parent but keeps referenced nodes', async () => {
    await g.add({ driver: 'file', 'node-name': 'f', filename: img });
    await g.add({ driver: 'raw', 'node-name': 'r', file: 'f' });
    await g.add({ driver: 'raw', 'node-name': 'r2', file: { driver: 'file', filename: img, 'node-name': 'f2' } });
    await g.del('r2');
    await g.del('r');
    expect(g.list().map((n) => n.name)).toEqual(['f']);
    await g.del('f');
    expect(g.list()).toHaveLength(0);
  });
});

describe('permissions', () => {
  it('refuses write permission on a read-only node', async () => {
    await g.add({ driver: 'file', 'node-name': 'f', filename: img, 'read-only': true });
    await g.add({ driver: 'raw', 'node-name': 'r', file: 'f' });
    expect(() => g.find('r').attach(WRITER)).toThrow('Block node is read-only');
    expect(g.find('r').parents).toHaveLength(0);
  });

  it('reports a conflict with who requires and who does not share', async () => {
    await g.add({ driver: 'null-co', 'node-name': 'src' });
    g.find('src').attach({
      name: "node '#block319'",
      role: 'file',
      perm: { consistentRead: true },
      shared: { consistentRead: true, writeUnchanged: true },
    });
    expect(() => g.find('src').attach(WRITER)).toThrow(
      "Permission conflict on node 'src': permissions 'write' are both required by an unnamed block device " +
        "(uses node 'src' as 'root' child) and unshared by node '#block319' (uses node 'src' as 'file' child).",
    );
  });

  it('propagates permissions to children and releases them on detach', async () => {
    await g.add({ driver: 'raw', 'node-name': 'r', file: { driver: 'file', filename: img, 'node-name': 'f' } });
    const u = g.find('r').attach(WRITER);
    const edge = g.find('f').parents[0];
    expect(edge?.spec.name).toBe("node 'r'");
    u.detach();
    expect(g.find('r').parents).toHaveLength(0);
  });

  it('refuses a second image opener that does not share write (image locking)', async () => {
    await g.add({ driver: 'raw', 'node-name': 'r1', file: { driver: 'file', filename: img } });
    await g.add({ driver: 'raw', 'node-name': 'r2', file: { driver: 'file', filename: img } });
    g.find('r1').attach(WRITER);
    expect(() =>
      g.find('r2').attach({ name: 'x', perm: { consistentRead: true }, shared: { consistentRead: true } }),
    ).toThrow('Failed to get shared "write" lock');
  });

  it('lets force-share read-only openers ignore image locks', async () => {
    await g.add({ driver: 'raw', 'node-name': 'r1', file: { driver: 'file', filename: img } });
    g.find('r1').attach(WRITER);
    await g.add({
      driver: 'raw',
      'node-name': 'r2',
      'read-only': true,
      'force-share': true,
      file: { driver: 'file', filename: img },
    });
    expect(() =>
      g.find('r2').attach({ name: 'x', perm: { consistentRead: true }, shared: { consistentRead: true } }),
    ).not.toThrow();
  });
});
