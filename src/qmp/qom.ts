/**
 * The QOM view of blockd (qom-list, qom-get, qom-set, qom-list-types, qom-list-properties), as
 * qemu-storage-daemon 7.2 shows it for the objects blockd has:
 *
 * ```
 * /            container   objects, chardevs (child<container>)
 * /objects     container   one child<TYPE> per user object (object-add, --object)
 * /chardevs    container   one child<chardev-TYPE> per chardev
 * ```
 *
 * Paths resolve like QEMU's object_resolve_path: absolute ('/objects/io0', empty components
 * skipped) or partial ('io0', 'objects/io0': must match exactly one place in the tree).
 * Property lists and their order per type are QSD's; values come from the object registry.
 *
 * Differences from QSD: only the types blockd implements are known (QSD also lists its I/O
 * channel, pr-manager, ... classes); children are listed in creation order (QSD lists them in
 * its hash-table order).
 */
import { QmpError } from '../util/errors.js';
import type { ObjectRegistry, ThrottleConfig, UserObject } from './objects.js';

/** What the QOM view needs to know of one chardev. */
export interface QomChardev {
  readonly id: string;
  /** The QOM type: `chardev-socket`, `chardev-stdio`, ... */
  readonly qomType: string;
  /** chardev-socket: a client is connected. */
  readonly connected?: boolean;
  /** chardev-socket: the SocketAddress it listens on or connects to. */
  readonly addr?: Readonly<Record<string, unknown>>;
}

export interface QomSources {
  readonly objects: ObjectRegistry;
  readonly chardevs: () => readonly QomChardev[];
}

/** ObjectPropertyInfo. */
export interface QomPropertyInfo {
  name: string;
  type: string;
}

/** ObjectTypeInfo. */
export interface QomTypeInfo {
  name: string;
  abstract?: boolean;
  parent?: string;
}

interface TypeDef {
  readonly parent?: string;
  readonly abstract?: boolean;
  /** An interface (qom-list-properties refuses these). */
  readonly iface?: boolean;
  readonly interfaces?: readonly string[];
  /** Every property of the type, in QSD's order (`type` first). */
  readonly props: readonly (readonly [string, string])[];
}

const TYPE_PROP = ['type', 'string'] as const;
const EVENT_LOOP_PROPS = [TYPE_PROP, ['thread-pool-min', 'int'], ['aio-max-batch', 'int'], ['thread-pool-max', 'int']] as const;
const SECRET_COMMON_PROPS = [TYPE_PROP, ['iv', 'string'], ['keyid', 'string'], ['loaded', 'bool'], ['format', 'QCryptoSecretFormat']] as const;
const TLS_PROPS = [TYPE_PROP, ['endpoint', 'QCryptoTLSCredsEndpoint'], ['dir', 'string'], ['verify-peer', 'bool'], ['priority', 'string']] as const;
const UC = ['user-creatable'];

/** throttle-group's legacy `x-*` properties, in QSD's order. */
const THROTTLE_X_PROPS = [
  'x-bps-write-max-length', 'x-iops-total-max-length', 'x-iops-size', 'limits', 'x-bps-total',
  'x-iops-read-max-length', 'x-bps-write', 'x-iops-write-max-length', 'x-bps-read-max', 'x-iops-read-max',
  'x-bps-total-max', 'x-bps-read-max-length', 'x-iops-read', 'x-bps-read', 'x-bps-write-max',
  'x-iops-total-max', 'x-iops-total', 'x-iops-write', 'x-bps-total-max-length', 'x-iops-write-max',
] as const;

/**
 * The types blockd has, in the order QSD 7.2's qom-list-types lists them (its hash order,
 * kept so that lists compare equal line by line).
 */
const TYPES: ReadonlyMap<string, TypeDef> = new Map<string, TypeDef>([
  ['authz-simple', { parent: 'authz', interfaces: UC, props: [TYPE_PROP, ['identity', 'string']] }],
  ['secret_common', { parent: 'object', abstract: true, props: SECRET_COMMON_PROPS }],
  ['container', { parent: 'object', props: [TYPE_PROP] }],
  ['interface', { abstract: true, iface: true, props: [] }],
  ['tls-creds-anon', { parent: 'tls-creds', interfaces: UC, props: [...TLS_PROPS, ['loaded', 'bool']] }],
  ['iothread', { parent: 'event-loop-base', interfaces: UC, props: [...EVENT_LOOP_PROPS, ['poll-max-ns', 'int'], ['poll-grow', 'int'], ['poll-shrink', 'int']] }],
  ['secret', { parent: 'secret_common', interfaces: UC, props: [...SECRET_COMMON_PROPS, ['file', 'string'], ['data', 'string']] }],
  ['authz', { parent: 'object', abstract: true, props: [TYPE_PROP] }],
  ['tls-creds-psk', { parent: 'tls-creds', interfaces: UC, props: [...TLS_PROPS, ['username', 'string'], ['loaded', 'bool']] }],
  ['tls-creds', { parent: 'object', abstract: true, props: TLS_PROPS }],
  ['chardev-pipe', { parent: 'chardev-fd', props: [TYPE_PROP] }],
  ['main-loop', { parent: 'event-loop-base', interfaces: UC, props: EVENT_LOOP_PROPS }],
  ['chardev-fd', { parent: 'chardev', abstract: true, props: [TYPE_PROP] }],
  ['chardev-null', { parent: 'chardev', props: [TYPE_PROP] }],
  ['chardev-ringbuf', { parent: 'chardev', props: [TYPE_PROP] }],
  ['event-loop-base', { parent: 'object', abstract: true, props: EVENT_LOOP_PROPS }],
  ['authz-list', { parent: 'authz', interfaces: UC, props: [TYPE_PROP, ['policy', 'QAuthZListPolicy'], ['rules', 'QAuthZListRule']] }],
  ['chardev-stdio', { parent: 'chardev-fd', props: [TYPE_PROP] }],
  ['chardev', { parent: 'object', abstract: true, props: [TYPE_PROP] }],
  ['user-creatable', { parent: 'interface', abstract: true, iface: true, props: [] }],
  ['chardev-socket', { parent: 'chardev', props: [TYPE_PROP, ['connected', 'bool'], ['addr', 'SocketAddress']] }],
  ['chardev-file', { parent: 'chardev-fd', props: [TYPE_PROP] }],
  ['chardev-memory', { parent: 'chardev-ringbuf', props: [TYPE_PROP] }],
  ['object', { abstract: true, props: [TYPE_PROP] }],
  ['tls-creds-x509', { parent: 'tls-creds', interfaces: UC, props: [...TLS_PROPS, ['sanity-check', 'bool'], ['passwordid', 'string'], ['loaded', 'bool']] }],
  ['throttle-group', { parent: 'object', interfaces: UC, props: [TYPE_PROP, ...THROTTLE_X_PROPS.map((n) => [n, n === 'limits' ? 'ThrottleLimits' : 'int'] as const)] }],
]);

/** The ancestry of a type, itself first, then its interfaces. */
function lineage(name: string): string[] {
  const out: string[] = [];
  let t: string | undefined = name;
  while (t !== undefined && !out.includes(t)) {
    out.push(t);
    const d = TYPES.get(t);
    for (const i of d?.interfaces ?? []) if (!out.includes(i)) out.push(i);
    t = d?.parent;
  }
  return out;
}

/** qom-list-types. */
export function listTypes(implementsType: string | undefined, abstract: boolean): QomTypeInfo[] {
  const out: QomTypeInfo[] = [];
  for (const [name, d] of TYPES) {
    if (d.abstract === true && !abstract) continue;
    if (implementsType !== undefined && !lineage(name).includes(implementsType)) continue;
    const info: QomTypeInfo = { name };
    if (d.abstract === true) info.abstract = true;
    if (d.parent !== undefined) info.parent = d.parent;
    out.push(info);
  }
  return out;
}

/** qom-list-properties. */
export function listTypeProperties(typename: string): QomPropertyInfo[] {
  const d = TYPES.get(typename);
  if (d === undefined) throw new QmpError(`Class '${typename}' not found`, 'DeviceNotFound');
  if (d.iface === true) throw new QmpError("Parameter 'typename' expects a QOM type");
  return d.props.map(([name, type]) => ({ name, type }));
}

// ------------------------------------------------------------------ the tree

/** One object of the tree. */
type QomNode =
  | { kind: 'container'; path: string; children: () => ReadonlyMap<string, QomNode> }
  | { kind: 'object'; path: string; obj: UserObject }
  | { kind: 'chardev'; path: string; chardev: QomChardev };

function typeOf(n: QomNode): string {
  if (n.kind === 'container') return 'container';
  if (n.kind === 'object') return n.obj.type;
  return n.chardev.qomType;
}

function childrenOf(n: QomNode): ReadonlyMap<string, QomNode> {
  return n.kind === 'container' ? n.children() : new Map();
}

export class QomTree {
  private readonly root: QomNode;

  constructor(private readonly src: QomSources) {
    const objects: QomNode = {
      kind: 'container',
      path: '/objects',
      children: () =>
        new Map(this.src.objects.list().map((o) => [o.id, { kind: 'object', path: `/objects/${o.id}`, obj: o } as QomNode])),
    };
    const chardevs: QomNode = {
      kind: 'container',
      path: '/chardevs',
      children: () =>
        new Map(this.src.chardevs().map((c) => [c.id, { kind: 'chardev', path: `/chardevs/${c.id}`, chardev: c } as QomNode])),
    };
    this.root = {
      kind: 'container',
      path: '',
      children: () => new Map([['objects', objects], ['chardevs', chardevs]]),
    };
  }

  /** object_resolve_path: undefined when absent; 'ambiguous' when a partial path matches twice. */
  private resolve(path: string): QomNode | 'ambiguous' | undefined {
    const parts = path.split('/').filter((p) => p !== '');
    if (path.startsWith('/')) return this.walk(this.root, parts);
    if (parts.length === 0) return undefined;
    return this.partial(this.root, parts);
  }

  private walk(from: QomNode, parts: readonly string[]): QomNode | undefined {
    let n: QomNode | undefined = from;
    for (const p of parts) {
      n = childrenOf(n).get(p);
      if (n === undefined) return undefined;
    }
    return n;
  }

  private partial(from: QomNode, parts: readonly string[]): QomNode | 'ambiguous' | undefined {
    let found = this.walk(from, parts);
    for (const child of childrenOf(from).values()) {
      const f = this.partial(child, parts);
      if (f === 'ambiguous') return f;
      if (f !== undefined) {
        if (found !== undefined) return 'ambiguous';
        found = f;
      }
    }
    return found;
  }

  /** qom-get / qom-set resolution: anything unresolvable is "not found". */
  private node(path: string): QomNode {
    const n = this.resolve(path);
    if (n === undefined || n === 'ambiguous') throw new QmpError(`Device '${path}' not found`, 'DeviceNotFound');
    return n;
  }

  /** qom-list. */
  list(path: string): QomPropertyInfo[] {
    const n = this.resolve(path);
    if (n === 'ambiguous') throw new QmpError(`Path '${path}' is ambiguous`);
    if (n === undefined) throw new QmpError(`Device '${path}' not found`, 'DeviceNotFound');
    const out = listTypeProperties(typeOf(n));
    for (const [name, child] of childrenOf(n)) out.push({ name, type: `child<${typeOf(child)}>` });
    return out;
  }

  private propType(n: QomNode, property: string): string | undefined {
    const t = typeOf(n);
    const own = TYPES.get(t)?.props.find(([name]) => name === property)?.[1];
    if (own !== undefined) return own;
    const child = childrenOf(n).get(property);
    return child === undefined ? undefined : `child<${typeOf(child)}>`;
  }

  private notFound(n: QomNode, property: string): QmpError {
    return new QmpError(`Property '${typeOf(n)}.${property}' not found`);
  }

  /** qom-get. */
  get(path: string, property: string): unknown {
    const n = this.node(path);
    const type = this.propType(n, property);
    if (type === undefined) throw this.notFound(n, property);
    if (property === 'type') return typeOf(n);
    if (type.startsWith('child<')) return `${n.path}/${property}`;
    if (n.kind === 'chardev') {
      if (property === 'connected') return n.chardev.connected ?? false;
      return n.chardev.addr ?? {};
    }
    if (n.kind !== 'object') throw this.notFound(n, property);
    return this.objectValue(n.obj, property);
  }

  private objectValue(o: UserObject, property: string): unknown {
    const p = o.props;
    switch (o.type) {
      case 'secret':
        if (property === 'loaded') return true;
        if (property === 'format') return p.format ?? 'raw';
        if (property === 'data') return this.src.objects.secretDataText(o.id) ?? '';
        return p[property] ?? '';
      case 'iothread':
      case 'main-loop':
        return p[property] ?? EVENT_LOOP_DEFAULTS[property] ?? 0;
      case 'throttle-group': {
        const cfg = this.src.objects.throttleLimits(o.id);
        if (cfg === undefined) return 0;
        const limits = throttleLimitsOf(cfg);
        if (property === 'limits') return limits;
        return limits[property.slice(2)] ?? 0;
      }
      case 'tls-creds-anon':
      case 'tls-creds-psk':
      case 'tls-creds-x509':
        if (property === 'loaded') return true;
        if (property === 'endpoint') return p.endpoint ?? 'client';
        if (property === 'verify-peer') return p['verify-peer'] ?? true;
        if (property === 'sanity-check') return p['sanity-check'] ?? true;
        return p[property] ?? '';
      case 'authz-simple':
        return p.identity ?? '';
      case 'authz-list':
        if (property === 'policy') return p.policy ?? 'deny';
        return p.rules ?? [];
    }
  }

  /** qom-set. */
  set(path: string, property: string, value: unknown): void {
    const n = this.node(path);
    const type = this.propType(n, property);
    if (type === undefined) throw this.notFound(n, property);
    const readOnly = (): QmpError => new QmpError(`Property '${typeOf(n)}.${property}' is not writable`);
    if (n.kind !== 'object' || property === 'type' || property === 'loaded' || type.startsWith('child<')) {
      throw readOnly();
    }
    const o = n.obj;
    const objects = this.src.objects;
    if (o.type === 'throttle-group') {
      // QEMU: the x-* properties only configure a group before it is complete.
      if (property !== 'limits') throw new QmpError('Property cannot be set after initialization');
      objects.setThrottleLimits(o.id, checkLimits(value));
      return;
    }
    switch (type) {
      case 'int': {
        const v = checkInt(property, value);
        if (v < 0) throw new QmpError(`${property} value must be in range [0, 9223372036854775807]`);
        objects.setProperty(o.id, property, v);
        // QEMU stores the value first, then checks the pool bounds (the value stays).
        if (property === 'thread-pool-min' || property === 'thread-pool-max') {
          const now = objects.get(o.id)?.props ?? {};
          const min = Number(now['thread-pool-min'] ?? 0);
          const max = Number(now['thread-pool-max'] ?? 64);
          if (min > max || min > 2147483647 || max > 2147483647) {
            throw new QmpError('bad thread-pool-min/thread-pool-max values');
          }
        }
        return;
      }
      case 'string':
        objects.setProperty(o.id, property, checkString(property, value));
        return;
      case 'bool':
        if (typeof value !== 'boolean') throw typeError(property, 'boolean');
        objects.setProperty(o.id, property, value);
        return;
      case 'QCryptoSecretFormat':
        objects.setProperty(o.id, property, checkEnum(property, value, ['raw', 'base64']));
        return;
      case 'QCryptoTLSCredsEndpoint':
        objects.setProperty(o.id, property, checkEnum(property, value, ['client', 'server']));
        return;
      case 'QAuthZListPolicy':
        objects.setProperty(o.id, property, checkEnum(property, value, ['deny', 'allow']));
        return;
      case 'QAuthZListRule':
        objects.setProperty(o.id, property, checkRules(value));
        return;
      default:
        throw readOnly();
    }
  }
}

const EVENT_LOOP_DEFAULTS: Readonly<Record<string, number>> = {
  'thread-pool-min': 0,
  'thread-pool-max': 64,
  'aio-max-batch': 0,
  'poll-max-ns': 32768,
  'poll-grow': 0,
  'poll-shrink': 0,
};

/** ThrottleLimits members in QAPI order (the input visitor checks them in this order). */
const LIMIT_MEMBERS = [
  'iops-total', 'iops-total-max', 'iops-total-max-length',
  'iops-read', 'iops-read-max', 'iops-read-max-length',
  'iops-write', 'iops-write-max', 'iops-write-max-length',
  'bps-total', 'bps-total-max', 'bps-total-max-length',
  'bps-read', 'bps-read-max', 'bps-read-max-length',
  'bps-write', 'bps-write-max', 'bps-write-max-length',
  'iops-size',
] as const;

/** A group's configuration as the ThrottleLimits QSD's `limits` property reads. */
function throttleLimitsOf(cfg: ThrottleConfig): Record<string, number> {
  const out: Record<string, number> = {};
  for (const m of LIMIT_MEMBERS) {
    if (m === 'iops-size') {
      out[m] = cfg.opSize;
      continue;
    }
    const r = /^((?:bps|iops)-(?:total|read|write))(-max)?(-length)?$/.exec(m);
    const b = cfg.buckets[r?.[1] as keyof ThrottleConfig['buckets']];
    out[m] = r?.[3] !== undefined ? b.burstLength : r?.[2] !== undefined ? b.max : b.avg;
  }
  return out;
}

function typeError(name: string, expected: string): QmpError {
  return new QmpError(`Invalid parameter type for '${name}', expected: ${expected}`);
}

function checkInt(name: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isInteger(v)) throw typeError(name, 'integer');
  return v;
}

function checkString(name: string, v: unknown): string {
  if (typeof v !== 'string') throw typeError(name, 'string');
  return v;
}

function checkEnum(name: string, v: unknown, values: readonly string[]): string {
  const s = checkString(name, v);
  if (!values.includes(s)) throw new QmpError(`Parameter '${name}' does not accept value '${s}'`);
  return s;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** The ThrottleLimits input visitor: member types in QAPI order, then unexpected members. */
function checkLimits(v: unknown): Record<string, unknown> {
  if (!isObject(v)) throw typeError('limits', 'object');
  for (const m of LIMIT_MEMBERS) if (m in v) checkInt(`limits.${m}`, v[m]);
  for (const k of Object.keys(v)) {
    if (!(LIMIT_MEMBERS as readonly string[]).includes(k)) throw new QmpError(`Parameter 'limits.${k}' is unexpected`);
  }
  return v;
}

/** QAuthZListRuleList: match (string), policy (enum), format (optional enum), nothing else. */
function checkRules(v: unknown): Array<Record<string, string>> {
  if (!Array.isArray(v)) throw typeError('rules', 'array');
  return v.map((r: unknown, i) => {
    const at = `rules[${i}]`;
    if (!isObject(r)) throw typeError(at, 'object');
    if (r.match === undefined) throw new QmpError(`Parameter '${at}.match' is missing`);
    const rule: Record<string, string> = { match: checkString(`${at}.match`, r.match) };
    if (r.policy === undefined) throw new QmpError(`Parameter '${at}.policy' is missing`);
    // QEMU's enum visitor names the member without its path.
    rule.policy = checkEnum('policy', r.policy, ['deny', 'allow']);
    if (r.format !== undefined) rule.format = checkEnum('format', r.format, ['exact', 'glob']);
    for (const k of Object.keys(r)) {
      if (!['match', 'policy', 'format'].includes(k)) throw new QmpError(`Parameter '${at}.${k}' is unexpected`);
    }
    return rule;
  });
}
