/**
 * The QMP schema (`schema/`): command, event and named-type JSON Schemas, compiled once
 * with ajv, plus QEMU-compatible argument error messages.
 *
 * ajv decides whether arguments are valid. When they are not, a small walker over the
 * same schema finds the error QEMU's QObject input visitor would report first: it visits
 * members in declaration order (a missing or mistyped member is reported when reached),
 * union base members before the tag's variant members, and only then complains about
 * members nobody asked for. ajv's own error list is ordered by keyword, not by member,
 * so it cannot give that answer by itself.
 */
import { readdirSync, readFileSync, existsSync } from 'node:fs';
import { join, basename } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Ajv2020, type ValidateFunction } from 'ajv/dist/2020.js';
import { QmpError } from '../util/errors.js';

/** A JSON Schema node as written in `schema/` (draft 2020-12 plus our `x-` keywords). */
export interface JsonSchema {
  $id?: string;
  $ref?: string;
  type?: string | string[];
  description?: string;
  properties?: Record<string, JsonSchema>;
  required?: string[];
  additionalProperties?: boolean | JsonSchema;
  items?: JsonSchema;
  enum?: unknown[];
  const?: unknown;
  anyOf?: JsonSchema[];
  oneOf?: JsonSchema[];
  allOf?: JsonSchema[];
  default?: unknown;
  'x-int'?: XInt;
  'x-name'?: string;
  'x-alternate'?: string;
  'x-union'?: { tag: string; cases: Record<string, JsonSchema> };
  'x-features'?: string[];
  [key: string]: unknown;
}

export type XInt =
  | 'int'
  | 'int8'
  | 'int16'
  | 'int32'
  | 'int64'
  | 'uint8'
  | 'uint16'
  | 'uint32'
  | 'uint64'
  | 'size';

/** One `schema/commands/<name>.json` file. */
export interface CommandSchemaFile {
  $id?: string;
  command: string;
  description?: string;
  arguments?: JsonSchema;
  returns?: JsonSchema;
  features?: string[];
  'allow-oob'?: boolean;
  [key: string]: unknown;
}

/** One `schema/events/<NAME>.json` file. */
export interface EventSchemaFile {
  $id?: string;
  event: string;
  description?: string;
  data?: JsonSchema;
  features?: string[];
  [key: string]: unknown;
}

const BASE = 'https://blockd.invalid/schema/';

/** Accepted ranges per x-int kind (the uint64 family accepts negatives, like QEMU). */
const INT_RANGES: Record<XInt, { min: number; max: number; label: string }> = {
  int: { min: -(2 ** 63), max: 2 ** 63, label: 'int64_t' },
  int64: { min: -(2 ** 63), max: 2 ** 63, label: 'int64_t' },
  int8: { min: -128, max: 127, label: 'int8_t' },
  int16: { min: -32768, max: 32767, label: 'int16_t' },
  int32: { min: -(2 ** 31), max: 2 ** 31 - 1, label: 'int32_t' },
  uint8: { min: 0, max: 255, label: 'uint8_t' },
  uint16: { min: 0, max: 65535, label: 'uint16_t' },
  uint32: { min: 0, max: 2 ** 32 - 1, label: 'uint32_t' },
  uint64: { min: -(2 ** 63), max: 2 ** 64, label: 'uint64_t' },
  size: { min: -(2 ** 63), max: 2 ** 64, label: 'uint64_t' },
};

const is64 = (k: XInt): boolean => k === 'int' || k === 'int64' || k === 'uint64' || k === 'size';
const isUnsigned = (k: XInt): boolean => k.startsWith('uint') || k === 'size';

/** What QEMU's visitor thinks of a number for an x-int member. */
function checkInt(kind: XInt, v: number): 'ok' | 'type' | 'range' {
  if (!Number.isFinite(v) || !Number.isInteger(v)) return 'type';
  const r = INT_RANGES[kind];
  if (isUnsigned(kind)) {
    // The uint64 family reads any int64 or uint64; negative values wrap (QEMU compat).
    if (v < -(2 ** 63) || v >= 2 ** 64) return 'type';
    if (is64(kind)) return 'ok';
    return v >= 0 && v <= r.max ? 'ok' : 'range';
  }
  if (v < -(2 ** 63) || v >= 2 ** 63) return 'type';
  if (is64(kind)) return 'ok';
  return v >= r.min && v <= r.max ? 'ok' : 'range';
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function defaultSchemaDir(): string {
  // src/qmp/schema-registry.ts and dist/qmp/schema-registry.js both sit two levels below the root.
  return fileURLToPath(new URL('../../schema/', import.meta.url));
}

function readJsonDir(dir: string): Array<{ file: string; json: unknown }> {
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((f) => {
      const path = join(dir, f);
      try {
        return { file: f, json: JSON.parse(readFileSync(path, 'utf8')) as unknown };
      } catch (err) {
        throw new Error(`cannot load schema file ${path}: ${(err as Error).message}`, { cause: err });
      }
    });
}

/** Path of a value inside the arguments, in QEMU's two flavours. */
interface VisitPath {
  /** Full dotted path (`addr.data.path`, `bitmaps[0].name`); '' at the top. */
  full: string;
  /** The member's own name; null for list elements (QEMU prints 'null'). */
  bare: string | null;
}

const joinPath = (full: string, key: string): string => (full === '' ? key : `${full}.${key}`);

export class SchemaRegistry {
  private readonly commands = new Map<string, CommandSchemaFile>();
  private readonly events = new Map<string, EventSchemaFile>();
  private readonly types = new Map<string, JsonSchema>();
  private readonly validators = new Map<string, ValidateFunction>();
  private variants = new Set<string>();
  private readonly ajv: Ajv2020;

  private constructor(readonly dir: string) {
    this.ajv = new Ajv2020({
      strict: true,
      strictTypes: false,
      strictTuples: false,
      strictRequired: false,
      allErrors: false,
      allowUnionTypes: true,
      validateFormats: false,
    });
    this.ajv.addKeyword({ keyword: 'x-name', schemaType: 'string' });
    this.ajv.addKeyword({ keyword: 'x-alternate', schemaType: 'string' });
    this.ajv.addKeyword({ keyword: 'x-features', schemaType: 'array' });
    // x-union is translated into if/then + unevaluatedProperties before compiling (see prep()).
    this.ajv.addKeyword({ keyword: 'x-union', schemaType: 'object' });
    this.ajv.addKeyword({
      keyword: 'x-int',
      type: 'number',
      schemaType: 'string',
      validate: (kind: XInt, data: number) => checkInt(kind, data) === 'ok',
      errors: false,
    });
  }

  /** Load and compile every schema under `dir` (default: the repository's `schema/`). */
  static load(dir: string = defaultSchemaDir()): SchemaRegistry {
    const reg = new SchemaRegistry(dir);
    reg.loadAll();
    return reg;
  }

  private loadAll(): void {
    for (const { file, json } of readJsonDir(join(this.dir, 'types'))) {
      if (!isPlainObject(json)) throw new Error(`schema type ${file} is not an object`);
      this.types.set(basename(file, '.json'), json as JsonSchema);
    }
    for (const { file, json } of readJsonDir(join(this.dir, 'commands'))) {
      const c = json as CommandSchemaFile;
      if (!isPlainObject(json) || typeof c.command !== 'string') {
        throw new Error(`schema command ${file} lacks "command"`);
      }
      if (this.commands.has(c.command)) throw new Error(`duplicate command ${c.command}`);
      this.commands.set(c.command, c);
    }
    for (const { file, json } of readJsonDir(join(this.dir, 'events'))) {
      const e = json as EventSchemaFile;
      if (!isPlainObject(json) || typeof e.event !== 'string') {
        throw new Error(`schema event ${file} lacks "event"`);
      }
      this.events.set(e.event, e);
    }

    // Register the named types (and variant copies for union cases), then compile.
    const variants = new Set<string>();
    const prepared = new Map<string, JsonSchema>();
    for (const [name, schema] of this.types) {
      prepared.set(name, this.prep(schema, variants));
    }
    for (const [name, schema] of prepared) {
      this.ajv.addSchema({ ...schema, $id: `${BASE}types/${name}.json` });
    }
    // Variant copies can reference further variants: iterate until closed.
    const done = new Set<string>();
    for (;;) {
      const todo = [...variants].filter((v) => !done.has(v));
      if (todo.length === 0) break;
      for (const name of todo) {
        done.add(name);
        const raw = this.types.get(name);
        if (raw === undefined) throw new Error(`union case refers to unknown type ${name}`);
        const v = stripClosed(this.prep(raw, variants));
        this.ajv.addSchema({ ...v, $id: `${BASE}variant/${name}.json` });
      }
    }
    this.variants = variants;
  }

  private compile(id: string, schema: JsonSchema): ValidateFunction {
    try {
      return this.ajv.compile({ ...this.prep(schema, this.variants), $id: id });
    } catch (err) {
      throw new Error(`cannot compile schema ${id}: ${(err as Error).message}`, { cause: err });
    }
  }

  /** The argument validator of a command, compiled on first use (keeps startup fast). */
  private validatorOf(name: string): ValidateFunction | undefined {
    let v = this.validators.get(name);
    if (v !== undefined) return v;
    const c = this.commands.get(name);
    if (c === undefined) return undefined;
    const args: JsonSchema = c.arguments ?? { type: 'object', properties: {}, additionalProperties: false };
    v = this.compile(`${BASE}compiled/commands/${name}.args.json`, args);
    this.validators.set(name, v);
    return v;
  }

  /**
   * Compile everything now: every command's arguments and returns, every event and type.
   * Startup does not need it (validators compile lazily); tests use it to catch bad schemas.
   */
  compileAll(): void {
    for (const [name, c] of this.commands) {
      this.validatorOf(name);
      if (c.returns !== undefined) this.compile(`${BASE}compiled/commands/${name}.returns.json`, c.returns);
    }
    for (const [name, e] of this.events) {
      if (e.data !== undefined) this.compile(`${BASE}compiled/events/${name}.json`, e.data);
    }
    for (const name of this.types.keys()) {
      // Compiling each type on its own finds dangling $refs early.
      this.ajv.getSchema(`${BASE}types/${name}.json`);
    }
  }

  /**
   * Copy a schema for ajv: `$ref`s become absolute (`types/<basename>`), and `x-union`
   * becomes `allOf: [{if: tag == case, then: <case without its closing keywords>}]` plus
   * `unevaluatedProperties: false`, which closes base + variant members together.
   */
  private prep(node: JsonSchema, variants: Set<string>): JsonSchema {
    const out: JsonSchema = {};
    for (const [k, v] of Object.entries(node)) {
      if (k === '$ref' && typeof v === 'string') {
        out.$ref = absRef(v, 'types');
      } else if (k === 'x-union') {
        continue;
      } else if (k === '$id') {
        continue;
      } else if (k === 'properties' && isPlainObject(v)) {
        const props: Record<string, JsonSchema> = {};
        for (const [pk, pv] of Object.entries(v)) props[pk] = this.prep(pv as JsonSchema, variants);
        out.properties = props;
      } else if (
        (k === 'anyOf' || k === 'oneOf' || k === 'allOf' || k === 'prefixItems') &&
        Array.isArray(v)
      ) {
        out[k] = v.map((s) => this.prep(s as JsonSchema, variants));
      } else if (
        (k === 'items' || k === 'additionalProperties' || k === 'not') &&
        isPlainObject(v)
      ) {
        out[k] = this.prep(v as JsonSchema, variants);
      } else if (k === '$defs' && isPlainObject(v)) {
        const defs: Record<string, JsonSchema> = {};
        for (const [dk, dv] of Object.entries(v)) defs[dk] = this.prep(dv as JsonSchema, variants);
        out.$defs = defs;
      } else {
        out[k] = v;
      }
    }
    const union = node['x-union'];
    if (union !== undefined) {
      delete out.additionalProperties;
      const conds: JsonSchema[] = Object.entries(union.cases).map(([value, c]) => {
        let then: JsonSchema;
        if (typeof c.$ref === 'string' && Object.keys(c).length === 1) {
          const name = refName(c.$ref);
          variants.add(name);
          then = { $ref: `${BASE}variant/${name}.json` };
        } else {
          then = stripClosed(this.prep(c, variants));
        }
        return {
          if: { properties: { [union.tag]: { const: value } }, required: [union.tag] },
          then,
        };
      });
      out.allOf = [...(out.allOf ?? []), ...conds];
      out.unevaluatedProperties = false;
    }
    return out;
  }

  /** Every command with a schema file, sorted. */
  commandNames(): string[] {
    return [...this.commands.keys()].sort();
  }

  hasCommand(name: string): boolean {
    return this.commands.has(name);
  }

  /** The parsed `schema/commands/<name>.json`; throws for an unknown command. */
  commandSchema(name: string): CommandSchemaFile {
    const c = this.commands.get(name);
    if (c === undefined) throw new Error(`no schema for command ${name}`);
    return c;
  }

  /** The command's `arguments` schema, or undefined when it takes none. */
  argumentsSchema(name: string): JsonSchema | undefined {
    return this.commandSchema(name).arguments;
  }

  /** Every event with a schema file, sorted. */
  eventNames(): string[] {
    return [...this.events.keys()].sort();
  }

  eventSchema(name: string): EventSchemaFile {
    const e = this.events.get(name);
    if (e === undefined) throw new Error(`no schema for event ${name}`);
    return e;
  }

  /** Names of every `types/` schema, sorted. */
  typeNames(): string[] {
    return [...this.types.keys()].sort();
  }

  /** A `types/` schema by name (basename without `.json`). */
  type(name: string): JsonSchema {
    const t = this.types.get(name);
    if (t === undefined) throw new Error(`no schema type ${name}`);
    return t;
  }

  /** Follow `$ref` (by basename) to the `types/` schema; the node itself when it has none. */
  deref(node: JsonSchema): JsonSchema {
    let cur = node;
    for (let i = 0; i < 64 && typeof cur.$ref === 'string'; i++) {
      cur = this.type(refName(cur.$ref));
    }
    return cur;
  }

  /** The type name a `$ref` points to, or undefined for an inline schema. */
  refTypeName(node: JsonSchema): string | undefined {
    return typeof node.$ref === 'string' ? refName(node.$ref) : undefined;
  }

  /**
   * Check `args` against the command's `arguments` schema. Throws a GenericError
   * `QmpError` worded like QEMU (the first error its input visitor would hit).
   */
  validateArguments(command: string, args: unknown): void {
    const validate = this.validatorOf(command);
    if (validate === undefined) throw new Error(`no schema for command ${command}`);
    if (validate(args)) return;
    const schema: JsonSchema = this.commandSchema(command).arguments ?? {
      type: 'object',
      properties: {},
      additionalProperties: false,
    };
    const msg = this.firstError(schema, args, { full: '', bare: null });
    if (msg !== undefined) throw new QmpError(msg);
    // The walker accepted what ajv refused: report ajv's view rather than let it through.
    const e = validate.errors?.[0];
    const where = e?.instancePath.replace(/^\//, '').replace(/\//g, '.') ?? '';
    throw new QmpError(`Parameter '${where}' ${e?.message ?? 'is invalid'}`);
  }

  // --- the QEMU-order walker ------------------------------------------------------------

  private firstError(node: JsonSchema, value: unknown, path: VisitPath): string | undefined {
    const s = this.deref(node);
    const bare = path.bare ?? 'null';

    const alts = s.anyOf ?? s.oneOf;
    if (alts !== undefined) {
      const kind = jsonKind(value);
      const pick = this.pickBranch(alts, kind);
      if (pick === undefined) {
        const name = s['x-alternate'] ?? this.altFallbackName(alts);
        return `Invalid parameter type for '${bare}', expected: ${name}`;
      }
      return this.firstError(pick, value, path);
    }
    if (s.allOf !== undefined && s['x-union'] === undefined && s.type === undefined) {
      for (const part of s.allOf) {
        const m = this.firstError(part, value, path);
        if (m !== undefined) return m;
      }
      return undefined;
    }

    const types = typeof s.type === 'string' ? [s.type] : s.type;
    const expect = (t: string): string => `Invalid parameter type for '${path.full}', expected: ${t}`;
    if (types !== undefined) {
      const kind = jsonKind(value);
      const ok = types.some((t) => t === kind || (t === 'number' && kind === 'integer'));
      if (!ok) {
        if (s['x-int'] !== undefined && typeof value === 'number') {
          // A float for an integer member: the uint64 family words it differently.
          return isUnsigned(s['x-int'])
            ? `Parameter '${path.full}' expects uint64`
            : expect('integer');
        }
        return expect(types.length === 1 ? (types[0] ?? 'any') : (s['x-name'] ?? types[0] ?? 'any'));
      }
    }
    if (s.enum !== undefined && !s.enum.includes(value)) {
      if (typeof value !== 'string') return expect('string');
      return `Parameter '${bare}' does not accept value '${value}'`;
    }
    if (s.const !== undefined && s.const !== value) {
      if (typeof value === 'string') return `Parameter '${bare}' does not accept value '${value}'`;
      return expect(typeof s.const === 'string' ? 'string' : jsonKind(s.const));
    }
    const xint = s['x-int'];
    if (xint !== undefined && typeof value === 'number') {
      const r = checkInt(xint, value);
      if (r === 'type') {
        return isUnsigned(xint) ? `Parameter '${path.full}' expects uint64` : expect('integer');
      }
      if (r === 'range') return `Parameter '${bare}' expects ${INT_RANGES[xint].label}`;
    }
    if (Array.isArray(value) && s.items !== undefined) {
      for (let i = 0; i < value.length; i++) {
        const m = this.firstError(s.items, value[i], { full: `${path.full}[${i}]`, bare: null });
        if (m !== undefined) return m;
      }
    }
    if (isPlainObject(value) && (s.properties !== undefined || s['x-union'] !== undefined)) {
      return this.objectError(s, value, path);
    }
    if (isPlainObject(value) && isPlainObject(s.additionalProperties)) {
      for (const [k, v] of Object.entries(value)) {
        const m = this.firstError(s.additionalProperties, v, {
          full: joinPath(path.full, k),
          bare: k,
        });
        if (m !== undefined) return m;
      }
    }
    return undefined;
  }

  private objectError(
    s: JsonSchema,
    value: Record<string, unknown>,
    path: VisitPath,
  ): string | undefined {
    const seen = new Set<string>();
    let open = s.additionalProperties !== false && s['x-union'] === undefined;
    const visitMembers = (obj: JsonSchema): string | undefined => {
      const required = new Set(obj.required ?? []);
      for (const [k, sub] of Object.entries(obj.properties ?? {})) {
        seen.add(k);
        const full = joinPath(path.full, k);
        if (Object.hasOwn(value, k)) {
          const m = this.firstError(sub, value[k], { full, bare: k });
          if (m !== undefined) return m;
        } else if (required.has(k)) {
          return `Parameter '${full}' is missing`;
        }
      }
      const union = obj['x-union'];
      if (union !== undefined) {
        const tag = value[union.tag];
        const c = typeof tag === 'string' ? union.cases[tag] : undefined;
        if (c !== undefined) {
          const variant = this.deref(c);
          const m = visitMembers(variant);
          if (m !== undefined) return m;
        }
      }
      return undefined;
    };
    const m = visitMembers(s);
    if (m !== undefined) return m;
    if (isPlainObject(s.additionalProperties)) open = false;
    for (const k of Object.keys(value)) {
      if (seen.has(k)) continue;
      if (isPlainObject(s.additionalProperties)) {
        const m2 = this.firstError(s.additionalProperties, value[k], {
          full: joinPath(path.full, k),
          bare: k,
        });
        if (m2 !== undefined) return m2;
        continue;
      }
      if (!open) return `Parameter '${joinPath(path.full, k)}' is unexpected`;
    }
    return undefined;
  }

  private branchKinds(branch: JsonSchema): string[] | undefined {
    const s = this.deref(branch);
    if (s.type !== undefined) return typeof s.type === 'string' ? [s.type] : s.type;
    if (s.enum !== undefined) return [...new Set(s.enum.map(jsonKind))];
    if (s.const !== undefined) return [jsonKind(s.const)];
    if (s.properties !== undefined || s['x-union'] !== undefined) return ['object'];
    const nested = s.anyOf ?? s.oneOf;
    if (nested !== undefined) {
      const all = nested.map((b) => this.branchKinds(b));
      if (all.some((k) => k === undefined)) return undefined;
      return all.flatMap((k) => k ?? []);
    }
    return undefined; // any
  }

  /** QEMU picks an alternate's branch by the JSON type of the value alone. */
  private pickBranch(alts: JsonSchema[], kind: string): JsonSchema | undefined {
    let fallback: JsonSchema | undefined;
    for (const b of alts) {
      const kinds = this.branchKinds(b);
      if (kinds === undefined || kinds.includes(kind)) return b;
      if (kind === 'integer' && kinds.includes('number')) fallback ??= b;
      if (kind === 'number' && kinds.includes('integer')) fallback ??= b;
    }
    return fallback;
  }

  private altFallbackName(alts: JsonSchema[]): string {
    const first = alts[0];
    if (first === undefined) return 'any';
    const kinds = this.branchKinds(first);
    return kinds?.[0] ?? 'any';
  }
}

/** `../types/Foo.json#/x` → `Foo`. */
function refName(ref: string): string {
  const file = ref.split('#')[0] ?? '';
  return basename(file, '.json');
}

function absRef(ref: string, folder: string): string {
  if (ref.startsWith('#')) return ref;
  const [file, frag] = ref.split('#', 2);
  const abs = `${BASE}${folder}/${basename(file ?? '')}`;
  return frag === undefined ? abs : `${abs}#${frag}`;
}

/** Drop the keywords that close an object on its own (a union variant is closed with its base). */
function stripClosed(s: JsonSchema): JsonSchema {
  const { additionalProperties: _a, unevaluatedProperties: _u, ...rest } = s;
  return rest;
}

/** The JSON type of a value in QAPI terms ('integer' for integral numbers). */
export function jsonKind(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  switch (typeof v) {
    case 'string':
      return 'string';
    case 'boolean':
      return 'boolean';
    case 'number':
      return Number.isInteger(v) ? 'integer' : 'number';
    case 'bigint':
      return 'integer';
    case 'object':
      return 'object';
    default:
      return 'undefined';
  }
}
