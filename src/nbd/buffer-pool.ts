/**
 * Reply (and gathered WRITE payload) buffers.
 *
 * Tiny buffers (headers, simple replies) are carved from a shared slab, like Node's own Buffer
 * pool but larger; a slab is never reused, it is released by the GC once every buffer carved
 * from it is gone, so no use-after-free is possible.
 *
 * Everything from {@link MIN_RECYCLED} bytes up (4 KiB read replies, big reads, gathered
 * writes, the batch a connection writes in one go) comes from size classes and is recycled: a
 * fresh ArrayBuffer per request costs page faults and page zeroing in the kernel, and the
 * external-memory growth makes V8 run a full mark-compact every few dozen MiB. A buffer comes
 * back only through {@link releaseReplyBuffer}, which its user calls once nothing (socket,
 * kernel, backend) uses it any more; one that is never released is simply collected.
 */
const SLAB_SIZE = 2 * 1024 * 1024;
/** Buffers of at least this size come from the recycled size classes. */
const MIN_RECYCLED = 1024;
/** Up to this size, classes are multiples of 1 KiB (a 4 KiB read reply fits 5 KiB); above, powers of two. */
const FINE_MAX = 64 * 1024;

let slab: Buffer = Buffer.allocUnsafeSlow(SLAB_SIZE);
let used = 0;

const CLASSES = new Map<number, ArrayBuffer[]>();
/** ArrayBuffers handed out by the pool (so that nothing else can be released into it). */
const OWNED = new WeakSet<ArrayBuffer>();
/** ArrayBuffers sitting in a free list (a second release of one is ignored). */
const FREE = new WeakSet<ArrayBuffer>();

/** Free buffers kept per size class: small classes serve many requests in flight at once. */
function keepFor(size: number): number {
  return size <= FINE_MAX ? 512 : size <= 1024 * 1024 ? 64 : 8;
}

function sizeClass(n: number): number {
  return n <= FINE_MAX ? (n + 1023) & ~1023 : 2 ** Math.ceil(Math.log2(n));
}

/** An uninitialised buffer of `n` bytes. */
export function allocReplyBuffer(n: number): Buffer {
  if (n >= MIN_RECYCLED) {
    const size = sizeClass(n);
    const ab = CLASSES.get(size)?.pop();
    if (ab !== undefined) {
      FREE.delete(ab);
      return Buffer.from(ab, 0, n);
    }
    const fresh = Buffer.allocUnsafeSlow(size);
    OWNED.add(fresh.buffer);
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

/** Whether `b` is a whole buffer from the size classes (and may go to {@link releaseReplyBuffer}). */
export function isRecyclable(b: Buffer): boolean {
  return b.length >= MIN_RECYCLED && b.byteOffset === 0 && OWNED.has(b.buffer as ArrayBuffer);
}

/** Give a buffer back once nothing (socket, kernel, reader, backend) uses it any more. */
export function releaseReplyBuffer(b: Buffer): void {
  const ab = b.buffer as ArrayBuffer;
  if (b.byteOffset !== 0 || !OWNED.has(ab) || FREE.has(ab)) return;
  let list = CLASSES.get(ab.byteLength);
  if (!list) CLASSES.set(ab.byteLength, (list = []));
  if (list.length < keepFor(ab.byteLength)) {
    list.push(ab);
    FREE.add(ab);
  }
}
