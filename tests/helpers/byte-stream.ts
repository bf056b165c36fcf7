/**
 * The bytes a socket delivers, read back in exact amounts: what the tests' raw protocol clients
 * build on. The source can change mid-stream (a TLS socket on top of the plain one after
 * NBD_OPT_STARTTLS); bytes already received stay.
 */
import type { Duplex } from 'node:stream';

export class ByteStream {
  private buf = Buffer.alloc(0);
  private waiters: Array<() => void> = [];
  private src: Duplex | undefined;
  closed = false;

  constructor(s: Duplex) {
    this.attach(s);
  }

  private readonly onData = (d: Buffer): void => {
    this.buf = Buffer.concat([this.buf, d]);
    this.wake();
  };

  private readonly onClose = (): void => {
    this.closed = true;
    this.wake();
  };

  /** Take the bytes of `s` from now on, and no longer those of the previous source. */
  attach(s: Duplex): void {
    this.src?.off('data', this.onData);
    this.src?.off('close', this.onClose);
    s.on('data', this.onData);
    s.on('close', this.onClose);
    s.on('error', () => undefined);
    this.src = s;
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  /** Read exactly n bytes; resolves undefined if the peer closes first. */
  async read(n: number): Promise<Buffer | undefined> {
    while (this.buf.length < n) {
      if (this.closed) return undefined;
      await new Promise<void>((r) => this.waiters.push(r));
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** Resolves true once the peer has closed the connection. */
  async waitClosed(): Promise<boolean> {
    while (!this.closed) await new Promise<void>((r) => this.waiters.push(r));
    return true;
  }
}
