/**
 * Raw NBD client over a Unix socket for bad-input integration tests: it sends exact
 * bytes and reads exact replies, with no protocol smarts of its own.
 */
import net from 'node:net';
import {
  decodeOptionReply,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  NBD_EXTENDED_REPLY_MAGIC,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_FLAG_ERROR,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  type OptionReply,
} from '../../src/nbd/protocol.js';
import { encodeExtRequest } from '../../src/nbd/protocol-ext.js';
import { ByteStream } from './byte-stream.js';

export type RawReply =
  | { kind: 'simple'; error: number; cookie: Buffer }
  | { kind: 'chunk'; flags: number; type: number; cookie: Buffer; payload: Buffer }
  /** An extended reply chunk: `offset` echoes the request's, `length` is the header's u64. */
  | { kind: 'ext'; flags: number; type: number; cookie: Buffer; offset: bigint; length: bigint; payload: Buffer };

export class RawNbdClient {
  private readonly bytes: ByteStream;

  private constructor(readonly sock: net.Socket) {
    this.bytes = new ByteStream(sock);
  }

  /** The server has closed the connection. */
  get closed(): boolean {
    return this.bytes.closed;
  }

  static connect(path: string): Promise<RawNbdClient> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection(path);
      s.once('connect', () => resolve(new RawNbdClient(s)));
      s.once('error', reject);
    });
  }

  /** Read exactly n bytes; resolves undefined if the server closes first. */
  read(n: number): Promise<Buffer | undefined> {
    return this.bytes.read(n);
  }

  /** Resolves true once the server has closed the connection. */
  waitClosed(): Promise<boolean> {
    return this.bytes.waitClosed();
  }

  write(b: Buffer): void {
    this.sock.write(b);
  }

  async greeting(clientFlags = 3): Promise<Buffer | undefined> {
    const g = await this.read(18);
    const f = Buffer.alloc(4);
    f.writeUInt32BE(clientFlags >>> 0, 0);
    this.write(f);
    return g;
  }

  async optionReply(): Promise<OptionReply | undefined> {
    const h = await this.read(20);
    if (!h) return undefined;
    const len = h.readUInt32BE(16);
    const p = len > 0 ? await this.read(len) : Buffer.alloc(0);
    if (!p) return undefined;
    return decodeOptionReply(Buffer.concat([h, p]));
  }

  /** Send an option and collect replies up to the final ACK or error. */
  async option(opt: number, payload?: Buffer): Promise<OptionReply[]> {
    this.write(encodeOption(opt, payload));
    const out: OptionReply[] = [];
    for (;;) {
      const r = await this.optionReply();
      if (!r) return out;
      out.push(r);
      if (r.type === NBD_REP_ACK || (r.type & NBD_REP_FLAG_ERROR) !== 0) return out;
    }
  }

  /** Greeting, EXTENDED_HEADERS or STRUCTURED_REPLY (optional), SET_META_CONTEXT (optional), GO. */
  async handshake(
    name: string,
    o: { structured?: boolean; extended?: boolean; contexts?: string[] } = {},
  ): Promise<OptionReply[]> {
    await this.greeting();
    if (o.extended) {
      const r = await this.option(NBD_OPT_EXTENDED_HEADERS);
      if (r[0]?.type !== NBD_REP_ACK) throw new Error('NBD_OPT_EXTENDED_HEADERS refused');
    } else if (o.structured ?? true) await this.option(NBD_OPT_STRUCTURED_REPLY);
    if (o.contexts) await this.option(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest(name, o.contexts));
    return this.option(NBD_OPT_GO, encodeInfoRequest(name, [3]));
  }

  request(type: number, offset: number | bigint, length: number, flags = 0, cookie = 1n, data?: Buffer): void {
    const h = encodeRequest(type, flags, cookie, offset, length);
    this.write(data ? Buffer.concat([h, data]) : h);
  }

  /** An extended (32-byte) request; with `data`, NBD_CMD_FLAG_PAYLOAD_LEN is the caller's to set. */
  extRequest(
    type: number,
    offset: number | bigint,
    length: number | bigint,
    flags = 0,
    cookie = 1n,
    data?: Buffer,
  ): void {
    const h = encodeExtRequest(type, flags, cookie, offset, length);
    this.write(data ? Buffer.concat([h, data]) : h);
  }

  /** One simple reply (data not read), one structured chunk or one extended chunk. */
  async reply(): Promise<RawReply | undefined> {
    const m = await this.read(4);
    if (!m) return undefined;
    const magic = m.readUInt32BE(0);
    if (magic === NBD_SIMPLE_REPLY_MAGIC) {
      const r = await this.read(12);
      if (!r) return undefined;
      return { kind: 'simple', error: r.readUInt32BE(0), cookie: r.subarray(4, 12) };
    }
    if (magic === NBD_EXTENDED_REPLY_MAGIC) {
      // [4..5] flags  [6..7] type  [8..15] cookie  [16..23] offset  [24..31] length
      const h = await this.read(28);
      if (!h) return undefined;
      const len = h.readBigUInt64BE(20);
      if (len > 64n << 20n) throw new Error(`oversized extended reply length ${len}`);
      const p = len > 0n ? await this.read(Number(len)) : Buffer.alloc(0);
      if (!p) return undefined;
      return {
        kind: 'ext',
        flags: h.readUInt16BE(0),
        type: h.readUInt16BE(2),
        cookie: h.subarray(4, 12),
        offset: h.readBigUInt64BE(12),
        length: len,
        payload: p,
      };
    }
    if (magic !== NBD_STRUCTURED_REPLY_MAGIC) throw new Error(`bad reply magic ${magic.toString(16)}`);
    const h = await this.read(16);
    if (!h) return undefined;
    const len = h.readUInt32BE(12);
    const p = len > 0 ? await this.read(len) : Buffer.alloc(0);
    if (!p) return undefined;
    return { kind: 'chunk', flags: h.readUInt16BE(0), type: h.readUInt16BE(2), cookie: h.subarray(4, 12), payload: p };
  }

  /** Error number and message of an ERROR chunk or simple reply. */
  static errorOf(r: RawReply | undefined): { error: number; message: string } | undefined {
    if (!r) return undefined;
    if (r.kind === 'simple') return { error: r.error, message: '' };
    if (r.type !== 0x8001) return { error: 0, message: '' };
    const ml = r.payload.readUInt16BE(4);
    return { error: r.payload.readUInt32BE(0), message: r.payload.toString('utf8', 6, 6 + ml) };
  }

  close(): void {
    this.sock.destroy();
  }
}
