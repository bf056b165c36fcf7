/** Test helpers around the optional native addon. */
import { afterEach, beforeEach } from 'vitest';
import { closeSync, openSync } from 'node:fs';
import { nativeOps, resetNativeOpsForTests } from '../../src/block/native.js';

/**
 * Whether the addon can tell what is in the page cache (cachestat(2), Linux >= 6.5): without it
 * no file range is ever handed out for sendfile.
 */
export function cachestatWorks(): boolean {
  const cached = nativeOps().cachedRange;
  if (!cached) return false;
  const fd = openSync('/proc/self/exe', 'r');
  try {
    return cached(fd, 0, 4096) !== -1;
  } finally {
    closeSync(fd);
  }
}

/**
 * Call inside a describe block: every test in it runs with `BLOCKD_NO_ADDON=1` (the pure-JS
 * fallback); the previous setting is restored after each test.
 */
export function withoutAddon(): void {
  let saved: string | undefined;
  beforeEach(() => {
    saved = process.env['BLOCKD_NO_ADDON'];
    process.env['BLOCKD_NO_ADDON'] = '1';
    resetNativeOpsForTests();
  });
  afterEach(() => {
    if (saved === undefined) delete process.env['BLOCKD_NO_ADDON'];
    else process.env['BLOCKD_NO_ADDON'] = saved;
    resetNativeOpsForTests();
  });
}
