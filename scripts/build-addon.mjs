#!/usr/bin/env node
// Build the optional native addon (native/ -> native/build/Release/blockd_native.node).
// The daemon works without it (src/block/native.ts falls back to pure JS), so a failed build
// is reported and exits 0 unless --strict is given (CI uses --strict where a compiler exists).
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const nativeDir = join(root, 'native');
const strict = process.argv.includes('--strict');

function findNodeGyp() {
  const candidates = [];
  const npmPrefix = spawnSync('npm', ['prefix', '-g'], { encoding: 'utf8' });
  if (npmPrefix.status === 0) {
    candidates.push(join(npmPrefix.stdout.trim(), 'lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js'));
  }
  candidates.push(join(dirname(process.execPath), '../lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js'));
  return candidates.find((p) => existsSync(p));
}

const gyp = findNodeGyp();
const args = ['rebuild', '--directory', nativeDir];
// Use the installed headers (no download: the build machines have no internet access).
const headers = ['/usr/include/node', join(dirname(process.execPath), '../include/node')].find((d) =>
  existsSync(join(d, 'node_api.h')),
);
if (headers) args.push(`--nodedir=${dirname(dirname(headers))}`);

const res = gyp
  ? spawnSync(process.execPath, [gyp, ...args], { stdio: 'inherit' })
  : spawnSync('npx', ['--no-install', 'node-gyp', ...args], { stdio: 'inherit' });
if (res.status !== 0) {
  console.error('build-addon: native addon build failed; blockd will use the pure-JS fallback');
  process.exit(strict ? 1 : 0);
}
console.log('build-addon: built native/build/Release/blockd_native.node');
