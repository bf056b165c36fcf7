/** Shared helpers for the qcow2 tests: tool detection, temp dirs, qemu-img/qemu-io wrappers. */
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import type { BlockNode } from '../../src/block/types.js';
import { silentLogger } from '../../src/util/logger.js';

export function have(tool: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' }).status === 0;
}

/** True when the QEMU tools are there; under CI=true a missing tool is a failure. */
export function qemuTools(...extra: string[]): boolean {
  const missing = ['qemu-img', 'qemu-io', ...extra].filter((t) => !have(t));
  if (missing.length === 0) return true;
  if (process.env['CI'] === 'true') throw new Error(`required tools missing under CI: ${missing.join(', ')}`);
  process.stderr.write(`skipping qcow2 tests: missing ${missing.join(', ')}\n`);
  return false;
}

export const KiB = 1024;
export const MiB = 1024 * 1024;

export function tmp(prefix = 'blockd-qcow2-'): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

export function rm(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

export function qemuIo(img: string, fmt: string, ...cmds: string[]): void {
  execFileSync('qemu-io', ['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), img], { stdio: 'ignore' });
}

/** `qemu-img check` → {code, out}. */
export function check(img: string): { code: number; out: string } {
  const r = spawnSync('qemu-img', ['check', img], { encoding: 'utf8' });
  return { code: r.status ?? -1, out: `${r.stdout}${r.stderr}` };
}

/** The guest content of an image, via qemu-img convert to raw. */
export function contentOf(img: string, dir: string, fmt = 'qcow2'): Buffer {
  const out = join(dir, `content-${Math.random().toString(36).slice(2)}.raw`);
  execFileSync('qemu-img', ['convert', '-f', fmt, '-O', 'raw', img, out], { stdio: 'ignore' });
  const b = readFileSync(out);
  rmSync(out);
  return b;
}

export function newGraph(): BlockGraph {
  return new BlockGraph(silentLogger());
}

export async function openQcow2(
  g: BlockGraph,
  name: string,
  filename: string,
  extra: Record<string, unknown> = {},
): Promise<BlockNode> {
  return g.add({ driver: 'qcow2', 'node-name': name, file: { driver: 'file', filename }, ...extra });
}

export async function readAll(node: BlockNode): Promise<Buffer> {
  const b = Buffer.alloc(node.size());
  const chunk = 4 * MiB;
  for (let off = 0; off < b.length; off += chunk) {
    await node.io.read(b.subarray(off, Math.min(b.length, off + chunk)), off);
  }
  return b;
}

/** First differing offset, or -1. */
export function firstDiff(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i += 4096) {
    const x = a.subarray(i, i + 4096);
    const y = b.subarray(i, i + 4096);
    if (!x.equals(y)) {
      for (let j = 0; j < x.length; j++) if (x[j] !== y[j]) return i + j;
    }
  }
  return -1;
}

/** Overwrite bytes of a file in place (hand-crafted corruption, header bits). */
export function poke(path: string, offset: number, data: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, data, 0, data.length, offset);
  } finally {
    closeSync(fd);
  }
}

/** Read `length` bytes of a file at `offset`. */
export function peek(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    closeSync(fd);
  }
}

/** Set incompatible feature bits (v3 header, offset 72) by hand. */
export function setIncompatible(path: string, bits: bigint): void {
  const b = peek(path, 72, 8);
  b.writeBigUInt64BE(b.readBigUInt64BE(0) | bits, 0);
  poke(path, 72, b);
}

/** `qemu-img info --output=json` (with -U, so an image open elsewhere can be read). */
export function imgInfo(img: string): Record<string, unknown> {
  return JSON.parse(qemuImg('info', '-U', '--output=json', img)) as Record<string, unknown>;
}
