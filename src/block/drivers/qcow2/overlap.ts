/**
 * qcow2 metadata overlap checks (QEMU's `overlap-check` option): before the driver writes to the
 * image file it makes sure the target clusters hold no metadata of a kind it is not rewriting.
 *
 * The driver keeps a map from host cluster index to the metadata kinds stored there, updated
 * as metadata is allocated and freed, so a check is one map lookup per cluster written.
 */
import { optError } from '../common.js';

// Kinds, in QEMU's bit order (the lowest set bit names the overlap in messages).
export const OL_MAIN_HEADER = 1 << 0;
export const OL_ACTIVE_L1 = 1 << 1;
export const OL_ACTIVE_L2 = 1 << 2;
export const OL_REFCOUNT_TABLE = 1 << 3;
export const OL_REFCOUNT_BLOCK = 1 << 4;
export const OL_SNAPSHOT_TABLE = 1 << 5;
export const OL_INACTIVE_L1 = 1 << 6;
export const OL_INACTIVE_L2 = 1 << 7;
export const OL_BITMAP_DIRECTORY = 1 << 8;

/** Checks that need no table walk. */
export const OL_CONSTANT = OL_MAIN_HEADER | OL_ACTIVE_L1 | OL_REFCOUNT_TABLE | OL_SNAPSHOT_TABLE | OL_BITMAP_DIRECTORY;
/** Everything known from in-memory tables (QEMU's default). */
export const OL_CACHED = OL_CONSTANT | OL_ACTIVE_L2 | OL_REFCOUNT_BLOCK | OL_INACTIVE_L1;
/** Also the snapshots' L2 tables (read once at open). */
export const OL_ALL = OL_CACHED | OL_INACTIVE_L2;

/** Names as QEMU prints them ("overlaps with %s"). */
const OL_NAMES = [
  'qcow2_header',
  'active L1 table',
  'active L2 table',
  'refcount table',
  'refcount block',
  'snapshot table',
  'inactive L1 table',
  'inactive L2 table',
  'bitmap directory',
] as const;

/** Per-kind members of the object form of the option. */
const OL_MEMBERS: ReadonlyArray<readonly [string, number]> = [
  ['main-header', OL_MAIN_HEADER],
  ['active-l1', OL_ACTIVE_L1],
  ['active-l2', OL_ACTIVE_L2],
  ['refcount-table', OL_REFCOUNT_TABLE],
  ['refcount-block', OL_REFCOUNT_BLOCK],
  ['snapshot-table', OL_SNAPSHOT_TABLE],
  ['inactive-l1', OL_INACTIVE_L1],
  ['inactive-l2', OL_INACTIVE_L2],
  ['bitmap-directory', OL_BITMAP_DIRECTORY],
];

const TEMPLATES: Readonly<Record<string, number>> = {
  none: 0,
  constant: OL_CONSTANT,
  cached: OL_CACHED,
  all: OL_ALL,
};

/** Name of the lowest kind in `kinds`. */
export function overlapName(kinds: number): string {
  for (let b = 0; b < OL_NAMES.length; b++) if (kinds & (1 << b)) return OL_NAMES[b] as string;
  return 'metadata';
}

/**
 * `overlap-check`: a template name (`none`, `constant`, `cached`, `all`) or an object with an
 * optional `template` and per-kind booleans that override it (QAPI Qcow2OverlapChecks).
 * Returns the kinds to check; absent = `cached`.
 */
export function parseOverlapCheck(v: unknown): number {
  if (v === undefined) return OL_CACHED;
  const template = (t: unknown, key: string): number => {
    if (typeof t !== 'string') throw optError(`Invalid parameter type for '${key}', expected: string`);
    const m = TEMPLATES[t];
    if (m === undefined) throw optError(`Parameter '${key}' does not accept value '${t}'`);
    return m;
  };
  if (typeof v === 'string') return template(v, 'overlap-check');
  if (v === null || typeof v !== 'object' || Array.isArray(v)) {
    throw optError("Invalid parameter type for 'overlap-check', expected: string");
  }
  const o = v as Record<string, unknown>;
  const known = new Set(['template', ...OL_MEMBERS.map(([k]) => k)]);
  for (const k of Object.keys(o)) {
    if (!known.has(k)) throw optError(`Parameter 'overlap-check.${k}' is unexpected`);
  }
  let mask = o['template'] === undefined ? OL_CACHED : template(o['template'], 'template');
  for (const [k, bit] of OL_MEMBERS) {
    const b = o[k];
    if (b === undefined) continue;
    if (typeof b !== 'boolean') throw optError(`Invalid parameter type for 'overlap-check.${k}', expected: boolean`);
    mask = b ? mask | bit : mask & ~bit;
  }
  return mask;
}

/** Host cluster index -> metadata kinds stored there. */
export class MetadataMap {
  private readonly kinds = new Map<number, number>();

  constructor(private readonly clusterSize: number) {}

  /** Record `kind` on the clusters of `[offset, offset+bytes)`. */
  add(offset: number, bytes: number, kind: number): void {
    const first = Math.floor(offset / this.clusterSize);
    const end = Math.ceil((offset + Math.max(bytes, 1)) / this.clusterSize);
    for (let c = first; c < end; c++) this.kinds.set(c, (this.kinds.get(c) ?? 0) | kind);
  }

  /** Forget `kind` on the clusters of `[offset, offset+bytes)`. */
  remove(offset: number, bytes: number, kind: number): void {
    const first = Math.floor(offset / this.clusterSize);
    const end = Math.ceil((offset + Math.max(bytes, 1)) / this.clusterSize);
    for (let c = first; c < end; c++) {
      const k = (this.kinds.get(c) ?? 0) & ~kind;
      if (k === 0) this.kinds.delete(c);
      else this.kinds.set(c, k);
    }
  }

  /** Kinds (within `mask`) stored on host cluster `c`; 0 when none. */
  at(c: number, mask: number): number {
    const k = this.kinds.get(c);
    return k === undefined ? 0 : k & mask;
  }

  /** Kinds (within `mask`) stored anywhere in `[offset, offset+length)`; 0 when none. */
  check(offset: number, length: number, mask: number): number {
    if (mask === 0 || length <= 0) return 0;
    const first = Math.floor(offset / this.clusterSize);
    const end = Math.ceil((offset + length) / this.clusterSize);
    let hit = 0;
    for (let c = first; c < end; c++) {
      const k = this.kinds.get(c);
      if (k !== undefined) hit |= k & mask;
    }
    return hit;
  }
}
