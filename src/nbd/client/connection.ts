/**
 * Transmission phase of one client connection (NBD spec: Transmission phase): pipelined
 * requests, simple and structured replies matched by cookie, READ data copied straight into the
 * caller's buffer, BLOCK_STATUS extents collected.
 *
 * The reply parser is a push state machine over the wire's FrameReader. Whatever the server
 * sends is checked against the request it answers (cookie known, chunk type allowed for the
 * command, data inside the requested range, lengths bounded); a violation closes this
 * connection and fails its requests with NBD_CONNECTION_LOST, so the client may retry them on
 * a new connection.
 */
import type { Errno } from '../../util/errors.js';
import { NbdError } from '../../util/errors.js';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_PAYLOAD_LEN,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  NBD_EXTENDED_REPLY_MAGIC,
  NBD_EXTENDED_REPLY_SIZE,
  NBD_EXTENDED_REQUEST_MAGIC,
  NBD_EXTENDED_REQUEST_SIZE,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REQUEST_MAGIC,
  NBD_REQUEST_SIZE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  cmdName,
  replyTypeName,
} from '../protocol.js';
import { readU64 } from '../protocol-ext.js';
import type { NegotiatedInfo } from './negotiate.js';
import { NbdConnectionLost, serverProtocolError, type ClientWire } from './wire.js';

/** One extent of a BLOCK_STATUS reply as the client reports it. */
export interface ClientExtent {
  length: number;
  flags: number;
}

/** A request as the client layer describes it. */
export interface ClientRequest {
  type: number;
  flags: number;
  offset: number;
  length: number;
  /** WRITE payload (`length` bytes). */
  data?: Buffer;
  /** READ destination (`length` bytes). */
  dest?: Buffer;
  /** BLOCK_STATUS: the context id whose extents are collected. */
  contextId?: number;
}

/** A failed request: the server's error as our errno, and its message if it sent one. */
export class NbdRequestError extends NbdError {
  constructor(
    errno: Errno,
    message: string,
    /** The server's NBD error value (NBD_E*). */
    readonly nbdError: number,
  ) {
    super('NBD_REQUEST_FAILED', errno, message);
  }
}

/** NBD error values -> errno (spec: Error values; unknown values count as EINVAL). */
function errnoOfNbd(e: number): Errno {
  switch (e) {
    case NBD_EPERM:
      return 'EPERM';
    case NBD_EIO:
      return 'EIO';
    case NBD_ENOMEM:
      return 'ENOMEM';
    case NBD_ENOSPC:
      return 'ENOSPC';
    case NBD_EOVERFLOW:
      return 'EOVERFLOW';
    case NBD_ENOTSUP:
      return 'ENOTSUP';
    case NBD_ESHUTDOWN:
      return 'ESHUTDOWN';
    case NBD_EINVAL:
    default:
      return 'EINVAL';
  }
}

const ERRNO_TEXT: Partial<Record<Errno, string>> = {
  EPERM: 'Operation not permitted',
  EIO: 'Input/output error',
  ENOMEM: 'Cannot allocate memory',
  EINVAL: 'Invalid argument',
  ENOSPC: 'No space left on device',
  EOVERFLOW: 'Value too large for defined data type',
  ENOTSUP: 'Operation not supported',
  ESHUTDOWN: 'Cannot send after transport endpoint shutdown',
};

/** Most requests one connection has in flight (QEMU's client uses 16). */
export const MAX_IN_FLIGHT = 16;
/** Largest non-data chunk payload (a BLOCK_STATUS of 2^17 extents, or an error message). */
const MAX_CHUNK_PAYLOAD = 4 + 8 * 131072;
/** The same with extended headers (a BLOCK_STATUS_EXT of 2^17 extents). */
const MAX_EXT_CHUNK_PAYLOAD = 8 + 16 * 131072;
/** Most extents collected for one BLOCK_STATUS request. */
const MAX_EXTENTS = 131072;

interface Pending {
  req: ClientRequest;
  resolve: (extents: ClientExtent[] | undefined) => void;
  reject: (err: Error) => void;
  /** First error chunk seen (structured replies may carry several). */
  error: number;
  message: string;
  /** READ: bytes covered by data/hole chunks. */
  covered: number;
  extents: ClientExtent[] | undefined;
  /** Extent bytes collected so far (BLOCK_STATUS). */
  extentBytes: number;
}

/** Parser states. */
const S_HEADER = 0;
/** Streaming READ data into `dest` (simple reply or OFFSET_DATA chunk). */
const S_DATA = 1;

export class NbdClientConnection {
  private readonly pending = new Map<number, Pending>();
  private nextCookie = 1;
  private state = S_HEADER;
  /** S_DATA: where the bytes go and how many remain. */
  private dataPending: Pending | undefined;
  private dataCookie = 0;
  private dataPos = 0;
  private dataLeft = 0;
  private dataDone = false;
  private readonly slotWaiters: Array<() => void> = [];
  private lostError: Error | undefined;
  /** Called once when this connection is gone (the client reconnects or gives up). */
  onLost: ((err: Error) => void) | undefined;

  constructor(
    private readonly wire: ClientWire,
    readonly info: NegotiatedInfo,
  ) {
    wire.onReadable = () => this.parse();
    wire.onClose = (err) => this.lost(err);
    // Bytes that arrived with the end of the handshake.
    if (wire.reader.length > 0) queueMicrotask(() => this.parse());
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.pending.size;
  }

  get alive(): boolean {
    return this.lostError === undefined;
  }

  /** Send `req` and wait for its reply; BLOCK_STATUS resolves with the extents. */
  async submit(req: ClientRequest): Promise<ClientExtent[] | undefined> {
    while (this.pending.size >= MAX_IN_FLIGHT && !this.lostError) {
      await new Promise<void>((r) => this.slotWaiters.push(r));
    }
    if (this.lostError) throw this.lostError;
    const cookie = this.nextCookie++;
    return new Promise((resolve, reject) => {
      this.pending.set(cookie, {
        req,
        resolve,
        reject,
        error: 0,
        message: '',
        covered: 0,
        extents: req.type === NBD_CMD_BLOCK_STATUS ? [] : undefined,
        extentBytes: 0,
      });
      if (this.info.extended) {
        this.sendExt(cookie, req);
        return;
      }
      // [0..3] magic  [4..5] flags  [6..7] type  [8..15] cookie  [16..23] offset  [24..27] length
      const h = Buffer.allocUnsafe(NBD_REQUEST_SIZE);
      h.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
      h.writeUInt16BE(req.flags, 4);
      h.writeUInt16BE(req.type, 6);
      h.writeUInt32BE(Math.floor(cookie / 0x100000000), 8);
      h.writeUInt32BE(cookie >>> 0, 12);
      h.writeUInt32BE(Math.floor(req.offset / 0x100000000), 16);
      h.writeUInt32BE(req.offset >>> 0, 20);
      h.writeUInt32BE(req.length >>> 0, 24);
      if (req.type === NBD_CMD_WRITE && req.data) this.wire.writev([h, req.data]);
      else this.wire.write(h);
    });
  }

  /**
   * Extended request. [0..3] NBD_EXTENDED_REQUEST_MAGIC  [4..5] flags  [6..7] type  [8..15] cookie
   * [16..23] offset  [24..31] length (u64: the WRITE payload length with PAYLOAD_LEN, else the
   * effect length)
   */
  private sendExt(cookie: number, req: ClientRequest): void {
    const h = Buffer.allocUnsafe(NBD_EXTENDED_REQUEST_SIZE);
    const write = req.type === NBD_CMD_WRITE && req.data !== undefined;
    h.writeUInt32BE(NBD_EXTENDED_REQUEST_MAGIC, 0);
    h.writeUInt16BE(req.flags | (write ? NBD_CMD_FLAG_PAYLOAD_LEN : 0), 4);
    h.writeUInt16BE(req.type, 6);
    h.writeUInt32BE(Math.floor(cookie / 0x100000000), 8);
    h.writeUInt32BE(cookie >>> 0, 12);
    h.writeUInt32BE(Math.floor(req.offset / 0x100000000), 16);
    h.writeUInt32BE(req.offset >>> 0, 20);
    h.writeUInt32BE(Math.floor(req.length / 0x100000000), 24);
    h.writeUInt32BE(req.length >>> 0, 28);
    if (write) this.wire.writev([h, req.data!]);
    else this.wire.write(h);
  }

  /** NBD_CMD_DISC, then close once sent. Requests still in flight fail as lost. */
  disconnect(): void {
    if (this.lostError) return;
    const ext = this.info.extended;
    const h = Buffer.alloc(ext ? NBD_EXTENDED_REQUEST_SIZE : NBD_REQUEST_SIZE);
    h.writeUInt32BE(ext ? NBD_EXTENDED_REQUEST_MAGIC : NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(NBD_CMD_DISC, 6);
    this.wire.write(h);
    this.wire.end();
  }

  /** Close at once. */
  destroy(err: Error = new NbdConnectionLost('NBD connection closed')): void {
    this.wire.destroy(err);
  }

  private lost(err: Error): void {
    if (this.lostError) return;
    this.lostError = err instanceof NbdConnectionLost ? err : new NbdConnectionLost(err.message);
    const all = [...this.pending.values()];
    this.pending.clear();
    for (const p of all) p.reject(this.lostError);
    for (const w of this.slotWaiters.splice(0)) w();
    this.onLost?.(this.lostError);
  }

  private violation(message: string): void {
    this.wire.destroy(serverProtocolError(message));
  }

  private finish(cookie: number, p: Pending): void {
    this.pending.delete(cookie);
    const w = this.slotWaiters.shift();
    if (w) w();
    if (p.error !== 0) {
      const errno = errnoOfNbd(p.error);
      const text = p.message || ERRNO_TEXT[errno] || errno;
      p.reject(new NbdRequestError(errno, text, p.error));
      return;
    }
    if (p.req.type === NBD_CMD_READ && this.info.structured && p.covered !== p.req.length) {
      p.reject(new NbdRequestError('EIO', `NBD server answered ${p.covered} of ${p.req.length} bytes of a read`, NBD_EIO));
      return;
    }
    p.resolve(p.extents);
  }

  private lookup(r: Buffer, at: number): [number, Pending] | undefined {
    const cookie = r.readUInt32BE(at) * 0x100000000 + r.readUInt32BE(at + 4);
    const p = this.pending.get(cookie);
    if (!p) {
      this.violation(`NBD server replied to an unknown cookie ${cookie}`);
      return undefined;
    }
    return [cookie, p];
  }

  /** S_DATA: copy what has arrived of a read's payload; true once all of it is in. */
  private copyData(): boolean {
    const p = this.dataPending!;
    const n = this.wire.reader.copyOut(p.req.dest!, this.dataPos, this.dataLeft);
    this.dataPos += n;
    this.dataLeft -= n;
    if (this.dataLeft > 0) return false;
    this.state = S_HEADER;
    this.dataPending = undefined;
    if (this.dataDone) this.finish(this.dataCookie, p);
    return true;
  }

  private parse(): void {
    if (this.info.extended) {
      this.parseExt();
      return;
    }
    const rd = this.wire.reader;
    while (!this.lostError) {
      if (this.state === S_DATA) {
        if (!this.copyData()) return;
        continue;
      }
      if (!rd.ensure(4)) return;
      const magic = rd.buf.readUInt32BE(rd.pos);
      if (magic === NBD_SIMPLE_REPLY_MAGIC) {
        // [0..3] magic  [4..7] error  [8..15] cookie
        if (!rd.ensure(16)) return;
        const b = rd.buf;
        const o = rd.pos;
        const error = b.readUInt32BE(o + 4);
        const hit = this.lookup(b, o + 8);
        if (!hit) return;
        rd.consume(16);
        const [cookie, p] = hit;
        if (this.info.structured && p.req.type === NBD_CMD_READ && error === 0) {
          // Spec: with structured replies a successful READ must use chunks.
          this.violation('NBD server sent a simple reply to a structured read');
          return;
        }
        p.error = error;
        if (error === 0 && p.req.type === NBD_CMD_READ) {
          p.covered = p.req.length;
          this.startData(cookie, p, 0, p.req.length, true);
          continue;
        }
        this.finish(cookie, p);
        continue;
      }
      if (magic !== NBD_STRUCTURED_REPLY_MAGIC || !this.info.structured) {
        this.violation(`Bad reply magic 0x${magic.toString(16)} from the NBD server`);
        return;
      }
      // [0..3] magic  [4..5] flags  [6..7] type  [8..15] cookie  [16..19] payload length
      if (!rd.ensure(20)) return;
      const b = rd.buf;
      const o = rd.pos;
      const flags = b.readUInt16BE(o + 4);
      const type = b.readUInt16BE(o + 6);
      const len = b.readUInt32BE(o + 16);
      const hit = this.lookup(b, o + 8);
      if (!hit) return;
      const [cookie, p] = hit;
      const done = (flags & NBD_REPLY_FLAG_DONE) !== 0;
      if (type === NBD_REPLY_TYPE_OFFSET_DATA) {
        if (p.req.type !== NBD_CMD_READ || len <= 8 || len - 8 > p.req.length) {
          this.violation(`Bad ${replyTypeName(type)} chunk (length ${len}) for ${cmdName(p.req.type)}`);
          return;
        }
        if (!rd.ensure(28)) return;
        const off = rd.buf.readUInt32BE(rd.pos + 20) * 0x100000000 + rd.buf.readUInt32BE(rd.pos + 24);
        const dlen = len - 8;
        const rel = off - p.req.offset;
        if (rel < 0 || rel + dlen > p.req.length) {
          this.violation('NBD server sent read data outside the requested range');
          return;
        }
        rd.consume(28);
        p.covered += dlen;
        this.startData(cookie, p, rel, dlen, done);
        continue;
      }
      if (len > MAX_CHUNK_PAYLOAD) {
        this.violation(`Oversized ${replyTypeName(type)} chunk (${len} bytes) from the NBD server`);
        return;
      }
      if (!rd.ensure(20 + len)) return;
      const pl = rd.buf.subarray(rd.pos + 20, rd.pos + 20 + len);
      const why = this.chunk(p, type, pl, done);
      rd.consume(20 + len);
      if (why) {
        this.violation(why);
        return;
      }
      if (done) this.finish(cookie, p);
    }
  }

  /**
   * Extended replies only (NBD spec: Extended reply chunk message). [0..3] magic  [4..5] flags
   * [6..7] type  [8..15] cookie  [16..23] offset (the request's)  [24..31] payload length (u64)
   */
  private parseExt(): void {
    const rd = this.wire.reader;
    while (!this.lostError) {
      if (this.state === S_DATA) {
        if (!this.copyData()) return;
        continue;
      }
      if (!rd.ensure(NBD_EXTENDED_REPLY_SIZE)) return;
      const b = rd.buf;
      const o = rd.pos;
      const magic = b.readUInt32BE(o);
      if (magic !== NBD_EXTENDED_REPLY_MAGIC) {
        this.violation(`Bad reply magic 0x${magic.toString(16)} from the NBD server (extended headers)`);
        return;
      }
      const flags = b.readUInt16BE(o + 4);
      const type = b.readUInt16BE(o + 6);
      const hit = this.lookup(b, o + 8);
      if (!hit) return;
      const [cookie, p] = hit;
      if (readU64(b, o + 16) !== p.req.offset) {
        this.violation(`NBD server echoed a wrong offset in a ${replyTypeName(type)} chunk`);
        return;
      }
      const len = readU64(b, o + 24);
      const done = (flags & NBD_REPLY_FLAG_DONE) !== 0;
      if (type === NBD_REPLY_TYPE_OFFSET_DATA) {
        if (p.req.type !== NBD_CMD_READ || len <= 8 || len - 8 > p.req.length) {
          this.violation(`Bad ${replyTypeName(type)} chunk (length ${len}) for ${cmdName(p.req.type)}`);
          return;
        }
        if (!rd.ensure(NBD_EXTENDED_REPLY_SIZE + 8)) return;
        const off = readU64(rd.buf, rd.pos + 32);
        const dlen = len - 8;
        const rel = off - p.req.offset;
        if (off < 0 || rel < 0 || rel + dlen > p.req.length) {
          this.violation('NBD server sent read data outside the requested range');
          return;
        }
        rd.consume(NBD_EXTENDED_REPLY_SIZE + 8);
        p.covered += dlen;
        this.startData(cookie, p, rel, dlen, done);
        continue;
      }
      if (len < 0 || len > MAX_EXT_CHUNK_PAYLOAD) {
        this.violation(`Oversized ${replyTypeName(type)} chunk from the NBD server`);
        return;
      }
      if (!rd.ensure(NBD_EXTENDED_REPLY_SIZE + len)) return;
      const pl = rd.buf.subarray(rd.pos + NBD_EXTENDED_REPLY_SIZE, rd.pos + NBD_EXTENDED_REPLY_SIZE + len);
      const why = this.chunk(p, type, pl, done);
      rd.consume(NBD_EXTENDED_REPLY_SIZE + len);
      if (why) {
        this.violation(why);
        return;
      }
      if (done) this.finish(cookie, p);
    }
  }

  private startData(cookie: number, p: Pending, pos: number, n: number, done: boolean): void {
    this.state = S_DATA;
    this.dataCookie = cookie;
    this.dataPending = p;
    this.dataPos = pos;
    this.dataLeft = n;
    this.dataDone = done;
  }

  /** Apply one non-data chunk; returns a protocol violation text or undefined. */
  private chunk(p: Pending, type: number, pl: Buffer, done: boolean): string | undefined {
    switch (type) {
      case NBD_REPLY_TYPE_NONE:
        if (pl.length !== 0 || !done) return 'Bad NBD_REPLY_TYPE_NONE chunk from the NBD server';
        return undefined;
      case NBD_REPLY_TYPE_OFFSET_HOLE: {
        // [0..7] offset  [8..11] hole size
        if (p.req.type !== NBD_CMD_READ || pl.length !== 12) return 'Bad NBD_REPLY_TYPE_OFFSET_HOLE chunk';
        const rel = pl.readUInt32BE(0) * 0x100000000 + pl.readUInt32BE(4) - p.req.offset;
        const n = pl.readUInt32BE(8);
        if (n === 0 || rel < 0 || rel + n > p.req.length) return 'NBD server sent a hole outside the requested range';
        p.req.dest!.fill(0, rel, rel + n);
        p.covered += n;
        return undefined;
      }
      case NBD_REPLY_TYPE_BLOCK_STATUS_EXT: {
        // [0..3] context id  [4..7] count n  then n x ([0..7] length, [8..15] status)
        if (!this.info.extended || p.req.type !== NBD_CMD_BLOCK_STATUS || pl.length < 24) {
          return 'Bad NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunk';
        }
        if (pl.length !== 8 + 16 * pl.readUInt32BE(4)) return 'Bad NBD_REPLY_TYPE_BLOCK_STATUS_EXT descriptor count';
        if (pl.readUInt32BE(0) !== p.req.contextId) return 'NBD server sent block status for a context not asked for';
        const ext = p.extents!;
        for (let o = 8; o < pl.length; o += 16) {
          const big = readU64(pl, o);
          if (big === 0) return 'NBD server sent a zero-length extent';
          // The contexts we select are 32-bit: the high half of the status must be zero.
          if (pl.readUInt32BE(o + 8) !== 0) return 'NBD server sent a 64-bit status for a 32-bit context';
          const room = p.req.length - p.extentBytes;
          if (room <= 0) break;
          // Spec: the final extent may run past the request (even past 2^53); the client clips it.
          const n = big < 0 || big > room ? room : big;
          if (ext.length >= MAX_EXTENTS) break;
          ext.push({ length: n, flags: pl.readUInt32BE(o + 12) });
          p.extentBytes += n;
        }
        return undefined;
      }
      case NBD_REPLY_TYPE_BLOCK_STATUS: {
        // [0..3] context id  then n x ([0..3] length, [4..7] flags)
        if (this.info.extended || p.req.type !== NBD_CMD_BLOCK_STATUS || pl.length < 12 || (pl.length - 4) % 8 !== 0) {
          return 'Bad NBD_REPLY_TYPE_BLOCK_STATUS chunk';
        }
        if (pl.readUInt32BE(0) !== p.req.contextId) return 'NBD server sent block status for a context not asked for';
        const ext = p.extents!;
        for (let o = 4; o < pl.length; o += 8) {
          let n = pl.readUInt32BE(o);
          if (n === 0) return 'NBD server sent a zero-length extent';
          // Spec: the final extent may run past the request; the client clips it.
          const room = p.req.length - p.extentBytes;
          if (room <= 0) break;
          if (n > room) n = room;
          if (ext.length >= MAX_EXTENTS) break;
          ext.push({ length: n, flags: pl.readUInt32BE(o + 4) });
          p.extentBytes += n;
        }
        return undefined;
      }
      case NBD_REPLY_TYPE_ERROR:
      case NBD_REPLY_TYPE_ERROR_OFFSET: {
        // [0..3] error  [4..5] message length M  [6..6+M) message  (ERROR_OFFSET: [6+M..] offset)
        if (pl.length < 6) return 'Short error chunk from the NBD server';
        const err = pl.readUInt32BE(0);
        const m = pl.readUInt16BE(4);
        const need = 6 + m + (type === NBD_REPLY_TYPE_ERROR_OFFSET ? 8 : 0);
        if (err === 0 || pl.length !== need) return 'Bad error chunk from the NBD server';
        if (p.error === 0) {
          p.error = err;
          p.message = pl.toString('utf8', 6, 6 + m);
        }
        return undefined;
      }
      default:
        // Spec: an unknown chunk type with the error bit is an error; otherwise a violation.
        if (type & 0x8000) {
          if (pl.length < 4) return 'Short error chunk from the NBD server';
          if (p.error === 0) p.error = pl.readUInt32BE(0) || NBD_EIO;
          return undefined;
        }
        return `Unknown reply chunk type ${type} from the NBD server`;
    }
  }
}
