/**
 * Slab allocator for reply buffers. Small buffers are carved from a shared slab
 * (like Node's own Buffer pool, but large enough for a 4 KiB read reply) instead of
 * creating one ArrayBuffer each; a slab is never reused, it is released by the GC
 * once every buffer carved from it is gone, so no use-after-free is possible.
 */
const SLAB_SIZE = 2 * 1024 * 1024;
/** Requests above this get their own allocation. */
const MAX_POOLED = 128 * 1024;

let slab: Buffer = Buffer.allocUnsafeSlow(SLAB_SIZE);
let used = 0;

/** An uninitialised buffer of `n` bytes. */
export function allocReplyBuffer(n: number): Buffer {
  if (n > MAX_POOLED) return Buffer.allocUnsafeSlow(n);
  if (used + n > SLAB_SIZE) {
    slab = Buffer.allocUnsafeSlow(SLAB_SIZE);
    used = 0;
  }
  const b = slab.subarray(used, used + n);
  // Keep 8-byte alignment for the next buffer.
  used = (used + n + 7) & ~7;
  return b;
}
