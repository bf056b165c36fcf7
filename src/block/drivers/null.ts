/**
 * `null-co` / `null-aio`: a test backend that accepts writes and drops them. Reads leave the
 * buffer as it is unless `read-zeroes` is set. `latency-ns` delays every request.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import {
  EXTENT_ALLOCATED,
  EXTENT_DATA,
  EXTENT_ZERO,
  type BlockDriver,
  type BlockExtent,
  type DriverCaps,
} from '../types.js';
import { BASE_MEMBERS, optBool, optSize, qemuJson, rejectUnknown, type Options } from './common.js';

const NULL_MEMBERS = [...BASE_MEMBERS, 'size', 'latency-ns', 'read-zeroes'];
const DEFAULT_SIZE = 1 << 30;

export class NullDriver implements BlockDriver {
  readonly caps: DriverCaps = {
    writeZeroes: true,
    fua: true,
    discard: true,
    blockStatus: true,
    resize: false,
    readSync: true,
    zeroInit: false,
  };
  private readonly length: number;
  private readonly latencyMs: number;
  private readonly readZeroes: boolean;

  constructor(
    readonly name: 'null-co' | 'null-aio',
    private readonly opts: Options,
  ) {
    rejectUnknown(opts, NULL_MEMBERS);
    const size = optSize(opts, 'size') ?? DEFAULT_SIZE;
    // QEMU keeps sizes in 512-byte sectors and rounds up.
    this.length = Math.ceil(size / 512) * 512;
    this.latencyMs = (optSize(opts, 'latency-ns', 'uint64') ?? 0) / 1e6;
    this.readZeroes = optBool(opts, 'read-zeroes') ?? false;
    this.caps.zeroInit = this.readZeroes;
    this.caps.readSync = this.latencyMs === 0;
  }

  getLength(): number {
    return this.length;
  }

  private async delay(): Promise<void> {
    if (this.latencyMs > 0) await sleep(this.latencyMs);
  }

  tryReadSync(buf: Buffer): boolean {
    if (this.latencyMs > 0) return false;
    if (this.readZeroes) buf.fill(0);
    return true;
  }

  /** What blockStatus reports, known without waiting (the NBD export then skips block status). */
  isDataSync(): boolean {
    return !this.readZeroes && this.latencyMs === 0;
  }

  isZeroSync(): boolean {
    return this.readZeroes && this.latencyMs === 0;
  }

  async read(buf: Buffer): Promise<void> {
    await this.delay();
    if (this.readZeroes) buf.fill(0);
  }

  async write(): Promise<void> {
    await this.delay();
  }

  async writeZeroes(): Promise<void> {
    await this.delay();
  }

  async discard(): Promise<void> {
    await this.delay();
  }

  async flush(): Promise<void> {
    await this.delay();
  }

  async blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    await this.delay();
    const flags = this.readZeroes ? EXTENT_ZERO | EXTENT_ALLOCATED : EXTENT_DATA | EXTENT_ALLOCATED;
    return [{ offset, length, flags, depth: 1 }];
  }

  async close(): Promise<void> {}

  jsonOptions(): Record<string, unknown> {
    return {
      'read-zeroes': this.opts['read-zeroes'],
      'latency-ns': this.opts['latency-ns'],
      driver: this.name,
      size: this.opts['size'],
    };
  }

  describeFilename(): string {
    const extra = ['size', 'latency-ns', 'read-zeroes'].some((k) => this.opts[k] !== undefined);
    return extra ? `json:${qemuJson(this.jsonOptions())}` : `${this.name}://`;
  }

  async queryImage(): Promise<Record<string, unknown>> {
    return { 'actual-size': 0 };
  }
}
