import { describe, expect, it } from 'vitest';
import { NodeIO } from '../../../src/block/io.js';
import type { BlockDriver, DriverCaps } from '../../../src/block/types.js';
import { BlockError } from '../../../src/util/errors.js';

/** A memory driver whose next requests can be made to fail. */
class FlakyDriver implements BlockDriver {
  name = 'flaky';
  data = Buffer.alloc(1 << 20);
  failNext = 0;
  seen: string[] = [];
  caps: DriverCaps = { writeZeroes: true, fua: true, discard: true, blockStatus: false, resize: false, readSync: false };
  private maybeFail(what: string): void {
    this.seen.push(what);
    if (this.failNext > 0) {
      this.failNext--;
      throw new BlockError('IO', 'EIO', `${what} failed`);
    }
  }
  getLength() {
    return this.data.length;
  }
  async read(buf: Buffer, offset: number) {
    this.maybeFail('read');
    this.data.copy(buf, 0, offset, offset + buf.length);
  }
  async write(buf: Buffer, offset: number) {
    this.maybeFail('write');
    buf.copy(this.data, offset);
  }
  async writeZeroes(offset: number, length: number) {
    this.maybeFail('zero');
    this.data.fill(0, offset, offset + length);
  }
  async discard() {
    this.maybeFail('discard');
  }
  async flush() {
    this.maybeFail('flush');
  }
  async close() {}
  describeFilename() {
    return 'flaky://';
  }
}

function setup(discard: 'ignore' | 'unmap' = 'unmap') {
  const drv = new FlakyDriver();
  const io = new NodeIO({ name: 'n', readOnly: false, options: { detectZeroes: 'off', discard } }, drv);
  return { drv, io };
}

describe('NodeIO statistics', () => {
  it('counts operations and bytes per request type', async () => {
    const { io } = setup();
    await io.read(Buffer.alloc(512), 0);
    await io.write(Buffer.alloc(100, 1), 1000);
    await io.writeZeroes(4096, 4096);
    await io.discard(8192, 512);
    await io.flush();
    expect(io.stats).toMatchObject({
      readOps: 1,
      readBytes: 512,
      writeOps: 1,
      writeBytes: 100,
      zeroOps: 1,
      zeroBytes: 4096,
      discardOps: 1,
      discardBytes: 512,
      flushOps: 1,
      driverDiscardOk: 1,
      driverDiscardBytesOk: 512,
      failedOps: 0,
    });
  });

  it('keeps the highest write end, failed writes included, discards not', async () => {
    const { io, drv } = setup();
    await io.write(Buffer.alloc(10), 100);
    await io.discard(0, 65536);
    expect(io.stats.wrHighestOffset).toBe(110);
    drv.failNext = 1;
    await expect(io.writeZeroes(5000, 1000)).rejects.toThrow(/failed/);
    expect(io.stats.wrHighestOffset).toBe(6000);
    await io.write(Buffer.alloc(10), 0);
    expect(io.stats.wrHighestOffset).toBe(6000);
  });

  it('counts failures per request type', async () => {
    const { io, drv } = setup();
    drv.failNext = 5;
    await expect(io.read(Buffer.alloc(1), 0)).rejects.toThrow();
    await expect(io.write(Buffer.alloc(1), 0)).rejects.toThrow();
    await expect(io.writeZeroes(0, 1)).rejects.toThrow();
    await expect(io.discard(0, 1)).rejects.toThrow();
    await expect(io.flush()).rejects.toThrow();
    expect(io.stats).toMatchObject({
      failedOps: 5,
      failedReadOps: 1,
      failedWriteOps: 2,
      failedDiscardOps: 1,
      failedFlushOps: 1,
      driverDiscardFailed: 1,
      readOps: 0,
      writeOps: 0,
    });
  });

  it('counts requests refused by the range checks as invalid', async () => {
    const { io, drv } = setup();
    const size = drv.data.length;
    await expect(io.read(Buffer.alloc(2), size - 1)).rejects.toThrow();
    await expect(io.write(Buffer.alloc(2), size - 1)).rejects.toThrow();
    await expect(io.writeZeroes(-1, 1)).rejects.toThrow();
    await expect(io.discard(size, 1)).rejects.toThrow();
    await expect(io.blockStatus(size, 1)).rejects.toThrow();
    expect(io.stats).toMatchObject({ invalidReadOps: 1, invalidWriteOps: 2, invalidDiscardOps: 1 });
    expect(drv.seen).toEqual([]);
  });

  it('drops discards on a node opened with discard=ignore before the driver or a counter', async () => {
    const { io, drv } = setup('ignore');
    let fired = 0;
    io.setWriteThreshold(1, () => fired++);
    await io.discard(0, 4096);
    expect(drv.seen).toEqual([]);
    expect(io.stats.discardOps).toBe(0);
    expect(fired).toBe(0);
  });
});

describe('NodeIO write threshold', () => {
  it('fires once, before the driver, for the first request ending past it', async () => {
    const { io, drv } = setup();
    const calls: Array<[number, number, string[]]> = [];
    io.setWriteThreshold(65536, (amount, threshold) => calls.push([amount, threshold, [...drv.seen]]));
    await io.write(Buffer.alloc(1), 65535);
    expect(calls).toEqual([]);
    await io.write(Buffer.alloc(8192), 61440);
    expect(calls).toEqual([[4096, 65536, ['write']]]);
    expect(io.writeThreshold).toBe(0);
    await io.write(Buffer.alloc(1), 100000);
    expect(calls.length).toBe(1);
  });

  it('fires for write-zeroes and discards too, and not for reads', async () => {
    const { io } = setup();
    const fired: number[] = [];
    io.setWriteThreshold(10, (a) => fired.push(a));
    await io.read(Buffer.alloc(100), 0);
    expect(fired).toEqual([]);
    await io.writeZeroes(0, 11);
    io.setWriteThreshold(10, (a) => fired.push(a));
    await io.discard(5, 10);
    expect(fired).toEqual([1, 5]);
  });

  it('fires even when the request then fails', async () => {
    const { io, drv } = setup();
    let fired = 0;
    io.setWriteThreshold(1, () => fired++);
    drv.failNext = 1;
    await expect(io.write(Buffer.alloc(4), 0)).rejects.toThrow();
    expect(fired).toBe(1);
  });

  it('is disarmed by 0 and refuses negative offsets', () => {
    const { io } = setup();
    io.setWriteThreshold(100, () => undefined);
    expect(io.writeThreshold).toBe(100);
    io.setWriteThreshold(0);
    expect(io.writeThreshold).toBe(0);
    expect(() => io.setWriteThreshold(-1)).toThrow(BlockError);
  });
});
