/**
 * The handshake state machine of a TLS server (NBD spec: TLS support, FORCEDTLS), driven
 * option by option: what is refused before STARTTLS, how STARTTLS is answered, and that
 * negotiation after it is the ordinary one.
 */
import { describe, expect, it } from 'vitest';
import { Handshake } from '../../../src/nbd/handshake.js';
import {
  decodeOptionReply,
  encodeInfoRequest,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_LIST,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_SERVER,
} from '../../../src/nbd/protocol.js';
import { MemoryBackend } from '../../helpers/nbd-memory-backend.js';

function setup(tls: boolean, clientFlags = NBD_FLAG_C_FIXED_NEWSTYLE) {
  const backend = new MemoryBackend([{ name: 'n', size: 1 << 20 }]);
  const hs = new Handshake(backend, { id: 1, clientAddress: 'unix', disconnect: () => undefined }, tls);
  hs.onClientFlags(clientFlags);
  return hs;
}

function replies(out: Buffer[]): Array<{ type: number; text: string }> {
  return out.map((b) => {
    const r = decodeOptionReply(b)!;
    return { type: r.type, text: r.payload.toString('utf8') };
  });
}

describe('handshake with TLS required', () => {
  it('skips the payload of every option before STARTTLS', () => {
    const hs = setup(true);
    expect(hs.payloadMode(NBD_OPT_GO, 100)).toBe('drain');
    expect(hs.payloadMode(NBD_OPT_EXPORT_NAME, 4)).toBe('drain');
  });

  it('answers options before STARTTLS with ERR_TLS_REQD and QSD\'s text', () => {
    const hs = setup(true);
    for (const opt of [NBD_OPT_LIST, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_GO, 0x1234]) {
      const step = hs.onOption(opt, 0, undefined);
      expect(step.state).toBe('OPTIONS');
      expect(replies(step.out)).toEqual([
        { type: NBD_REP_ERR_TLS_REQD, text: `Option 0x${opt.toString(16)} not permitted before TLS` },
      ]);
    }
  });

  it('closes on EXPORT_NAME before STARTTLS, with no reply', () => {
    const step = setup(true).onOption(NBD_OPT_EXPORT_NAME, 1, undefined);
    expect(step.state).toBe('CLOSED');
    expect(step.out).toEqual([]);
  });

  it('acknowledges ABORT before STARTTLS and closes', () => {
    const step = setup(true).onOption(NBD_OPT_ABORT, 0, undefined);
    expect(step.state).toBe('CLOSED');
    expect(replies(step.out)).toEqual([{ type: NBD_REP_ACK, text: '' }]);
  });

  it('refuses STARTTLS with a payload and closes', () => {
    const step = setup(true).onOption(NBD_OPT_STARTTLS, 2, undefined);
    expect(step.state).toBe('CLOSED');
    expect(replies(step.out)).toEqual([{ type: NBD_REP_ERR_INVALID, text: "option 'starttls' has unexpected length" }]);
  });

  it('acknowledges STARTTLS and asks for the TLS handshake', () => {
    const step = setup(true).onOption(NBD_OPT_STARTTLS, 0, undefined);
    expect(step.startTls).toBe(true);
    expect(step.state).toBe('OPTIONS');
    expect(replies(step.out)).toEqual([{ type: NBD_REP_ACK, text: '' }]);
  });

  it('negotiates normally after STARTTLS and refuses a second one', () => {
    const hs = setup(true);
    hs.onOption(NBD_OPT_STARTTLS, 0, undefined);
    expect(replies(hs.onOption(NBD_OPT_STARTTLS, 0, undefined).out)).toEqual([
      { type: NBD_REP_ERR_INVALID, text: 'TLS already enabled' },
    ]);
    expect(replies(hs.onOption(NBD_OPT_LIST, 0, undefined).out).map((r) => r.type)).toEqual([NBD_REP_SERVER, NBD_REP_ACK]);
    expect(hs.payloadMode(NBD_OPT_GO, 100)).toBe('buffer');
    const go = encodeInfoRequest('n', []);
    expect(hs.onOption(NBD_OPT_GO, go.length, go).state).toBe('TRANSMISSION');
  });

  it('closes a client without fixed newstyle on its first option', () => {
    const hs = setup(true, 0);
    expect(hs.payloadMode(NBD_OPT_EXPORT_NAME, 1)).toBe('close');
  });
});

describe('handshake without TLS', () => {
  it('answers STARTTLS with ERR_POLICY and never with ERR_TLS_REQD', () => {
    const hs = setup(false);
    expect(replies(hs.onOption(NBD_OPT_STARTTLS, 0, undefined).out)).toEqual([
      { type: NBD_REP_ERR_POLICY, text: 'TLS not configured' },
    ]);
    expect(replies(hs.onOption(NBD_OPT_LIST, 0, undefined).out).map((r) => r.type)).toEqual([NBD_REP_SERVER, NBD_REP_ACK]);
  });
});
