/**
 * A minimal stand-in for net.Socket so NbdConnection can be driven by scripted bytes
 * in unit tests: `feed()` delivers client bytes, `output()` returns what the server wrote.
 */
import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import { SocketTransport } from '../../src/nbd/transport.js';

export class FakeSocket extends EventEmitter {
  readonly written: Buffer[] = [];
  destroyed = false;
  ended = false;
  paused = true;
  writableNeedDrain = false;
  writableLength = 0;
  private corked = 0;

  setNoDelay(): this {
    return this;
  }
  pause(): this {
    this.paused = true;
    return this;
  }
  resume(): this {
    this.paused = false;
    return this;
  }
  cork(): void {
    this.corked++;
  }
  uncork(): void {
    this.corked--;
  }
  write(b: Buffer): boolean {
    if (this.ended || this.destroyed) throw new Error('write after end');
    this.written.push(Buffer.from(b));
    return true;
  }
  end(cb?: () => void): this {
    this.ended = true;
    queueMicrotask(() => cb?.());
    return this;
  }
  destroy(): this {
    if (this.destroyed) return this;
    this.destroyed = true;
    queueMicrotask(() => this.emit('close', false));
    return this;
  }
  /** Deliver client bytes. */
  feed(b: Buffer): void {
    if (!this.destroyed) this.emit('data', b);
  }
  output(): Buffer {
    return Buffer.concat(this.written);
  }
  asSocket(): Socket {
    return this as unknown as Socket;
  }
  /** The transport an NbdConnection runs on; `userBuffer`: reads come through its onRead(). */
  asTransport(userBuffer = false): SocketTransport {
    return new SocketTransport(this.asSocket(), userBuffer);
  }
}

/** Let queued nextTicks, microtasks and zero-delay backend promises run. */
export async function settle(rounds = 5): Promise<void> {
  for (let i = 0; i < rounds; i++) await new Promise((r) => setImmediate(r));
}
