/**
 * Running bin/blockd as a child process in integration tests: build once, spawn with stdout and
 * stderr captured (NDJSON log records dropped from stderr), and clean up children and temp
 * directories after each test.
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

export const ROOT = resolve(import.meta.dirname, '../..');
export const BIN = join(ROOT, 'bin/blockd');

export interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Newest modification time of the TypeScript sources under src/. */
function newestSource(dir = join(ROOT, 'src')): number {
  let newest = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    newest = Math.max(newest, e.isDirectory() ? newestSource(p) : statSync(p).mtimeMs);
  }
  return newest;
}

/**
 * Make sure dist/ is built from the current sources (the launcher runs the compiled code):
 * compiles only when a source is newer than dist/. Use in a beforeAll with a long timeout.
 */
export function buildDist(): void {
  const main = join(ROOT, 'dist/cli/main.js');
  if (existsSync(main) && statSync(main).mtimeMs >= newestSource()) return;
  try {
    execFileSync('npx', ['tsc', '-p', ROOT], { cwd: ROOT, stdio: 'ignore' });
  } catch {
    // Type errors elsewhere in the tree do not stop tsc from emitting dist/.
  }
  if (!existsSync(join(ROOT, 'dist/cli/main.js'))) throw new Error('build did not produce dist/cli/main.js');
}

const children = new Set<ChildProcess>();
const dirs: string[] = [];

/** Kill children still running and remove temp dirs; use in an afterEach. */
export function cleanupProcesses(): void {
  for (const c of children) if (c.exitCode === null && c.pid !== undefined) c.kill('SIGKILL');
  children.clear();
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
}

/** A temp dir removed by cleanupProcesses(). */
export function tempDir(prefix = 'blockd-cli-'): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  dirs.push(d);
  return d;
}

/** Start blockd; `done` resolves with its exit code and output once it has exited. */
export function startBlockd(
  args: string[],
  opts: { cwd?: string; env?: Record<string, string> } = {},
): { child: ChildProcess; done: Promise<Run> } {
  const child = spawn(BIN, [...args], {
    cwd: opts.cwd ?? ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, BLOCKD_DAEMONIZED_CHILD: '', ...opts.env },
  });
  children.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout?.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  // NDJSON log records (warn level by default) are not part of the QSD-compatible output.
  const text = (): string =>
    stderr
      .split(/(?<=\n)/)
      .filter((l) => !l.startsWith('{"level":'))
      .join('');
  const done = new Promise<Run>((res) => child.on('close', (code) => res({ code, stdout, stderr: text() })));
  return { child, done };
}

/** Run blockd to its end. */
export const runBlockd = (args: string[], opts: { cwd?: string } = {}): Promise<Run> => startBlockd(args, opts).done;
