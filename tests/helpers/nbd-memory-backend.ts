/**
 * In-memory NbdBackend for engine tests. Each export is a Buffer with a per-block
 * allocation map (4 KiB blocks) that drives `base:allocation`, sparse READ holes and
 * an optional `qemu:dirty-bitmap:<name>` context.
 */
import { DaemonError, type Errno } from '../../src/util/errors.js';
import {
  DEFAULT_BLOCK_SIZES,
  StaticContextProvider,
  type NbdBackend,
  type NbdBlockSizes,
  type NbdConnectionInfo,
  type NbdExportHandle,
  type NbdExportSummary,
  type NbdMetaContext,
  type NbdMetaContextProvider,
  type NbdSession,
  type NbdWriteZeroesOptions,
  type NbdZeroRanges,
} from '../../src/nbd/backend.js';
import type { NbdExtent } from '../../src/nbd/protocol.js';

export const MEM_BLOCK = 4096;

export interface MemExportOptions {
  name: string;
  size: number;
  readOnly?: boolean;
  description?: string;
  multiConn?: boolean;
  canFastZero?: boolean;
  blockSizes?: NbdBlockSizes;
  /** Offer a synchronous read path (default true). */
  syncReads?: boolean;
  /** Report unallocated blocks as holes in READ results (default true). */
  sparseReads?: boolean;
  /** Export `qemu:dirty-bitmap:<name>` tracking written blocks. */
  dirtyBitmap?: string;
  /** Delay async operations by this many ms (exercises pipelining). */
  delayMs?: number;
  /** Refuse more than this many simultaneous clients (0 = unlimited). */
  maxClients?: number;
}

type Op = 'read' | 'write' | 'writeZeroes' | 'trim' | 'flush' | 'cache' | 'blockStatus';

export class MemExport implements NbdExportHandle {
  readonly name: string;
  readonly description?: string;
  readonly size: number;
  readonly readOnly: boolean;
  readonly canFlush = true;
  readonly canTrim = true;
  readonly canWriteZeroes = true;
  readonly canFastZero: boolean;
  readonly canCache = true;
  readonly multiConn: boolean;
  readonly rotational = false;
  readonly blockSizes: NbdBlockSizes;
  readonly metaContexts: readonly NbdMetaContextProvider[];
  readonly data: Buffer;
  /** 1 = allocated (holds data) per MEM_BLOCK block. */
  readonly alloc: Uint8Array;
  readonly dirty: Uint8Array;
  readonly tryReadSync?: (buf: Buffer, offset: number) => boolean;
  readonly calls: Array<{ op: Op; offset?: number; length?: number; fua?: boolean; opts?: NbdWriteZeroesOptions }> = [];
  clients = 0;
  peakInFlight = 0;
  private inFlightNow = 0;
  /** Fail the next call of `op` with this errno. */
  failNext: { op: Op; errno: Errno } | undefined;
  refuseNew: DaemonError | undefined;
  readonly sessions = new Set<NbdConnectionInfo>();
  private readonly sparse: boolean;
  private readonly delayMs: number;
  private readonly maxClients: number;

  constructor(o: MemExportOptions) {
    this.name = o.name;
    if (o.description !== undefined) this.description = o.description;
    this.size = o.size;
    this.readOnly = o.readOnly ?? false;
    this.multiConn = o.multiConn ?? true;
    this.canFastZero = o.canFastZero ?? true;
    this.blockSizes = o.blockSizes ?? { ...DEFAULT_BLOCK_SIZES };
    this.data = Buffer.alloc(o.size);
    const blocks = Math.ceil(o.size / MEM_BLOCK);
    this.alloc = new Uint8Array(blocks);
    this.dirty = new Uint8Array(blocks);
    this.sparse = o.sparseReads ?? true;
    this.delayMs = o.delayMs ?? 0;
    this.maxClients = o.maxClients ?? 0;
    if (o.syncReads ?? true) {
      this.tryReadSync = (buf, offset) => {
        this.data.copy(buf, 0, offset, offset + buf.length);
        return true;
      };
    }
    const base: NbdMetaContext = {
      name: 'base:allocation',
      blockStatus: (off, len, max) => this.status(off, len, max, (b) => (this.alloc[b] ? 0 : 3)),
    };
    const providers: NbdMetaContextProvider[] = [new StaticContextProvider('base', [base])];
    if (o.dirtyBitmap !== undefined) {
      const bm: NbdMetaContext = {
        name: `qemu:dirty-bitmap:${o.dirtyBitmap}`,
        blockStatus: (off, len, max) => this.status(off, len, max, (b) => (this.dirty[b] ? 1 : 0)),
      };
      providers.push(new StaticContextProvider('qemu', [bm]));
    }
    this.metaContexts = providers;
  }

  /** Fill `data` and mark the blocks allocated (test setup). */
  fill(offset: number, data: Buffer): void {
    data.copy(this.data, offset);
    this.mark(offset, data.length, 1);
  }

  onConnect(info: NbdConnectionInfo): NbdSession | DaemonError {
    if (this.refuseNew) return this.refuseNew;
    if (this.maxClients > 0 && this.clients >= this.maxClients) {
      return new DaemonError('EXPORT_BUSY', `export '${this.name}' has too many clients`, { errno: 'EPERM' });
    }
    this.clients++;
    this.sessions.add(info);
    return {
      onDisconnect: () => {
        this.clients--;
        this.sessions.delete(info);
      },
    };
  }

  private async gate(op: Op): Promise<void> {
    this.inFlightNow++;
    this.peakInFlight = Math.max(this.peakInFlight, this.inFlightNow);
    try {
      if (this.delayMs > 0) await new Promise((r) => setTimeout(r, this.delayMs));
      else await Promise.resolve();
    } finally {
      this.inFlightNow--;
    }
    if (this.failNext && this.failNext.op === op) {
      const e = this.failNext.errno;
      this.failNext = undefined;
      throw new DaemonError('INJECTED', `injected ${op} failure`, { errno: e });
    }
  }

  private mark(offset: number, length: number, v: 0 | 1): void {
    if (length <= 0) return;
    const first = Math.floor(offset / MEM_BLOCK);
    const last = Math.floor((offset + length - 1) / MEM_BLOCK);
    for (let b = first; b <= last; b++) {
      if (v === 1) {
        this.alloc[b] = 1;
      } else {
        // Only whole blocks become holes.
        const bs = b * MEM_BLOCK;
        const be = Math.min(bs + MEM_BLOCK, this.size);
        if (bs >= offset && be <= offset + length) this.alloc[b] = 0;
      }
    }
  }

  private markDirty(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / MEM_BLOCK);
    const last = Math.floor((offset + length - 1) / MEM_BLOCK);
    for (let b = first; b <= last; b++) this.dirty[b] = 1;
  }

  private async status(
    offset: number,
    length: number,
    max: number,
    flagOf: (block: number) => number,
  ): Promise<NbdExtent[]> {
    this.calls.push({ op: 'blockStatus', offset, length });
    await this.gate('blockStatus');
    const out: NbdExtent[] = [];
    let pos = offset;
    const end = offset + length;
    while (pos < end && out.length <= max) {
      const b = Math.floor(pos / MEM_BLOCK);
      const f = flagOf(b);
      const next = Math.min((b + 1) * MEM_BLOCK, end);
      const last = out[out.length - 1];
      if (last && last.flags === f) last.length += next - pos;
      else out.push({ length: next - pos, flags: f });
      pos = next;
    }
    return out.slice(0, max);
  }

  async read(buf: Buffer, offset: number): Promise<NbdZeroRanges | void> {
    this.calls.push({ op: 'read', offset, length: buf.length });
    await this.gate('read');
    this.data.copy(buf, 0, offset, offset + buf.length);
    if (!this.sparse) return;
    const holes: Array<{ offset: number; length: number }> = [];
    const end = offset + buf.length;
    let pos = offset;
    while (pos < end) {
      const b = Math.floor(pos / MEM_BLOCK);
      const next = Math.min((b + 1) * MEM_BLOCK, end);
      if (!this.alloc[b]) {
        const last = holes[holes.length - 1];
        if (last && last.offset + last.length === pos) last.length += next - pos;
        else holes.push({ offset: pos, length: next - pos });
      }
      pos = next;
    }
    return holes;
  }

  async write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    this.calls.push({ op: 'write', offset, length: buf.length, fua });
    await this.gate('write');
    buf.copy(this.data, offset);
    this.mark(offset, buf.length, 1);
    this.markDirty(offset, buf.length);
  }

  async writeZeroes(offset: number, length: number, opts: NbdWriteZeroesOptions): Promise<void> {
    this.calls.push({ op: 'writeZeroes', offset, length, opts });
    await this.gate('writeZeroes');
    this.data.fill(0, offset, offset + length);
    if (opts.mayUnmap) this.mark(offset, length, 0);
    else this.mark(offset, length, 1);
    this.markDirty(offset, length);
  }

  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    this.calls.push({ op: 'trim', offset, length, fua });
    await this.gate('trim');
    this.data.fill(0, offset, offset + length);
    this.mark(offset, length, 0);
    this.markDirty(offset, length);
  }

  async flush(): Promise<void> {
    this.calls.push({ op: 'flush' });
    await this.gate('flush');
  }

  async cache(offset: number, length: number): Promise<void> {
    this.calls.push({ op: 'cache', offset, length });
    await this.gate('cache');
  }
}

/** A backend over a set of {@link MemExport}s; no default export (like QSD). */
export class MemoryBackend implements NbdBackend {
  readonly exports = new Map<string, MemExport>();

  constructor(exports: MemExportOptions[] = []) {
    for (const e of exports) this.add(e);
  }

  add(o: MemExportOptions): MemExport {
    const e = new MemExport(o);
    this.exports.set(o.name, e);
    return e;
  }

  get(name: string): MemExport {
    const e = this.exports.get(name);
    if (!e) throw new Error(`no export ${name}`);
    return e;
  }

  listExports(): readonly NbdExportSummary[] {
    return [...this.exports.values()].map((e) =>
      e.description !== undefined ? { name: e.name, description: e.description } : { name: e.name },
    );
  }

  openExport(name: string): NbdExportHandle | DaemonError {
    return (
      this.exports.get(name) ??
      new DaemonError('EXPORT_NOT_FOUND', `export '${name}' not present`, { errno: 'ENOENT' })
    );
  }
}
