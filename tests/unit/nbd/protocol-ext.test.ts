import { describe, expect, it } from 'vitest';
import {
  decodeExtChunkHeader,
  decodeExtRequest,
  encodeBlockStatusExtChunk,
  encodeExtErrorChunk,
  encodeExtNone,
  encodeExtOffsetHole,
  encodeExtRequest,
  EXT_DATA_HEADER_SIZE,
  makeTag,
  readU64,
  writeExtOffsetDataHeader,
} from '../../../src/nbd/protocol-ext.js';
import {
  NBD_CMD_FLAG_PAYLOAD_LEN,
  NBD_CMD_WRITE,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
} from '../../../src/nbd/protocol.js';

describe('extended-header codecs', () => {
  it('round-trips an extended request with a 64-bit length', () => {
    const b = encodeExtRequest(NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, 0xfedcba9876543210n, 1n << 44n, (1n << 40n) + 5n);
    expect(b.length).toBe(32);
    expect(b.readUInt32BE(0)).toBe(0x21e41c71);
    const r = decodeExtRequest(b)!;
    expect(r).toMatchObject({ type: NBD_CMD_WRITE, flags: NBD_CMD_FLAG_PAYLOAD_LEN, offset: 1n << 44n, length: (1n << 40n) + 5n });
    expect(r.cookie.readBigUInt64BE(0)).toBe(0xfedcba9876543210n);
    expect(decodeExtRequest(b.subarray(0, 31))).toBeUndefined();
    const bad = Buffer.from(b);
    bad.writeUInt32BE(0x25609513, 0);
    expect(decodeExtRequest(bad)).toBeUndefined();
  });

  it('reads u64 values as numbers up to 2^53 - 1 and -1 above', () => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(Number.MAX_SAFE_INTEGER));
    expect(readU64(b, 0)).toBe(Number.MAX_SAFE_INTEGER);
    b.writeBigUInt64BE(1n << 53n);
    expect(readU64(b, 0)).toBe(-1);
  });

  it('echoes cookie and request offset in every chunk header', () => {
    const tag = makeTag(7n, 3n << 40n);
    const none = decodeExtChunkHeader(encodeExtNone(tag))!;
    expect(none).toMatchObject({ flags: NBD_REPLY_FLAG_DONE, type: NBD_REPLY_TYPE_NONE, offset: 3 * 2 ** 40, length: 0 });
    expect(none.cookie.readBigUInt64BE(0)).toBe(7n);
    const hole = encodeExtOffsetHole(0, tag, 3 * 2 ** 40 + 4096, 8192);
    expect(decodeExtChunkHeader(hole)).toMatchObject({ type: NBD_REPLY_TYPE_OFFSET_HOLE, offset: 3 * 2 ** 40, length: 12 });
    expect(readU64(hole, 32)).toBe(3 * 2 ** 40 + 4096);
    expect(hole.readUInt32BE(40)).toBe(8192);
    const err = encodeExtErrorChunk(NBD_REPLY_FLAG_DONE, tag, 22, 'x'.repeat(2000));
    expect(decodeExtChunkHeader(err)).toMatchObject({ type: NBD_REPLY_TYPE_ERROR, length: 6 + 1000 });
    expect(err.readUInt32BE(32)).toBe(22);
    expect(err.readUInt16BE(36)).toBe(1000);
  });

  it('writes OFFSET_DATA headers with the tag of the request bytes', () => {
    const req = encodeExtRequest(0, 0, 0x1122n, 1n << 33n, 4096);
    const a = Buffer.alloc(EXT_DATA_HEADER_SIZE);
    writeExtOffsetDataHeader(a, 0, NBD_REPLY_FLAG_DONE, req.subarray(8, 24), 2 ** 33, 4096);
    expect(a.subarray(8, 24).equals(req.subarray(8, 24))).toBe(true);
    expect(decodeExtChunkHeader(a)).toMatchObject({ type: NBD_REPLY_TYPE_OFFSET_DATA, offset: 2 ** 33, length: 8 + 4096 });
    expect(readU64(a, 32)).toBe(2 ** 33);
  });

  it('lays out BLOCK_STATUS_EXT: context id, count, then 64-bit lengths and statuses', () => {
    const c = encodeBlockStatusExtChunk(NBD_REPLY_FLAG_DONE, makeTag(1n, 0n), 5, [
      { length: 8 * 2 ** 40, flags: 3 },
      { length: 512, flags: 0 },
    ]);
    expect(decodeExtChunkHeader(c)).toMatchObject({ type: NBD_REPLY_TYPE_BLOCK_STATUS_EXT, length: 8 + 32 });
    expect(c.readUInt32BE(32)).toBe(5);
    expect(c.readUInt32BE(36)).toBe(2);
    expect(c.readBigUInt64BE(40)).toBe(8n << 40n);
    expect(c.readBigUInt64BE(48)).toBe(3n);
    expect(c.readBigUInt64BE(56)).toBe(512n);
    expect(c.readBigUInt64BE(64)).toBe(0n);
  });
});
