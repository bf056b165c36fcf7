#!/usr/bin/env node
// blockd launcher: runs the compiled daemon (npm run build writes dist/).
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const main = new URL('../dist/cli/main.js', import.meta.url);
if (!existsSync(fileURLToPath(main))) {
  process.stderr.write(
    'blockd: dist/cli/main.js is missing: run "npm run build" in the blockd directory first\n',
  );
  process.exit(1);
}
const { run } = await import(main.href);
await run(process.argv.slice(2));
