/**
 * User-creatable objects (`object-add`, `object-del`, `--object`): the registry of ids and the
 * per-type creation rules of qemu-storage-daemon 7.2 (qmp.md §3.9).
 *
 * Creation runs in QOM's order, which decides which error a client sees first:
 *   1. the type (`invalid object type: X`) and the id syntax,
 *   2. property setters (`loaded`, value ranges, throttle `limits`),
 *   3. the id must be new (`attempt to add duplicate property ...`),
 *   4. "complete" (secret loading and decryption, credential files, iothread pool sizes).
 *
 * What each type really does in blockd:
 * - `secret`: loaded and decrypted (AES-256-CBC with `keyid`/`iv`); read with `secretValue()`.
 * - `iothread`, `main-loop`: properties checked and stored. blockd runs everything in one
 *   Node.js event loop, so an iothread only gives exports a name to refer to.
 * - `throttle-group`: limits checked and stored; `throttle` nodes enforce them (block/throttle-group.ts).
 * - `tls-creds-*`: credential files checked as QSD does and read into memory at creation (as
 *   QEMU loads them into GnuTLS); the NBD server and `driver=nbd` use them (export/nbd-tls.ts).
 * - `authz-simple`, `authz-list`: consulted by {@link ObjectRegistry.authzCheck} for each TLS
 *   client of an NBD server started with `tls-authz`.
 */
import { readFile, stat, access } from 'node:fs/promises';
import { constants as fsConstants } from 'node:fs';
import { createDecipheriv, createPrivateKey, createPublicKey, X509Certificate } from 'node:crypto';
import type { Logger } from '../util/logger.js';
import type { TlsCredsMaterial } from '../export/nbd-tls.js';
import { QmpError, strerror } from '../util/errors.js';

/** Object types blockd can create (what `--object help` lists). */
export const CREATABLE_OBJECT_TYPES = [
  'authz-list',
  'authz-simple',
  'iothread',
  'main-loop',
  'secret',
  'throttle-group',
  'tls-creds-anon',
  'tls-creds-psk',
  'tls-creds-x509',
] as const;
export type CreatableObjectType = (typeof CREATABLE_OBJECT_TYPES)[number];

/** Types a QSD 7.2 build can create but blockd cannot (schema values QSD refuses get `invalid object type`). */
const QSD_ONLY_TYPES = new Set(['pr-manager-helper', 'secret_keyring', 'thread-context', 'tls-cipher-suites']);

/** Error code of a malformed id: the CLI appends QSD's hint line to it. */
export const OBJECT_BAD_ID = 'OBJECT_BAD_ID';

/** QEMU's THROTTLE_VALUE_MAX. */
const THROTTLE_VALUE_MAX = 1_000_000_000_000_000;
const UINT_MAX = 4294967295;
const INT_MAX = 2147483647;
const INT64_MAX_TEXT = '9223372036854775807';
/** Secrets larger than this are refused (QEMU has no limit; we will not buffer gigabytes). */
const MAX_SECRET_FILE = 16 * 1024 * 1024;

export type TlsEndpoint = 'client' | 'server';

/** What `nbd-server-start` learns about a `tls-creds` id. */
export type TlsCredsLookup =
  | { kind: 'missing' }
  | { kind: 'not-tls-creds' }
  | { kind: 'tls-creds'; type: string; endpoint: TlsEndpoint; material: TlsCredsMaterial };

/** One throttle bucket (QEMU LeakyBucket settings): rate, burst rate, burst seconds. */
export interface ThrottleBucket {
  avg: number;
  max: number;
  burstLength: number;
}

/** The six buckets in QEMU's order (bps total/read/write, iops total/read/write) and the op size. */
export interface ThrottleConfig {
  buckets: Record<ThrottleBucketName, ThrottleBucket>;
  opSize: number;
}

const BUCKET_NAMES = ['bps-total', 'bps-read', 'bps-write', 'iops-total', 'iops-read', 'iops-write'] as const;
type ThrottleBucketName = (typeof BUCKET_NAMES)[number];

/** A created object: its type, id and the properties it was created with (secrets redacted). */
export interface UserObject {
  readonly id: string;
  readonly type: CreatableObjectType;
  /** The object-add members except `qom-type`, `id`, and secret material (`data`). */
  readonly props: Readonly<Record<string, unknown>>;
}

interface Entry extends UserObject {
  readonly props: Record<string, unknown>;
  /** secret: the decoded (and decrypted) value. */
  secret?: Buffer;
  /** secret: the `data` text as given (what QOM's `data` property reads back, as in QSD). */
  dataText?: string;
  /** tls-creds-*: endpoint. */
  endpoint?: TlsEndpoint;
  /** tls-creds-*: what was loaded from `dir`. */
  tls?: TlsCredsMaterial;
  /** throttle-group: the checked limits. */
  throttle?: ThrottleConfig;
}

/** The object-add arguments after schema validation (union members are type-specific). */
export type ObjectAddArgs = { 'qom-type': string; id: string } & Record<string, unknown>;

/** Well-formed ids: a letter, then letters, digits, '-', '.', '_' (QEMU id_wellformed). */
function idWellFormed(id: string): boolean {
  return /^[A-Za-z][A-Za-z0-9._-]*$/.test(id);
}

function str(v: unknown): string | undefined {
  return typeof v === 'string' ? v : undefined;
}
function num(v: unknown): number | undefined {
  return typeof v === 'number' ? v : undefined;
}

/** QEMU's qbase64_decode: only the base64 alphabet, '=' and '\n' are allowed, then a lenient decode. */
function base64Decode(text: string): Buffer {
  if (text.includes('\0')) throw new QmpError('Base64 data contains embedded NUL characters');
  if (!/^[A-Za-z0-9+/=\n]*$/.test(text)) throw new QmpError('Base64 data contains invalid characters');
  return Buffer.from(text.replace(/\n/g, ''), 'base64');
}

/** glib's g_file_get_contents wording, which QSD puts after `Unable to read PATH: `. */
function readErrorText(path: string, err: unknown, opening: boolean): string {
  const what = opening ? 'Failed to open file' : 'Error reading file';
  return `Unable to read ${path}: ${what} \u201c${path}\u201d: ${strerror(err)}`;
}

export class ObjectRegistry {
  private readonly objects = new Map<string, Entry>();
  private readonly log: Logger;

  constructor(log: Logger) {
    this.log = log.child({ component: 'objects' });
  }

  /** Every object, in creation order. */
  list(): readonly UserObject[] {
    return [...this.objects.values()].map((e) => ({ id: e.id, type: e.type, props: e.props }));
  }

  get(id: string): UserObject | undefined {
    const e = this.objects.get(id);
    return e === undefined ? undefined : { id: e.id, type: e.type, props: e.props };
  }

  has(id: string): boolean {
    return this.objects.has(id);
  }

  /**
   * The bytes of secret `id` (decoded and decrypted). Throws QSD's errors:
   * `No secret with id 'X'`, `Object with id 'X' is not a secret`.
   */
  secretValue(id: string): Buffer {
    const e = this.objects.get(id);
    if (e === undefined) throw new QmpError(`No secret with id '${id}'`);
    if (e.type !== 'secret' || e.secret === undefined) {
      throw new QmpError(`Object with id '${id}' is not a secret`);
    }
    return Buffer.from(e.secret);
  }

  /** True when `id` names an `iothread` object (what block-export-add's `iothread` needs). */
  isIothread(id: string): boolean {
    return this.objects.get(id)?.type === 'iothread';
  }

  /** What kind of object `id` is, for `nbd-server-start tls-creds`. */
  tlsCreds(id: string): TlsCredsLookup {
    const e = this.objects.get(id);
    if (e === undefined) return { kind: 'missing' };
    if (e.endpoint === undefined || e.tls === undefined) return { kind: 'not-tls-creds' };
    // The loaded files, with the endpoint (and x509 verify-peer) as they are now: qom-set
    // changes them for later users, as in QEMU.
    const material: TlsCredsMaterial =
      e.tls.type === 'x509'
        ? { ...e.tls, endpoint: e.endpoint, verifyPeer: e.props['verify-peer'] !== false }
        : { ...e.tls, endpoint: e.endpoint };
    return { kind: 'tls-creds', type: e.type, endpoint: e.endpoint, material };
  }

  /**
   * QEMU's qauthz_is_allowed_by_id: undefined when `identity` is allowed by the authz object
   * `id`, `'denied'` when the object denies it, else why the check could not run (QEMU's
   * wording). Consulted per TLS client, so qom-set of rules applies to later clients.
   */
  authzCheck(id: string, identity: string): string | undefined {
    const e = this.objects.get(id);
    if (e === undefined) return `Cannot find QAuthZ object ID ${id}`;
    if (e.type === 'authz-simple') return e.props.identity === identity ? undefined : 'denied';
    if (e.type !== 'authz-list') return `Object '${id}' is not a QAuthZ subclass`;
    const rules = Array.isArray(e.props.rules) ? (e.props.rules as unknown[]) : [];
    for (const r of rules) {
      if (typeof r !== 'object' || r === null) continue;
      const rule = r as { match?: unknown; policy?: unknown; format?: unknown };
      if (typeof rule.match !== 'string') continue;
      const hit = rule.format === 'glob' ? globMatch(rule.match, identity) : rule.match === identity;
      if (hit) return rule.policy === 'allow' ? undefined : 'denied';
    }
    return e.props.policy === 'allow' ? undefined : 'denied';
  }

  /**
   * The block layer's throttle groups, set by the composition root: object-del asks whether a
   * group is in use, qom-set of `limits` hands the new limits on.
   */
  throttleGroups: { inUse(id: string): boolean; update(id: string, cfg: ThrottleConfig): void } | undefined;

  /** The stored limits of a throttle group (what `throttle` nodes enforce). */
  throttleLimits(id: string): ThrottleConfig | undefined {
    return this.objects.get(id)?.throttle;
  }

  /** secret `id`: its `data` text as given at creation or by qom-set (QOM reads it back). */
  secretDataText(id: string): string | undefined {
    return this.objects.get(id)?.dataText;
  }

  /**
   * qom-set of a plain property (type-checked by the caller): the stored value changes, as
   * with QEMU's setters; loaded secrets and credentials are not reloaded. `endpoint` of TLS
   * credentials takes effect for later users (nbd-server-start).
   */
  setProperty(id: string, name: string, value: unknown): void {
    const e = this.objects.get(id);
    if (e === undefined) throw new QmpError(`object '${id}' not found`);
    if (e.type === 'secret' && name === 'data') {
      e.dataText = String(value);
      return;
    }
    e.props[name] = value;
    if (name === 'endpoint' && e.endpoint !== undefined) e.endpoint = value === 'server' ? 'server' : 'client';
  }

  /** qom-set `limits` of a throttle group: the given members over the current ones, checked whole. */
  setThrottleLimits(id: string, limits: Record<string, unknown>): void {
    const e = this.objects.get(id);
    if (e?.throttle === undefined) throw new QmpError(`object '${id}' is not a throttle group`);
    e.throttle = applyThrottleLimits(e.throttle, limits);
    this.throttleGroups?.update(id, e.throttle);
  }

  /** object-add. `args` has been validated against schema/types/ObjectOptions.json. */
  async add(args: ObjectAddArgs): Promise<void> {
    const type = args['qom-type'];
    const id = args.id;
    if (!idWellFormed(id)) {
      throw new QmpError("Parameter 'id' expects an identifier", 'GenericError', OBJECT_BAD_ID);
    }
    if (!(CREATABLE_OBJECT_TYPES as readonly string[]).includes(type)) {
      if (QSD_ONLY_TYPES.has(type)) throw new QmpError(`Object type '${type}' is not supported by blockd`);
      throw new QmpError(`invalid object type: ${type}`);
    }
    const t = type as CreatableObjectType;
    const { 'qom-type': _t, id: _i, ...props } = args;

    // 2. property setters
    if (props.loaded !== undefined) throw new QmpError(`Property '${t}.loaded' is not writable`);
    const entry: Entry = { id, type: t, props: redact(props) };
    if (t === 'secret' && typeof props.data === 'string') entry.dataText = props.data;
    if (t === 'iothread' || t === 'main-loop') checkEventLoopRanges(props);
    if (t === 'throttle-group') entry.throttle = throttleFromProps(props);

    // 3. the id must be new
    if (this.objects.has(id)) {
      throw new QmpError(`attempt to add duplicate property '${id}' to object (type 'container')`);
    }

    // 4. complete
    switch (t) {
      case 'secret':
        entry.secret = await this.loadSecret(props);
        break;
      case 'iothread':
        checkThreadPool(props);
        break;
      case 'main-loop':
        checkThreadPool(props);
        for (const e of this.objects.values()) {
          if (e.type === 'main-loop') throw new QmpError('only one main-loop instance allowed');
        }
        break;
      case 'throttle-group':
        if (entry.throttle !== undefined) checkThrottle(entry.throttle);
        break;
      case 'tls-creds-x509':
        entry.endpoint = endpointOf(props);
        entry.tls = await this.loadX509(props, entry.endpoint);
        break;
      case 'tls-creds-psk':
        entry.endpoint = endpointOf(props);
        entry.tls = await loadPsk(props, entry.endpoint);
        break;
      case 'tls-creds-anon': {
        entry.endpoint = endpointOf(props);
        let dh: string | undefined;
        if (entry.endpoint === 'server' && typeof props.dir === 'string') {
          dh = await credPath(props.dir, 'dh-params.pem', false);
        }
        entry.tls = { type: 'anon', endpoint: entry.endpoint, ...(dh === undefined ? {} : { dhparam: await readCred(dh) }) };
        break;
      }
      case 'authz-simple':
      case 'authz-list':
        break;
    }
    // A concurrent add of the same id (the file reads above are async) loses here.
    if (this.objects.has(id)) {
      throw new QmpError(`attempt to add duplicate property '${id}' to object (type 'container')`);
    }
    this.objects.set(id, entry);
    this.log.info({ id, type: t }, 'object created');
  }

  /** object-del: QSD 7.2 lets tls-creds and iothreads in use go, not throttle groups. */
  delete(id: string): void {
    const e = this.objects.get(id);
    if (e === undefined) throw new QmpError(`object '${id}' not found`);
    if (e.type === 'main-loop' || (e.type === 'throttle-group' && this.throttleGroups?.inUse(id))) {
      throw new QmpError(`object '${id}' is in use, can not be deleted`);
    }
    if (e.secret !== undefined) e.secret.fill(0);
    this.objects.delete(id);
    this.log.info({ id, type: e.type }, 'object deleted');
  }

  /** Wipe secrets (shutdown). */
  clear(): void {
    for (const e of this.objects.values()) e.secret?.fill(0);
    this.objects.clear();
  }

  // ------------------------------------------------------------------ secret

  private async loadSecret(props: Record<string, unknown>): Promise<Buffer> {
    const data = str(props.data);
    const file = str(props.file);
    if (data !== undefined && file !== undefined) {
      throw new QmpError("'file' and 'data' are mutually exclusive");
    }
    let input: Buffer;
    if (data !== undefined) input = Buffer.from(data, 'utf8');
    else if (file !== undefined) input = await readSecretFile(file);
    else throw new QmpError("Either 'file' or 'data' must be provided");
    const base64 = props.format === 'base64';
    const keyid = str(props.keyid);
    if (keyid !== undefined) return this.decrypt(input, keyid, str(props.iv), base64);
    return base64 ? base64Decode(input.toString('latin1')) : input;
  }

  /** AES-256-CBC with the 32-byte secret `keyid`, checked like QEMU's secret decryption. */
  private decrypt(input: Buffer, keyid: string, iv: string | undefined, base64: boolean): Buffer {
    const key = this.secretValue(keyid);
    if (key.length !== 32) throw new QmpError('Key should be 32 bytes in length');
    if (iv === undefined) throw new QmpError('IV is required to decrypt secret');
    const ivBytes = base64Decode(iv);
    if (ivBytes.length !== 16) throw new QmpError(`IV should be 16 bytes in length not ${ivBytes.length}`);
    const ciphertext = base64 ? base64Decode(input.toString('latin1')) : input;
    if (ciphertext.length % 16 !== 0 || ciphertext.length === 0) {
      throw new QmpError(`Length ${ciphertext.length} must be a multiple of block size 16`);
    }
    const d = createDecipheriv('aes-256-cbc', key, ivBytes);
    d.setAutoPadding(false);
    const plain = Buffer.concat([d.update(ciphertext), d.final()]);
    key.fill(0);
    const pad = plain[plain.length - 1] ?? 0;
    if (pad > 16 || pad > plain.length) {
      plain.fill(0);
      throw new QmpError(`Incorrect number of padding bytes (${pad}) found on decrypted data`);
    }
    return plain.subarray(0, plain.length - pad);
  }

  // ------------------------------------------------------------------ x509

  private async loadX509(props: Record<string, unknown>, endpoint: TlsEndpoint): Promise<TlsCredsMaterial> {
    const dir = str(props.dir);
    if (dir === undefined) throw new QmpError("Missing 'dir' property value");
    const server = endpoint === 'server';
    const ca = await credPath(dir, 'ca-cert.pem', true);
    const crl = await credPath(dir, 'ca-crl.pem', false);
    const cert = await credPath(dir, server ? 'server-cert.pem' : 'client-cert.pem', server);
    const key = await credPath(dir, server ? 'server-key.pem' : 'client-key.pem', server);
    const dh = server ? await credPath(dir, 'dh-params.pem', false) : undefined;

    if (props['sanity-check'] !== false) {
      if (ca !== undefined && pemCertificates(await readCred(ca)).length === 0) {
        throw new QmpError(`Unable to import CA certificate list ${ca}`);
      }
      if (cert !== undefined) {
        const why = certificateProblem(await readCred(cert));
        if (why !== undefined) {
          throw new QmpError(`Unable to import ${server ? 'server' : 'client'} certificate ${cert}: ${why}`);
        }
      }
    }
    const material: TlsCredsMaterial = {
      type: 'x509',
      endpoint,
      ca: ca === undefined ? '' : await readCred(ca),
      verifyPeer: props['verify-peer'] !== false,
    };
    if (crl !== undefined) material.crl = await readCred(crl);
    if (dh !== undefined) material.dhparam = await readCred(dh);
    if (cert !== undefined && key !== undefined) {
      let passphrase: Buffer | undefined;
      const pwid = str(props.passwordid);
      if (pwid !== undefined) passphrase = this.secretValue(pwid);
      const fail = (why: string): QmpError => new QmpError(`Cannot load certificate '${cert}' & key '${key}': ${why}`);
      let pub: string;
      let keyPem: string;
      try {
        const k = createPrivateKey(
          passphrase === undefined ? { key: await readCred(key) } : { key: await readCred(key), passphrase },
        );
        pub = createPublicKey(k).export({ type: 'spki', format: 'pem' }).toString();
        keyPem = k.export({ type: 'pkcs8', format: 'pem' }).toString();
      } catch {
        throw fail('The requested data were not available.');
      } finally {
        passphrase?.fill(0);
      }
      const first = pemCertificates(await readCred(cert))[0];
      if (first !== undefined && first.publicKey.export({ type: 'spki', format: 'pem' }).toString() !== pub) {
        throw fail('The certificate and the given key do not match.');
      }
      material.cert = await readCred(cert);
      material.key = keyPem;
    }
    return material;
  }
}

// ------------------------------------------------------------------ helpers

/** What object-add members the registry keeps (the secret material itself is not kept there). */
function redact(props: Record<string, unknown>): Record<string, unknown> {
  const { data: _d, ...rest } = props;
  return rest;
}

function endpointOf(props: Record<string, unknown>): TlsEndpoint {
  return props.endpoint === 'server' ? 'server' : 'client';
}

async function readSecretFile(path: string): Promise<Buffer> {
  try {
    const st = await stat(path);
    if (st.isDirectory()) {
      throw Object.assign(new Error('Is a directory'), { code: 'EISDIR' });
    }
    if (st.isFile() && st.size > MAX_SECRET_FILE) throw new QmpError(`Unable to read ${path}: file too large`);
  } catch (err) {
    if (err instanceof QmpError) throw err;
    const code = (err as { code?: unknown }).code;
    throw new QmpError(readErrorText(path, err, code !== 'EISDIR'));
  }
  try {
    const b = await readFile(path);
    if (b.length > MAX_SECRET_FILE) throw new QmpError(`Unable to read ${path}: file too large`);
    return b;
  } catch (err) {
    if (err instanceof QmpError) throw err;
    throw new QmpError(readErrorText(path, err, false));
  }
}

/** QEMU's credential path check: `DIR/FILE` must be readable; a missing optional file is fine. */
async function credPath(dir: string, file: string, required: boolean): Promise<string | undefined> {
  const path = `${dir}/${file}`;
  try {
    await access(path, fsConstants.R_OK);
    return path;
  } catch (err) {
    if ((err as { code?: unknown }).code === 'ENOENT' && !required) return undefined;
    throw new QmpError(`Unable to access credentials ${path}: ${strerror(err)}`);
  }
}

async function readCred(path: string): Promise<string> {
  try {
    const st = await stat(path);
    if (st.size > MAX_SECRET_FILE) throw new QmpError(`Unable to read ${path}: file too large`);
    return await readFile(path, 'latin1');
  } catch (err) {
    if (err instanceof QmpError) throw err;
    throw new QmpError(`Unable to access credentials ${path}: ${strerror(err)}`);
  }
}

const PEM_CERT = /-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g;

/** Every certificate of a PEM file that parses. */
function pemCertificates(text: string): X509Certificate[] {
  const out: X509Certificate[] = [];
  for (const m of text.matchAll(PEM_CERT)) {
    try {
      out.push(new X509Certificate(m[0]));
    } catch {
      // an unparsable block is skipped, as a certificate list import would
    }
  }
  return out;
}

/** Why a certificate file does not hold a certificate (GnuTLS's wording), or undefined. */
function certificateProblem(text: string): string | undefined {
  if (!text.includes('-----BEGIN CERTIFICATE-----')) return 'Base64 unexpected header error.';
  return pemCertificates(text).length === 0 ? 'ASN1 parser: Error in DER parsing.' : undefined;
}

/** keys.psk: `username:hexkey` lines (GnuTLS's format); malformed lines are skipped. */
function parsePskFile(text: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  for (const raw of text.split('\n')) {
    const line = raw.replace(/\r$/, '');
    const colon = line.indexOf(':');
    if (colon <= 0) continue;
    const hex = line.slice(colon + 1).trim();
    if (hex.length === 0 || hex.length % 2 !== 0 || !/^[0-9a-fA-F]+$/.test(hex)) continue;
    const user = line.slice(0, colon);
    if (!keys.has(user)) keys.set(user, Buffer.from(hex, 'hex'));
  }
  return keys;
}

/** GLib's g_pattern_match_simple: `*` any run, `?` one character, nothing else special. */
function globMatch(pattern: string, text: string): boolean {
  const re = pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.');
  return new RegExp(`^${re}$`, 's').test(text);
}

async function loadPsk(props: Record<string, unknown>, endpoint: TlsEndpoint): Promise<TlsCredsMaterial> {
  if (endpoint === 'server' && props.username !== undefined) {
    throw new QmpError('username should not be set when endpoint=server');
  }
  const dir = str(props.dir);
  if (dir === undefined) throw new QmpError("Missing 'dir' property value");
  const keys = await credPath(dir, 'keys.psk', true);
  const text = keys === undefined ? '' : await readCred(keys);
  if (endpoint === 'server') {
    const dh = await credPath(dir, 'dh-params.pem', false);
    return { type: 'psk', endpoint, keys: parsePskFile(text), ...(dh === undefined ? {} : { dhparam: await readCred(dh) }) };
  }
  const user = str(props.username) ?? 'qemu';
  const found = text.split('\n').some((l) => l.startsWith(`${user}:`));
  if (!found) throw new QmpError(`Username ${user} not found in PSK file ${keys ?? ''}`);
  const own = parsePskFile(text).get(user);
  return { type: 'psk', endpoint, username: user, keys: new Map(own === undefined ? [] : [[user, own]]) };
}

/** iothread / main-loop setters: every value must be in [0, INT64_MAX]. */
function checkEventLoopRanges(props: Record<string, unknown>): void {
  for (const k of ['aio-max-batch', 'thread-pool-min', 'thread-pool-max', 'poll-max-ns', 'poll-grow', 'poll-shrink']) {
    const v = num(props[k]);
    if (v !== undefined && v < 0) throw new QmpError(`${k} value must be in range [0, ${INT64_MAX_TEXT}]`);
  }
}

function checkThreadPool(props: Record<string, unknown>): void {
  const min = num(props['thread-pool-min']) ?? 0;
  const max = num(props['thread-pool-max']) ?? 64;
  if (min > max || min > INT_MAX || max > INT_MAX) {
    throw new QmpError('bad thread-pool-min/thread-pool-max values');
  }
}

function emptyThrottle(): ThrottleConfig {
  const buckets = {} as Record<ThrottleBucketName, ThrottleBucket>;
  for (const b of BUCKET_NAMES) buckets[b] = { avg: 0, max: 0, burstLength: 1 };
  return { buckets, opSize: 0 };
}

/** A negative int64 seen through QEMU's uint64 fields. */
function asUnsigned(v: number): number {
  return v < 0 ? Number.MAX_VALUE : v;
}

/**
 * throttle-group setters: `x-*` aliases (non-negative, burst lengths up to UINT_MAX), then
 * `limits`, which is converted and checked as a whole at once.
 */
function throttleFromProps(props: Record<string, unknown>): ThrottleConfig {
  const cfg = emptyThrottle();
  for (const [k, v] of Object.entries(props)) {
    if (!k.startsWith('x-') || typeof v !== 'number') continue;
    if (v < 0) throw new QmpError('Property values cannot be negative');
    const name = k.slice(2);
    if (name.endsWith('-max-length') && v > UINT_MAX) {
      // QEMU 7.2's wording, missing space included.
      throw new QmpError(`${k} value must be in therange [0, ${UINT_MAX}]`);
    }
    setThrottleMember(cfg, name, v);
  }
  const limits = props.limits;
  if (typeof limits === 'object' && limits !== null && !Array.isArray(limits)) {
    return applyThrottleLimits(cfg, limits as Record<string, unknown>);
  }
  return cfg;
}

/** QEMU's throttle_limits_to_config over `base`: the members given replace, then the whole is checked. */
function applyThrottleLimits(base: ThrottleConfig, limits: Record<string, unknown>): ThrottleConfig {
  const next = structuredClone(base);
  for (const [k, v] of Object.entries(limits)) {
    if (typeof v !== 'number') continue;
    if (k.endsWith('-max-length') && v > UINT_MAX) {
      throw new QmpError(`${k} value must be in the range [0, ${UINT_MAX}]`);
    }
    setThrottleMember(next, k, k.endsWith('-max-length') && v < 0 ? UINT_MAX : asUnsigned(v));
  }
  checkThrottle(next);
  return next;
}

function setThrottleMember(cfg: ThrottleConfig, name: string, v: number): void {
  if (name === 'iops-size') {
    cfg.opSize = v;
    return;
  }
  const m = /^((?:bps|iops)-(?:total|read|write))(-max)?(-length)?$/.exec(name);
  const bucket = m?.[1] as ThrottleBucketName | undefined;
  if (m === null || bucket === undefined) return;
  const b = cfg.buckets[bucket];
  if (m[3] !== undefined) b.burstLength = v;
  else if (m[2] !== undefined) b.max = v;
  else b.avg = v;
}

/** QEMU's throttle_is_valid, same checks in the same order. */
function checkThrottle(cfg: ThrottleConfig): void {
  const bk = cfg.buckets;
  const mixed = (f: 'avg' | 'max', kind: 'bps' | 'iops'): boolean =>
    bk[`${kind}-total`][f] !== 0 && (bk[`${kind}-read`][f] !== 0 || bk[`${kind}-write`][f] !== 0);
  if (mixed('avg', 'bps') || mixed('avg', 'iops') || mixed('max', 'bps') || mixed('max', 'iops')) {
    throw new QmpError('bps/iops/max total values and read/write values cannot be used at the same time');
  }
  if (cfg.opSize !== 0 && bk['iops-total'].avg === 0 && bk['iops-read'].avg === 0 && bk['iops-write'].avg === 0) {
    throw new QmpError('iops size requires an iops value to be set');
  }
  for (const name of BUCKET_NAMES) {
    const b = bk[name];
    if (b.avg > THROTTLE_VALUE_MAX || b.max > THROTTLE_VALUE_MAX) {
      throw new QmpError(`bps/iops/max values must be within [0, ${THROTTLE_VALUE_MAX}]`);
    }
    if (b.burstLength === 0) throw new QmpError('the burst length cannot be 0');
    if (b.burstLength > 1 && b.max === 0) throw new QmpError('burst length set without burst rate');
    if (b.max !== 0 && b.burstLength > Math.floor(THROTTLE_VALUE_MAX / b.max)) {
      throw new QmpError('burst length too high for this burst rate');
    }
    if (b.max !== 0 && b.avg === 0) throw new QmpError('bps_max/iops_max require corresponding bps/iops values');
    if (b.max !== 0 && b.max < b.avg) throw new QmpError('bps_max/iops_max cannot be lower than bps/iops');
  }
}
