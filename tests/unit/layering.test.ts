import { describe, expect, it } from 'vitest';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

// The layering of STYLE.md: cli -> qmp -> export -> block / nbd, everything -> util.
const SRC = resolve(dirname(fileURLToPath(import.meta.url)), '../../src');
const ALLOWED: Record<string, readonly string[]> = {
  util: ['util'],
  block: ['block', 'util'],
  nbd: ['nbd', 'util'],
  export: ['export', 'block', 'nbd', 'util'],
  qmp: ['qmp', 'export', 'block', 'nbd', 'util'],
  cli: ['cli', 'qmp', 'export', 'block', 'nbd', 'util'],
};

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    return statSync(p).isDirectory() ? sources(p) : p.endsWith('.ts') ? [p] : [];
  });
}

function imports(file: string): string[] {
  const text = readFileSync(file, 'utf8');
  const out: string[] = [];
  for (const m of text.matchAll(/(?:import|export)\s[^'"]*?from\s+['"]([^'"]+)['"]/g)) out.push(m[1]!);
  for (const m of text.matchAll(/import\(\s*['"]([^'"]+)['"]\s*\)/g)) out.push(m[1]!);
  return out;
}

describe('source layering', () => {
  it('keeps every import inside the layers STYLE.md allows', () => {
    const violations: string[] = [];
    let checked = 0;
    for (const file of sources(SRC)) {
      const layer = relative(SRC, file).split('/')[0]!;
      const allowed = ALLOWED[layer];
      expect(allowed, `unknown layer ${layer}`).toBeDefined();
      for (const spec of imports(file)) {
        if (!spec.startsWith('.')) continue;
        checked++;
        const target = relative(SRC, resolve(dirname(file), spec)).split('/')[0]!;
        if (!allowed!.includes(target)) violations.push(`${relative(SRC, file)} imports ${spec}`);
      }
    }
    expect(checked).toBeGreaterThan(100);
    expect(violations).toEqual([]);
  });

  it('writes no console output from src/', () => {
    const offenders = sources(SRC).filter((f) => /\bconsole\.(log|error|warn|info)\(/.test(readFileSync(f, 'utf8')));
    expect(offenders.map((f) => relative(SRC, f))).toEqual([]);
  });
});
