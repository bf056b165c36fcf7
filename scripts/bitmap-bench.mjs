#!/usr/bin/env node
// Dirty bitmap benchmark: memory per TiB at 64 KiB granularity, and the time to map a 1 TiB
// sparse bitmap over NBD (nbdinfo --map=qemu:dirty-bitmap:NAME against an in-process blockd).
// Usage: npm run build && node --expose-gc scripts/bitmap-bench.mjs [writes=1000]
// Prints one JSON object; numbers depend on the machine (run it a few times).
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { performance } from 'node:perf_hooks';

const run = promisify(execFile);
const dist = new URL('../dist/', import.meta.url);
const { DirtyBitmap } = await import(new URL('block/dirty-bitmap.js', dist).href);
const { Services } = await import(new URL('qmp/services.js', dist).href);
const { silentLogger } = await import(new URL('util/logger.js', dist).href);
const { bitmapsOf } = await import(new URL('block/dirty-bitmap-set.js', dist).href);

const TiB = 2 ** 40;
const G = 65536;
const writes = Number(process.argv[2] ?? 1000);

function gc() {
  if (globalThis.gc) globalThis.gc();
}

/** ArrayBuffer bytes held after building a bitmap with `fill` (measured by the runtime). */
function measure(fill) {
  gc();
  const before = process.memoryUsage().arrayBuffers;
  const b = new DirtyBitmap(TiB, G);
  fill(b);
  gc();
  const after = process.memoryUsage().arrayBuffers;
  return { runtimeBytes: after - before, reportedBytes: b.memoryBytes(), dirtyBytes: b.dirtyBytes, bitmap: b };
}

function rng(seed) {
  let s = seed >>> 0;
  return () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
}

const r = rng(42);
const memory = {
  empty: measure(() => {}),
  full: measure((b) => b.fill()),
  [`sparse_${writes}_writes`]: measure((b) => {
    for (let i = 0; i < writes; i++) b.mark(Math.floor(r() * (TiB / G)) * G, 4096);
  }),
  worstCaseEveryOtherGranule: measure((b) => {
    for (let i = 0; i < b.bitCount; i += 2) b.setBits(i, i + 1);
  }),
};

const ops = {};
{
  const b = memory.worstCaseEveryOtherGranule.bitmap;
  let t = performance.now();
  const h = b.sha256();
  ops.sha256WorstCaseMs = +(performance.now() - t).toFixed(1);
  t = performance.now();
  let n = 0;
  for (let pos = 0; ; ) {
    const a = memory[`sparse_${writes}_writes`].bitmap.nextDirtyArea(pos);
    if (!a) break;
    n++;
    pos = a.offset + a.length;
  }
  ops.walkSparseDirtyAreasMs = +(performance.now() - t).toFixed(2);
  ops.sparseDirtyAreas = n;
  void h;
}

// NBD map of a 1 TiB sparse bitmap.
const dir = mkdtempSync(join(tmpdir(), 'blockd-bmbench-'));
const sock = join(dir, 'nbd.sock');
const svc = new Services(silentLogger());
const nbd = {};
try {
  await svc.exports.startServer({ addr: { type: 'unix', path: sock } });
  await svc.graph.add({ driver: 'null-co', 'node-name': 'big', size: TiB });
  const node = svc.graph.find('big');
  const set = bitmapsOf(node);
  set.add({ name: 'sparse', granularity: G, disabled: true });
  set.add({ name: 'dense', granularity: G, disabled: true });
  const sparse = set.find('sparse').bits;
  const dense = set.find('dense').bits;
  const r2 = rng(7);
  for (let i = 0; i < writes; i++) sparse.mark(Math.floor(r2() * (TiB / G)) * G, 4096);
  for (let i = 0; i < 100000; i++) dense.mark(Math.floor(r2() * (TiB / G)) * G, 4096);
  svc.exports.addExport({ type: 'nbd', id: 'e', nodeName: 'big', bitmaps: ['sparse', 'dense'] });
  // Time spent inside the bitmap contexts (server side), apart from process start and handshake.
  const exp = svc.exports.openExport('big');
  const inServer = { calls: 0, ms: 0 };
  for (const name of ['sparse', 'dense']) {
    const ctx = exp.metaContexts[1].listContexts(`qemu:dirty-bitmap:${name}`, true)[0];
    const orig = ctx.blockStatus;
    ctx.blockStatus = async (o, l, m) => {
      const t = performance.now();
      try {
        return await orig(o, l, m);
      } finally {
        inServer.calls++;
        inServer.ms += performance.now() - t;
      }
    };
  }
  const uri = `nbd+unix:///big?socket=${sock}`;
  await run('nbdinfo', ['--size', uri]); // warm-up
  let t = performance.now();
  await run('nbdinfo', ['--size', uri]);
  nbd.baselineNbdinfoSizeMs = +(performance.now() - t).toFixed(1);
  for (const name of ['sparse', 'dense']) {
    inServer.calls = 0;
    inServer.ms = 0;
    t = performance.now();
    const { stdout } = await run('nbdinfo', [`--map=qemu:dirty-bitmap:${name}`, uri], { maxBuffer: 1 << 28 });
    const ms = performance.now() - t;
    nbd[name] = {
      dirtyGranules: (name === 'sparse' ? sparse : dense).dirtyBits,
      extents: stdout.trim().split('\n').length,
      nbdinfoMapMs: +ms.toFixed(1),
      blockStatusRequests: inServer.calls,
      serverSideMs: +inServer.ms.toFixed(1),
    };
  }
} finally {
  await svc.shutdown();
  rmSync(dir, { recursive: true, force: true });
}

const strip = (m) => ({ runtimeBytes: m.runtimeBytes, reportedBytes: m.reportedBytes, dirtyBytes: m.dirtyBytes });
console.log(
  JSON.stringify(
    {
      disk: '1 TiB',
      granularity: G,
      bits: TiB / G,
      rawBitsBytes: TiB / G / 8,
      gcExposed: Boolean(globalThis.gc),
      memory: Object.fromEntries(Object.entries(memory).map(([k, v]) => [k, strip(v)])),
      ops,
      nbd,
    },
    null,
    2,
  ),
);
