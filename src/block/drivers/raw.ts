/**
 * `raw`: a format driver that is a window (`offset`, `size`) into its `file` child.
 * Without `size` the window follows the child's length.
 */
import { BlockError } from '../../util/errors.js';
import type { BlockDriver, BlockExtent, DriverCaps, FileRange, WriteDone, WriteFlags, ZeroFlags } from '../types.js';
import {
  BASE_MEMBERS,
  optError,
  optSize,
  qemuJson,
  rejectUnknown,
  type DriverOpenContext,
  type Options,
} from './common.js';

const RAW_MEMBERS = [...BASE_MEMBERS, 'file', 'offset', 'size'];

export class RawDriver implements BlockDriver {
  readonly name = 'raw';
  readonly caps: DriverCaps;
  private readonly offset: number;
  private readonly fixedSize: number | undefined;

  constructor(
    private readonly ctx: DriverOpenContext,
    private readonly opts: Options,
  ) {
    rejectUnknown(opts, RAW_MEMBERS);
    this.offset = optSize(opts, 'offset') ?? 0;
    this.fixedSize = optSize(opts, 'size');
    const childLen = ctx.childIO('file').size();
    if (this.offset > childLen) {
      throw optError(
        `Offset (${this.offset}) cannot be greater than size of the containing file (${childLen})`,
      );
    }
    if (this.fixedSize !== undefined) {
      if (this.offset + this.fixedSize > childLen) {
        // QEMU's text, double space included.
        throw optError(
          `The sum of offset (${this.offset}) and size (${this.fixedSize}) has to be smaller or equal to the  actual size of the containing file (${childLen})`,
        );
      }
      if (this.fixedSize % 512 !== 0) throw optError('Specified size is not multiple of 512');
    }
    const child = ctx.childDriver('file');
    this.caps = {
      writeZeroes: true,
      fua: true,
      discard: true,
      blockStatus: true,
      resize: this.fixedSize === undefined,
      readSync: child.caps.readSync,
      zeroInit: child.caps.zeroInit ?? false,
    };
  }

  private get child() {
    return this.ctx.childIO('file');
  }

  getLength(): number {
    if (this.fixedSize !== undefined) return this.fixedSize;
    return Math.max(0, this.child.size() - this.offset);
  }

  tryReadSync(buf: Buffer, offset: number): boolean {
    return this.child.tryReadSync(buf, offset + this.offset);
  }

  isDataSync(offset: number, length: number): boolean {
    return this.child.isDataSync?.(offset + this.offset, length) ?? false;
  }

  /** raw is a plain window of its file child: the child's range, shifted by `offset`. */
  fileRangeSync(offset: number, length: number, holes = false, lending = false): FileRange | undefined {
    return this.child.fileRangeSync?.(offset + this.offset, length, holes, lending);
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.child.read(buf, offset + this.offset);
  }

  write(buf: Buffer, offset: number, flags: WriteFlags): Promise<void> {
    return this.child.write(buf, offset + this.offset, flags);
  }

  submitWrite(buf: Buffer, offset: number, done: WriteDone): boolean {
    return this.child.submitWrite?.(buf, offset + this.offset, done) ?? false;
  }

  writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.child.writeZeroes(offset + this.offset, length, flags);
  }

  discard(offset: number, length: number): Promise<void> {
    return this.child.discard(offset + this.offset, length);
  }

  flush(): Promise<void> {
    return this.child.flush();
  }

  async blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    const ext = await this.child.blockStatus(offset + this.offset, length);
    return ext.map((e) => ({ ...e, offset: e.offset - this.offset }));
  }

  async truncate(size: number): Promise<void> {
    if (this.fixedSize !== undefined) {
      throw new BlockError('NOT_SUPPORTED', 'ENOTSUP', 'Cannot resize fixed-size raw disks');
    }
    await this.child.truncate(this.offset + size);
  }

  async close(): Promise<void> {}

  jsonOptions(): Record<string, unknown> {
    const child = this.ctx.childDriver('file');
    return {
      offset: this.opts['offset'],
      driver: 'raw',
      size: this.opts['size'],
      file: child.jsonOptions?.() ?? child.describeFilename(),
    };
  }

  describeFilename(): string {
    if (this.opts['offset'] === undefined && this.opts['size'] === undefined) {
      return this.ctx.childDriver('file').describeFilename();
    }
    return `json:${qemuJson(this.jsonOptions())}`;
  }

  async queryImage(): Promise<Record<string, unknown>> {
    const child = this.ctx.childDriver('file');
    const sub = (await child.queryImage?.()) ?? {};
    return { 'actual-size': sub['actual-size'], 'dirty-flag': false };
  }
}
