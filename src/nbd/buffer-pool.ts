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

/**
 * Large reply buffers (big READs) are recycled: a fresh 256 KiB allocation costs page faults and
 * page zeroing in the kernel on every request. A buffer comes back only through
 * {@link releaseReplyBuffer}, which the connection calls once the socket write that carried it
 * has completed (the kernel has copied it), so a recycled buffer is never still in use.
 */
const LARGE_CLASSES = new Map<number, ArrayBuffer[]>();
/** ArrayBuffers handed out by the large pool (so that nothing else can be released into it). */
const LARGE_OWNED = new WeakSet<ArrayBuffer>();
/** Free buffers kept per size class. */
const LARGE_KEEP = 32;

function largeClass(n: number): number {
  return 2 ** Math.ceil(Math.log2(n));
}

/** An uninitialised buffer of `n` bytes. */
export function allocReplyBuffer(n: number): Buffer {
  if (n > MAX_POOLED) {
    const size = largeClass(n);
    const ab = LARGE_CLASSES.get(size)?.pop();
    if (ab !== undefined) return Buffer.from(ab, 0, n);
    const fresh = Buffer.allocUnsafeSlow(size);
    LARGE_OWNED.add(fresh.buffer);
    return fresh.subarray(0, n);
  }
  if (used + n > SLAB_SIZE) {
    slab = Buffer.allocUnsafeSlow(SLAB_SIZE);
    used = 0;
  }
  const b = slab.subarray(used, used + n);
  // Keep 8-byte alignment for the next buffer.
  used = (used + n + 7) & ~7;
  return b;
}

/** Whether `b` came from the large pool (and may be handed to {@link releaseReplyBuffer}). */
export function isRecyclable(b: Buffer): boolean {
  return b.length > MAX_POOLED && b.byteOffset === 0 && LARGE_OWNED.has(b.buffer as ArrayBuffer);
}

/** Give a large reply buffer back once nothing (socket, kernel, reader) uses it any more. */
export function releaseReplyBuffer(b: Buffer): void {
  const ab = b.buffer as ArrayBuffer;
  if (b.byteOffset !== 0 || !LARGE_OWNED.has(ab)) return;
  let list = LARGE_CLASSES.get(ab.byteLength);
  if (!list) LARGE_CLASSES.set(ab.byteLength, (list = []));
  if (list.length < LARGE_KEEP && !list.includes(ab)) list.push(ab);
}
