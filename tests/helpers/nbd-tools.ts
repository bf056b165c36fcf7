/**
 * External NBD client tools for integration tests. A missing tool skips its tests with
 * a clear message, except under CI=true where it fails them.
 */
import { execFile, execFileSync } from 'node:child_process';
import { promisify } from 'node:util';

export const execFileP = promisify(execFile);

const cache = new Map<string, string | undefined>();

/** Absolute command for `tool` (or a python3 that can `import nbd`), or undefined. */
export function findTool(tool: string): string | undefined {
  if (cache.has(tool)) return cache.get(tool);
  let found: string | undefined;
  if (tool === 'python3-nbd') {
    for (const py of ['python3', '/usr/bin/python3']) {
      try {
        execFileSync(py, ['-c', 'import nbd'], { stdio: 'ignore' });
        found = py;
        break;
      } catch {
        /* try the next one */
      }
    }
  } else {
    try {
      found = execFileSync('sh', ['-c', `command -v ${tool}`], { encoding: 'utf8' }).trim() || undefined;
    } catch {
      found = undefined;
    }
  }
  cache.set(tool, found);
  return found;
}

/**
 * Returns the tool path, or undefined after registering why it is missing: tests call
 * `ctx.skip()` on undefined. Under CI=true a missing tool throws instead.
 */
export function requireTool(tool: string): string | undefined {
  const t = findTool(tool);
  if (t === undefined) {
    const msg = `external tool '${tool}' is not installed`;
    if (process.env.CI === 'true') throw new Error(`${msg} (required when CI=true)`);
    console.warn(`skipping: ${msg}`);
  }
  return t;
}
