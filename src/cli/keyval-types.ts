/**
 * Typed conversion of a keyval string tree (see keyval.ts) by walking the command's
 * argument JSON Schema, the way QEMU's keyval input visitor reads option strings:
 * integers with C strtoll/strtoull base 0 rules (`0x` hex, leading-`0` octal), `size`
 * with binary suffixes, on/off booleans, enums, flat unions (`x-union`, the case picked by
 * the tag), alternates (`anyOf`/`oneOf` with `x-alternate`: a string branch wins for a
 * string), nested objects and arrays.
 *
 * Members are visited in schema order: a missing required member, a badly typed value and
 * (at the end of each object) an unexpected member are reported where QEMU's visitor would
 * report them, with the same texts (qsd-cli.md §3). The result is then validated again by
 * the dispatcher like any QMP `arguments`.
 */
import { CliError } from '../util/errors.js';
import type { JsonSchema, XInt } from '../qmp/schema-registry.js';
import type { KeyvalTree, KeyvalValue } from './keyval.js';

/** Follows `$ref` to the referenced schema (SchemaRegistry.deref in production). */
export type Deref = (node: JsonSchema) => JsonSchema;

export interface ConvertOptions {
  deref: Deref;
  /** Receives deprecation warnings (e.g. `backing=` meaning null). */
  warn?: (message: string) => void;
}

interface Path {
  /** Dotted path from the top (`addr.path`, `bitmaps[0]`). */
  full: string;
  /** The member's own name (QEMU uses it in enum and range errors); 'null' for list items. */
  bare: string;
}

const fail = (msg: string): never => {
  throw new CliError(msg, 'KEYVAL_TYPE');
};

const isTree = (v: KeyvalValue): v is KeyvalTree => typeof v === 'object' && !Array.isArray(v);
const join = (full: string, key: string): string => (full === '' ? key : `${full}.${key}`);

// --- scalar parsers (exported for tests) ---------------------------------------------

const SPACE = /^[ \t\n\v\f\r]*/;

/**
 * C `strtoll`/`strtoull` with base 0 over the whole string: optional leading white space
 * and sign, `0x` hex, leading-`0` octal, else decimal; nothing may follow.
 * Returns the magnitude with its sign, or undefined when the text is not a number.
 */
export function parseCInteger(text: string): bigint | undefined {
  let s = text.replace(SPACE, '');
  let neg = false;
  if (s[0] === '+' || s[0] === '-') {
    neg = s[0] === '-';
    s = s.slice(1);
  }
  let digits: RegExp;
  let body: string;
  let prefix: string;
  if (/^0[xX][0-9a-fA-F]/.test(s)) {
    digits = /^[0-9a-fA-F]+$/;
    body = s.slice(2);
    prefix = '0x';
  } else if (s.startsWith('0')) {
    digits = /^[0-7]+$/;
    body = s;
    prefix = '0o';
  } else {
    digits = /^[0-9]+$/;
    body = s;
    prefix = '';
  }
  if (!digits.test(body)) return undefined;
  const mag = BigInt(prefix === '' ? body : `${prefix}${body}`);
  return neg ? -mag : mag;
}

const TWO64 = 1n << 64n;
const TWO63 = 1n << 63n;

/** strtoll into int64 (QEMU qemu_strtoi64): undefined if not a number or out of range. */
export function parseInt64(text: string): bigint | undefined {
  const v = parseCInteger(text);
  if (v === undefined || v < -TWO63 || v >= TWO63) return undefined;
  return v;
}

/**
 * strtoull into uint64 (QEMU qemu_strtou64): a leading '-' negates modulo 2^64, as in C.
 * The result is returned as the int64 with the same bits (so `-1` stays `-1`, which the
 * QMP validator accepts for the uint64 family exactly as QEMU does).
 */
export function parseUint64Bits(text: string): bigint | undefined {
  const v = parseCInteger(text);
  if (v === undefined) return undefined;
  const mag = v < 0n ? -v : v;
  if (mag >= TWO64) return undefined;
  let bits = v < 0n ? (TWO64 - mag) % TWO64 : mag;
  if (bits >= TWO63) bits -= TWO64;
  return bits;
}

const SIZE_SUFFIX: Record<string, bigint> = {
  b: 1n,
  B: 1n,
  k: 1n << 10n,
  K: 1n << 10n,
  m: 1n << 20n,
  M: 1n << 20n,
  g: 1n << 30n,
  G: 1n << 30n,
  t: 1n << 40n,
  T: 1n << 40n,
  p: 1n << 50n,
  P: 1n << 50n,
  e: 1n << 60n,
  E: 1n << 60n,
};

/**
 * QEMU's size syntax (qemu_strtosz): decimal digits, an optional fraction (which needs a
 * suffix), an optional k/M/G/T/P/E (binary) or b suffix; or `0x` hex without fraction or
 * suffix. Leading white space is skipped; nothing may follow. Undefined when invalid or
 * not below 2^64.
 */
export function parseSize(text: string): bigint | undefined {
  const s = text.replace(SPACE, '');
  const hex = /^0[xX]([0-9a-fA-F]+)$/.exec(s);
  if (hex !== null) {
    const v = BigInt(`0x${hex[1] ?? ''}`);
    return v < TWO64 ? v : undefined;
  }
  const m = /^([0-9]+)(?:\.([0-9]*))?([bBkKmMgGtTpPeE])?$/.exec(s);
  if (m === null) return undefined;
  const int = BigInt(m[1] ?? '0');
  const frac = m[2];
  const suffix = m[3];
  const mul = suffix === undefined ? 1n : (SIZE_SUFFIX[suffix] ?? 1n);
  let total = int * mul;
  if (frac !== undefined && /[1-9]/.test(frac)) {
    if (mul === 1n) return undefined; // a fraction needs a scale
    const den = 10n ** BigInt(frac.length);
    total += (BigInt(frac) * mul) / den;
  }
  return total < TWO64 ? total : undefined;
}

/** QEMU's boolean words (qapi_bool_parse). */
export function parseBool(text: string): boolean | undefined {
  switch (text) {
    case 'on':
    case 'yes':
    case 'true':
    case 'y':
      return true;
    case 'off':
    case 'no':
    case 'false':
    case 'n':
      return false;
    default:
      return undefined;
  }
}

const INT_LIMITS: Record<XInt, { min: bigint; max: bigint; label: string } | undefined> = {
  int: undefined,
  int64: undefined,
  uint64: undefined,
  size: undefined,
  int8: { min: -128n, max: 127n, label: 'int8_t' },
  int16: { min: -32768n, max: 32767n, label: 'int16_t' },
  int32: { min: -(2n ** 31n), max: 2n ** 31n - 1n, label: 'int32_t' },
  uint8: { min: 0n, max: 255n, label: 'uint8_t' },
  uint16: { min: 0n, max: 65535n, label: 'uint16_t' },
  uint32: { min: 0n, max: 2n ** 32n - 1n, label: 'uint32_t' },
};

// --- the walker ------------------------------------------------------------------------

class Converter {
  constructor(private readonly opts: ConvertOptions) {}

  value(node: JsonSchema, v: KeyvalValue, path: Path): unknown {
    const s = this.opts.deref(node);
    const alts = s.anyOf ?? s.oneOf;
    if (alts !== undefined) return this.alternate(s, alts, v, path);

    const types = s.type === undefined ? [] : typeof s.type === 'string' ? [s.type] : s.type;
    const isObject =
      types.includes('object') || s.properties !== undefined || s['x-union'] !== undefined;
    if (isObject) return this.object(s, v, path);
    if (types.includes('array')) return this.array(s, v, path);
    if (types.length === 0 && s.enum === undefined && s.const === undefined) {
      return v; // "any": keep the tree as it is
    }

    if (typeof v !== 'string') fail(`Parameters '${path.full}.*' are unexpected`);
    return this.scalar(s, types, v as string, path);
  }

  private scalar(s: JsonSchema, types: string[], text: string, path: Path): unknown {
    const t = types[0] ?? (typeof (s.enum?.[0] ?? s.const) === 'string' ? 'string' : undefined);
    switch (t) {
      case 'string': {
        const allowed = s.enum ?? (s.const !== undefined ? [s.const] : undefined);
        if (allowed !== undefined && !allowed.includes(text)) {
          fail(`Parameter '${path.bare}' does not accept value '${text}'`);
        }
        return text;
      }
      case 'boolean': {
        const b = parseBool(text);
        if (b === undefined) fail(`Parameter '${path.full}' expects 'on' or 'off'`);
        return b;
      }
      case 'integer':
        return this.integer(s['x-int'] ?? 'int', text, path);
      case 'number': {
        const trimmed = text.replace(SPACE, '');
        const n = trimmed === '' ? Number.NaN : Number(trimmed);
        if (!Number.isFinite(n)) fail(`Parameter '${path.full}' expects number`);
        return n;
      }
      case 'null':
        if (text !== '') fail(`Invalid parameter type for '${path.full}', expected: null`);
        return null;
      default:
        return text;
    }
  }

  private integer(kind: XInt, text: string, path: Path): number {
    if (kind === 'size') {
      const v = parseSize(text);
      if (v === undefined) fail(`Parameter '${path.full}' expects size`);
      const bits = (v as bigint) >= TWO63 ? (v as bigint) - TWO64 : (v as bigint);
      return Number(bits);
    }
    const unsigned = kind.startsWith('uint');
    const v = unsigned ? parseUint64Bits(text) : parseInt64(text);
    if (v === undefined) fail(`Parameter '${path.full}' expects integer`);
    const lim = INT_LIMITS[kind];
    if (lim !== undefined) {
      // A negative uint value is a huge uint64 in QEMU: out of range for the narrow types.
      if ((v as bigint) < lim.min || (v as bigint) > lim.max) {
        fail(`Parameter '${path.bare}' expects ${lim.label}`);
      }
    }
    return Number(v);
  }

  private alternate(s: JsonSchema, alts: JsonSchema[], v: KeyvalValue, path: Path): unknown {
    const name = s['x-alternate'] ?? s['x-name'] ?? 'alternate';
    const kinds = alts.map((b) => this.kinds(b));
    if (typeof v === 'string') {
      // `backing=` (empty) for an alternate with a null branch: deprecated spelling of null.
      if (v === '' && kinds.some((k) => k.includes('null')) && kinds.some((k) => k.includes('string'))) {
        this.opts.warn?.(
          `Use of "${path.bare}": "" is deprecated; use "${path.bare}": null instead`,
        );
        return null;
      }
      const str = alts.find((_, i) => kinds[i]?.includes('string'));
      if (str !== undefined) return this.value(str, v, path);
      // No string branch: the first scalar branch that can read the text.
      for (let i = 0; i < alts.length; i++) {
        const k = kinds[i] ?? [];
        const branch = alts[i];
        if (branch === undefined) continue;
        if (k.some((x) => x === 'integer' || x === 'number' || x === 'boolean')) {
          try {
            return this.value(branch, v, path);
          } catch {
            // try the next branch
          }
        }
      }
      return fail(`Invalid parameter type for '${path.bare}', expected: ${name}`);
    }
    const want = Array.isArray(v) ? 'array' : 'object';
    const idx = kinds.findIndex((k) => k.includes(want));
    const branch = idx < 0 ? undefined : alts[idx];
    if (branch === undefined) return fail(`Invalid parameter type for '${path.bare}', expected: ${name}`);
    return this.value(branch, v, path);
  }

  /** The JSON kinds a branch accepts. */
  private kinds(node: JsonSchema): string[] {
    const s = this.opts.deref(node);
    if (s.type !== undefined) return typeof s.type === 'string' ? [s.type] : s.type;
    if (s.enum !== undefined) return ['string'];
    if (s.const !== undefined) return [s.const === null ? 'null' : typeof s.const];
    if (s.properties !== undefined || s['x-union'] !== undefined) return ['object'];
    const nested = s.anyOf ?? s.oneOf;
    if (nested !== undefined) return nested.flatMap((b) => this.kinds(b));
    return ['string', 'object', 'array', 'integer', 'number', 'boolean', 'null'];
  }

  private array(s: JsonSchema, v: KeyvalValue, path: Path): unknown[] {
    if (!Array.isArray(v)) return fail(`Invalid parameter type for '${path.full}', expected: array`);
    const items = s.items;
    return v.map((item, i) =>
      items === undefined ? item : this.value(items, item, { full: `${path.full}[${i}]`, bare: 'null' }),
    );
  }

  private object(s: JsonSchema, v: KeyvalValue, path: Path): Record<string, unknown> {
    if (!isTree(v)) return fail(`Invalid parameter type for '${path.full}', expected: object`);
    const out: Record<string, unknown> = {};
    const seen = new Set<string>();
    const visit = (obj: JsonSchema): void => {
      const required = new Set(obj.required ?? []);
      for (const [k, sub] of Object.entries(obj.properties ?? {})) {
        seen.add(k);
        const child = { full: join(path.full, k), bare: k };
        const cv = Object.hasOwn(v, k) ? v[k] : undefined;
        if (cv !== undefined) {
          out[k] = this.value(sub, cv, child);
        } else if (required.has(k)) {
          fail(`Parameter '${child.full}' is missing`);
        }
      }
      const union = obj['x-union'];
      if (union !== undefined) {
        const tag = out[union.tag];
        const c = typeof tag === 'string' && Object.hasOwn(union.cases, tag) ? union.cases[tag] : undefined;
        if (c !== undefined) visit(this.opts.deref(c));
      }
    };
    visit(s);
    const extra = s.additionalProperties;
    for (const k of Object.keys(v)) {
      if (seen.has(k)) continue;
      const cv = v[k] as KeyvalValue;
      const child = { full: join(path.full, k), bare: k };
      if (typeof extra === 'object' && extra !== null) {
        out[k] = this.value(extra, cv, child);
      } else if (extra === false || s['x-union'] !== undefined) {
        // A union is closed over base + variant members (schema/README.md).
        fail(`Parameter '${child.full}' is unexpected`);
      } else {
        out[k] = cv;
      }
    }
    return out;
  }
}

/**
 * Convert a keyval tree into typed JSON arguments for the object schema `schema`
 * (a command's `arguments`, or a named type). Throws `CliError` with QEMU's text.
 */
export function keyvalToTyped(
  tree: KeyvalTree,
  schema: JsonSchema,
  opts: ConvertOptions,
): Record<string, unknown> {
  const conv = new Converter(opts);
  return conv.value(schema, tree, { full: '', bare: 'null' }) as Record<string, unknown>;
}
