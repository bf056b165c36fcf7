import { describe, expect, it } from 'vitest';
import { NodeIO, ZERO_CHUNK, sanitizeExtents } from '../../../src/block/io.js';
import { EXTENT_ALLOCATED, EXTENT_DATA, EXTENT_ZERO, type BlockDriver, type DriverCaps } from '../../../src/block/types.js';
import { DaemonError } from '../../../src/util/errors.js';

class FakeDriver implements BlockDriver {
  name = 'fake';
  data: Buffer;
  writes: { offset: number; length: number }[] = [];
  flushes = 0;
  caps: DriverCaps = { writeZeroes: false, fua: false, discard: false, blockStatus: false, resize: true, readSync: false };
  constructor(size: number) {
    this.data = Buffer.alloc(size, 0xaa);
  }
  getLength() {
    return this.data.length;
  }
  async read(buf: Buffer, offset: number) {
    this.data.copy(buf, 0, offset, offset + buf.length);
  }
  async write(buf: Buffer, offset: number) {
    this.writes.push({ offset, length: buf.length });
    buf.copy(this.data, offset);
  }
  async flush() {
    this.flushes++;
  }
  async truncate(size: number) {
    const d = Buffer.alloc(size);
    this.data.copy(d, 0, 0, Math.min(size, this.data.length));
    this.data = d;
  }
  async close() {}
  describeFilename() {
    return 'fake://';
  }
}

function setup(size = 4096, readOnly = false) {
  const drv = new FakeDriver(size);
  const io = new NodeIO({ name: 'n', readOnly }, drv);
  return { drv, io };
}

async function errnoOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(DaemonError);
    return (e as DaemonError).errno;
  }
  return 'no error';
}

describe('NodeIO range checks', () => {
  it('reads data inside the node', async () => {
    const { io } = setup();
    const b = Buffer.alloc(16);
    await io.read(b, 100);
    expect(b.every((x) => x === 0xaa)).toBe(true);
  });

  it('answers EINVAL for reads past the end', async () => {
    const { io } = setup();
    expect(await errnoOf(io.read(Buffer.alloc(2), 4095))).toBe('EINVAL');
  });

  it('answers ENOSPC for writes past the end', async () => {
    const { io } = setup();
    expect(await errnoOf(io.write(Buffer.alloc(2), 4095))).toBe('ENOSPC');
  });

  it('answers EINVAL for negative or fractional offsets', async () => {
    const { io } = setup();
    expect(await errnoOf(io.read(Buffer.alloc(1), -1))).toBe('EINVAL');
    expect(await errnoOf(io.read(Buffer.alloc(1), 1.5))).toBe('EINVAL');
  });

  it('answers EOVERFLOW for ranges beyond 2^53', async () => {
    const { io } = setup();
    expect(await errnoOf(io.writeZeroes(Number.MAX_SAFE_INTEGER, 10))).toBe('EOVERFLOW');
  });
});

describe('NodeIO permissions', () => {
  it('answers EPERM for writes to a read-only node', async () => {
    const { io } = setup(4096, true);
    expect(await errnoOf(io.write(Buffer.alloc(1), 0))).toBe('EPERM');
    expect(await errnoOf(io.discard(0, 1))).toBe('EPERM');
    expect(await errnoOf(io.writeZeroes(0, 1))).toBe('EPERM');
  });

  it('still allows reads from a read-only node', async () => {
    const { io } = setup(4096, true);
    await io.read(Buffer.alloc(1), 0);
    expect(io.stats.readOps).toBe(1);
  });
});

describe('NodeIO fallbacks', () => {
  it('writes zero buffers in bounded chunks when the driver cannot zero', async () => {
    const { io, drv } = setup(3 * ZERO_CHUNK);
    await io.writeZeroes(10, 2 * ZERO_CHUNK + 5);
    expect(drv.writes.every((w) => w.length <= ZERO_CHUNK)).toBe(true);
    expect(drv.data.subarray(10, 10 + 2 * ZERO_CHUNK + 5).every((x) => x === 0)).toBe(true);
    expect(drv.data[9]).toBe(0xaa);
  });

  it('answers ENOTSUP for fast zeroing when the driver cannot zero', async () => {
    const { io, drv } = setup();
    expect(await errnoOf(io.writeZeroes(0, 10, { noFallback: true }))).toBe('ENOTSUP');
    expect(drv.writes).toHaveLength(0);
  });

  it('reports all data when the driver has no block status', async () => {
    const { io } = setup();
    expect(await io.blockStatus(0, 4096)).toEqual([
      { offset: 0, length: 4096, flags: EXTENT_DATA | EXTENT_ALLOCATED, depth: 1 },
    ]);
  });

  it('flushes after a FUA write when the driver has no FUA', async () => {
    const { io, drv } = setup();
    await io.write(Buffer.alloc(4), 0, { fua: true });
    expect(drv.flushes).toBe(1);
  });

  it('treats discard as a successful no-op when the driver cannot discard', async () => {
    const { io, drv } = setup();
    await io.discard(0, 100);
    expect(drv.data[0]).toBe(0xaa);
  });
});

describe('NodeIO hooks and serialisation', () => {
  it('calls write hooks with the range before the driver writes', async () => {
    const { io, drv } = setup();
    const seen: string[] = [];
    io.addWriteHook((o, l, k) => {
      seen.push(`${k}:${o}+${l}:${drv.writes.length}`);
    });
    await io.write(Buffer.alloc(8), 16);
    await io.discard(0, 4);
    expect(seen).toEqual(['write:16+8:0', 'discard:0+4:1']);
  });

  it('fails the write when a hook throws', async () => {
    const { io, drv } = setup();
    io.addWriteHook(() => {
      throw new DaemonError('X', 'hook failed', { errno: 'EIO' });
    });
    expect(await errnoOf(io.write(Buffer.alloc(1), 0))).toBe('EIO');
    expect(drv.writes).toHaveLength(0);
  });

  it('waits for in-flight I/O before resizing and holds new I/O until done', async () => {
    const { io, drv } = setup();
    let release!: () => void;
    const order: string[] = [];
    drv.read = async () => {
      await new Promise<void>((r) => (release = r));
      order.push('read');
    };
    const origTruncate = drv.truncate.bind(drv);
    drv.truncate = async (s: number) => {
      order.push('truncate');
      await origTruncate(s);
    };
    const r = io.read(Buffer.alloc(1), 0);
    const t = io.truncate(8192);
    const w = io.write(Buffer.alloc(1), 5000).then(() => order.push('write'));
    await Promise.resolve();
    release();
    await Promise.all([r, t, w]);
    expect(order).toEqual(['read', 'truncate', 'write']);
    expect(io.size()).toBe(8192);
  });

  it('counts statistics per request kind', async () => {
    const { io } = setup();
    await io.write(Buffer.alloc(10), 0);
    await io.read(Buffer.alloc(20), 0);
    await io.flush();
    expect(io.stats).toMatchObject({ writeOps: 1, writeBytes: 10, readOps: 1, readBytes: 20, flushOps: 1 });
  });
});

describe('NodeIO detect-zeroes', () => {
  it('turns an all-zero write into write-zeroes when detect-zeroes is on', async () => {
    const drv = new FakeDriver(4096);
    let zeroCalls = 0;
    drv.caps = { ...drv.caps, writeZeroes: true };
    (drv as BlockDriver).writeZeroes = async (o: number, l: number) => {
      zeroCalls++;
      drv.data.fill(0, o, o + l);
    };
    const io = new NodeIO({ name: 'n', readOnly: false, options: { detectZeroes: 'on', discard: 'ignore' } }, drv);
    await io.write(Buffer.alloc(512), 0);
    expect(zeroCalls).toBe(1);
    expect(drv.writes).toHaveLength(0);
  });
});

describe('sanitizeExtents', () => {
  const D = EXTENT_DATA | EXTENT_ALLOCATED;
  it('hands on a list that is already contiguous, inside the request and merged, as it is', () => {
    const ext = [
      { offset: 100, length: 10, flags: D, depth: 1 },
      { offset: 110, length: 5, flags: EXTENT_ZERO, depth: 0 },
    ];
    expect(sanitizeExtents(ext, 100, 20)).toBe(ext);
  });

  it('merges equal neighbours, clamps to the request and stops at a gap', () => {
    const ext = [
      { offset: 0, length: 10, flags: D, depth: 1 },
      { offset: 10, length: 10, flags: D, depth: 1 },
      { offset: 20, length: 30, flags: EXTENT_ZERO, depth: 0 },
      { offset: 60, length: 10, flags: D, depth: 1 },
    ];
    expect(sanitizeExtents(ext, 0, 40)).toEqual([
      { offset: 0, length: 20, flags: D, depth: 1 },
      { offset: 20, length: 20, flags: EXTENT_ZERO, depth: 0 },
    ]);
    expect(sanitizeExtents([{ offset: 5, length: 10, flags: D, depth: 1 }], 0, 40)).toBeUndefined();
    expect(sanitizeExtents([], 0, 40)).toBeUndefined();
  });
});
