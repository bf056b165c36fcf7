/**
 * qom-list, qom-get, qom-set, qom-list-types, qom-list-properties (schema/commands/qom-*.json);
 * the tree and its rules live in qmp/qom.ts.
 */
import { defineCommand, type CommandDef } from '../types.js';
import { listTypeProperties, listTypes } from '../qom.js';

export const qomCommands: readonly CommandDef[] = [
  defineCommand<{ path: string }>('qom-list', (a, ctx) => ctx.services.qom.list(a.path)),
  defineCommand<{ path: string; property: string }>('qom-get', (a, ctx) => ctx.services.qom.get(a.path, a.property)),
  defineCommand<{ path: string; property: string; value: unknown }>('qom-set', (a, ctx) => {
    ctx.services.qom.set(a.path, a.property, a.value);
    return {};
  }),
  defineCommand<{ implements?: string; abstract?: boolean }>('qom-list-types', (a) =>
    listTypes(a.implements, a.abstract ?? false),
  ),
  defineCommand<{ typename: string }>('qom-list-properties', (a) => listTypeProperties(a.typename)),
];
