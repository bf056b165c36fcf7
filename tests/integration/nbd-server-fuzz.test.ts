/**
 * Bounded fuzz of the NBD server's handshake and transmission phases, compact and extended
 * headers (fixed seeds, so every run sends the same bytes): a valid client transcript is mutated
 * (bit flips, random bytes, cuts, inserted garbage) and sent over a real socket on both socket
 * layers. Each case must end with
 * that connection closed once the client half-closes, no other harm: the server keeps serving a
 * well-behaved client, with the export's data as the fuzz cases left it readable.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { NbdServer } from '../../src/nbd/server.js';
import {
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_PAYLOAD_LEN,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_READ_ONLY,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
} from '../../src/nbd/protocol.js';
import { encodeExtRequest } from '../../src/nbd/protocol-ext.js';
import { silentLogger } from '../../src/util/logger.js';
import { MemoryBackend } from '../helpers/nbd-memory-backend.js';
import { RawNbdClient } from '../helpers/nbd-raw-client.js';
import { nativeAddon } from '../../src/block/native.js';
import { netIoBindingFrom, type NetIoBinding } from '../../src/nbd/native-transport.js';

const NETIO = netIoBindingFrom(nativeAddon());
const TRANSPORTS: [string, NetIoBinding | undefined][] = [['net.Socket', undefined]];
if (NETIO) TRANSPORTS.push(['native netio', NETIO]);

let dir: string | undefined;
let server: NbdServer | undefined;

afterEach(async () => {
  await server?.close();
  server = undefined;
  if (dir) rmSync(dir, { recursive: true, force: true });
  dir = undefined;
});

/** xorshift32. */
function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

/** The client side of a whole session, as separate messages (mutations pick one). */
function transcript(readOnly: boolean): Buffer[] {
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(3, 0);
  const m: Buffer[] = [flags];
  if (readOnly) m.push(encodeOption(NBD_OPT_READ_ONLY));
  m.push(
    encodeOption(NBD_OPT_LIST),
    encodeOption(NBD_OPT_STRUCTURED_REPLY),
    encodeOption(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('n', ['base:allocation'])),
    encodeOption(NBD_OPT_INFO, encodeInfoRequest('n', [3])),
    encodeOption(NBD_OPT_GO, encodeInfoRequest('n', [3])),
    encodeRequest(NBD_CMD_READ, 0, 1n, 4096, 8192),
    Buffer.concat([encodeRequest(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 2n, 65536, 512), Buffer.alloc(512, 0x5a)]),
    encodeRequest(NBD_CMD_BLOCK_STATUS, 0, 3n, 0, 1 << 20),
    encodeRequest(NBD_CMD_TRIM, 0, 4n, 1 << 20, 4096),
    encodeRequest(NBD_CMD_WRITE_ZEROES, 0, 5n, 2 << 20, 65536),
    encodeRequest(NBD_CMD_CACHE, 0, 6n, 0, 4096),
    encodeRequest(NBD_CMD_FLUSH, 0, 7n, 0, 0),
    encodeRequest(NBD_CMD_DISC, 0, 8n, 0, 0),
  );
  return m;
}

/** A session with extended headers: 32-byte requests, PAYLOAD_LEN, the block-status payload form. */
function extTranscript(): Buffer[] {
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(3, 0);
  const filter = Buffer.alloc(12);
  filter.writeBigUInt64BE(1n << 20n, 0);
  filter.writeUInt32BE(0, 8);
  return [
    flags,
    encodeOption(NBD_OPT_EXTENDED_HEADERS),
    encodeOption(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('n', ['base:allocation'])),
    encodeOption(NBD_OPT_GO, encodeInfoRequest('n', [3])),
    encodeExtRequest(NBD_CMD_READ, 0, 1n, 4096, 8192),
    Buffer.concat([
      encodeExtRequest(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_PAYLOAD_LEN, 2n, 65536, 512),
      Buffer.alloc(512, 0x5a),
    ]),
    encodeExtRequest(NBD_CMD_BLOCK_STATUS, 0, 3n, 0, 1 << 20),
    Buffer.concat([encodeExtRequest(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_PAYLOAD_LEN, 4n, 0, 12), filter]),
    encodeExtRequest(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 5n, 4096, 1 << 20),
    encodeExtRequest(NBD_CMD_TRIM, 0, 6n, 1 << 20, 4096),
    encodeExtRequest(NBD_CMD_WRITE_ZEROES, 0, 7n, 2 << 20, 65536),
    encodeExtRequest(NBD_CMD_CACHE, 0, 8n, 0, 4096),
    encodeExtRequest(NBD_CMD_FLUSH, 0, 9n, 0, 0),
    encodeExtRequest(NBD_CMD_DISC, 0, 10n, 0, 0),
  ];
}

function mutate(msgs: Buffer[], rnd: () => number): Buffer {
  const parts = msgs.map((b) => Buffer.from(b));
  const k = 1 + (rnd() % 4);
  for (let i = 0; i < k; i++) {
    const which = rnd() % parts.length;
    const b = parts[which]!;
    if (b.length === 0) continue;
    const pos = rnd() % b.length;
    switch (rnd() % 5) {
      case 0:
        b[pos] = b[pos]! ^ (1 << (rnd() % 8));
        break;
      case 1:
        b[pos] = rnd() & 0xff;
        break;
      case 2: {
        // A length or offset field set to something large.
        const at = Math.min(pos, b.length - 4);
        if (at >= 0) b.writeUInt32BE(rnd() >>> 0, at);
        break;
      }
      case 3:
        parts[which] = b.subarray(0, pos);
        break;
      default: {
        const junk = Buffer.alloc(1 + (rnd() % 64));
        for (let j = 0; j < junk.length; j++) junk[j] = rnd() & 0xff;
        parts.splice(which, 0, junk);
      }
    }
  }
  return Buffer.concat(parts);
}

/** Server output of one case, to tell how far it got. */
interface CaseResult {
  bytes: number;
  /** The server sent a transmission reply (simple or structured magic after the handshake). */
  transmission: boolean;
}

/** Send `bytes` after the greeting, half-close, and resolve once the server closed. */
function runCase(path: string, bytes: Buffer): Promise<CaseResult> {
  return new Promise((resolve, reject) => {
    const s = createConnection(path);
    const got: Buffer[] = [];
    s.on('error', () => undefined);
    s.on('data', (c: Buffer) => got.push(c));
    s.once('connect', () => {
      // Write in a few pieces so the parsers see partial frames too.
      const cut = bytes.length > 2 ? 1 + (bytes.length % 7) : bytes.length;
      s.write(bytes.subarray(0, cut));
      s.end(bytes.subarray(cut));
    });
    s.once('close', () => {
      const all = Buffer.concat(got);
      // Structured 0x668e33ef, simple 0x67446698 or extended 0x6e8a278c reply magic past the greeting.
      const transmission = ['668e33ef', '67446698', '6e8a278c'].some((m) => all.indexOf(Buffer.from(m, 'hex'), 18) >= 0);
      resolve({ bytes: all.length, transmission });
    });
    s.setTimeout(30000, () => reject(new Error('server never closed a fuzzed connection')));
  });
}

for (const [label, netio] of TRANSPORTS) {
  describe(`NBD server fuzz on ${label} (bounded, fixed seeds)`, () => {
    it('closes every mutated session and keeps serving good clients', async () => {
      dir = mkdtempSync(join(tmpdir(), 'nbd-fuzz-'));
      const path = join(dir, 'nbd.sock');
      const backend = new MemoryBackend([{ name: 'n', size: 4 << 20 }]);
      server = new NbdServer({ backend, log: silentLogger(), netio, handshakeTimeoutMs: 30000 });
      await server.listen({ type: 'unix', path });
      const rnd = prng(label === 'net.Socket' ? 0x6e626431 : 0x6e626432);
      const CASES = 400;
      let deep = 0;
      let deepExt = 0;
      for (let i = 0; i < CASES; i++) {
        // Every other case negotiates extended headers and fuzzes their transmission phase.
        const extended = i % 2 === 1;
        const r = await runCase(path, mutate(extended ? extTranscript() : transcript(i % 3 === 0), rnd));
        if (r.transmission) deep++;
        if (r.transmission && extended) deepExt++;
      }
      expect(deepExt).toBeGreaterThan(CASES / 8);
      // The mutations must not all be caught at the door: many cases reach transmission.
      expect(deep).toBeGreaterThan(CASES / 4);
      // Every fuzzed connection is gone from the server's books.
      for (let i = 0; i < 100 && server.connectionCount > 0; i++) await new Promise((r) => setTimeout(r, 10));
      expect(server.connectionCount).toBe(0);
      // And a good client is served.
      const c = await RawNbdClient.connect(path);
      const go = await c.handshake('n');
      expect(go.at(-1)!.type).toBe(NBD_REP_ACK);
      c.request(NBD_CMD_READ, 0, 512, 0, 9n);
      const r = await c.reply();
      expect(r?.kind === 'chunk' && r.cookie.readBigUInt64BE(0)).toBe(9n);
      c.close();
      // And a good client with extended headers.
      const x = await RawNbdClient.connect(path);
      expect((await x.handshake('n', { extended: true })).at(-1)!.type).toBe(NBD_REP_ACK);
      x.extRequest(NBD_CMD_READ, 512, 512, 0, 10n);
      const xr = await x.reply();
      expect(xr?.kind === 'ext' && xr.cookie.readBigUInt64BE(0) === 10n && xr.offset).toBe(512n);
      x.close();
    });
  });
}
