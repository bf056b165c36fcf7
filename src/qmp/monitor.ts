/**
 * One QMP session on one connection (qmp.md §1): greeting, capability negotiation,
 * envelope checks in QEMU's order, `id` echo, events, in-order replies.
 */
import type { Logger } from '../util/logger.js';
import { DaemonError } from '../util/errors.js';
import type { QmpEvent } from '../util/events.js';
import type { Services } from './services.js';
import type { Dispatcher } from './dispatcher.js';
import { JsonStreamParser, encodeMessage, type JsonStreamResult, type JsonValue } from './json-stream.js';
import { versionInfo } from './commands/control.js';

/** A byte stream carrying one QMP session (socket, WebSocket, stdio). */
export interface QmpPeer {
  /** Queue text for the client; false when the caller should wait for `drained()`. */
  write(text: string): boolean;
  /** Resolves when the transport can take more output (or is closed). */
  drained(): Promise<void>;
  pause(): void;
  resume(): void;
  /** Close the connection (idempotent). */
  close(): void;
  onData(cb: (chunk: Buffer) => void): void;
  onClose(cb: () => void): void;
  readonly description: string;
}

export interface MonitorOptions {
  pretty?: boolean;
  /** The --monitor id, for logs. */
  id?: string;
}

/** Stop reading from a client once this many parsed messages wait to run. */
const QUEUE_HIGH = 256;
const QUEUE_LOW = 32;

class EnvelopeError extends Error {}

const isObject = (v: JsonValue | undefined): v is { [k: string]: JsonValue } =>
  typeof v === 'object' && v !== null && !Array.isArray(v) && typeof v !== 'bigint';

const INT64_MAX = 2n ** 63n - 1n;
const UINT64_MAX = 2n ** 64n - 1n;
/** The largest doubles below 2^63 and 2^64. */
const BELOW_2_63 = 2 ** 63 - 1024;
const BELOW_2_64 = 2 ** 64 - 2048;

/**
 * An exact integer beyond 2^53 as the nearest double that stays on the same side of QEMU's
 * int64/uint64 limits: INT64_MAX itself rounds to 2^63, which is no int64, and UINT64_MAX to
 * 2^64, which is no uint64; both are pulled back to the double just below.
 */
function bigToNumber(v: bigint): number {
  const n = Number(v);
  if (v <= INT64_MAX && n >= 2 ** 63) return BELOW_2_63;
  if (v <= UINT64_MAX && n >= 2 ** 64) return BELOW_2_64;
  return n;
}

/** Replace bigints (exact integers beyond 2^53) by numbers before validation. */
function plainNumbers(v: JsonValue): unknown {
  if (typeof v === 'bigint') return bigToNumber(v);
  if (Array.isArray(v)) return v.map(plainNumbers);
  if (isObject(v)) {
    const out: Record<string, unknown> = {};
    for (const [k, e] of Object.entries(v)) {
      Object.defineProperty(out, k, { value: plainNumbers(e), enumerable: true, writable: true, configurable: true });
    }
    return out;
  }
  return v;
}

export class MonitorSession {
  private readonly parser = new JsonStreamParser();
  private readonly queue: JsonStreamResult[] = [];
  private running = false;
  private paused = false;
  private closed = false;
  private negotiated = false;
  private oob = false;
  private readonly unsubscribe: () => void;
  private readonly log: Logger;
  private readonly pretty: boolean;
  private idleWaiters: Array<() => void> = [];

  constructor(
    private readonly peer: QmpPeer,
    private readonly services: Services,
    private readonly dispatcher: Dispatcher,
    log: Logger,
    opts: MonitorOptions = {},
  ) {
    this.pretty = opts.pretty ?? false;
    this.log = log.child({ component: 'monitor', monitor: opts.id, peer: peer.description });
    this.unsubscribe = services.events.subscribe((ev) => this.onEvent(ev));
    peer.onData((chunk) => this.feed(chunk));
    peer.onClose(() => this.teardown());
    this.log.info('QMP client connected');
    this.send({
      QMP: { version: versionInfo(), capabilities: ['oob'] },
    });
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Close the connection (monitor shutdown). */
  close(): void {
    this.peer.close();
    this.teardown();
  }

  /** Resolves when no command is queued or running (tests, orderly shutdown). */
  idle(): Promise<void> {
    if (!this.running && this.queue.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private teardown(): void {
    if (this.closed) return;
    this.closed = true;
    this.unsubscribe();
    this.queue.length = 0;
    this.log.info('QMP client disconnected');
  }

  private feed(chunk: Buffer): void {
    if (this.closed) return;
    let results: JsonStreamResult[];
    try {
      results = this.parser.push(chunk);
    } catch (err) {
      // Never expected; a parser bug must not take the daemon down.
      this.log.error({ err }, 'JSON parser failure; closing connection');
      this.close();
      return;
    }
    if (results.length === 0) return;
    for (const r of results) this.queue.push(r);
    if (!this.paused && this.queue.length >= QUEUE_HIGH) {
      this.paused = true;
      this.peer.pause();
    }
    void this.pump();
  }

  private async pump(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      while (!this.closed && this.queue.length > 0) {
        const msg = this.queue.shift() as JsonStreamResult;
        if (this.paused && this.queue.length <= QUEUE_LOW) {
          this.paused = false;
          this.peer.resume();
        }
        await this.handle(msg);
      }
    } finally {
      this.running = false;
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  private async handle(msg: JsonStreamResult): Promise<void> {
    if (!msg.ok) {
      await this.reply({ error: { class: 'GenericError', desc: msg.error } });
      return;
    }
    const req = msg.value;
    if (!isObject(req)) {
      await this.reply({ error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } });
      return;
    }
    const hasId = Object.hasOwn(req, 'id');
    const id = req.id;
    const withId = (body: Record<string, unknown>, idFirst: boolean): Record<string, unknown> => {
      if (!hasId) return body;
      return idFirst ? { id, ...body } : { ...body, id };
    };
    const fail = (cls: string, desc: string): Promise<void> =>
      this.reply(withId({ error: { class: cls, desc } }, true));

    let name: string;
    let isOob: boolean;
    try {
      ({ name, isOob } = this.checkEnvelope(req));
    } catch (err) {
      if (err instanceof EnvelopeError) return fail('GenericError', err.message);
      throw err;
    }
    if (!this.negotiated && name !== 'qmp_capabilities') {
      return fail('CommandNotFound', "Expecting capabilities negotiation with 'qmp_capabilities'");
    }
    if (this.negotiated && name === 'qmp_capabilities') {
      // QEMU runs the command's argument checks before its handler refuses it.
      try {
        this.dispatcher.validate(name, (isObject(req.arguments) ? plainNumbers(req.arguments) : {}) as Record<string, unknown>);
      } catch (err) {
        if (err instanceof DaemonError) return fail(err.qmpClass, err.message);
        throw err;
      }
      return fail('CommandNotFound', 'Capabilities negotiation is already complete, command ignored');
    }
    if (!this.dispatcher.has(name)) {
      return fail('CommandNotFound', `The command ${name} has not been found`);
    }
    if (isOob && !this.dispatcher.allowsOob(name)) {
      return fail('GenericError', `The command ${name} does not support OOB`);
    }
    const args = (isObject(req.arguments) ? plainNumbers(req.arguments) : {}) as Record<string, unknown>;
    let result;
    try {
      result = await this.dispatcher.execute(name, args, 'qmp');
    } catch (err) {
      if (err instanceof DaemonError) return fail(err.qmpClass, err.message);
      this.log.error({ err, command: name }, 'unexpected failure');
      return fail('GenericError', err instanceof Error ? err.message : String(err));
    }
    if (name === 'qmp_capabilities') {
      this.negotiated = true;
      const enable = args.enable;
      this.oob = Array.isArray(enable) && enable.includes('oob');
    }
    await this.reply(withId({ return: result.value }, false));
    for (const fn of result.after) {
      try {
        await fn();
      } catch (err) {
        this.log.error({ err, command: name }, 'after-reply hook failed');
      }
    }
  }

  /** qmp.md §1.5 steps 1–3. */
  private checkEnvelope(req: { [k: string]: JsonValue }): { name: string; isOob: boolean } {
    const keys = Object.keys(req);
    const hasExec = Object.hasOwn(req, 'execute');
    const hasOob = this.oob && Object.hasOwn(req, 'exec-oob');
    if (hasExec && typeof req.execute !== 'string') {
      throw new EnvelopeError("QMP input member 'execute' must be a string");
    }
    if (hasOob && typeof req['exec-oob'] !== 'string') {
      throw new EnvelopeError("QMP input member 'exec-oob' must be a string");
    }
    if (hasExec && hasOob) {
      const [a, b] = keys.indexOf('execute') < keys.indexOf('exec-oob')
        ? ['execute', 'exec-oob']
        : ['exec-oob', 'execute'];
      throw new EnvelopeError(`QMP input member '${a}' clashes with '${b}'`);
    }
    if (Object.hasOwn(req, 'arguments') && !isObject(req.arguments)) {
      throw new EnvelopeError("QMP input member 'arguments' must be an object");
    }
    for (const k of keys) {
      if (k === 'execute' || k === 'arguments' || k === 'id') continue;
      if (k === 'exec-oob' && this.oob) continue;
      throw new EnvelopeError(`QMP input member '${k}' is unexpected`);
    }
    if (!hasExec && !hasOob) throw new EnvelopeError("QMP input lacks member 'execute'");
    return hasExec
      ? { name: req.execute as string, isOob: false }
      : { name: req['exec-oob'] as string, isOob: true };
  }

  private onEvent(ev: QmpEvent): void {
    if (this.closed || !this.negotiated) return;
    this.send({ timestamp: ev.timestamp, event: ev.event, data: ev.data });
  }

  private send(msg: unknown): boolean {
    if (this.closed) return true;
    try {
      return this.peer.write(encodeMessage(msg, this.pretty));
    } catch (err) {
      this.log.warn({ err }, 'write to QMP client failed');
      this.close();
      return true;
    }
  }

  private async reply(msg: Record<string, unknown>): Promise<void> {
    if (!this.send(msg) && !this.closed) await this.peer.drained();
  }
}
