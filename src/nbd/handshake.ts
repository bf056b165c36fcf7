/**
 * Fixed-newstyle handshake as a pure state machine: it consumes decoded client input
 * (client flags, then one option at a time) and returns the bytes to send plus the
 * next state. The connection owns the socket and the framing; this module owns the
 * negotiation rules, with replies and messages matching qemu-storage-daemon 7.2.
 *
 * States:
 *   CLIENT_FLAGS --flags ok--> OPTIONS --GO ack / EXPORT_NAME--> TRANSMISSION
 *        |                       |  \--ABORT / protocol violation--> CLOSED
 *        \--unknown flag bits------------------------------------> CLOSED
 */
import { DaemonError } from '../util/errors.js';
import type {
  NbdBackend,
  NbdConnectionInfo,
  NbdExportHandle,
  NbdMetaContext,
  NbdSession,
} from './backend.js';
import {
  decodeInfoRequest,
  decodeMetaContextRequest,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
  NBD_FLAG_BLOCK_STATUS_PAYLOAD,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_ROTATIONAL,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_MAX_BUFFER_SIZE,
  NBD_MAX_OPTION_SIZE,
  NBD_MAX_STRING_SIZE,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_READ_ONLY,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_BLOCK_SIZE_REQD,
  NBD_REP_ERR_EXT_HEADER_REQD,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
} from './protocol.js';

export type HandshakeState = 'CLIENT_FLAGS' | 'OPTIONS' | 'TRANSMISSION' | 'CLOSED';

/** A metadata context selected by SET_META_CONTEXT, with the id sent to the client. */
export interface SelectedContext {
  id: number;
  context: NbdMetaContext;
}

/** What transmission needs once negotiation succeeded. */
export interface NegotiatedExport {
  exp: NbdExportHandle;
  session: NbdSession;
  structured: boolean;
  /**
   * NBD_OPT_EXTENDED_HEADERS was acknowledged: 32-byte requests and replies only (structured
   * replies are implied; `structured` stays as negotiated and is not consulted then).
   */
  extended: boolean;
  /** Transmission flags as sent to this client. */
  flags: number;
  /** The client sees the export read-only (the export is, or the client sent NBD_OPT_READ_ONLY). */
  readOnly: boolean;
  /** The client sent NBD_OPT_READ_ONLY (its writes fail with EPERM, not EINVAL). */
  readOnlyIntent: boolean;
  /** Selected contexts, in id order (empty: BLOCK_STATUS is refused). */
  contexts: SelectedContext[];
}

export interface HandshakeStep {
  out: Buffer[];
  state: HandshakeState;
  /** Why the connection closes (logged by the caller). */
  reason?: string;
  /** Set when state = TRANSMISSION. */
  negotiated?: NegotiatedExport;
  /** NBD_OPT_STARTTLS was ACKed: the TLS handshake starts right after `out` is sent. */
  startTls?: boolean;
}

/**
 * How the connection must deliver an option's payload: buffered for options we
 * parse, drained (skipped without buffering) for options whose payload we ignore or
 * refuse, or close the connection straight away (limits exceeded).
 */
export type PayloadMode = 'buffer' | 'drain' | 'close';

/** Options we parse: their payload is buffered up to this size, else refused. */
const MAX_PARSED_OPTION = 1024 * 1024;

/** Connection facts the handshake passes to `onConnect`. */
export type ConnectionFacts = Pick<NbdConnectionInfo, 'id' | 'clientAddress' | 'disconnect'>;

/** Option names as QEMU prints them in `option '<name>' has unexpected length`. */
const OPT_TEXT: Record<number, string> = {
  [NBD_OPT_LIST]: 'list',
  [NBD_OPT_STARTTLS]: 'starttls',
  [NBD_OPT_STRUCTURED_REPLY]: 'structured reply',
  [NBD_OPT_ABORT]: 'abort',
  [NBD_OPT_READ_ONLY]: 'read only',
  [NBD_OPT_EXTENDED_HEADERS]: 'extended headers',
};

/**
 * Transmission flags for `exp`, per connection (DF only with structured replies or extended
 * headers). `readOnly`: what this client sees (the export's mode, or read-only after
 * NBD_OPT_READ_ONLY). `statusPayload`: extended headers with meta contexts selected for `exp`
 * (NBD spec: NBD_FLAG_BLOCK_STATUS_PAYLOAD).
 */
export function transmissionFlags(
  exp: NbdExportHandle,
  structured: boolean,
  readOnly = exp.readOnly,
  statusPayload = false,
): number {
  let f = NBD_FLAG_HAS_FLAGS;
  if (readOnly) f |= NBD_FLAG_READ_ONLY;
  if (exp.canFlush) f |= NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
  if (exp.rotational) f |= NBD_FLAG_ROTATIONAL;
  if (!readOnly && exp.canTrim) f |= NBD_FLAG_SEND_TRIM;
  if (!readOnly && exp.canWriteZeroes) {
    f |= NBD_FLAG_SEND_WRITE_ZEROES;
    if (exp.canFastZero) f |= NBD_FLAG_SEND_FAST_ZERO;
  }
  if (structured) f |= NBD_FLAG_SEND_DF;
  if (exp.multiConn) f |= NBD_FLAG_CAN_MULTI_CONN;
  if (exp.canCache) f |= NBD_FLAG_SEND_CACHE;
  if (statusPayload) f |= NBD_FLAG_BLOCK_STATUS_PAYLOAD;
  return f;
}

/** Every context of an export, in provider order: the index is the context id (QEMU numbering). */
export function allContexts(exp: NbdExportHandle): NbdMetaContext[] {
  const out: NbdMetaContext[] = [];
  for (const p of exp.metaContexts) out.push(...p.listContexts('', false));
  return out;
}

function rep(option: number, type: number, payload?: Buffer): Buffer {
  return encodeOptionReply(option, type, payload);
}

function repErr(option: number, type: number, message: string): Buffer {
  let m = Buffer.from(message, 'utf8');
  if (m.length > NBD_MAX_STRING_SIZE) m = m.subarray(0, NBD_MAX_STRING_SIZE);
  return encodeOptionReply(option, type, m);
}

/** Reply type for a backend refusal of an export (see NbdBackend.openExport). */
function refusalType(err: DaemonError): number {
  switch (err.errno) {
    case 'ESHUTDOWN':
      return NBD_REP_ERR_SHUTDOWN;
    case 'EPERM':
    case 'EACCES':
      return NBD_REP_ERR_POLICY;
    default:
      return NBD_REP_ERR_UNKNOWN;
  }
}

const GREETING = encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);

export class Handshake {
  state: HandshakeState = 'CLIENT_FLAGS';
  private fixed = false;
  private noZeroes = false;
  private structured = false;
  /** NBD_OPT_EXTENDED_HEADERS was acknowledged (docs/nbd.md). */
  private extended = false;
  /** NBD_OPT_READ_ONLY was sent (blockd's experimental option, docs/nbd.md). */
  private readOnlyIntent = false;
  /** Export named by the last SET_META_CONTEXT, and what it selected. */
  private metaExport: string | undefined;
  private metaSelected: SelectedContext[] = [];

  /** TLS is required (FORCEDTLS) and has not started: only STARTTLS and ABORT are served. */
  private tlsPending: boolean;

  /** `tls`: the server has TLS credentials (NBD spec: TLS support, FORCEDTLS mode). */
  constructor(
    private readonly backend: NbdBackend,
    private readonly conn: ConnectionFacts,
    private readonly tls = false,
  ) {
    this.tlsPending = tls;
  }

  /** NBD spec: Newstyle negotiation; we always offer FIXED_NEWSTYLE and NO_ZEROES. */
  greeting(): Buffer {
    // Never modified after it is built, so every connection can send the same bytes.
    return GREETING;
  }

  onClientFlags(flags: number): HandshakeStep {
    if (this.state !== 'CLIENT_FLAGS') throw new Error('client flags out of order');
    if ((flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) !== 0) {
      return this.close(`unsupported client flags 0x${(flags >>> 0).toString(16)}`);
    }
    this.fixed = (flags & NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (flags & NBD_FLAG_C_NO_ZEROES) !== 0;
    this.state = 'OPTIONS';
    return { out: [], state: this.state };
  }

  /** Decide, from the option header alone, how its payload is delivered. */
  payloadMode(option: number, length: number): PayloadMode {
    if (length > NBD_MAX_OPTION_SIZE) return 'close';
    if (!this.fixed && option !== NBD_OPT_EXPORT_NAME) return 'close';
    // Before TLS every payload is skipped unread (QEMU: nbd_opt_drop).
    if (this.tlsPending) return this.fixed ? 'drain' : 'close';
    switch (option) {
      case NBD_OPT_EXPORT_NAME:
        return length > NBD_MAX_STRING_SIZE ? 'close' : 'buffer';
      case NBD_OPT_INFO:
      case NBD_OPT_GO:
      case NBD_OPT_LIST_META_CONTEXT:
      case NBD_OPT_SET_META_CONTEXT:
        return length > MAX_PARSED_OPTION ? 'drain' : 'buffer';
      default:
        return 'drain';
    }
  }

  /**
   * Handle one option. `payload` is the buffered payload, or undefined when it was
   * drained (then `length` says how long it was).
   */
  onOption(option: number, length: number, payload: Buffer | undefined): HandshakeStep {
    if (this.state !== 'OPTIONS') throw new Error('option out of order');
    if (!this.fixed && option !== NBD_OPT_EXPORT_NAME) {
      return this.close('non-fixed-newstyle client sent an option other than EXPORT_NAME');
    }
    if (this.tlsPending) return this.beforeTls(option, length);
    if (payload === undefined && length > 0 && this.payloadMode(option, length) === 'buffer') {
      throw new Error('payload expected');
    }
    if (
      payload === undefined &&
      (option === NBD_OPT_INFO ||
        option === NBD_OPT_GO ||
        option === NBD_OPT_LIST_META_CONTEXT ||
        option === NBD_OPT_SET_META_CONTEXT)
    ) {
      return this.reply(repErr(option, NBD_REP_ERR_TOO_BIG, 'option too long'));
    }
    switch (option) {
      case NBD_OPT_EXPORT_NAME:
        return this.optExportName(payload ?? Buffer.alloc(0));
      case NBD_OPT_ABORT:
        // NBD spec: always ACK, then the client (or we) close.
        this.state = 'CLOSED';
        return { out: [rep(option, NBD_REP_ACK)], state: 'CLOSED', reason: 'client sent NBD_OPT_ABORT' };
      case NBD_OPT_LIST:
        if (length !== 0) return this.unexpectedLength(option);
        return this.optList();
      case NBD_OPT_STARTTLS:
        if (length !== 0) return this.unexpectedLength(option);
        if (this.tls) return this.reply(repErr(option, NBD_REP_ERR_INVALID, 'TLS already enabled'));
        return this.reply(repErr(option, NBD_REP_ERR_POLICY, 'TLS not configured'));
      case NBD_OPT_READ_ONLY:
        // Experimental (docs/nbd.md): every export is read-only to this client from now on.
        if (length !== 0) return this.unexpectedLength(option);
        this.readOnlyIntent = true;
        return this.reply(rep(option, NBD_REP_ACK));
      case NBD_OPT_STRUCTURED_REPLY:
        if (length !== 0) return this.unexpectedLength(option);
        if (this.extended) {
          // NBD spec: extended headers take precedence; no downgrade to structured replies.
          return this.reply(repErr(option, NBD_REP_ERR_EXT_HEADER_REQD, 'extended headers already negotiated'));
        }
        if (this.structured) {
          return this.reply(repErr(option, NBD_REP_ERR_INVALID, 'structured reply already negotiated'));
        }
        this.structured = true;
        return this.reply(rep(option, NBD_REP_ACK));
      case NBD_OPT_EXTENDED_HEADERS:
        if (length !== 0) return this.unexpectedLength(option);
        if (this.extended) {
          return this.reply(repErr(option, NBD_REP_ERR_INVALID, 'extended headers already negotiated'));
        }
        this.extended = true;
        return this.reply(rep(option, NBD_REP_ACK));
      case NBD_OPT_INFO:
      case NBD_OPT_GO:
        return this.optInfoGo(option, payload ?? Buffer.alloc(0));
      case NBD_OPT_LIST_META_CONTEXT:
      case NBD_OPT_SET_META_CONTEXT:
        return this.optMetaContext(option, payload ?? Buffer.alloc(0));
      default:
        // Includes PEEK_EXPORT (withdrawn).
        return this.reply(repErr(option, NBD_REP_ERR_UNSUP, `Unsupported option ${option} (<unknown>)`));
    }
  }

  /**
   * An option before STARTTLS on a TLS server. NBD spec (FORCEDTLS): ERR_TLS_REQD for all but
   * STARTTLS and ABORT; EXPORT_NAME cannot fail, so it closes. QSD's messages; QSD also answers
   * ABORT with ERR_TLS_REQD, we follow the spec (ACK) since the connection closes either way.
   */
  private beforeTls(option: number, length: number): HandshakeStep {
    switch (option) {
      case NBD_OPT_STARTTLS:
        if (length !== 0) {
          // QEMU drops a client that cannot even start TLS correctly.
          return this.close('STARTTLS with a payload', [
            repErr(option, NBD_REP_ERR_INVALID, "option 'starttls' has unexpected length"),
          ]);
        }
        this.tlsPending = false;
        return { out: [rep(option, NBD_REP_ACK)], state: this.state, startTls: true };
      case NBD_OPT_ABORT:
        this.state = 'CLOSED';
        return { out: [rep(option, NBD_REP_ACK)], state: 'CLOSED', reason: 'client sent NBD_OPT_ABORT' };
      case NBD_OPT_EXPORT_NAME:
        return this.close('Option 0x1 not permitted before TLS');
      default:
        return this.reply(
          repErr(option, NBD_REP_ERR_TLS_REQD, `Option 0x${(option >>> 0).toString(16)} not permitted before TLS`),
        );
    }
  }

  private reply(...out: Buffer[]): HandshakeStep {
    return { out, state: this.state };
  }

  private close(reason: string, out: Buffer[] = []): HandshakeStep {
    this.state = 'CLOSED';
    return { out, state: 'CLOSED', reason };
  }

  private unexpectedLength(option: number): HandshakeStep {
    return this.reply(
      repErr(option, NBD_REP_ERR_INVALID, `option '${OPT_TEXT[option] ?? option}' has unexpected length`),
    );
  }

  private lookup(name: string): NbdExportHandle | DaemonError {
    try {
      return this.backend.openExport(name);
    } catch (e) {
      if (e instanceof DaemonError) return e;
      throw e;
    }
  }

  private optList(): HandshakeStep {
    const out: Buffer[] = [];
    for (const e of this.backend.listExports()) {
      out.push(rep(NBD_OPT_LIST, NBD_REP_SERVER, encodeRepServer(e.name, e.description ?? '')));
    }
    out.push(rep(NBD_OPT_LIST, NBD_REP_ACK));
    return this.reply(...out);
  }

  /** Flags this client is (or would be) given for `exp`. */
  private flagsFor(exp: NbdExportHandle, readOnly: boolean): number {
    const statusPayload = this.extended && this.metaExport === exp.name && this.metaSelected.length > 0;
    return transmissionFlags(exp, this.structured || this.extended, readOnly, statusPayload);
  }

  /** Enter transmission with `exp`; returns an error message when the export layer refuses. */
  private connect(exp: NbdExportHandle): NegotiatedExport | DaemonError {
    const contexts = this.metaExport === exp.name ? this.metaSelected : [];
    const c = this.conn;
    const readOnly = exp.readOnly || this.readOnlyIntent;
    const res = exp.onConnect({
      id: c.id,
      clientAddress: c.clientAddress,
      disconnect: c.disconnect,
      exportName: exp.name,
      readOnly,
    });
    if (res instanceof DaemonError) return res;
    return {
      exp,
      session: res,
      structured: this.structured,
      extended: this.extended,
      flags: this.flagsFor(exp, readOnly),
      readOnly,
      readOnlyIntent: this.readOnlyIntent,
      contexts,
    };
  }

  private optExportName(payload: Buffer): HandshakeStep {
    const name = payload.toString('utf8');
    // NBD spec: a client that negotiated extended headers MUST NOT use EXPORT_NAME, which has no
    // error reply (QEMU closes too).
    if (this.extended) return this.close('NBD_OPT_EXPORT_NAME after extended headers were negotiated');
    const exp = this.lookup(name);
    // NBD spec: EXPORT_NAME has no error reply; the only way to refuse is to close.
    if (exp instanceof DaemonError) return this.close(`export '${name}' refused: ${exp.message}`);
    const neg = this.connect(exp);
    if (neg instanceof DaemonError) return this.close(`export '${name}' refused: ${neg.message}`);
    this.state = 'TRANSMISSION';
    return {
      out: [encodeExportNameReply(exp.size, neg.flags, this.noZeroes)],
      state: 'TRANSMISSION',
      negotiated: neg,
    };
  }

  private optInfoGo(option: number, payload: Buffer): HandshakeStep {
    const req = decodeInfoRequest(payload);
    if ('error' in req) return this.reply(repErr(option, NBD_REP_ERR_INVALID, req.error));
    const exp = this.lookup(req.name);
    if (exp instanceof DaemonError) return this.reply(repErr(option, refusalType(exp), exp.message));

    const sendName = req.infos.includes(NBD_INFO_NAME);
    const askedBlockSize = req.infos.includes(NBD_INFO_BLOCK_SIZE);
    let neg: NegotiatedExport | undefined;
    if (option === NBD_OPT_GO) {
      const r = this.connect(exp);
      if (r instanceof DaemonError) return this.reply(repErr(option, refusalType(r), r.message));
      neg = r;
    }

    // QSD order: NAME (if asked), DESCRIPTION (if any), BLOCK_SIZE, EXPORT, ACK.
    const out: Buffer[] = [];
    if (sendName) out.push(rep(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_NAME, exp.name)));
    if (exp.description) {
      out.push(rep(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_DESCRIPTION, exp.description)));
    }
    const bs = exp.blockSizes;
    // A client that did not ask for BLOCK_SIZE is told minimum 1 (QEMU does the same
    // and then tolerates unaligned requests from it).
    const min = askedBlockSize ? bs.minimum : 1;
    const pref = Math.max(bs.preferred, min);
    const max = Math.min(bs.maximum, NBD_MAX_BUFFER_SIZE);
    out.push(rep(option, NBD_REP_INFO, encodeInfoBlockSize(min, pref, max)));
    const flags = neg ? neg.flags : this.flagsFor(exp, exp.readOnly || this.readOnlyIntent);
    out.push(rep(option, NBD_REP_INFO, encodeInfoExport(exp.size, flags)));

    if (option === NBD_OPT_INFO && !askedBlockSize && bs.minimum > 1) {
      out.push(
        repErr(option, NBD_REP_ERR_BLOCK_SIZE_REQD, 'request NBD_INFO_BLOCK_SIZE to use this export'),
      );
      return this.reply(...out);
    }
    out.push(rep(option, NBD_REP_ACK));
    if (neg) {
      this.state = 'TRANSMISSION';
      return { out, state: 'TRANSMISSION', negotiated: neg };
    }
    return this.reply(...out);
  }

  private optMetaContext(option: number, payload: Buffer): HandshakeStep {
    const isSet = option === NBD_OPT_SET_META_CONTEXT;
    if (isSet) {
      // NBD spec: SET replaces the previous selection even when it fails.
      this.metaExport = undefined;
      this.metaSelected = [];
      if (!this.structured && !this.extended) {
        return this.reply(
          repErr(
            option,
            NBD_REP_ERR_INVALID,
            "request option 'set meta context' when structured reply is not negotiated",
          ),
        );
      }
    }
    const req = decodeMetaContextRequest(payload, isSet ? 'set' : 'list');
    if ('error' in req) return this.reply(repErr(option, NBD_REP_ERR_INVALID, req.error));
    const exp = this.lookup(req.name);
    if (exp instanceof DaemonError) return this.reply(repErr(option, refusalType(exp), exp.message));

    const all = allContexts(exp);
    const picked = new Set<NbdMetaContext>();
    if (req.queries.length === 0) {
      // LIST with no query lists everything; SET with no query selects nothing.
      if (!isSet) for (const c of all) picked.add(c);
    } else {
      for (const q of req.queries) {
        const colon = q.indexOf(':');
        if (colon <= 0) continue; // not namespace:leaf -> ignored, like QSD
        const ns = q.slice(0, colon);
        for (const p of exp.metaContexts) {
          if (p.namespace !== ns) continue;
          for (const c of p.listContexts(q, isSet)) picked.add(c);
        }
      }
    }
    const selected: SelectedContext[] = [];
    for (const c of picked) {
      const id = all.findIndex((x) => x.name === c.name);
      if (id >= 0) selected.push({ id, context: all[id]! });
    }
    selected.sort((a, b) => a.id - b.id);
    const out = selected.map((s) =>
      rep(option, NBD_REP_META_CONTEXT, encodeRepMetaContext(isSet ? s.id : 0, s.context.name)),
    );
    out.push(rep(option, NBD_REP_ACK));
    if (isSet) {
      this.metaExport = exp.name;
      this.metaSelected = selected;
    }
    return this.reply(...out);
  }
}
