/**
 * NbdExport error policies against a fake node whose I/O fails on demand: the cases a full
 * tmpfs cannot produce (read errors, EIO, FAST_ZERO refusals, ignore on reads).
 */
import { describe, expect, it } from 'vitest';
import { NbdExport, errorAction, type IoErrorEvent, type OnErrorPolicy } from '../../../src/export/nbd-export.js';
import type { BlockUser } from '../../../src/block/types.js';
import { BlockError, DaemonError, type Errno } from '../../../src/util/errors.js';
import { silentLogger } from '../../../src/util/logger.js';
import type { NbdExportHandle, NbdSession } from '../../../src/nbd/backend.js';

const SIZE = 64 * 1024;

class FakeNode {
  data = Buffer.alloc(SIZE);
  /** The next I/O fails with this errno (until cleared). */
  fail: Errno | undefined;
  calls = 0;
  submitted = 0;
  private check(): void {
    this.calls++;
    if (this.fail) throw new BlockError('IO', this.fail, `fake ${this.fail}`);
  }
  user(): BlockUser {
    const io = {
      size: () => SIZE,
      read: async (buf: Buffer, off: number) => {
        this.check();
        this.data.copy(buf, 0, off, off + buf.length);
      },
      tryReadSync: () => false,
      write: async (buf: Buffer, off: number) => {
        this.check();
        buf.copy(this.data, off);
      },
      // The callback path (BlockIO.submitWrite): fails as write() does, from a later turn.
      submitWrite: (buf: Buffer, off: number, done: (err?: Error) => void) => {
        this.submitted++;
        let err: Error | undefined;
        try {
          this.check();
        } catch (e) {
          err = e as Error;
        }
        setImmediate(() => {
          if (err) return done(err);
          buf.copy(this.data, off);
          done();
        });
        return true;
      },
      writeZeroes: async (off: number, len: number, o: { noFallback?: boolean }) => {
        if (o.noFallback) throw new BlockError('NO_FAST_ZERO', 'ENOTSUP', 'no fast zero');
        this.check();
        this.data.fill(0, off, off + len);
      },
      discard: async () => this.check(),
      flush: async () => this.check(),
      blockStatus: async (off: number, len: number) => [{ offset: off, length: len, flags: 1, depth: 1 }],
    };
    return { node: { name: 'n0' }, io } as unknown as BlockUser;
  }
}

function makeExport(onError?: { werror: OnErrorPolicy; rerror: OnErrorPolicy }): {
  exp: NbdExport;
  node: FakeNode;
  events: IoErrorEvent[];
  connect(): { h: NbdExportHandle; s: NbdSession };
} {
  const node = new FakeNode();
  const events: IoErrorEvent[] = [];
  const exp = new NbdExport(
    {
      id: 'e0',
      name: 'x',
      writable: true,
      writethrough: false,
      allocationDepth: false,
      maxConnections: 0,
      multiConn: 'auto',
      ...(onError ? { onError } : {}),
      reportIoError: (ev) => events.push(ev),
    },
    node.user(),
    () => 100,
    silentLogger(),
  );
  let id = 0;
  const connect = (): { h: NbdExportHandle; s: NbdSession } => {
    const s = exp.onConnect({ id: ++id, clientAddress: 'unix', exportName: 'x', readOnly: false, disconnect: () => undefined });
    if (s instanceof DaemonError) throw s;
    return { h: s.handle ?? exp, s };
  };
  return { exp, node, events, connect };
}

/** Settle pending promise callbacks (bounded). */
async function ticks(n = 5): Promise<void> {
  for (let i = 0; i < n; i++) await Promise.resolve();
}

describe('errorAction (QEMU blk_get_error_action)', () => {
  it('stops on ENOSPC and reports anything else under enospc', () => {
    expect(errorAction('enospc', 'ENOSPC')).toBe('stop');
    expect(errorAction('enospc', 'EIO')).toBe('report');
  });
  it('maps stop, ignore, report and auto whatever the errno', () => {
    for (const e of ['EIO', 'ENOSPC'] as const) {
      expect(errorAction('stop', e)).toBe('stop');
      expect(errorAction('ignore', e)).toBe('ignore');
      expect(errorAction('report', e)).toBe('report');
      expect(errorAction('auto', e)).toBe('report');
    }
  });
});

describe('NbdExport error policies', () => {
  it('holds a failed read under rerror=stop with io-status failed, then retries it on resume', async () => {
    const { exp, node, events, connect } = makeExport({ werror: 'report', rerror: 'stop' });
    const { h } = connect();
    node.data.fill(0x42, 0, 512);
    node.fail = 'EIO';
    let done = false;
    const buf = Buffer.alloc(512);
    const p = h.read(buf, 0).then(() => (done = true));
    await ticks();
    expect(events).toEqual([
      { device: 'e0', 'node-name': 'n0', operation: 'read', action: 'stop', nospace: false, reason: 'Input/output error' },
    ]);
    expect(exp.ioStatus).toBe('failed');
    expect(exp.isStopped).toBe(true);
    // Later requests are held too, without reaching the node.
    const calls = node.calls;
    const w = h.write(Buffer.alloc(512, 1), 4096, false);
    await ticks();
    expect(node.calls).toBe(calls);
    expect(exp.heldCount).toBe(2);
    expect(done).toBe(false);
    node.fail = undefined;
    exp.resume();
    await p;
    await w;
    expect(buf.every((b) => b === 0x42)).toBe(true);
    expect(node.data[4096]).toBe(1);
    expect(exp.ioStatus).toBe('ok');
    expect(exp.counters.failedOps).toBe(0);
  });

  it('answers zeroes, not the old buffer content, for a failed read under rerror=ignore', async () => {
    const { node, events, connect } = makeExport({ werror: 'report', rerror: 'ignore' });
    const { h } = connect();
    node.fail = 'EIO';
    const buf = Buffer.alloc(512, 0xee);
    await h.read(buf, 0);
    expect(buf.every((b) => b === 0)).toBe(true);
    expect(events[0]).toMatchObject({ operation: 'read', action: 'ignore', nospace: false });
  });

  it('reports EIO under werror=enospc and counts the failure', async () => {
    const { exp, node, events, connect } = makeExport({ werror: 'enospc', rerror: 'report' });
    const { h } = connect();
    node.fail = 'EIO';
    await expect(h.write(Buffer.alloc(512), 0, false)).rejects.toMatchObject({ errno: 'EIO' });
    expect(events[0]).toMatchObject({ operation: 'write', action: 'report', nospace: false });
    expect(exp.isStopped).toBe(false);
    expect(exp.counters.failedOps).toBe(1);
  });

  it('counts flush, trim and write-zeroes failures as write errors', async () => {
    const { node, events, connect } = makeExport({ werror: 'report', rerror: 'stop' });
    const { h } = connect();
    node.fail = 'EIO';
    await expect(h.trim(0, 512, false)).rejects.toBeInstanceOf(DaemonError);
    await expect(h.writeZeroes(0, 512, { mayUnmap: true, fastZero: false, fua: false })).rejects.toBeInstanceOf(DaemonError);
    // A flush after a write that was acknowledged: the node is really flushed.
    node.fail = undefined;
    await h.write(Buffer.alloc(512), 0, false);
    node.fail = 'EIO';
    await expect(h.flush()).rejects.toBeInstanceOf(DaemonError);
    expect(events.map((e) => e.operation)).toEqual(['write', 'write', 'write']);
  });

  it('applies no policy to a FAST_ZERO request the node cannot do fast', async () => {
    const { exp, events, connect } = makeExport({ werror: 'stop', rerror: 'stop' });
    const { h } = connect();
    await expect(h.writeZeroes(0, 512, { mayUnmap: true, fastZero: true, fua: false })).rejects.toMatchObject({
      errno: 'ENOTSUP',
    });
    expect(events).toEqual([]);
    expect(exp.isStopped).toBe(false);
  });

  it('sends no event and keeps io-status ok without a policy', async () => {
    const { exp, node, events, connect } = makeExport();
    const { h } = connect();
    node.fail = 'ENOSPC';
    await expect(h.write(Buffer.alloc(512), 0, false)).rejects.toMatchObject({ errno: 'ENOSPC' });
    expect(events).toEqual([]);
    expect(exp.ioStatus).toBe('ok');
  });

  it('fails only the held requests of a connection whose socket closed', async () => {
    const { exp, node, connect } = makeExport({ werror: 'stop', rerror: 'stop' });
    const a = connect();
    const b = connect();
    node.fail = 'ENOSPC';
    const pa = a.h.write(Buffer.alloc(512, 1), 0, false);
    const pb = b.h.write(Buffer.alloc(512, 2), 512, false);
    await ticks();
    expect(exp.heldCount).toBe(2);
    a.s.onClose?.();
    await expect(pa).rejects.toMatchObject({ errno: 'ESHUTDOWN' });
    expect(exp.heldCount).toBe(1);
    node.fail = undefined;
    exp.resume();
    await pb;
    expect(node.data[512]).toBe(2);
    expect(node.data[0]).toBe(0);
  });

  it('fails every held request when the export is removed', async () => {
    const { exp, node, connect } = makeExport({ werror: 'stop', rerror: 'report' });
    const { h } = connect();
    node.fail = 'ENOSPC';
    const p = h.write(Buffer.alloc(512), 0, false);
    await ticks();
    exp.shuttingDown = true;
    exp.failHeld('the export is being removed');
    await expect(p).rejects.toMatchObject({ errno: 'ESHUTDOWN' });
    expect(exp.heldCount).toBe(0);
    expect(exp.counters.failedOps).toBe(1);
  });

  it('keeps the first error in io-status until resumed', async () => {
    const { exp, node, connect } = makeExport({ werror: 'stop', rerror: 'stop' });
    const { h } = connect();
    node.fail = 'ENOSPC';
    void h.write(Buffer.alloc(512), 0, false).catch(() => undefined);
    node.fail = 'EIO';
    void h.read(Buffer.alloc(512), 0).catch(() => undefined);
    await ticks();
    expect(exp.ioStatus).toBe('nospace');
    exp.failHeld('test over');
  });
});

describe('BLOCK_IO_ERROR reason', () => {
  it('words every errno a node can fail with as strerror() does', async () => {
    const all: Errno[] = ['EPERM', 'ENOENT', 'EIO', 'ENOMEM', 'EACCES', 'EBUSY', 'EEXIST', 'EINVAL', 'EFBIG',
      'ENOSPC', 'EROFS', 'EAGAIN', 'ENOTSUP', 'EOVERFLOW', 'ESHUTDOWN', 'ECONNRESET', 'ETIMEDOUT', 'EPROTO', 'ECANCELED'];
    for (const errno of all) {
      const { node, events, connect } = makeExport({ werror: 'report', rerror: 'report' });
      node.fail = errno;
      await connect().h.write(Buffer.alloc(1), 0, false).catch(() => undefined);
      // Words, not the errno name, the fake's message or an object dump.
      expect(events[0]?.reason, errno).toMatch(/^[A-Z][a-z]+[- a-z/A-Z]*$/);
      expect(events[0]?.reason, errno).not.toMatch(/fake|object|^E[A-Z]+$/);
    }
  });
});

describe('NbdExport.submitWrite (the callback write path)', () => {
  function submit(h: NbdExportHandle, buf: Buffer, off: number, fua = false): { started: boolean; result: Promise<unknown> } {
    let resolve!: (v: unknown) => void;
    const result = new Promise<unknown>((r) => (resolve = r));
    const started = h.submitWrite?.(buf, off, fua, (err) => resolve(err ?? 'ok')) ?? false;
    return { started, result };
  }

  it('writes and counts as write() does; FUA, writethrough and a stopped export take write()', async () => {
    const { exp, node, connect } = makeExport();
    const { h } = connect();
    const w = submit(h, Buffer.alloc(512, 9), 1024);
    expect(w.started).toBe(true);
    expect(await w.result).toBe('ok');
    expect(node.data[1024]).toBe(9);
    expect(exp.counters.writeOps).toBe(1);
    expect(exp.counters.writeBytes).toBe(512);
    // FUA needs the flush write() does: refused, nothing counted.
    expect(submit(h, Buffer.alloc(512), 0, true).started).toBe(false);
    expect(exp.counters.writeOps).toBe(1);
    expect(node.submitted).toBe(1);
  });

  it('is refused by a writethrough export', () => {
    const node = new FakeNode();
    const exp = new NbdExport(
      { id: 'e0', name: 'x', writable: true, writethrough: true, allocationDepth: false, maxConnections: 0, multiConn: 'auto' },
      node.user(),
      () => 100,
      silentLogger(),
    );
    expect(exp.submitWrite(Buffer.alloc(512), 0, false, () => undefined)).toBe(false);
    expect(node.submitted).toBe(0);
  });

  it('reports a failure under werror=report with the event and the count', async () => {
    const { exp, node, events, connect } = makeExport({ werror: 'report', rerror: 'report' });
    const { h } = connect();
    node.fail = 'EIO';
    const w = submit(h, Buffer.alloc(512), 0);
    expect(w.started).toBe(true);
    expect(await w.result).toMatchObject({ errno: 'EIO' });
    expect(events).toEqual([
      { device: 'e0', 'node-name': 'n0', operation: 'write', action: 'report', nospace: false, reason: 'Input/output error' },
    ]);
    expect(exp.counters.failedOps).toBe(1);
  });

  it('answers success under werror=ignore', async () => {
    const { node, events, connect } = makeExport({ werror: 'ignore', rerror: 'report' });
    const { h } = connect();
    node.fail = 'EIO';
    expect(await submit(h, Buffer.alloc(512), 0).result).toBe('ok');
    expect(events[0]).toMatchObject({ operation: 'write', action: 'ignore' });
  });

  it('holds a failed write under werror=stop and writes it on resume; later writes take write()', async () => {
    const { exp, node, events, connect } = makeExport({ werror: 'stop', rerror: 'report' });
    const { h } = connect();
    node.fail = 'ENOSPC';
    let settled: unknown;
    const w = submit(h, Buffer.alloc(512, 0x33), 2048);
    void w.result.then((v) => (settled = v));
    await new Promise((r) => setTimeout(r, 20));
    expect(events[0]).toMatchObject({ operation: 'write', action: 'stop', nospace: true });
    expect(exp.ioStatus).toBe('nospace');
    expect(exp.isStopped).toBe(true);
    expect(settled).toBeUndefined();
    // While stopped the callback path refuses (write() holds the request).
    expect(submit(h, Buffer.alloc(512), 0).started).toBe(false);
    node.fail = undefined;
    exp.resume();
    expect(await w.result).toBe('ok');
    expect(node.data[2048]).toBe(0x33);
    expect(exp.counters.failedOps).toBe(0);
  });
});
