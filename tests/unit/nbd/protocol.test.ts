import { describe, expect, it } from 'vitest';
import {
  cmdName,
  decodeChunkHeader,
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOptionHeader,
  decodeOptionReply,
  decodeRequest,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeNoneChunk,
  encodeOffsetHole,
  encodeOption,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
  encodeRequest,
  encodeSimpleReply,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_READ,
  NBD_OPT_GO,
  NBD_OPTS_MAGIC,
  NBD_REP_ACK,
  NBD_REP_ERR_UNSUP,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  optName,
  repName,
  writeOffsetDataHeader,
} from '../../../src/nbd/protocol.js';

const cookie = Buffer.from('0102030405060708', 'hex');

describe('NBD protocol codecs', () => {
  it('encodes the 18-byte greeting QSD sends', () => {
    expect(encodeGreeting(3).toString('hex')).toBe('4e42444d4147494349484156454f50540003');
  });

  it('round-trips an option header', () => {
    const b = encodeOption(NBD_OPT_GO, Buffer.from('abc'));
    expect(decodeOptionHeader(b)).toEqual({ magic: NBD_OPTS_MAGIC, option: NBD_OPT_GO, length: 3 });
    expect(b.subarray(16).toString()).toBe('abc');
  });

  it('round-trips an option reply with and without payload', () => {
    const r = decodeOptionReply(encodeOptionReply(9, NBD_REP_ERR_UNSUP, Buffer.from('msg')));
    expect(r).toMatchObject({ option: 9, type: NBD_REP_ERR_UNSUP });
    expect(r?.payload.toString()).toBe('msg');
    expect(decodeOptionReply(encodeOptionReply(1, NBD_REP_ACK))?.payload.length).toBe(0);
  });

  it('rejects a truncated option reply', () => {
    expect(decodeOptionReply(encodeOptionReply(1, NBD_REP_ACK, Buffer.from('xy')).subarray(0, 21))).toBeUndefined();
  });

  it('round-trips an INFO/GO request', () => {
    expect(decodeInfoRequest(encodeInfoRequest('disk', [1, 3]))).toEqual({ name: 'disk', infos: [1, 3] });
  });

  it('reports inconsistent INFO lengths with the QSD message', () => {
    const b = Buffer.concat([encodeInfoRequest('n', [3]), Buffer.from([0])]);
    expect(decodeInfoRequest(b)).toEqual({ error: 'Inconsistent lengths in option info' });
    expect(decodeInfoRequest(Buffer.alloc(3))).toEqual({ error: 'Inconsistent lengths in option info' });
  });

  it('refuses INFO names above 4096 bytes with the QSD message', () => {
    expect(decodeInfoRequest(encodeInfoRequest('x'.repeat(5000)))).toEqual({ error: 'Invalid name length: 5000' });
  });

  it('round-trips a meta context request', () => {
    const b = encodeMetaContextRequest('e', ['base:allocation', 'qemu:dirty-bitmap:b']);
    expect(decodeMetaContextRequest(b, 'set')).toEqual({ name: 'e', queries: ['base:allocation', 'qemu:dirty-bitmap:b'] });
  });

  it('rejects a meta context query running past the payload', () => {
    const b = encodeMetaContextRequest('e', ['base:allocation']).subarray(0, 20);
    expect(decodeMetaContextRequest(b, 'list')).toEqual({ error: 'Inconsistent lengths in option list meta context' });
  });

  it('round-trips a request header including a 64-bit offset', () => {
    const b = encodeRequest(NBD_CMD_READ, 5, cookie, 0x1234_5678_9abcn, 4096);
    const r = decodeRequest(b);
    expect(r).toMatchObject({ flags: 5, type: NBD_CMD_READ, offset: 0x1234_5678_9abc, length: 4096 });
    expect(r.cookie.equals(cookie)).toBe(true);
  });

  it('marks offsets above 2^53 as unsafe but keeps the exact value', () => {
    const r = decodeRequest(encodeRequest(NBD_CMD_READ, 0, cookie, 1n << 63n, 1));
    expect(r.offset).toBe(-1);
    expect(r.offsetBig).toBe(1n << 63n);
  });

  it('encodes a simple reply echoing the cookie', () => {
    expect(encodeSimpleReply(22, cookie).toString('hex')).toBe('67446698000000160102030405060708');
  });

  it('encodes an OFFSET_DATA header with the absolute offset', () => {
    const b = Buffer.alloc(28);
    writeOffsetDataHeader(b, 0, NBD_REPLY_FLAG_DONE, cookie, 2 ** 40 + 5, 100);
    expect(decodeChunkHeader(b)).toMatchObject({ flags: 1, type: 1, length: 108 });
    expect(b.readBigUInt64BE(20)).toBe(2n ** 40n + 5n);
  });

  it('encodes OFFSET_HOLE, NONE and ERROR chunks', () => {
    const h = encodeOffsetHole(1, cookie, 4096, 512);
    expect(decodeChunkHeader(h)).toMatchObject({ type: NBD_REPLY_TYPE_OFFSET_HOLE, length: 12 });
    expect(h.readUInt32BE(28)).toBe(512);
    expect(decodeChunkHeader(encodeNoneChunk(cookie))).toMatchObject({ type: NBD_REPLY_TYPE_NONE, flags: 1, length: 0 });
    const e = encodeErrorChunk(1, cookie, 22, 'bad');
    expect(decodeChunkHeader(e)).toMatchObject({ type: NBD_REPLY_TYPE_ERROR, length: 9 });
    expect(e.readUInt32BE(20)).toBe(22);
    expect(e.subarray(26).toString()).toBe('bad');
  });

  it('caps error chunk messages at 1000 bytes for the qemu client', () => {
    const e = encodeErrorChunk(1, cookie, 5, 'x'.repeat(5000));
    expect(e.readUInt16BE(24)).toBe(1000);
  });

  it('encodes a BLOCK_STATUS chunk', () => {
    const b = encodeBlockStatusChunk(1, cookie, 7, [
      { length: 4096, flags: 3 },
      { length: 512, flags: 0 },
    ]);
    expect(decodeChunkHeader(b)).toMatchObject({ type: NBD_REPLY_TYPE_BLOCK_STATUS, length: 20 });
    expect([b.readUInt32BE(20), b.readUInt32BE(24), b.readUInt32BE(28), b.readUInt32BE(32)]).toEqual([7, 4096, 3, 512]);
  });

  it('encodes INFO_EXPORT, INFO_BLOCK_SIZE, SERVER and META_CONTEXT payloads', () => {
    expect(encodeInfoExport(1 << 20, 0x58f).toString('hex')).toBe('0000' + '0000000000100000' + '058f');
    expect(encodeInfoBlockSize(1, 4096, 33554432).toString('hex')).toBe('0003000000010000100002000000');
    expect(encodeRepServer('ro', 'a ro').toString('hex')).toBe(Buffer.from('\0\0\0\x02roa ro', 'latin1').toString('hex'));
    expect(encodeRepMetaContext(0, 'base:allocation').readUInt32BE(0)).toBe(0);
  });

  it('pads the EXPORT_NAME reply unless NO_ZEROES was agreed', () => {
    expect(encodeExportNameReply(1024, 0xd6d, false).length).toBe(134);
    expect(encodeExportNameReply(1024, 0xd6d, true).toString('hex')).toBe('00000000000004000d6d');
  });

  it('names constants for logs', () => {
    expect(optName(NBD_OPT_GO)).toBe('NBD_OPT_GO');
    expect(cmdName(NBD_CMD_BLOCK_STATUS)).toBe('NBD_CMD_BLOCK_STATUS');
    expect(repName(NBD_REP_ERR_UNSUP)).toBe('NBD_REP_ERR_UNSUP');
    expect(optName(99)).toBe('<unknown 99>');
  });
});
