/**
 * Owns the partial chunks read from a socket and hands out contiguous views of the
 * next N bytes. Headers that lie inside one chunk are decoded in place (no copy);
 * only a header or payload straddling chunk boundaries is copied once.
 */
export class FrameReader {
  private chunks: Buffer[] = [];
  /** Read position inside chunks[0]. */
  private head = 0;
  /** Bytes available. */
  length = 0;
  /**
   * Chunks may be overwritten once the current read callback returns (the socket reads into one
   * reused buffer): nothing may keep a view of them, and {@link own} must run before returning.
   */
  volatile = false;
  /** After {@link ensure}: the buffer holding the next bytes, and their offset in it. */
  buf: Buffer = Buffer.alloc(0);
  pos = 0;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /**
   * Make the next `n` bytes contiguous and point {@link buf}/{@link pos} at them.
   * Returns false (and changes nothing) when fewer than `n` bytes are buffered.
   */
  ensure(n: number): boolean {
    if (this.length < n) return false;
    let first = this.chunks[0]!;
    if (first.length - this.head < n) {
      // Coalesce just enough leading chunks into one buffer.
      const merged = Buffer.allocUnsafe(Math.max(n, 0));
      let filled = 0;
      while (filled < n) {
        const c = this.chunks[0]!;
        const avail = c.length - this.head;
        const take = Math.min(avail, n - filled);
        c.copy(merged, filled, this.head, this.head + take);
        filled += take;
        if (take === avail) {
          this.chunks.shift();
          this.head = 0;
        } else {
          this.head += take;
        }
      }
      // Put the merged bytes back in front as their own chunk.
      if (this.head === 0) {
        this.chunks.unshift(merged);
      } else {
        const rest = this.chunks[0]!.subarray(this.head);
        this.chunks[0] = rest;
        this.chunks.unshift(merged);
        this.head = 0;
      }
      first = merged;
    }
    this.buf = first;
    this.pos = this.head;
    return true;
  }

  /** Whether the next `n` bytes (n <= length) lie in one chunk (so {@link take} makes no copy). */
  contiguous(n: number): boolean {
    const first = this.chunks[0];
    return first !== undefined && first.length - this.head >= n;
  }

  /** Drop `n` bytes (n <= length). */
  consume(n: number): void {
    this.length -= n;
    while (n > 0) {
      const c = this.chunks[0]!;
      const avail = c.length - this.head;
      if (n < avail) {
        this.head += n;
        return;
      }
      n -= avail;
      this.chunks.shift();
      this.head = 0;
    }
  }

  /** Take the next `n` bytes as one Buffer: a view when contiguous, else one copy. */
  take(n: number): Buffer {
    if (!this.ensure(n)) throw new RangeError('FrameReader.take past end');
    const b = this.buf.subarray(this.pos, this.pos + n);
    this.consume(n);
    return b;
  }

  /** Discard up to `n` bytes; returns how many were discarded. */
  skip(n: number): number {
    const k = Math.min(n, this.length);
    this.consume(k);
    return k;
  }

  /**
   * Copy up to `n` bytes into `dst` at `dstOff`, consuming them; returns the count.
   * Used to gather a WRITE payload that arrives across several socket reads.
   */
  copyOut(dst: Buffer, dstOff: number, n: number): number {
    let done = 0;
    while (done < n && this.length > 0) {
      const c = this.chunks[0]!;
      const take = Math.min(c.length - this.head, n - done);
      c.copy(dst, dstOff + done, this.head, this.head + take);
      done += take;
      this.consume(take);
    }
    return done;
  }

  /** Copy the unread bytes out of volatile chunks into one buffer of our own. */
  own(): void {
    if (this.length === 0) {
      this.chunks = [];
      this.head = 0;
      return;
    }
    const b = Buffer.allocUnsafe(this.length);
    let filled = 0;
    for (const c of this.chunks) {
      const from = filled === 0 ? this.head : 0;
      filled += c.copy(b, filled, from);
    }
    this.chunks = [b];
    this.head = 0;
  }

  clear(): void {
    this.chunks = [];
    this.head = 0;
    this.length = 0;
  }
}
