/**
 * The transmission phase with extended headers (NBD spec: NBD_OPT_EXTENDED_HEADERS): 32-byte
 * requests with 64-bit lengths, NBD_CMD_FLAG_PAYLOAD_LEN, and only 32-byte extended reply
 * chunks (NONE for success without data, OFFSET_DATA / OFFSET_HOLE, ERROR, BLOCK_STATUS_EXT).
 *
 * It is a layer of its own between request.ts and connection.ts for what the framing changes:
 * the request header and payload requests (NBD_CMD_FLAG_PAYLOAD_LEN). A connection picks one
 * input state (REQUEST or EXT_REQUEST) when it enters transmission, and from then on every
 * request takes one path or the other. Validation reuses request.ts (same order and texts);
 * every command then runs in dispatch.ts, whose replies (replyNone, replyError, READ data and
 * hole chunks, BLOCK_STATUS chunks) follow the connection's `extended` flag.
 *
 * Every reply echoes the request's cookie and offset, carried together as a 16-byte tag (see
 * protocol-ext.ts). Limits: READ and WRITE payloads are bounded by the maximum block size as
 * before; BLOCK_STATUS, TRIM, WRITE_ZEROES and CACHE take any effect length inside the export.
 */
import { allocReplyBuffer, isRecyclable, releaseReplyBuffer } from './buffer-pool.js';
import type { SelectedContext } from './handshake.js';
import {
  cmdName,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_PAYLOAD_LEN,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_EINVAL,
  NBD_EXTENDED_REQUEST_MAGIC,
  NBD_EXTENDED_REQUEST_SIZE,
  NBD_MAX_BUFFER_SIZE,
} from './protocol.js';
import { readU64, ZERO_TAG } from './protocol-ext.js';
import { CMD_RULES, EMPTY, NbdRequestParser, READ_ONLY_TEXT, type CmdRule } from './request.js';

/** Extended headers lift QEMU's 32 MiB bound on CACHE (an effect length, no payload). */
const EXT_RULES: Readonly<Record<number, CmdRule>> = {
  ...CMD_RULES,
  [NBD_CMD_CACHE]: { ...CMD_RULES[NBD_CMD_CACHE]!, bounded: false },
};
const UNKNOWN_RULE: CmdRule = { payload: false, mutates: false, bounded: false, ranged: true, flags: 0 };

/** What to do with a gathered payload (EXT_PAYLOAD). */
interface PendingPayload {
  type: number;
  flags: number;
  offset: number;
}

export abstract class NbdExtRequestParser extends NbdRequestParser {
  /** NBD_FLAG_BLOCK_STATUS_PAYLOAD was advertised to this client. */
  protected statusPayload = false;
  private xPending: PendingPayload = { type: 0, flags: 0, offset: 0 };

  /** Hard disconnect without flushing (connection.ts). */
  protected abstract closeNow(reason: string): void;

  // ------------------------------------------------------------ header

  protected onExtRequestHeader(b: Buffer, p: number): void {
    const r = this.reader;
    const magic = b.readUInt32BE(p);
    if (magic !== NBD_EXTENDED_REQUEST_MAGIC) {
      // Framing error (a compact request included): as on the compact path.
      this.badMagic(magic, NBD_EXTENDED_REQUEST_SIZE, ZERO_TAG, 'invalid NBD extended request magic');
      return;
    }
    const flags = b.readUInt16BE(p + 4);
    const type = b.readUInt16BE(p + 6);
    const offset = readU64(b, p + 16);
    const length = readU64(b, p + 24);

    // Synchronous READ from memory, as on the compact path (the tag: cookie and offset).
    let readBuf: Buffer | undefined;
    if (type === NBD_CMD_READ) {
      const r0 = this.syncRead(b.subarray(p + 8, p + 24), flags, offset, length, NBD_EXTENDED_REQUEST_SIZE);
      if (r0 === null) return;
      readBuf = r0;
    }

    if (type === NBD_CMD_DISC) {
      this.onDisc(NBD_EXTENDED_REQUEST_SIZE);
      return;
    }
    // Cookie and offset, echoed by every reply to this request.
    const tag = Buffer.from(b.subarray(p + 8, p + 24));
    const offsetBig = offset >= 0 ? undefined : b.readBigUInt64BE(p + 16);
    const lengthBig = length >= 0 ? undefined : b.readBigUInt64BE(p + 24);
    r.consume(NBD_EXTENDED_REQUEST_SIZE);
    if (this.trace) {
      // u64 values above 2^53 as decimal strings (a BigInt does not serialise to JSON).
      const o = offsetBig === undefined ? offset : String(offsetBig);
      const l = lengthBig === undefined ? length : String(lengthBig);
      this.log.trace({ cmd: cmdName(type), flags, offset: o, length: l }, 'request');
    }

    if ((flags & NBD_CMD_FLAG_PAYLOAD_LEN) !== 0) {
      // NBD spec: a payload above the maximum payload size is a hard disconnect.
      if (length < 0 || length > NBD_MAX_BUFFER_SIZE) {
        this.closeNow(`payload length ${lengthBig ?? length} above ${NBD_MAX_BUFFER_SIZE}`);
        return;
      }
      this.onPayloadRequest(tag, type, flags, offset, length);
      return;
    }
    if (type === NBD_CMD_WRITE) {
      // No payload follows (the flag decides the framing): refuse, nothing to drain.
      this.replyError(tag, type, NBD_EINVAL, 'write without NBD_CMD_FLAG_PAYLOAD_LEN');
      return;
    }
    const offsetText = () => String(offsetBig ?? offset);
    if (length < 0) {
      // An effect length above 2^53 cannot fit any export.
      this.replyError(tag, type, NBD_EINVAL, `operation past EOF; From: ${offsetText()}, Len: ${lengthBig}, Size: ${this.size}`);
      return;
    }
    const err = this.validate(type, EXT_RULES[type] ?? UNKNOWN_RULE, flags, offset, offsetText, length);
    if (err !== undefined) {
      this.replyError(tag, type, err === READ_ONLY_TEXT ? this.readOnlyError : NBD_EINVAL, err);
      return;
    }
    if (type === NBD_CMD_READ) this.startRead(tag, flags, offset, length, readBuf);
    else this.startOther(tag, type, flags, offset, length);
  }

  /** A request with NBD_CMD_FLAG_PAYLOAD_LEN and a payload of `length` (<= 32 MiB) bytes. */
  private onPayloadRequest(tag: Buffer, type: number, flags: number, offset: number, length: number): void {
    const f = flags & ~NBD_CMD_FLAG_PAYLOAD_LEN;
    if (type === NBD_CMD_WRITE) {
      const err = this.validate(type, EXT_RULES[type]!, f, offset, () => String(offset), length);
      if (err !== undefined) {
        this.extDrain(tag, type, length, err === READ_ONLY_TEXT ? this.readOnlyError : NBD_EINVAL, err);
        return;
      }
      this.extGather(tag, { type, flags: f, offset }, length);
      return;
    }
    if (type === NBD_CMD_BLOCK_STATUS && this.statusPayload) {
      // NBD spec: [0..7] effect length  then n x [0..3] context id; n >= 1, no duplicates.
      const n = (length - 8) / 4;
      if (length < 12 || !Number.isInteger(n) || n > this.contexts.length) {
        this.extDrain(tag, type, length, NBD_EINVAL, `invalid block status payload length ${length}`);
        return;
      }
      this.extGather(tag, { type, flags: f, offset }, length);
      return;
    }
    // No payload form for this command: consume the payload, then EINVAL (NBD spec).
    const err =
      this.validate(type, EXT_RULES[type] ?? UNKNOWN_RULE, flags, offset, () => String(offset), 0) ??
      `unexpected payload for command ${cmdName(type)}`;
    this.extDrain(tag, type, length, NBD_EINVAL, err);
  }

  /** Take a payload of `length` bytes, now if it is all here, else in state EXT_PAYLOAD. */
  private extGather(tag: Buffer, what: PendingPayload, length: number): void {
    const r = this.reader;
    if (r.length >= length && !r.volatile && r.contiguous(length)) {
      this.onExtPayload(tag, what, r.take(length));
      return;
    }
    const buf = allocReplyBuffer(length);
    if (r.length >= length) {
      r.copyOut(buf, 0, length);
      this.onExtPayload(tag, what, buf);
      return;
    }
    this.wCookie = tag;
    this.xPending = what;
    this.wBuf = buf;
    this.wFilled = 0;
    this.state = 'EXT_PAYLOAD';
  }

  /** Consume a refused payload, then reply with the error (state EXT_DRAIN). */
  private extDrain(tag: Buffer, type: number, length: number, err: number, msg: string): void {
    this.wCookie = tag;
    this.xPending = { type, flags: 0, offset: 0 };
    this.wRemaining = length;
    this.wError = { err, msg };
    this.state = 'EXT_DRAIN';
  }

  /**
   * Input states EXT_PAYLOAD and EXT_DRAIN (called from the connection's pump). Returns false
   * when more bytes are needed.
   */
  protected pumpExtPayload(): boolean {
    const r = this.reader;
    if (this.state === 'EXT_PAYLOAD') {
      this.wFilled += r.copyOut(this.wBuf, this.wFilled, this.wBuf.length - this.wFilled);
      if (this.wFilled < this.wBuf.length) return false;
      this.state = 'EXT_REQUEST';
      const buf = this.wBuf;
      this.wBuf = EMPTY;
      this.onExtPayload(this.wCookie, this.xPending, buf);
      return true;
    }
    this.wRemaining -= r.skip(this.wRemaining);
    if (this.wRemaining > 0) return false;
    this.state = 'EXT_REQUEST';
    const e = this.wError!;
    this.wError = undefined;
    this.replyError(this.wCookie, this.xPending.type, e.err, e.msg);
    return true;
  }

  private onExtPayload(tag: Buffer, what: PendingPayload, payload: Buffer): void {
    if (what.type === NBD_CMD_WRITE) {
      this.startWrite(tag, what.flags, what.offset, payload);
      return;
    }
    // BLOCK_STATUS payload form: effect length, then the context ids to answer for.
    const length = readU64(payload, 0);
    const picked: SelectedContext[] = [];
    let bad: string | undefined;
    for (let o = 8; o < payload.length; o += 4) {
      const id = payload.readUInt32BE(o);
      const c = this.contexts.find((x) => x.id === id);
      if (!c || picked.includes(c)) {
        bad = `invalid or repeated context id ${id} in block status payload`;
        break;
      }
      picked.push(c);
    }
    if (isRecyclable(payload)) releaseReplyBuffer(payload);
    const offsetText = () => String(what.offset);
    if (bad === undefined && length < 0) bad = `operation past EOF; From: ${what.offset}, Len: huge, Size: ${this.size}`;
    bad ??= this.validate(NBD_CMD_BLOCK_STATUS, EXT_RULES[NBD_CMD_BLOCK_STATUS]!, what.flags, what.offset, offsetText, length);
    if (bad !== undefined) {
      this.replyError(tag, NBD_CMD_BLOCK_STATUS, NBD_EINVAL, bad);
      return;
    }
    this.startBlockStatus(tag, what.flags, what.offset, length, picked);
  }
}
