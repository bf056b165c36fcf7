/** Helpers shared by the drivers: option parsing with QEMU's error texts, JSON filenames. */
import { BlockError } from '../../util/errors.js';
import type { Logger } from '../../util/logger.js';
import type { NodeOptionsInfo } from '../node.js';
import type { BlockDriver, BlockIO } from '../types.js';
import type { ThrottleGroups } from '../throttle-group.js';

export type Options = Record<string, unknown>;

/** What a driver factory receives. Children are opened (or looked up) by the graph. */
export interface DriverOpenContext {
  nodeName: string;
  readOnly: boolean;
  options: NodeOptionsInfo;
  log: Logger;
  /** The I/O wrapper of a child edge, resolved at call time (edges can be moved). */
  childIO(role: string): BlockIO;
  /** The driver of a child (for json filenames). */
  childDriver(role: string): BlockDriver;
  /** Whether a child edge with this role exists now (optional children such as `backing`). */
  hasChild?(role: string): boolean;
  /**
   * Emit a QMP event for this node (e.g. BLOCK_IMAGE_CORRUPTED); absent when the graph has no
   * event sink (tests, tools).
   */
  emitEvent?(event: string, data: Record<string, unknown>): void;
  /** The graph's throttle groups (the `throttle` driver joins one). */
  throttleGroups?: ThrottleGroups;
}

export function optError(message: string): BlockError {
  return new BlockError('BAD_OPTION', 'EINVAL', message);
}

export function optString(o: Options, key: string, required: true): string;
export function optString(o: Options, key: string, required?: false): string | undefined;
export function optString(o: Options, key: string, required = false): string | undefined {
  const v = o[key];
  if (v === undefined) {
    if (required) throw optError(`Parameter '${key}' is missing`);
    return undefined;
  }
  if (typeof v !== 'string') throw optError(`Invalid parameter type for '${key}', expected: string`);
  return v;
}

export function optBool(o: Options, key: string): boolean | undefined {
  const v = o[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'boolean') throw optError(`Invalid parameter type for '${key}', expected: boolean`);
  return v;
}

/** A non-negative integer option (QAPI `size`/`uint64`/`int` used as a size), safe-integer bounded. */
export function optSize(o: Options, key: string, what: 'size' | 'uint64' | 'int' = 'size'): number | undefined {
  const v = o[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v)) {
    throw optError(`Invalid parameter type for '${key}', expected: ${what === 'int' ? 'integer' : 'integer'}`);
  }
  if (v < 0) throw optError(`Parameter '${key}' expects a non-negative number below 2^64`);
  if (!Number.isSafeInteger(v)) throw optError(`Parameter '${key}' expects a value below 2^53`);
  return v;
}

export function optEnum<T extends string>(o: Options, key: string, values: readonly T[]): T | undefined {
  const v = o[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'string') throw optError(`Invalid parameter type for '${key}', expected: string`);
  if (!(values as readonly string[]).includes(v)) throw optError(`Parameter '${key}' does not accept value '${v}'`);
  return v as T;
}

/** Refuse members a driver does not know (the schema does this too, but the CLI path may not). */
export function rejectUnknown(o: Options, known: readonly string[]): void {
  for (const k of Object.keys(o)) {
    if (!known.includes(k)) throw optError(`Parameter '${k}' is unexpected`);
  }
}

/** QEMU's `json:{...}` rendering: `{"a": 1, "b": {"c": "d"}}`. */
export function qemuJson(v: unknown): string {
  if (v !== null && typeof v === 'object' && !Array.isArray(v)) {
    const parts = Object.entries(v as Record<string, unknown>)
      .filter(([, x]) => x !== undefined)
      .map(([k, x]) => `${JSON.stringify(k)}: ${qemuJson(x)}`);
    return `{${parts.join(', ')}}`;
  }
  if (Array.isArray(v)) return `[${v.map(qemuJson).join(', ')}]`;
  return JSON.stringify(v);
}

/** Base members every BlockdevOptions has (handled by the graph, ignored by drivers). */
export const BASE_MEMBERS = [
  'driver',
  'node-name',
  'discard',
  'cache',
  'read-only',
  'auto-read-only',
  'force-share',
  'detect-zeroes',
  'active',
] as const;
