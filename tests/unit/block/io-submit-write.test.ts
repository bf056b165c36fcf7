/**
 * The callback write path (BlockIO.submitWrite): taken only when the node's write() would do
 * nothing but the driver call, refused without side effects otherwise (the caller then uses
 * write(), which runs hooks, thresholds, detect-zeroes and the resize gate), and counted in
 * blockstats exactly as write() counts.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NodeIO } from '../../../src/block/io.js';
import type { BlockGraph } from '../../../src/block/graph.js';
import { Storage } from '../../../src/block/drivers/qcow2/storage.js';
import type { BlockDriver, BlockIO, DriverCaps, WriteDone } from '../../../src/block/types.js';
import { DaemonError } from '../../../src/util/errors.js';
import { newGraph, rm, tmp } from '../../helpers/qcow2.js';

class CbDriver implements BlockDriver {
  name = 'fake';
  data = Buffer.alloc(64 * 1024);
  caps: DriverCaps = { writeZeroes: false, fua: false, discard: false, blockStatus: false, resize: true, readSync: false };
  /** Errno of the next submitted write's failure (cleared when used). */
  failNext: string | undefined;
  refuse = false;
  submitted = 0;
  slowWrites = 0;
  getLength() {
    return this.data.length;
  }
  async read(buf: Buffer, offset: number) {
    this.data.copy(buf, 0, offset, offset + buf.length);
  }
  async write(buf: Buffer, offset: number) {
    this.slowWrites++;
    buf.copy(this.data, offset);
  }
  submitWrite(buf: Buffer, offset: number, done: WriteDone): boolean {
    if (this.refuse) return false;
    this.submitted++;
    const fail = this.failNext;
    this.failNext = undefined;
    setImmediate(() => {
      if (fail) {
        const e = new Error(`pwrite failed: ${fail}`) as Error & { code: string };
        e.code = fail;
        done(e);
        return;
      }
      buf.copy(this.data, offset);
      done();
    });
    return true;
  }
  async flush() {}
  async truncate(_size: number): Promise<void> {}
  async close() {}
  describeFilename() {
    return 'fake://';
  }
}

function submit(io: NodeIO, buf: Buffer, offset: number): Promise<Error | undefined> | false {
  let resolve!: (e: Error | undefined) => void;
  const p = new Promise<Error | undefined>((r) => (resolve = r));
  let sync = true;
  const ok = io.submitWrite(buf, offset, (err) => {
    // The callback never runs before submitWrite returned.
    expect(sync).toBe(false);
    resolve(err);
  });
  sync = false;
  return ok ? p : false;
}

describe('NodeIO.submitWrite', () => {
  it('writes through the driver and counts as write() counts', async () => {
    const drv = new CbDriver();
    const io = new NodeIO({ name: 'n', readOnly: false }, drv);
    const p = submit(io, Buffer.alloc(4096, 5), 8192);
    expect(p).not.toBe(false);
    expect(await p).toBeUndefined();
    expect(drv.data.subarray(8192, 12288).every((b) => b === 5)).toBe(true);
    expect(io.stats.writeOps).toBe(1);
    expect(io.stats.writeBytes).toBe(4096);
    expect(io.stats.wrHighestOffset).toBe(12288);
    // The same accounting as the promise path.
    await io.write(Buffer.alloc(512, 6), 0);
    expect(io.stats.writeOps).toBe(2);
    expect(io.stats.writeBytes).toBe(4608);
  });

  it('maps a driver failure to a DaemonError with its errno and counts it failed', async () => {
    const drv = new CbDriver();
    const io = new NodeIO({ name: 'n', readOnly: false }, drv);
    drv.failNext = 'ENOSPC';
    const err = await submit(io, Buffer.alloc(4096), 0);
    expect(err).toBeInstanceOf(DaemonError);
    expect((err as DaemonError).errno).toBe('ENOSPC');
    expect(io.stats.failedWriteOps).toBe(1);
    expect(io.stats.failedOps).toBe(1);
    expect(io.stats.writeOps).toBe(0);
  });

  it('refuses, with nothing counted or written, whatever write() must handle itself', async () => {
    const cases: Array<[string, (io: NodeIO, drv: CbDriver) => void, number, number, boolean?]> = [
      ['a write hook (dirty bitmap)', (io) => void io.addWriteHook(() => undefined), 0, 4096],
      ['an armed write threshold', (io) => io.setWriteThreshold(1 << 20), 0, 4096],
      ['a driver that refuses', (_io, drv) => void (drv.refuse = true), 0, 4096],
      ['a range past the end', () => undefined, 64 * 1024 - 512, 4096],
      ['a negative offset', () => undefined, -4096, 4096],
      ['an empty write', () => undefined, 0, 0],
    ];
    for (const [what, arm, offset, length] of cases) {
      const drv = new CbDriver();
      const io = new NodeIO({ name: 'n', readOnly: false }, drv);
      arm(io, drv);
      expect(submit(io, Buffer.alloc(length, 1), offset), what).toBe(false);
      expect(drv.submitted, what).toBe(0);
      expect(io.stats.writeOps + io.stats.failedOps + io.stats.invalidWriteOps, what).toBe(0);
      expect(io.stats.wrHighestOffset, what).toBe(0);
    }
    const ro = new CbDriver();
    expect(submit(new NodeIO({ name: 'n', readOnly: true }, ro), Buffer.alloc(512), 0)).toBe(false);
    for (const dz of ['on', 'unmap'] as const) {
      const drv = new CbDriver();
      const io = new NodeIO({ name: 'n', readOnly: false, options: { detectZeroes: dz } } as never, drv);
      expect(submit(io, Buffer.alloc(512), 0), dz).toBe(false);
    }
    // A driver without the path at all.
    const plain = new CbDriver() as BlockDriver;
    (plain as { submitWrite?: unknown }).submitWrite = undefined;
    expect(submit(new NodeIO({ name: 'n', readOnly: false }, plain), Buffer.alloc(512), 0)).toBe(false);
  });

  it('keeps the write in flight for a resize, which waits for it', async () => {
    const drv = new CbDriver();
    const truncated: number[] = [];
    drv.truncate = async (size: number): Promise<void> => void truncated.push(size);
    const io = new NodeIO({ name: 'n', readOnly: false }, drv);
    let settled = false;
    const p = submit(io, Buffer.alloc(4096, 3), 0);
    expect(p).not.toBe(false);
    void (p as Promise<unknown>).then(() => (settled = true));
    const r = io.truncate(128 * 1024).then(() => settled);
    // While the resize waits, new writes take the promise path (they wait behind the gate).
    expect(submit(io, Buffer.alloc(512), 0)).toBe(false);
    expect(await r).toBe(true);
    expect(truncated).toEqual([128 * 1024]);
  });
});

describe('submitWrite through a real raw-over-file graph', () => {
  let dir: string;
  let img: string;
  let g: BlockGraph;

  beforeEach(() => {
    dir = tmp('blockd-submit-');
    img = join(dir, 'a.raw');
    writeFileSync(img, '');
    truncateSync(img, 1 << 20);
    g = newGraph();
  });

  afterEach(async () => {
    await g.closeAll();
    rm(dir);
  });

  const write = (io: BlockIO, buf: Buffer, off: number) =>
    new Promise<Error | undefined>((resolve, reject) => {
      if (!io.submitWrite?.(buf, off, resolve)) reject(new Error('refused'));
    });

  it('lands the bytes at the raw offset in the file and counts on both nodes', async () => {
    await g.add({ driver: 'file', 'node-name': 'f', filename: img });
    const r = await g.add({ driver: 'raw', 'node-name': 'r', file: 'f', offset: 65536 });
    expect(await write(r.io, Buffer.alloc(4096, 0x5a), 4096)).toBeUndefined();
    const on = readFileSync(img);
    expect(on.subarray(65536 + 4096, 65536 + 8192).every((b) => b === 0x5a)).toBe(true);
    expect(on.subarray(65536, 65536 + 4096).every((b) => b === 0)).toBe(true);
    expect(r.io.stats.writeOps).toBe(1);
    expect(g.find('f').io.stats.writeOps).toBe(1);
    expect(g.find('f').io.stats.wrHighestOffset).toBe(65536 + 8192);
  });

  it('is refused when a hook sits on the file node below (a bitmap on the protocol node)', async () => {
    await g.add({ driver: 'file', 'node-name': 'f', filename: img });
    const r = await g.add({ driver: 'raw', 'node-name': 'r', file: 'f' });
    const unhook = g.find('f').io.addWriteHook(() => undefined);
    expect(r.io.submitWrite?.(Buffer.alloc(512), 0, () => undefined)).toBe(false);
    expect(r.io.stats.writeOps + g.find('f').io.stats.writeOps).toBe(0);
    unhook();
    expect(await write(r.io, Buffer.alloc(512, 1), 0)).toBeUndefined();
  });

  it('is refused by an O_DIRECT file node (aligned bounce buffers are write()\'s)', async () => {
    await g.add({ driver: 'file', 'node-name': 'f', filename: img, cache: { direct: true } }).catch(() => undefined);
    const f = g.get('f');
    if (!f) return; // the file system refuses O_DIRECT (tmpfs): nothing to check here
    expect(f.io.submitWrite?.(Buffer.alloc(4096), 0, () => undefined), 'O_DIRECT').toBe(false);
    expect(f.io.submitWrite?.(Buffer.alloc(4096), 0, () => undefined)).toBe(false);
  });
});

describe('qcow2 Storage.submitWrite', () => {
  /** A file node whose callback writes complete when the test says so. */
  function fileIO(size: number) {
    const pending: Array<() => void> = [];
    const io = {
      size: () => size,
      submitWrite: (_buf: Buffer, _off: number, done: WriteDone) => {
        pending.push(() => done());
        return true;
      },
    };
    return { io: io as unknown as BlockIO, pending };
  }

  it('counts a callback write for ioBarrier until it completes', async () => {
    const { io, pending } = fileIO(1 << 20);
    const st = new Storage(() => io, 65536);
    const done: string[] = [];
    // Once in each epoch (the barrier flips it).
    for (const [name, off, want] of [
      ['write', 4096, ['write']],
      ['second', 0, ['write', 'second']],
    ] as const) {
      expect(st.submitWrite(Buffer.alloc(512), off, () => done.push(name))).toBe(true);
      let barrier = false;
      const b = st.ioBarrier().then(() => (barrier = true));
      await new Promise((r) => setTimeout(r, 10));
      expect(barrier).toBe(false);
      pending.shift()!();
      await b;
      expect(done).toEqual(want);
    }
  });

  it('refuses a write past the end of the file (write() grows the file first)', () => {
    const { io } = fileIO(65536);
    const st = new Storage(() => io, 65536);
    expect(st.submitWrite(Buffer.alloc(512), 65536, () => undefined)).toBe(false);
    expect(st.submitWrite(Buffer.alloc(1024), 65536 - 512, () => undefined)).toBe(false);
  });
});
