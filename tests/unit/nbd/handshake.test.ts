import { describe, expect, it } from 'vitest';
import { Handshake } from '../../../src/nbd/handshake.js';
import {
  decodeOptionReply,
  encodeInfoRequest,
  encodeMetaContextRequest,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_BLOCK_SIZE_REQD,
  NBD_REP_ERR_EXT_HEADER_REQD,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
} from '../../../src/nbd/protocol.js';
import { MemoryBackend } from '../../helpers/nbd-memory-backend.js';
import { DaemonError } from '../../../src/util/errors.js';

function setup() {
  const backend = new MemoryBackend([
    { name: 'n', size: 1 << 20, dirtyBitmap: 'b0' },
    { name: 'ro', size: 1 << 20, readOnly: true, description: 'a ro' },
  ]);
  const hs = new Handshake(backend, { id: 1, clientAddress: 'unix', disconnect: () => undefined });
  return { backend, hs };
}

function replies(out: Buffer[]) {
  return out.map((b) => {
    const r = decodeOptionReply(b)!;
    return { type: r.type, text: r.payload.toString('latin1') };
  });
}

function ready() {
  const s = setup();
  expect(s.hs.onClientFlags(3).state).toBe('OPTIONS');
  return s;
}

describe('NBD handshake state machine', () => {
  it('closes on unknown client flags', () => {
    const { hs } = setup();
    expect(hs.onClientFlags(7).state).toBe('CLOSED');
  });

  it('closes when a non-fixed client sends anything but EXPORT_NAME', () => {
    const { hs } = setup();
    hs.onClientFlags(0);
    expect(hs.payloadMode(NBD_OPT_LIST, 0)).toBe('close');
    expect(hs.onOption(NBD_OPT_LIST, 0, undefined).state).toBe('CLOSED');
  });

  it('answers unknown options with ERR_UNSUP', () => {
    const { hs } = ready();
    expect(replies(hs.onOption(99, 3, undefined).out)).toEqual([
      { type: NBD_REP_ERR_UNSUP, text: 'Unsupported option 99 (<unknown>)' },
    ]);
  });

  it('acknowledges EXTENDED_HEADERS once, refuses a repeat, a payload and a later STRUCTURED_REPLY', () => {
    const { hs } = ready();
    expect(replies(hs.onOption(NBD_OPT_EXTENDED_HEADERS, 1, undefined).out)).toEqual([
      { type: NBD_REP_ERR_INVALID, text: "option 'extended headers' has unexpected length" },
    ]);
    expect(replies(hs.onOption(NBD_OPT_EXTENDED_HEADERS, 0, undefined).out)).toEqual([{ type: NBD_REP_ACK, text: '' }]);
    expect(replies(hs.onOption(NBD_OPT_EXTENDED_HEADERS, 0, undefined).out)).toEqual([
      { type: NBD_REP_ERR_INVALID, text: 'extended headers already negotiated' },
    ]);
    expect(replies(hs.onOption(NBD_OPT_STRUCTURED_REPLY, 0, undefined).out)).toEqual([
      { type: NBD_REP_ERR_EXT_HEADER_REQD, text: 'extended headers already negotiated' },
    ]);
  });

  it('accepts EXTENDED_HEADERS after STRUCTURED_REPLY', () => {
    const { hs } = ready();
    hs.onOption(NBD_OPT_STRUCTURED_REPLY, 0, undefined);
    expect(replies(hs.onOption(NBD_OPT_EXTENDED_HEADERS, 0, undefined).out)[0]?.type).toBe(NBD_REP_ACK);
  });

  it('with extended headers: SET_META_CONTEXT works, GO enters transmission extended with BLOCK_STATUS_PAYLOAD', () => {
    const { hs } = ready();
    hs.onOption(NBD_OPT_EXTENDED_HEADERS, 0, undefined);
    const m = encodeMetaContextRequest('n', ['base:allocation']);
    expect(replies(hs.onOption(NBD_OPT_SET_META_CONTEXT, m.length, m).out).map((r) => r.type)).toEqual([
      NBD_REP_META_CONTEXT,
      NBD_REP_ACK,
    ]);
    const p = encodeInfoRequest('n', [NBD_INFO_BLOCK_SIZE]);
    const step = hs.onOption(NBD_OPT_GO, p.length, p);
    expect(step.state).toBe('TRANSMISSION');
    expect(step.negotiated?.extended).toBe(true);
    // HAS_FLAGS ... SEND_DF (bit 7) and BLOCK_STATUS_PAYLOAD (bit 12)
    expect(step.negotiated!.flags & (1 << 7)).toBe(1 << 7);
    expect(step.negotiated!.flags & (1 << 12)).toBe(1 << 12);
  });

  it('does not advertise BLOCK_STATUS_PAYLOAD without extended headers or without contexts', () => {
    const a = ready();
    a.hs.onOption(NBD_OPT_STRUCTURED_REPLY, 0, undefined);
    const m = encodeMetaContextRequest('n', ['base:allocation']);
    a.hs.onOption(NBD_OPT_SET_META_CONTEXT, m.length, m);
    const p = encodeInfoRequest('n', []);
    expect(a.hs.onOption(NBD_OPT_GO, p.length, p).negotiated!.flags & (1 << 12)).toBe(0);
    const b = ready();
    b.hs.onOption(NBD_OPT_EXTENDED_HEADERS, 0, undefined);
    const step = b.hs.onOption(NBD_OPT_GO, p.length, p);
    expect(step.negotiated!.extended).toBe(true);
    expect(step.negotiated!.flags & (1 << 12)).toBe(0);
  });

  it('closes on EXPORT_NAME after extended headers (it has no error reply)', () => {
    const { hs } = ready();
    hs.onOption(NBD_OPT_EXTENDED_HEADERS, 0, undefined);
    const n = Buffer.from('n');
    expect(hs.onOption(NBD_OPT_EXPORT_NAME, n.length, n).state).toBe('CLOSED');
  });

  it('refuses STARTTLS with ERR_POLICY when TLS is not configured', () => {
    const { hs } = ready();
    expect(replies(hs.onOption(NBD_OPT_STARTTLS, 0, undefined).out)).toEqual([
      { type: NBD_REP_ERR_POLICY, text: 'TLS not configured' },
    ]);
  });

  it('accepts STRUCTURED_REPLY once and refuses a repeat', () => {
    const { hs } = ready();
    expect(replies(hs.onOption(NBD_OPT_STRUCTURED_REPLY, 0, undefined).out)[0]?.type).toBe(NBD_REP_ACK);
    expect(replies(hs.onOption(NBD_OPT_STRUCTURED_REPLY, 0, undefined).out)).toEqual([
      { type: NBD_REP_ERR_INVALID, text: 'structured reply already negotiated' },
    ]);
  });

  it('lists exports with their descriptions', () => {
    const { hs } = ready();
    const r = replies(hs.onOption(NBD_OPT_LIST, 0, undefined).out);
    expect(r.map((x) => x.type)).toEqual([NBD_REP_SERVER, NBD_REP_SERVER, NBD_REP_ACK]);
    expect(r[1]?.text).toBe('\0\0\0\x02roa ro');
  });

  it('refuses LIST with a payload', () => {
    const { hs } = ready();
    expect(replies(hs.onOption(NBD_OPT_LIST, 1, undefined).out)).toEqual([
      { type: NBD_REP_ERR_INVALID, text: "option 'list' has unexpected length" },
    ]);
  });

  it('answers INFO in QSD order: name, description, block size, export, ack', () => {
    const { hs } = ready();
    const p = encodeInfoRequest('ro', [NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE]);
    const out = hs.onOption(NBD_OPT_INFO, p.length, p).out.map((b) => decodeOptionReply(b)!);
    expect(out.map((r) => (r.type === NBD_REP_INFO ? r.payload.readUInt16BE(0) : r.type))).toEqual([1, 2, 3, 0, NBD_REP_ACK]);
    expect(out[3]!.payload.readUInt16BE(10)).toBe(0x050f);
    expect(hs.state).toBe('OPTIONS');
  });

  it('answers ERR_UNKNOWN for a missing export', () => {
    const { hs } = ready();
    const p = encodeInfoRequest('zz');
    expect(replies(hs.onOption(NBD_OPT_GO, p.length, p).out)).toEqual([
      { type: NBD_REP_ERR_UNKNOWN, text: "export 'zz' not present" },
    ]);
  });

  it('sends ERR_BLOCK_SIZE_REQD for INFO without BLOCK_SIZE on an aligned export', () => {
    const { hs, backend } = ready();
    backend.add({ name: 'al', size: 1 << 20, blockSizes: { minimum: 512, preferred: 4096, maximum: 1 << 25 } });
    const p = encodeInfoRequest('al');
    const r = replies(hs.onOption(NBD_OPT_INFO, p.length, p).out);
    expect(r[r.length - 1]?.type).toBe(NBD_REP_ERR_BLOCK_SIZE_REQD);
  });

  it('enters transmission on GO with DF set once structured replies are on', () => {
    const { hs } = ready();
    hs.onOption(NBD_OPT_STRUCTURED_REPLY, 0, undefined);
    const p = encodeInfoRequest('n');
    const step = hs.onOption(NBD_OPT_GO, p.length, p);
    expect(step.state).toBe('TRANSMISSION');
    expect(step.negotiated?.flags).toBe(0x0ded);
  });

  it('refuses SET_META_CONTEXT before structured replies', () => {
    const { hs } = ready();
    const p = encodeMetaContextRequest('n', ['base:allocation']);
    expect(replies(hs.onOption(NBD_OPT_SET_META_CONTEXT, p.length, p).out)).toEqual([
      {
        type: NBD_REP_ERR_INVALID,
        text: "request option 'set meta context' when structured reply is not negotiated",
      },
    ]);
  });

  it('lists every context for a LIST with no queries, with id 0', () => {
    const { hs } = ready();
    const p = encodeMetaContextRequest('n', []);
    const r = replies(hs.onOption(NBD_OPT_LIST_META_CONTEXT, p.length, p).out);
    expect(r).toEqual([
      { type: NBD_REP_META_CONTEXT, text: '\0\0\0\0base:allocation' },
      { type: NBD_REP_META_CONTEXT, text: '\0\0\0\0qemu:dirty-bitmap:b0' },
      { type: NBD_REP_ACK, text: '' },
    ]);
  });

  it('selects several contexts at once with QEMU ids and ignores namespace-only queries', () => {
    const { hs } = ready();
    hs.onOption(NBD_OPT_STRUCTURED_REPLY, 0, undefined);
    const p = encodeMetaContextRequest('n', ['qemu:dirty-bitmap:b0', 'base:', 'base:allocation', 'foo', 'x:y']);
    const r = replies(hs.onOption(NBD_OPT_SET_META_CONTEXT, p.length, p).out);
    expect(r).toEqual([
      { type: NBD_REP_META_CONTEXT, text: '\0\0\0\0base:allocation' },
      { type: NBD_REP_META_CONTEXT, text: '\0\0\0\x01qemu:dirty-bitmap:b0' },
      { type: NBD_REP_ACK, text: '' },
    ]);
    const g = encodeInfoRequest('n');
    expect(hs.onOption(NBD_OPT_GO, g.length, g).negotiated?.contexts.map((c) => c.id)).toEqual([0, 1]);
  });

  it('drops selected contexts when GO picks another export', () => {
    const { hs } = ready();
    hs.onOption(NBD_OPT_STRUCTURED_REPLY, 0, undefined);
    const p = encodeMetaContextRequest('ro', ['base:allocation']);
    hs.onOption(NBD_OPT_SET_META_CONTEXT, p.length, p);
    const g = encodeInfoRequest('n');
    expect(hs.onOption(NBD_OPT_GO, g.length, g).negotiated?.contexts).toEqual([]);
  });

  it('closes on EXPORT_NAME of an unknown export', () => {
    const { hs } = ready();
    expect(hs.onOption(NBD_OPT_EXPORT_NAME, 2, Buffer.from('zz')).state).toBe('CLOSED');
  });

  it('answers EXPORT_NAME without padding when NO_ZEROES was agreed', () => {
    const { hs } = ready();
    const step = hs.onOption(NBD_OPT_EXPORT_NAME, 1, Buffer.from('n'));
    expect(step.state).toBe('TRANSMISSION');
    expect(step.out[0]?.toString('hex')).toBe('00000000001000000d6d');
  });

  it('lets the export layer refuse a client on GO', () => {
    const { hs, backend } = ready();
    backend.get('n').refuseNew = new DaemonError('GONE', "export 'n' is being deleted", { errno: 'ESHUTDOWN' });
    const g = encodeInfoRequest('n');
    const r = replies(hs.onOption(NBD_OPT_GO, g.length, g).out);
    expect(r).toEqual([{ type: 0x80000007, text: "export 'n' is being deleted" }]);
  });

  it('acks ABORT and closes', () => {
    const { hs } = ready();
    const step = hs.onOption(NBD_OPT_ABORT, 0, undefined);
    expect(step.state).toBe('CLOSED');
    expect(replies(step.out)[0]?.type).toBe(NBD_REP_ACK);
  });

  it('closes on options longer than 32 MiB', () => {
    const { hs } = ready();
    expect(hs.payloadMode(99, 32 * 1024 * 1024 + 1)).toBe('close');
    expect(hs.payloadMode(99, 32 * 1024 * 1024)).toBe('drain');
  });
});
