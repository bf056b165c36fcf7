/**
 * Crash safety: a child process writes through our qcow2 driver and is SIGKILLed at random
 * moments. Afterwards `qemu-img check` finds no corruption (leaks are allowed) and every write
 * acknowledged before a completed flush is in the image; slots written by the interrupted round
 * hold either their old or their new content.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync, spawn } from 'node:child_process';
import { rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { check, contentOf, qemuImg, qemuTools, rm, tmp } from '../helpers/qcow2.js';

const tools = qemuTools();
const ROOT = resolve(import.meta.dirname, '../..');
const OUT = join(ROOT, 'node_modules', '.cache', `blockd-qcow2-crash-${process.pid}`);

const SLOT = 4096;
const SLOTS = 1024; // 4 MiB disk
const OPS = 24;

/** The ops of round r (same generator as in the child). */
function roundOps(seed: number, r: number): { slot: number; value: number }[] {
  let s = (seed * 1000003 + r * 7919) >>> 0;
  const rnd = (): number => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 0x100000000;
  };
  const used = new Set<number>();
  const out: { slot: number; value: number }[] = [];
  while (out.length < OPS) {
    const slot = Math.floor(rnd() * SLOTS);
    if (used.has(slot)) continue;
    used.add(slot);
    // value 0 = write-zeroes, otherwise a data pattern.
    out.push({ slot, value: rnd() < 0.15 ? 0 : 1 + ((r * 37 + out.length) % 254) });
  }
  return out;
}

const CHILD = `
import { BlockGraph } from './block/graph.js';
import { silentLogger } from './util/logger.js';
${roundOps.toString().replace('function roundOps(seed, r)', 'function roundOps(seed, r)')}
const [filename, seedS] = process.argv.slice(2);
const seed = Number(seedS);
const g = new BlockGraph(silentLogger());
const node = await g.add({ driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename } });
process.stdout.write('ready\\n');
for (let r = 0; ; r++) {
  await Promise.all(roundOps(seed, r).map((o) => o.value === 0
    ? node.io.writeZeroes(o.slot * ${SLOT}, ${SLOT}, { mayUnmap: true })
    : node.io.write(Buffer.alloc(${SLOT}, o.value), o.slot * ${SLOT})));
  await node.io.flush();
  process.stdout.write('done ' + r + '\\n');
}
`;

describe.skipIf(!tools)('qcow2 crash safety', () => {
  beforeAll(() => {
    try {
      execFileSync(
        'npx',
        ['tsc', 'src/block/graph.ts', 'src/util/logger.ts', '--outDir', OUT, '--rootDir', 'src', '--module', 'NodeNext',
          '--moduleResolution', 'NodeNext', '--target', 'ES2022', '--skipLibCheck', '--types', 'node'],
        { cwd: ROOT, stdio: 'ignore' },
      );
    } catch {
      // Type errors elsewhere do not stop tsc from emitting.
    }
    writeFileSync(join(OUT, 'qcow2-crash-child.mjs'), CHILD.replace('const OPS = 24;', '').replace(/\bOPS\b/g, String(OPS)).replace(/\bSLOTS\b/g, String(SLOTS)));
  }, 60_000);
  afterAll(() => rmSync(OUT, { recursive: true, force: true }));

  it('keeps the image consistent and flushed writes durable across SIGKILL', async () => {
    const dir = tmp();
    try {
      const img = join(dir, 'c.qcow2');
      qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=16384', img, String(SLOT * SLOTS));
      let shadow = Buffer.alloc(SLOT * SLOTS);
      let rounds = 0;
      for (let iter = 0; iter < 4; iter++) {
        const seed = 1 + iter;
        const child = spawn(process.execPath, [join(OUT, 'qcow2-crash-child.mjs'), img, String(seed)], {
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        let out = '';
        let err = '';
        child.stderr.on('data', (b: Buffer) => (err += b.toString()));
        const exited = new Promise<void>((r) => child.on('exit', () => r()));
        await new Promise<void>((r, j) => {
          child.stdout.on('data', (b: Buffer) => {
            out += b.toString();
            if (out.includes('ready')) r();
          });
          child.on('exit', () => j(new Error(`child exited early: ${err}`)));
        });
        await new Promise((r) => setTimeout(r, 50 + Math.floor(Math.random() * 250)));
        child.kill('SIGKILL');
        await exited;
        const done = [...out.matchAll(/done (\d+)/g)].map((m) => Number(m[1]));
        const lastDone = done.length ? Math.max(...done) : -1;
        rounds += lastDone + 1;

        const c = check(img);
        expect(c.code === 0 || c.code === 3, c.out).toBe(true);
        const content = contentOf(img, dir);
        for (let r = 0; r <= lastDone; r++) {
          for (const o of roundOps(seed, r)) shadow.fill(o.value, o.slot * SLOT, (o.slot + 1) * SLOT);
        }
        const inflight = new Map(roundOps(seed, lastDone + 1).map((o) => [o.slot, o.value]));
        for (let s = 0; s < SLOTS; s++) {
          const got = content.subarray(s * SLOT, (s + 1) * SLOT);
          const want = shadow.subarray(s * SLOT, (s + 1) * SLOT);
          if (got.equals(want)) continue;
          const v = inflight.get(s);
          expect(v !== undefined && got.equals(Buffer.alloc(SLOT, v)), `slot ${s} after round ${lastDone}`).toBe(true);
        }
        shadow = Buffer.from(content);
      }
      expect(rounds).toBeGreaterThan(0);
      // A final clean open and close leaves no leaks behind us either way.
      expect([0, 3]).toContain(check(img).code);
    } finally {
      rm(dir);
    }
  }, 60_000);
});
