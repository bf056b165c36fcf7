#!/usr/bin/env node
// Generate docs/qmp.md from schema/: every command and event with its description and members.
// Usage: node scripts/gen-qmp-docs.mjs [--check]   (--check: exit 1 if docs/qmp.md is stale)
import { readdirSync, readFileSync, writeFileSync, existsSync } from 'node:fs';
import { join, dirname, basename } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const SCHEMA = join(ROOT, 'schema');
const OUT = join(ROOT, 'docs', 'qmp.md');

function loadDir(sub) {
  const dir = join(SCHEMA, sub);
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((f) => ({ file: f, json: JSON.parse(readFileSync(join(dir, f), 'utf8')) }));
}

const types = new Map(loadDir('types').map(({ file, json }) => [basename(file, '.json'), json]));

function refName(node) {
  return typeof node?.$ref === 'string' ? basename(node.$ref, '.json') : undefined;
}

function typeText(node) {
  if (!node || typeof node !== 'object') return 'any';
  const ref = refName(node);
  if (ref) return `[${ref}](#type-${ref.toLowerCase()})`;
  if (node['x-alternate']) return node['x-alternate'];
  if (node['x-name']) return node['x-name'];
  if (node.enum) return node.enum.map((v) => `\`${v}\``).join(' \\| ');
  if (node.const !== undefined) return `\`${node.const}\``;
  if (node.type === 'array') return `array of ${typeText(node.items)}`;
  if (node.type === 'integer') return node['x-int'] ?? 'int';
  if (Array.isArray(node.type)) return node.type.join(' \\| ');
  return node.type ?? 'any';
}

function esc(text) {
  return String(text ?? '').replace(/\|/g, '\\|').replace(/\n/g, ' ');
}

function membersTable(schema) {
  const s = refName(schema) ? types.get(refName(schema)) ?? schema : schema;
  const props = s?.properties ?? {};
  const names = Object.keys(props);
  const lines = [];
  if (names.length === 0 && !s?.['x-union']) return '_No arguments._\n';
  if (names.length) {
    const req = new Set(s.required ?? []);
    lines.push('| Member | Type | Required | Default | Description |', '|---|---|---|---|---|');
    for (const n of names) {
      const p = props[n];
      const def = p.default === undefined ? '' : `\`${JSON.stringify(p.default)}\``;
      lines.push(`| \`${n}\` | ${typeText(p)} | ${req.has(n) ? 'yes' : 'no'} | ${def} | ${esc(p.description)} |`);
    }
  }
  if (s?.['x-union']) {
    const u = s['x-union'];
    lines.push('', `Members that depend on \`${u.tag}\`:`, '');
    for (const [tag, c] of Object.entries(u.cases ?? {})) lines.push(`- \`${tag}\`: ${typeText(c)}`);
  }
  return lines.join('\n') + '\n';
}

const parts = [
  '# QMP reference',
  '',
  'Generated from `schema/` by `scripts/gen-qmp-docs.mjs`; do not edit by hand.',
  'Argument checking and error texts follow qemu-storage-daemon 7.2 (see `docs/qmp-protocol.md`).',
  '',
  '## Commands',
  '',
];
for (const { json } of loadDir('commands')) {
  parts.push(`### \`${json.command}\``, '');
  if (json.features?.length) parts.push(`Features: ${json.features.join(', ')}`, '');
  parts.push(esc(json.description), '');
  parts.push(json.arguments ? membersTable(json.arguments) : '_No arguments._\n');
  if (json.returns) parts.push(`Returns: ${typeText(json.returns)}`, '');
}
const events = loadDir('events');
if (events.length) {
  parts.push('## Events', '');
  for (const { json } of events) {
    parts.push(`### \`${json.event}\``, '', esc(json.description), '', membersTable(json.data ?? {}));
  }
}
if (types.size) {
  parts.push('## Types', '');
  for (const [name, json] of types) {
    parts.push(`### ${name} {#type-${name.toLowerCase()}}`, '', esc(json.description), '');
    if (json.enum) parts.push(`Values: ${json.enum.map((v) => `\`${v}\``).join(', ')}`, '');
    else if (json['x-alternate']) parts.push(`One of: ${(json.anyOf ?? []).map(typeText).join(', ')}`, '');
    else parts.push(membersTable(json));
  }
}
const text = parts.join('\n').replace(/\n{3,}/g, '\n\n');

if (process.argv.includes('--check')) {
  const current = existsSync(OUT) ? readFileSync(OUT, 'utf8') : '';
  if (current !== text) {
    process.stderr.write('docs/qmp.md is out of date: run npm run docs\n');
    process.exit(1);
  }
} else {
  writeFileSync(OUT, text);
}
