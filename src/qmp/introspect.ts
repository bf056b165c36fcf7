/**
 * `query-qmp-schema`: the schema in QEMU's SchemaInfo shape. Commands and events keep
 * their names; every other type gets an opaque number ("0" is the empty object used by
 * commands without arguments or result); arrays are "[T]"; builtins are str, any, bool,
 * int, null, number. Optional members carry `"default": null`.
 */
import type { JsonSchema, SchemaRegistry } from './schema-registry.js';

export type SchemaInfo = Record<string, unknown> & { name: string; 'meta-type': string };

const BUILTINS: SchemaInfo[] = [
  { name: 'str', 'meta-type': 'builtin', 'json-type': 'string' },
  { name: 'any', 'meta-type': 'builtin', 'json-type': 'value' },
  { name: 'bool', 'meta-type': 'builtin', 'json-type': 'boolean' },
  { name: 'int', 'meta-type': 'builtin', 'json-type': 'int' },
  { name: 'null', 'meta-type': 'builtin', 'json-type': 'null' },
  { name: 'number', 'meta-type': 'builtin', 'json-type': 'number' },
];

/** Build the SchemaInfo list for the given commands (default: all) and every event. */
export function buildSchemaInfo(reg: SchemaRegistry, commands?: readonly string[]): SchemaInfo[] {
  const types: SchemaInfo[] = [{ name: '0', 'meta-type': 'object', members: [] }];
  const byName = new Map<string, string>();
  const byNode = new Map<JsonSchema, string>();
  const arrays = new Set<string>();
  let next = 1;

  const features = (f: unknown): { features?: string[] } =>
    Array.isArray(f) && f.length > 0 ? { features: f.map(String) } : {};

  const ref = (node: JsonSchema): string => {
    const named = reg.refTypeName(node);
    if (named !== undefined) {
      const hit = byName.get(named);
      if (hit !== undefined) return hit;
      const target = reg.type(named);
      return define(target, named);
    }
    return define(node, undefined);
  };

  const define = (node: JsonSchema, named: string | undefined): string => {
    const hit = byNode.get(node);
    if (hit !== undefined) return hit;
    const kinds = typeof node.type === 'string' ? [node.type] : node.type;
    const alts = node.anyOf ?? node.oneOf;
    const isObject = node.properties !== undefined || node['x-union'] !== undefined;
    let builtin: string | undefined;
    if (alts === undefined && !isObject && node.enum === undefined) {
      if (kinds === undefined) builtin = 'any';
      else if (kinds.length === 1) {
        const k = kinds[0];
        if (k === 'string') builtin = 'str';
        else if (k === 'boolean') builtin = 'bool';
        else if (k === 'integer') builtin = 'int';
        else if (k === 'number') builtin = 'number';
        else if (k === 'null') builtin = 'null';
        else if (k === 'object') builtin = 'any';
      }
    }
    if (builtin !== undefined) return builtin;
    if (kinds?.length === 1 && kinds[0] === 'array' && node.items !== undefined) {
      const el = ref(node.items);
      const name = `[${el}]`;
      if (!arrays.has(name)) {
        arrays.add(name);
        types.push({ name, 'meta-type': 'array', 'element-type': el });
      }
      return name;
    }
    const name = String(next++);
    byNode.set(node, name);
    if (named !== undefined) byName.set(named, name);
    if (node.enum !== undefined) {
      const values = node.enum.map(String);
      types.push({
        name,
        'meta-type': 'enum',
        members: values.map((v) => ({ name: v })),
        values,
      });
    } else if (alts !== undefined) {
      const entry: SchemaInfo = { name, 'meta-type': 'alternate', members: [] };
      types.push(entry);
      entry.members = alts.map((b) => ({ type: ref(b) }));
    } else if (kinds !== undefined && kinds.length > 1) {
      const entry: SchemaInfo = { name, 'meta-type': 'alternate', members: [] };
      types.push(entry);
      entry.members = kinds.map((k) => ({ type: ref({ type: k }) }));
    } else {
      const entry: SchemaInfo = { name, 'meta-type': 'object', members: [] };
      types.push(entry);
      entry.members = members(node);
      const union = node['x-union'];
      if (union !== undefined) {
        entry.tag = union.tag;
        entry.variants = Object.entries(union.cases).map(([c, s]) => ({
          case: c,
          type: ref(s),
        }));
      }
      Object.assign(entry, features(node['x-features']));
    }
    return name;
  };

  const members = (node: JsonSchema): Array<Record<string, unknown>> => {
    const required = new Set(node.required ?? []);
    return Object.entries(node.properties ?? {}).map(([m, s]) => ({
      name: m,
      type: ref(s),
      ...(required.has(m) ? {} : { default: null }),
      ...features(s['x-features'] ?? reg.deref(s)['x-features']),
    }));
  };

  const argType = (s: JsonSchema | undefined): string => {
    if (s === undefined) return '0';
    const d = reg.deref(s);
    if (Object.keys(d.properties ?? {}).length === 0 && d['x-union'] === undefined && s.$ref === undefined) {
      return '0';
    }
    return ref(s);
  };

  const out: SchemaInfo[] = [];
  for (const name of commands ?? reg.commandNames()) {
    const c = reg.commandSchema(name);
    out.push({
      name,
      'meta-type': 'command',
      'arg-type': argType(c.arguments),
      'ret-type': c.returns === undefined ? '0' : ref(c.returns),
      ...(c['allow-oob'] === true ? { 'allow-oob': true } : {}),
      ...features(c.features),
    });
  }
  for (const name of reg.eventNames()) {
    const e = reg.eventSchema(name);
    out.push({ name, 'meta-type': 'event', 'arg-type': argType(e.data), ...features(e.features) });
  }
  return [...out, ...types, ...BUILTINS];
}
