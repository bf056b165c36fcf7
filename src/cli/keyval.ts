/**
 * QEMU "keyval" option syntax (`--blockdev`, `--export`, `--monitor`, `--nbd-server`,
 * `--object`): `key=value,key.sub=value,...` turned into a tree of strings.
 *
 * Behaviour follows util/keyval.c of QEMU 7.2 as documented in
 * /work/shared/reference/qsd-cli.md §3 (independently written):
 * - dotted keys build nested objects; a fragment of digits (never the first) is a list
 *   index, and a level whose keys are all indexes becomes an array with no gaps;
 * - only `,` is special in values and is doubled to be literal (`,,`);
 * - the first element may be a bare value for the option's implied key;
 * - a bare `help` or `?` element asks for help;
 * - the last value of a repeated key wins; a trailing comma is allowed.
 *
 * Values stay strings; `keyval-types.ts` converts them with the command's schema.
 */
import { CliError } from '../util/errors.js';

/** A parsed keyval value: a string leaf, a nested object, or a list. */
export type KeyvalValue = string | KeyvalTree | KeyvalValue[];
export interface KeyvalTree {
  [key: string]: KeyvalValue;
}

export interface KeyvalResult {
  tree: KeyvalTree;
  /** A bare `help` or `?` element was present. */
  help: boolean;
}

/** QEMU limits a key fragment to 127 characters (a 128-byte buffer with its NUL). */
const MAX_FRAGMENT = 127;
const INT_MAX = 2147483647;

/** Intermediate representation: Maps keep insertion order and cannot collide with Object.prototype. */
type Node = string | Map<string, Node>;

const isDigit = (c: string | undefined): boolean => c !== undefined && c >= '0' && c <= '9';
const isAlpha = (c: string | undefined): boolean =>
  c !== undefined && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'));
const isAlnum = (c: string | undefined): boolean => isAlpha(c) || isDigit(c);

/**
 * Length of the QAPI name at `key[start..]` (a letter, then letters, digits, '-' or '_',
 * optionally preceded by a downstream `__RFQDN_` prefix), or 0 if there is none.
 */
function qapiNameLength(key: string, start: number): number {
  let p = start;
  if (key[p] === '_') {
    p++;
    if (key[p] !== '_') return 0;
    p++;
    while (isAlnum(key[p]) || key[p] === '-' || key[p] === '.') p++;
    if (key[p] !== '_') return 0;
    p++;
  }
  if (!isAlpha(key[p])) return 0;
  p++;
  while (isAlnum(key[p]) || key[p] === '-' || key[p] === '_') p++;
  return p - start;
}

/** Numeric value of a list index fragment (all digits), saturated at INT_MAX like QEMU. */
function indexValue(frag: string): number {
  const n = Number.parseInt(frag, 10);
  return n > INT_MAX ? INT_MAX : n;
}

const isIndexKey = (k: string): boolean => k.length > 0 && /^[0-9]+$/.test(k);

/**
 * Store `value` (a leaf) or an intermediate object (value undefined) under `name` in `cur`.
 * `pathForError` is the key prefix QEMU names when a path is used both ways.
 */
function put(
  cur: Map<string, Node>,
  name: string,
  value: string | undefined,
  pathForError: string,
): Node {
  const old = cur.get(name);
  if (old !== undefined) {
    const oldIsLeaf = typeof old === 'string';
    if (oldIsLeaf !== (value !== undefined)) {
      throw new CliError(`Parameters '${pathForError}.*' used inconsistently`, 'KEYVAL');
    }
    if (value === undefined) return old;
  }
  const next: Node = value ?? new Map<string, Node>();
  cur.set(name, next);
  return next;
}

/** Walk the fragments of `key` (no '=' or ','), creating intermediate objects; returns the leaf's parent and name. */
function descend(root: Map<string, Node>, key: string): { parent: Map<string, Node>; leaf: string } {
  let cur = root;
  let prev: string | undefined;
  let i = 0;
  for (;;) {
    let len: number;
    if (i !== 0 && isDigit(key[i])) {
      len = 0;
      while (isDigit(key[i + len])) len++;
    } else {
      len = qapiNameLength(key, i);
    }
    if (len === 0 || (i + len < key.length && key[i + len] !== '.')) {
      throw new CliError(`Invalid parameter '${key}'`, 'KEYVAL');
    }
    if (len > MAX_FRAGMENT) {
      const whole = i === 0 && len === key.length;
      throw new CliError(
        `Parameter${whole ? '' : ' fragment'} '${key.slice(i, i + len)}' is too long`,
        'KEYVAL',
      );
    }
    if (prev !== undefined) {
      const next = put(cur, prev, undefined, key.slice(0, i - 1));
      // put() returned an object: a leaf there would have thrown above.
      cur = next as Map<string, Node>;
    }
    prev = key.slice(i, i + len);
    i += len;
    if (key[i] !== '.') break;
    i++;
  }
  return { parent: cur, leaf: prev ?? '' };
}

/** Turn levels whose keys are all list indexes into arrays (QEMU's keyval_listify). */
function listify(map: Map<string, Node>, prefix: string): KeyvalTree | KeyvalValue[] {
  let hasIndex = false;
  let hasMember = false;
  let maxIndex = -1;
  const converted = new Map<string, KeyvalValue>();
  for (const [k, v] of map) {
    if (isIndexKey(k)) {
      hasIndex = true;
      maxIndex = Math.max(maxIndex, indexValue(k));
    } else {
      hasMember = true;
    }
    converted.set(k, typeof v === 'string' ? v : listify(v, `${prefix}${k}.`));
  }
  if (hasIndex && hasMember) {
    throw new CliError(`Parameters '${prefix}*' used inconsistently`, 'KEYVAL');
  }
  if (!hasIndex) {
    const obj: KeyvalTree = {};
    for (const [k, v] of converted) obj[k] = v;
    return obj;
  }
  // One slot per key plus a sentinel: an index beyond the number of keys means a gap,
  // reported as the first missing index (duplicates such as "1" and "01" share a slot).
  const n = converted.size;
  const elt: Array<KeyvalValue | undefined> = new Array<KeyvalValue | undefined>(n + 1);
  for (const [k, v] of converted) {
    const idx = indexValue(k);
    if (idx >= n) continue;
    elt[idx] = v;
  }
  const out: KeyvalValue[] = [];
  const limit = Math.min(n + 1, maxIndex + 1);
  for (let i = 0; i < limit; i++) {
    const v = elt[i];
    if (v === undefined) throw new CliError(`Parameter '${prefix}${i}' missing`, 'KEYVAL');
    out.push(v);
  }
  return out;
}

/**
 * Parse a keyval string. `impliedKey` names the key of a bare first element
 * (`driver` for --blockdev); without it a bare element is an error.
 * Throws `CliError` with QEMU's message on a syntax error.
 */
export function parseKeyval(text: string, impliedKey?: string): KeyvalResult {
  const root = new Map<string, Node>();
  let help = false;
  let pos = 0;
  let first = true;
  while (pos < text.length) {
    const rest = text.slice(pos);
    const m = /[=,]/.exec(rest);
    const len = m === null ? rest.length : m.index;
    const implied = first ? impliedKey : undefined;
    first = false;

    if (len > 0 && rest[len] !== '=') {
      const word = rest.slice(0, len);
      if (word === 'help' || word === '?') {
        help = true;
        pos += len + (rest[len] === ',' ? 1 : 0);
        continue;
      }
      if (implied !== undefined) {
        put(root, implied, word, implied);
        pos += len + (rest[len] === ',' ? 1 : 0);
        continue;
      }
    }

    const key = rest.slice(0, len);
    const { parent, leaf } = descend(root, key);
    if (rest[len] !== '=') {
      throw new CliError(`Expected '=' after parameter '${key}'`, 'KEYVAL');
    }
    // Value: up to a single ',' (",," is a literal comma) or the end.
    let p = pos + len + 1;
    let value = '';
    while (p < text.length) {
      const c = text[p] as string;
      if (c === ',') {
        if (text[p + 1] !== ',') {
          p++;
          break;
        }
        p++;
      }
      value += c;
      p++;
    }
    put(parent, leaf, value, key);
    pos = p;
  }
  const tree = listify(root, '');
  // The top level always has QAPI names (the first fragment cannot be an index).
  return { tree: tree as KeyvalTree, help };
}
