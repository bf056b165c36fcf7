/**
 * `--object help` and `--object TYPE,help` (qsd-cli.md §5 `--object`): the listings QSD prints,
 * built from schema/types/ObjectOptions*.json for the types blockd can create.
 */
import type { JsonSchema, SchemaRegistry } from '../qmp/schema-registry.js';
import { CREATABLE_OBJECT_TYPES } from '../qmp/objects.js';

/** `List of user creatable objects:` then one indented type per line. */
export function objectListHelpText(): string {
  return `List of user creatable objects:\n${CREATABLE_OBJECT_TYPES.map((t) => `  ${t}\n`).join('')}`;
}

/** QOM's name for the type of one property (`<string>`, `<int>`, `<QCryptoSecretFormat>`, ...). */
function typeLabel(schema: SchemaRegistry, node: JsonSchema): string {
  const s = schema.deref(node);
  if (s.type === 'array' && s.items !== undefined) return typeLabel(schema, s.items);
  if (typeof s['x-name'] === 'string') return s['x-name'];
  if (s.type === 'integer') return 'int';
  if (s.type === 'boolean') return 'bool';
  if (s.type === 'string') return 'string';
  return 'any';
}

/**
 * `TYPE options:` then `  name=<type>` lines sorted as whole lines (QSD's order: `x-a-max=` sorts
 * after `x-a-max-length=`). The deprecated, unwritable `loaded` is not listed, as in QSD.
 * Undefined for a type blockd cannot create (the caller prints the type list, as QSD does for
 * unknown types).
 */
export function objectTypeHelpText(schema: SchemaRegistry, type: string): string | undefined {
  if (!(CREATABLE_OBJECT_TYPES as readonly string[]).includes(type)) return undefined;
  const union = schema.type('ObjectOptions')['x-union'];
  const c = union?.cases[type];
  const props = c === undefined ? {} : (schema.deref(c).properties ?? {});
  const lines = Object.entries(props)
    .filter(([, p]) => !(p['x-features'] ?? []).includes('deprecated'))
    .map(([name, p]) => `  ${name}=<${typeLabel(schema, p)}>`)
    .sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  return `${type} options:\n${lines.map((l) => `${l}\n`).join('')}`;
}
