/**
 * NBD command dispatch: runs validated requests against the export backend (READ into a reply
 * buffer, WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS over the negotiated meta
 * contexts), keeps the in-flight count and bytes, and turns results and errors into replies
 * (reply-writer.ts). Requests arrive parsed and checked from request.ts.
 */
import type { NbdExtent, NbdExportHandle, NbdSession, NbdZeroRanges } from './backend.js';
import { allocReplyBuffer, isRecyclable, releaseReplyBuffer } from './buffer-pool.js';
import { nbdErrorOf } from './errors.js';
import type { SelectedContext } from './handshake.js';
import {
  encodeBlockStatusChunk,
  encodeNoneChunk,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_MAX_BLOCK_STATUS_EXTENTS,
  NBD_REPLY_FLAG_DONE,
} from './protocol.js';
import { encodeBlockStatusExtChunk } from './protocol-ext.js';
import { NbdReplyWriter, type ReadCtx } from './reply-writer.js';

export abstract class NbdDispatcher extends NbdReplyWriter {
  // transmission (set when the handshake reaches it)
  protected exp: NbdExportHandle | undefined;
  protected session: NbdSession | undefined;
  protected contexts: SelectedContext[] = [];
  protected inFlight = 0;
  protected inFlightBytes = 0;

  /** The socket closed and every request has settled (connection.ts). */
  protected abstract finalize(): void;
  /** A request settled: resume reading if the window has room again (connection.ts). */
  protected abstract maybeResume(): void;

  protected begin(bytes: number): void {
    this.inFlight++;
    this.inFlightBytes += bytes;
  }

  protected settle(bytes: number): void {
    this.inFlight--;
    this.inFlightBytes -= bytes;
    if (this.state === 'CLOSED') {
      if (this.inFlight === 0) this.finalize();
      return;
    }
    this.maybeResume();
  }

  // ---------------------------------------------------------------- READ

  /**
   * READ (`id` as for startWrite). `reuse`: a reply buffer of readHeaderSize() + length bytes the
   * synchronous attempt already took.
   */
  protected startRead(cookie: Buffer, flags: number, offset: number, length: number, reuse?: Buffer): void {
    if (length === 0) {
      // QSD: a NONE chunk (structured) or an empty simple reply.
      if (this.extended) this.replyNone(cookie);
      else this.queue(this.structured ? encodeNoneChunk(cookie) : this.simple(0, cookie));
      return;
    }
    const hdr = this.readHeaderSize();
    const buf = reuse ?? allocReplyBuffer(hdr + length);
    const ctx: ReadCtx = { cookie, offset, length, flags, buf, hdr };
    this.begin(length);
    let p: Promise<NbdZeroRanges | void>;
    try {
      p = this.exp!.read(buf.subarray(hdr), offset);
    } catch (err) {
      p = Promise.reject(err);
    }
    p.then(
      (holes) => {
        this.finishRead(ctx, holes);
        this.settle(length);
      },
      (err: unknown) => {
        this.logFailure(NBD_CMD_READ, err);
        this.replyError(cookie, NBD_CMD_READ, nbdErrorOf(err, NBD_CMD_READ, flags), 'reading from file failed');
        this.settle(length);
      },
    );
  }

  /** WRITE of `data` (`id`: the cookie, or the tag with extended headers; see replyNone). */
  protected startWrite(id: Buffer, flags: number, offset: number, data: Buffer): void {
    if (data.length === 0) {
      this.replyNone(id);
      return;
    }
    const exp = this.exp!;
    if (exp.submitWrite !== undefined) {
      // The fast path: no promise on any layer (plain writes to raw-over-file nodes, qcow2
      // overwrites in place; see NbdExportHandle.submitWrite).
      const length = data.length;
      let started = false;
      try {
        started = exp.submitWrite(data, offset, (flags & NBD_CMD_FLAG_FUA) !== 0, (err) =>
          // The backend is done with the payload once the write settled: recycle large ones.
          this.finish(id, NBD_CMD_WRITE, flags, length, isRecyclable(data) ? data : undefined, err === undefined, err),
        );
      } catch {
        started = false;
      }
      if (started) {
        this.begin(length);
        return;
      }
    }
    this.run(
      id,
      NBD_CMD_WRITE,
      flags,
      data.length,
      () => this.exp!.write(data, offset, (flags & NBD_CMD_FLAG_FUA) !== 0),
      // The backend is done with the payload once the write settled: recycle large ones.
      isRecyclable(data) ? data : undefined,
    );
  }

  // ---------------------------------------------------------------- others

  /** FLUSH, TRIM, CACHE, WRITE_ZEROES and BLOCK_STATUS (`id` as for startWrite). */
  protected startOther(id: Buffer, type: number, flags: number, offset: number, length: number): void {
    const exp = this.exp!;
    const fua = (flags & NBD_CMD_FLAG_FUA) !== 0;
    switch (type) {
      case NBD_CMD_FLUSH:
        this.run(id, type, flags, 0, () => exp.flush());
        return;
      case NBD_CMD_TRIM:
        if (length === 0) return void this.replyNone(id);
        this.run(id, type, flags, 0, () => exp.trim(offset, length, fua));
        return;
      case NBD_CMD_CACHE:
        this.run(id, type, flags, 0, () => (exp.canCache ? exp.cache(offset, length) : Promise.resolve()));
        return;
      case NBD_CMD_WRITE_ZEROES:
        if (length === 0) return void this.replyNone(id);
        this.run(id, type, flags, 0, () =>
          exp.writeZeroes(offset, length, {
            mayUnmap: (flags & NBD_CMD_FLAG_NO_HOLE) === 0,
            fastZero: (flags & NBD_CMD_FLAG_FAST_ZERO) !== 0,
            fua,
          }),
        );
        return;
      case NBD_CMD_BLOCK_STATUS:
        this.startBlockStatus(id, flags, offset, length, this.contexts);
        return;
    }
  }

  /** Run a command whose success reply carries no data (replyNone). */
  protected run(
    id: Buffer,
    type: number,
    flags: number,
    bytes: number,
    op: () => Promise<void>,
    recycle?: Buffer,
  ): void {
    this.begin(bytes);
    let p: Promise<void>;
    try {
      p = op();
    } catch (err) {
      p = Promise.reject(err);
    }
    p.then(
      () => this.finish(id, type, flags, bytes, recycle, true, undefined),
      (err: unknown) => this.finish(id, type, flags, bytes, recycle, false, err),
    );
  }

  /** A command without reply data settled (run(), or a submitWrite's callback): reply, settle. */
  private finish(
    id: Buffer,
    type: number,
    flags: number,
    bytes: number,
    recycle: Buffer | undefined,
    ok: boolean,
    err: unknown,
  ): void {
    if (recycle) releaseReplyBuffer(recycle);
    if (ok) this.replyNone(id);
    else {
      this.logFailure(type, err);
      this.replyError(id, type, nbdErrorOf(err, type, flags), FAIL_TEXT[type] ?? 'request failed');
    }
    this.settle(bytes);
  }

  /**
   * One BLOCK_STATUS chunk per context in `ctxs` (all selected ones, or those a payload named
   * with extended headers). Extended headers: BLOCK_STATUS_EXT chunks, extents up to 2^53 - 1.
   */
  protected startBlockStatus(id: Buffer, flags: number, offset: number, length: number, ctxs: SelectedContext[]): void {
    const reqOne = (flags & NBD_CMD_FLAG_REQ_ONE) !== 0;
    const max = reqOne ? 1 : NBD_MAX_BLOCK_STATUS_EXTENTS;
    const ext = this.extended;
    const maxLength = ext ? Number.MAX_SAFE_INTEGER : 0xffffffff;
    this.begin(0);
    let p: Promise<NbdExtent[][]>;
    try {
      p = Promise.all(ctxs.map((c) => c.context.blockStatus(offset, length, max, maxLength)));
    } catch (err) {
      p = Promise.reject(err);
    }
    p.then((lists) => {
      const chunks: Buffer[] = [];
      for (let i = 0; i < ctxs.length; i++) {
        const extents = normalizeExtents(lists[i] ?? [], length, max, maxLength);
        if (extents.length === 0) throw new Error(`context '${ctxs[i]!.context.name}' returned no extents`);
        const f = i === ctxs.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
        chunks.push(
          ext
            ? encodeBlockStatusExtChunk(f, id, ctxs[i]!.id, extents)
            : encodeBlockStatusChunk(f, id, ctxs[i]!.id, extents),
        );
      }
      for (const c of chunks) this.queue(c);
    })
      .catch((err: unknown) => {
        this.logFailure(NBD_CMD_BLOCK_STATUS, err);
        this.replyError(id, NBD_CMD_BLOCK_STATUS, nbdErrorOf(err, NBD_CMD_BLOCK_STATUS, flags), "can't get block status");
      })
      .finally(() => this.settle(0));
  }
}

/** QSD's reply texts for failed commands (shared with the extended-header path). */
export const FAIL_TEXT: Record<number, string> = {
  [NBD_CMD_WRITE]: 'writing to file failed',
  [NBD_CMD_WRITE_ZEROES]: 'writing to file failed',
  [NBD_CMD_FLUSH]: 'flush failed',
  [NBD_CMD_TRIM]: 'discard failed',
  [NBD_CMD_CACHE]: 'caching data failed',
};

/**
 * Make backend extents wire-safe: drop empty ones, merge equal neighbours, never
 * run past the request (QEMU never does), at most `max`, each at most `maxLength` bytes
 * (u32 for BLOCK_STATUS chunks; extended headers allow up to 2^53 - 1).
 */
export function normalizeExtents(
  ext: readonly NbdExtent[],
  length: number,
  max: number,
  maxLength = 0xffffffff,
): readonly NbdExtent[] {
  // Usually already so (the export merges and clamps): then no copy of thousands of extents.
  if (isWireSafe(ext, length, max, maxLength)) return ext;
  const out: NbdExtent[] = [];
  let total = 0;
  for (const e of ext) {
    if (total >= length) break;
    if (!(e.length > 0)) continue;
    const len = Math.min(e.length, length - total, maxLength);
    const last = out[out.length - 1];
    if (last && last.flags === e.flags && last.length + len <= maxLength) last.length += len;
    else {
      if (out.length >= max) break;
      out.push({ length: len, flags: e.flags >>> 0 });
    }
    total += len;
  }
  return out;
}

function isWireSafe(ext: readonly NbdExtent[], length: number, max: number, maxLength: number): boolean {
  if (ext.length > max) return false;
  let total = 0;
  let prevFlags = -1;
  for (const e of ext) {
    const len = e.length;
    if (!(len > 0) || len > maxLength || e.flags !== e.flags >>> 0) return false;
    if (e.flags === prevFlags) return false;
    total += len;
    prevFlags = e.flags;
  }
  return total <= length;
}
