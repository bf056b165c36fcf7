/**
 * The per-connection handle of an NbdExport offers the engine the same synchronous fast paths
 * as the export itself (the engine only sees the handle). A missing one does not change the
 * bytes a client gets, only the cost: it once hid the known-zero hole path from every client.
 */
import { describe, expect, it } from 'vitest';
import { NbdExport } from '../../../src/export/nbd-export.js';
import type { BlockUser } from '../../../src/block/types.js';
import { DaemonError } from '../../../src/util/errors.js';
import { silentLogger } from '../../../src/util/logger.js';

const SIZE = 1024 * 1024;
const HALF = SIZE / 2;

function connectHandle() {
  // First half data, second half known zeroes.
  const io = {
    size: () => SIZE,
    read: async (buf: Buffer) => void buf.fill(7),
    tryReadSync: (buf: Buffer, off: number) => (off + buf.length <= HALF ? (buf.fill(7), true) : false),
    isDataSync: (off: number, len: number) => off + len <= HALF,
    isZeroSync: (off: number, len: number) => off >= HALF && off + len <= SIZE,
    blockStatus: async (off: number, len: number) => [{ offset: off, length: len, flags: 0, depth: 1 }],
    fileRangeSync: (off: number, len: number) => (off + len <= HALF ? { fd: 42, offset: off + 512 } : undefined),
  };
  const exp = new NbdExport(
    { id: 'e0', name: 'x', writable: false, writethrough: false, allocationDepth: false, maxConnections: 0, multiConn: 'auto' },
    { node: { name: 'n0' }, io } as unknown as BlockUser,
    () => 100,
    silentLogger(),
  );
  const s = exp.onConnect({ id: 1, clientAddress: 'unix', exportName: 'x', readOnly: true, disconnect: () => undefined });
  if (s instanceof DaemonError) throw s;
  if (!s.handle) throw new Error('expected a per-connection handle');
  return { exp, h: s.handle };
}

describe('NbdExport connection handle', () => {
  it('answers known zeroes synchronously, as the export does', () => {
    const { exp, h } = connectHandle();
    expect(exp.tryReadZeroSync(HALF, 4096)).toBe(true);
    expect(h.tryReadZeroSync?.(HALF, 4096)).toBe(true);
    expect(h.tryReadZeroSync?.(0, 4096)).toBe(false);
    expect(h.tryReadZeroSync?.(HALF - 4096, 8192)).toBe(false);
  });

  it('serves cached data synchronously, as the export does', () => {
    const { h } = connectHandle();
    const buf = Buffer.alloc(4096);
    expect(h.tryReadSync?.(buf, 0)).toBe(true);
    expect(buf.every((b) => b === 7)).toBe(true);
    expect(h.tryReadSync?.(Buffer.alloc(4096), HALF)).toBe(false);
  });

  it('names a cached file range synchronously, as the export does', () => {
    const { exp, h } = connectHandle();
    expect(exp.tryReadFileSync(4096, 65536)).toEqual({ fd: 42, offset: 4096 + 512 });
    expect(h.tryReadFileSync?.(4096, 65536)).toEqual({ fd: 42, offset: 4096 + 512 });
    expect(h.tryReadFileSync?.(HALF, 65536)).toBeUndefined();
  });
});
