/** Test helpers around the optional native addon. */
import { afterEach, beforeEach } from 'vitest';
import { resetNativeOpsForTests } from '../../src/block/native.js';

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
