/**
 * Small QMP test client: connect over unix, TCP or WebSocket, read the greeting,
 * send commands, collect events. Replies are matched in order (QMP answers in order).
 */
import net from 'node:net';
import { WebSocket } from 'ws';

export type QmpMessage = Record<string, unknown>;

export interface QmpReply {
  return?: unknown;
  error?: { class: string; desc: string };
  id?: unknown;
}

export type QmpTarget =
  | { path: string }
  | { host?: string; port: number }
  | { ws: string };

export class QmpTestClient {
  /** Every event received, in order. */
  readonly events: QmpMessage[] = [];
  greeting: QmpMessage | undefined;
  private buf = '';
  private readonly messages: QmpMessage[] = [];
  private waiters: Array<() => void> = [];
  private closed = false;
  private sendRaw: (data: string | Buffer) => void = () => undefined;
  private closer: () => void = () => undefined;

  /** Connect and wait for the greeting. */
  static async connect(target: QmpTarget, opts: { negotiate?: boolean } = {}): Promise<QmpTestClient> {
    const c = new QmpTestClient();
    await c.open(target);
    c.greeting = await c.next();
    if (opts.negotiate === true) {
      const r = await c.cmd('qmp_capabilities');
      if (r.error !== undefined) throw new Error(`negotiation failed: ${r.error.desc}`);
    }
    return c;
  }

  /** Connect without waiting for the greeting (e.g. a queued second client). */
  static async connectRaw(target: QmpTarget): Promise<QmpTestClient> {
    const c = new QmpTestClient();
    await c.open(target);
    return c;
  }

  private open(target: QmpTarget): Promise<void> {
    if ('ws' in target) {
      const ws = new WebSocket(target.ws);
      ws.on('message', (d: Buffer) => this.onText(d.toString('utf8')));
      ws.on('close', () => this.onClose());
      ws.on('error', () => this.onClose());
      this.sendRaw = (data) => ws.send(data);
      this.closer = () => ws.close();
      return new Promise((resolve, reject) => {
        ws.once('open', () => resolve());
        ws.once('error', reject);
      });
    }
    const sock =
      'path' in target
        ? net.connect({ path: target.path })
        : net.connect({ host: target.host ?? '127.0.0.1', port: target.port });
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => this.onText(d));
    sock.on('close', () => this.onClose());
    sock.on('error', () => this.onClose());
    this.sendRaw = (data) => {
      if (!sock.destroyed) sock.write(data);
    };
    this.closer = () => sock.destroy();
    return new Promise((resolve, reject) => {
      sock.once('connect', () => resolve());
      sock.once('error', reject);
    });
  }

  private onText(text: string): void {
    this.buf += text;
    let i: number;
    while ((i = this.buf.indexOf('\r\n')) >= 0) {
      const line = this.buf.slice(0, i);
      this.buf = this.buf.slice(i + 2);
      if (line.trim() === '') continue;
      const msg = JSON.parse(line) as QmpMessage;
      if ('event' in msg) this.events.push(msg);
      else this.messages.push(msg);
    }
    this.wake();
  }

  private onClose(): void {
    this.closed = true;
    this.wake();
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** The next non-event message; rejects on EOF. */
  async next(): Promise<QmpMessage> {
    for (;;) {
      const m = this.messages.shift();
      if (m !== undefined) return m;
      if (this.closed) throw new Error('QMP connection closed');
      await new Promise<void>((r) => this.waiters.push(r));
    }
  }

  /** Resolves when the server closes the connection. */
  async waitClosed(): Promise<void> {
    while (!this.closed) await new Promise<void>((r) => this.waiters.push(r));
  }

  /** Wait until `n` events have arrived in total. */
  async waitEvents(n: number): Promise<QmpMessage[]> {
    while (this.events.length < n && !this.closed) await new Promise<void>((r) => this.waiters.push(r));
    return this.events;
  }

  /** Send raw bytes/text. */
  send(data: string | Buffer): void {
    this.sendRaw(data);
  }

  /** Run a command and return its reply. */
  async cmd(name: string, args?: Record<string, unknown>, id?: unknown): Promise<QmpReply> {
    const msg: QmpMessage = { execute: name };
    if (args !== undefined) msg.arguments = args;
    if (id !== undefined) msg.id = id;
    this.sendRaw(JSON.stringify(msg));
    return (await this.next()) as QmpReply;
  }

  close(): void {
    this.closer();
  }
}
