/**
 * Client side of the fixed-newstyle handshake (NBD spec: Handshake). The steps, in order:
 *
 *   greeting -> client flags -> [NBD_OPT_READ_ONLY]
 *     -> [NBD_OPT_EXTENDED_HEADERS] (refused: NBD_OPT_STRUCTURED_REPLY)
 *     -> [NBD_OPT_SET_META_CONTEXT] -> NBD_OPT_GO (fallback NBD_OPT_EXPORT_NAME) -> transmission
 *
 * Every length the server sends is bounded before anything is buffered; a reply that breaks the
 * protocol fails the negotiation with NBD_SERVER_PROTOCOL and the caller closes the socket.
 */
import type { ConnectionOptions } from 'node:tls';
import { NbdError } from '../../util/errors.js';
import {
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT,
  NBD_MAGIC,
  NBD_MAX_BUFFER_SIZE,
  NBD_MAX_STRING_SIZE,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_READ_ONLY,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_OPTS_MAGIC,
  NBD_REP_ACK,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_FLAG_ERROR,
  NBD_REP_INFO,
  NBD_REP_MAGIC,
  NBD_REP_META_CONTEXT,
  optName,
  repName,
} from '../protocol.js';
import { serverProtocolError, type ClientWire } from './wire.js';

/** What the client asks for. */
export interface NegotiateOptions {
  exportName: string;
  /** Send NBD_OPT_READ_ONLY (blockd's experimental option; other servers answer UNSUP). */
  readOnlyIntent: boolean;
  /** Metadata contexts to select (e.g. `base:allocation`); empty = none. */
  metaContexts: readonly string[];
  /** Ask for NBD_OPT_EXTENDED_HEADERS (servers without it answer UNSUP: compact headers). */
  extendedHeaders: boolean;
  /** Start TLS first (NBD_OPT_STARTTLS), with these Node TLS client options. */
  tls?: ConnectionOptions | undefined;
}

/** What the server granted. */
export interface NegotiatedInfo {
  size: number;
  /** Transmission flags. */
  flags: number;
  /** Structured replies (also true with extended headers, which imply them). */
  structured: boolean;
  /** Extended headers: 32-byte requests and replies, 64-bit lengths. */
  extended: boolean;
  minBlock: number;
  prefBlock: number;
  maxBlock: number;
  /** Selected context name -> id. */
  contexts: Map<string, number>;
  /** The server accepted NBD_OPT_READ_ONLY. */
  readOnlyAcked: boolean;
}

/** Longest option reply payload we buffer (INFO/META_CONTEXT carry at most a 4 KiB string). */
const MAX_OPTION_REPLY = 64 * 1024;

interface Reply {
  type: number;
  payload: Buffer;
}

async function readReply(wire: ClientWire, option: number): Promise<Reply> {
  // [0..7] NBD_REP_MAGIC  [8..11] option  [12..15] type  [16..19] length
  const h = await wire.read(20);
  if (h.readBigUInt64BE(0) !== NBD_REP_MAGIC) throw serverProtocolError('Bad option reply magic from the NBD server');
  const echoed = h.readUInt32BE(8);
  if (echoed !== option) {
    throw serverProtocolError(`NBD server replied to ${optName(echoed)} while ${optName(option)} was asked`);
  }
  const type = h.readUInt32BE(12);
  const len = h.readUInt32BE(16);
  if (len > MAX_OPTION_REPLY) {
    throw serverProtocolError(`NBD server sent an oversized ${repName(type)} reply (${len} bytes) to ${optName(option)}`);
  }
  return { type, payload: len > 0 ? await wire.read(len) : Buffer.alloc(0) };
}

/** The error text a failed option carries (the server's message, if any). */
function errorText(r: Reply): string {
  return r.payload.toString('utf8', 0, Math.min(r.payload.length, NBD_MAX_STRING_SIZE));
}

function negotiationError(message: string): NbdError {
  return new NbdError('NBD_NEGOTIATION', 'EINVAL', message, true);
}

/** An option either acknowledged (true) or refused as unsupported (false); anything else fails. */
async function simpleOption(wire: ClientWire, option: number): Promise<boolean> {
  wire.write(encodeOption(option));
  const r = await readReply(wire, option);
  if (r.type === NBD_REP_ACK) {
    if (r.payload.length !== 0) throw serverProtocolError(`NBD server sent a payload with the ACK of ${optName(option)}`);
    return true;
  }
  // Refused, TLS_REQD included: like QEMU's client, go on; NBD_OPT_GO reports TLS_REQD.
  if (r.type & NBD_REP_FLAG_ERROR) return false;
  throw serverProtocolError(`Unexpected ${repName(r.type)} reply to ${optName(option)}`);
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/**
 * NBD spec: TLS support. STARTTLS before anything else, as QEMU's client does; any refusal is
 * fatal (QEMU's wording), an ACK is followed by the TLS handshake on the same socket.
 */
async function startTls(wire: ClientWire, options: ConnectionOptions): Promise<void> {
  wire.write(encodeOption(NBD_OPT_STARTTLS));
  const r = await readReply(wire, NBD_OPT_STARTTLS);
  if (r.type === NBD_REP_ACK) {
    if (r.payload.length !== 0) throw serverProtocolError('NBD server sent a payload with the ACK of NBD_OPT_STARTTLS');
    await wire.startTls(options);
    return;
  }
  // QEMU's text; the server's own message is only a hint there (not in QMP replies).
  if (r.type & NBD_REP_FLAG_ERROR) throw negotiationError('Denied by server for option 5 (starttls)');
  throw serverProtocolError(`Unexpected ${repName(r.type)} reply to NBD_OPT_STARTTLS`);
}

/** Run the handshake on a freshly connected `wire`. */
export async function negotiate(wire: ClientWire, opts: NegotiateOptions): Promise<NegotiatedInfo> {
  // Greeting: [0..7] NBDMAGIC  [8..15] IHAVEOPT  [16..17] handshake flags
  const g = await wire.read(18);
  if (g.readBigUInt64BE(0) !== NBD_MAGIC) throw serverProtocolError('Bad NBD magic from the server');
  if (g.readBigUInt64BE(8) !== NBD_OPTS_MAGIC) throw negotiationError('Server does not support the NBD newstyle protocol');
  const hflags = g.readUInt16BE(16);
  if (!(hflags & NBD_FLAG_FIXED_NEWSTYLE)) throw negotiationError('Server does not support the fixed newstyle protocol');
  const noZeroes = (hflags & NBD_FLAG_NO_ZEROES) !== 0;
  const cflags = Buffer.allocUnsafe(4);
  cflags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0), 0);
  wire.write(cflags);
  if (opts.tls !== undefined) await startTls(wire, opts.tls);

  const readOnlyAcked = opts.readOnlyIntent ? await simpleOption(wire, NBD_OPT_READ_ONLY) : false;
  // Extended headers imply structured replies; a server without them (QEMU 7.2, libnbd-era
  // servers) answers UNSUP and the compact protocol follows, exactly as before.
  const extended = opts.extendedHeaders ? await simpleOption(wire, NBD_OPT_EXTENDED_HEADERS) : false;
  const structured = extended || (await simpleOption(wire, NBD_OPT_STRUCTURED_REPLY));

  const contexts = new Map<string, number>();
  if (structured && opts.metaContexts.length > 0) {
    wire.write(encodeOption(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest(opts.exportName, opts.metaContexts)));
    for (;;) {
      const r = await readReply(wire, NBD_OPT_SET_META_CONTEXT);
      if (r.type === NBD_REP_ACK) break;
      if (r.type === NBD_REP_META_CONTEXT) {
        // [0..3] context id  [4..] name
        if (r.payload.length < 5 || r.payload.length > 4 + NBD_MAX_STRING_SIZE) {
          throw serverProtocolError('Bad NBD_REP_META_CONTEXT length from the NBD server');
        }
        const name = r.payload.toString('utf8', 4);
        if (!opts.metaContexts.includes(name)) {
          throw serverProtocolError(`NBD server selected the context '${name}', which was not asked for`);
        }
        contexts.set(name, r.payload.readUInt32BE(0));
        continue;
      }
      if (r.type & NBD_REP_FLAG_ERROR) {
        // Unknown export: GO below reports it. Other refusals just mean no contexts.
        contexts.clear();
        break;
      }
      throw serverProtocolError(`Unexpected ${repName(r.type)} reply to NBD_OPT_SET_META_CONTEXT`);
    }
  }

  wire.write(encodeOption(NBD_OPT_GO, encodeInfoRequest(opts.exportName, [NBD_INFO_BLOCK_SIZE])));
  let size = -1;
  let flags = 0;
  let minBlock = 1;
  let prefBlock = 4096;
  let maxBlock = NBD_MAX_BUFFER_SIZE;
  for (;;) {
    const r = await readReply(wire, NBD_OPT_GO);
    if (r.type === NBD_REP_INFO) {
      const p = r.payload;
      if (p.length < 2) throw serverProtocolError('Short NBD_REP_INFO from the NBD server');
      const info = p.readUInt16BE(0);
      if (info === NBD_INFO_EXPORT) {
        // [0..1] type  [2..9] size  [10..11] transmission flags
        if (p.length !== 12) throw serverProtocolError('Bad NBD_INFO_EXPORT length from the NBD server');
        const big = p.readBigUInt64BE(2);
        if (big > BigInt(Number.MAX_SAFE_INTEGER)) throw serverProtocolError(`NBD export size ${big} is too large`);
        size = Number(big);
        flags = p.readUInt16BE(10);
      } else if (info === NBD_INFO_BLOCK_SIZE) {
        // [0..1] type  [2..5] minimum  [6..9] preferred  [10..13] maximum
        if (p.length !== 14) throw serverProtocolError('Bad NBD_INFO_BLOCK_SIZE length from the NBD server');
        minBlock = p.readUInt32BE(2);
        prefBlock = p.readUInt32BE(6);
        maxBlock = p.readUInt32BE(10);
        if (!isPowerOfTwo(minBlock) || minBlock > 65536) throw serverProtocolError(`Bad NBD minimum block size ${minBlock}`);
        if (!isPowerOfTwo(prefBlock) || prefBlock < minBlock) throw serverProtocolError(`Bad NBD preferred block size ${prefBlock}`);
        if (maxBlock < minBlock || (maxBlock !== 0xffffffff && maxBlock % minBlock !== 0)) {
          throw serverProtocolError(`Bad NBD maximum block size ${maxBlock}`);
        }
      }
      continue;
    }
    if (r.type === NBD_REP_ACK) {
      if (size < 0) throw serverProtocolError('NBD server finished NBD_OPT_GO without NBD_INFO_EXPORT');
      break;
    }
    if (r.type === NBD_REP_ERR_UNSUP) {
      // NBD spec: a server that acknowledged extended headers must support GO.
      if (extended) throw serverProtocolError('NBD server refused NBD_OPT_GO after acknowledging extended headers');
      return exportNameFallback(wire, opts, noZeroes, { structured, extended, contexts, readOnlyAcked });
    }
    if (r.type === NBD_REP_ERR_UNKNOWN) throw negotiationError('Requested export not available');
    if (r.type === NBD_REP_ERR_TLS_REQD) throw negotiationError('TLS negotiation required before option 7 (go)');
    if (r.type === NBD_REP_ERR_POLICY) {
      const why = errorText(r);
      throw negotiationError(`The NBD server refused the export${why ? `: ${why}` : ''}`);
    }
    if (r.type & NBD_REP_FLAG_ERROR) {
      const why = errorText(r);
      throw negotiationError(`Requested export not available${why ? `: ${why}` : ''}`);
    }
    throw serverProtocolError(`Unexpected ${repName(r.type)} reply to NBD_OPT_GO`);
  }
  if (!(flags & NBD_FLAG_HAS_FLAGS)) throw serverProtocolError('NBD server sent transmission flags without HAS_FLAGS');
  return {
    size,
    flags,
    structured,
    extended,
    minBlock,
    prefBlock,
    maxBlock: Math.min(maxBlock, NBD_MAX_BUFFER_SIZE),
    contexts,
    readOnlyAcked,
  };
}

/** Old servers without NBD_OPT_GO: NBD_OPT_EXPORT_NAME has no error path, only a close. */
async function exportNameFallback(
  wire: ClientWire,
  opts: NegotiateOptions,
  noZeroes: boolean,
  granted: Pick<NegotiatedInfo, 'structured' | 'extended' | 'contexts' | 'readOnlyAcked'>,
): Promise<NegotiatedInfo> {
  wire.write(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from(opts.exportName, 'utf8')));
  // [0..7] size  [8..9] transmission flags  [10..133] zeroes unless NO_ZEROES
  const r = await wire.read(noZeroes ? 10 : 134).catch(() => {
    throw negotiationError('Requested export not available');
  });
  const big = r.readBigUInt64BE(0);
  if (big > BigInt(Number.MAX_SAFE_INTEGER)) throw serverProtocolError(`NBD export size ${big} is too large`);
  return {
    size: Number(big),
    flags: r.readUInt16BE(8),
    minBlock: 1,
    prefBlock: 4096,
    maxBlock: NBD_MAX_BUFFER_SIZE,
    ...granted,
  };
}
