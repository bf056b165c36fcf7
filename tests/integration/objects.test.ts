import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { createCipheriv, randomBytes } from 'node:crypto';
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { Services } from '../../src/qmp/services.js';
import { Dispatcher } from '../../src/qmp/dispatcher.js';
import { SchemaRegistry } from '../../src/qmp/schema-registry.js';
import { ALL_COMMANDS } from '../../src/qmp/commands/index.js';
import { silentLogger } from '../../src/util/logger.js';

const schema = SchemaRegistry.load();
const CI = process.env.CI === 'true';

function haveOpenssl(): boolean {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    if (CI) throw new Error('openssl is required under CI');
    return false;
  }
}
const OPENSSL = haveOpenssl();

/** A CA, a server certificate/key signed by it, and a key that matches nothing. */
function makePki(dir: string): void {
  const ossl = (args: string[]): void => {
    execFileSync('openssl', args, { cwd: dir, stdio: 'ignore' });
  };
  ossl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem',
    '-days', '30', '-subj', '/CN=test-ca']);
  ossl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'server-key.pem', '-out', 'server.csr',
    '-subj', '/CN=localhost']);
  ossl(['x509', '-req', '-in', 'server.csr', '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem',
    '-CAcreateserial', '-out', 'server-cert.pem', '-days', '30']);
  ossl(['genpkey', '-algorithm', 'RSA', '-out', 'other-key.pem']);
}

let pki: string;
beforeAll(() => {
  pki = mkdtempSync(join(tmpdir(), 'blockd-pki-'));
  if (OPENSSL) makePki(pki);
}, 60_000);
afterAll(() => rmSync(pki, { recursive: true, force: true }));

describe('object-add and object-del', () => {
  let dir: string;
  let svc: Services;
  let d: Dispatcher;
  let logLines: string[];

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'blockd-objects-'));
    logLines = [];
    const log = pino({ level: 'info' }, { write: (s: string) => void logLines.push(s) });
    svc = new Services(log);
    d = new Dispatcher(svc, ALL_COMMANDS, schema);
  });

  afterEach(async () => {
    await svc.shutdown();
    rmSync(dir, { recursive: true, force: true });
  });

  const add = async (args: Record<string, unknown>): Promise<unknown> =>
    (await d.execute('object-add', args, 'qmp')).value;
  const del = async (id: string): Promise<unknown> => (await d.execute('object-del', { id }, 'qmp')).value;
  const fails = (args: Record<string, unknown>, desc: string): Promise<void> =>
    expect(d.execute('object-add', args, 'qmp')).rejects.toMatchObject({ qmpClass: 'GenericError', message: desc });

  function tlsDir(name: string, files: Record<string, string>): string {
    const p = join(dir, name);
    mkdirSync(p);
    for (const [f, src] of Object.entries(files)) copyFileSync(join(pki, src), join(p, f));
    return p;
  }

  describe('common rules', () => {
    it('creates an object and deletes it again', async () => {
      expect(await add({ 'qom-type': 'secret', id: 's0', data: 'x' })).toEqual({});
      expect(svc.objects.get('s0')?.type).toBe('secret');
      expect(await del('s0')).toEqual({});
      expect(svc.objects.has('s0')).toBe(false);
    });

    it('refuses a duplicate id whatever the type', async () => {
      await add({ 'qom-type': 'secret', id: 's0', data: 'x' });
      await fails({ 'qom-type': 'iothread', id: 's0' }, "attempt to add duplicate property 's0' to object (type 'container')");
    });

    it('refuses an id that is not an identifier', async () => {
      await fails({ 'qom-type': 'secret', id: '1x', data: 'x' }, "Parameter 'id' expects an identifier");
      await fails({ 'qom-type': 'secret', id: '', data: 'x' }, "Parameter 'id' expects an identifier");
    });

    it('checks the id before the object type', async () => {
      await fails({ 'qom-type': 'memory-backend-ram', id: '1x', size: 1 }, "Parameter 'id' expects an identifier");
    });

    it('refuses a qom-type outside the schema with the enum error', async () => {
      await fails({ 'qom-type': 'bogus', id: 'b' }, "Parameter 'qom-type' does not accept value 'bogus'");
    });

    it('answers invalid object type for schema types QSD cannot create', async () => {
      await fails({ 'qom-type': 'memory-backend-ram', id: 'm', size: 1024 }, 'invalid object type: memory-backend-ram');
      await fails({ 'qom-type': 'authz-listfile', id: 'a', filename: '/x' }, 'invalid object type: authz-listfile');
    });

    it('checks the members of a type it cannot create against the 7.2 schema first', async () => {
      await fails({ 'qom-type': 'input-linux', id: 'i' }, "Parameter 'evdev' is missing");
    });

    it('says clearly which QSD types blockd does not implement', async () => {
      await fails({ 'qom-type': 'pr-manager-helper', id: 'p', path: '/x' }, "Object type 'pr-manager-helper' is not supported by blockd");
    });

    it('requires the id', async () => {
      await fails({ 'qom-type': 'secret', data: 'x' }, "Parameter 'id' is missing");
    });

    it('refuses unknown members', async () => {
      await fails({ 'qom-type': 'iothread', id: 'io', bogus: 1 }, "Parameter 'bogus' is unexpected");
    });

    it('refuses the deprecated loaded property as not writable', async () => {
      await fails({ 'qom-type': 'secret', id: 's', data: 'x', loaded: true }, "Property 'secret.loaded' is not writable");
      await fails({ 'qom-type': 'tls-creds-anon', id: 'a', loaded: false }, "Property 'tls-creds-anon.loaded' is not writable");
    });

    it('reports a setter error before a duplicate id', async () => {
      await add({ 'qom-type': 'secret', id: 's0', data: 'x' });
      await fails({ 'qom-type': 'secret', id: 's0', data: 'x', loaded: true }, "Property 'secret.loaded' is not writable");
    });

    it('reports a duplicate id before a completion error', async () => {
      await add({ 'qom-type': 'secret', id: 's0', data: 'x' });
      await fails({ 'qom-type': 'secret', id: 's0' }, "attempt to add duplicate property 's0' to object (type 'container')");
    });

    it('answers object-del of an unknown id', async () => {
      await expect(del('nope')).rejects.toMatchObject({ message: "object 'nope' not found" });
    });
  });

  describe('secret', () => {
    it('keeps the value of data', async () => {
      await add({ 'qom-type': 'secret', id: 's', data: 'hello' });
      expect(svc.objects.secretValue('s').toString()).toBe('hello');
    });

    it('decodes base64 data', async () => {
      await add({ 'qom-type': 'secret', id: 's', data: Buffer.from('pw').toString('base64'), format: 'base64' });
      expect(svc.objects.secretValue('s').toString()).toBe('pw');
    });

    it('reads the value from a file, base64 with a trailing newline included', async () => {
      const f = join(dir, 'pw');
      writeFileSync(f, 'eA==\n');
      await add({ 'qom-type': 'secret', id: 's', file: f, format: 'base64' });
      expect(svc.objects.secretValue('s').toString()).toBe('x');
    });

    it('does not keep the secret data in the stored properties', async () => {
      await add({ 'qom-type': 'secret', id: 's', data: 'hello' });
      expect(svc.objects.get('s')?.props).toEqual({});
    });

    it('refuses base64 with characters outside the alphabet', async () => {
      await fails({ 'qom-type': 'secret', id: 's', data: 'e A==', format: 'base64' }, 'Base64 data contains invalid characters');
    });

    it('requires data or file', async () => {
      await fails({ 'qom-type': 'secret', id: 's' }, "Either 'file' or 'data' must be provided");
    });

    it('refuses data and file together', async () => {
      await fails({ 'qom-type': 'secret', id: 's', data: 'x', file: '/x' }, "'file' and 'data' are mutually exclusive");
    });

    it('reports a missing file in glib wording', async () => {
      const f = join(dir, 'none');
      await fails({ 'qom-type': 'secret', id: 's', file: f },
        `Unable to read ${f}: Failed to open file \u201c${f}\u201d: No such file or directory`);
    });

    it('reports a directory as unreadable', async () => {
      await fails({ 'qom-type': 'secret', id: 's', file: dir },
        `Unable to read ${dir}: Error reading file \u201c${dir}\u201d: Is a directory`);
    });

    it('answers secretValue for unknown ids and non-secrets with QSD errors', async () => {
      await add({ 'qom-type': 'iothread', id: 'io' });
      expect(() => svc.objects.secretValue('nope')).toThrow("No secret with id 'nope'");
      expect(() => svc.objects.secretValue('io')).toThrow("Object with id 'io' is not a secret");
    });

    describe('encrypted with keyid (AES-256-CBC)', () => {
      const key = randomBytes(32);
      const iv = randomBytes(16);
      const encrypt = (plain: string): string => {
        const c = createCipheriv('aes-256-cbc', key, iv);
        return Buffer.concat([c.update(plain), c.final()]).toString('base64');
      };
      const withKey = async (): Promise<void> => {
        await add({ 'qom-type': 'secret', id: 'k', data: key.toString('base64'), format: 'base64' });
      };

      it('decrypts the data with the key secret and the iv', async () => {
        await withKey();
        await add({ 'qom-type': 'secret', id: 'e', data: encrypt('topsecret'), format: 'base64', keyid: 'k', iv: iv.toString('base64') });
        expect(svc.objects.secretValue('e').toString()).toBe('topsecret');
      });

      it('refuses an unknown key id', async () => {
        await fails({ 'qom-type': 'secret', id: 'e', data: 'eA==', format: 'base64', keyid: 'k' }, "No secret with id 'k'");
      });

      it('refuses a key that is not an object of type secret', async () => {
        await add({ 'qom-type': 'iothread', id: 'io' });
        await fails({ 'qom-type': 'secret', id: 'e', data: 'eA==', keyid: 'io' }, "Object with id 'io' is not a secret");
      });

      it('requires a 32-byte key', async () => {
        await add({ 'qom-type': 'secret', id: 'k', data: 'short' });
        await fails({ 'qom-type': 'secret', id: 'e', data: 'eA==', keyid: 'k', iv: 'AAAA' }, 'Key should be 32 bytes in length');
      });

      it('requires the iv', async () => {
        await withKey();
        await fails({ 'qom-type': 'secret', id: 'e', data: encrypt('x'), format: 'base64', keyid: 'k' }, 'IV is required to decrypt secret');
      });

      it('requires a 16-byte iv', async () => {
        await withKey();
        await fails({ 'qom-type': 'secret', id: 'e', data: encrypt('x'), format: 'base64', keyid: 'k', iv: 'AAAA' },
          'IV should be 16 bytes in length not 3');
      });

      it('requires whole cipher blocks', async () => {
        await withKey();
        await fails({ 'qom-type': 'secret', id: 'e', data: 'abc', keyid: 'k', iv: iv.toString('base64') },
          'Length 3 must be a multiple of block size 16');
      });

      it('refuses impossible padding after decryption', async () => {
        await withKey();
        const c = createCipheriv('aes-256-cbc', key, iv);
        c.setAutoPadding(false);
        const block = Buffer.alloc(16, 0x6a);
        const ct = Buffer.concat([c.update(block), c.final()]).toString('base64');
        await fails({ 'qom-type': 'secret', id: 'e', data: ct, format: 'base64', keyid: 'k', iv: iv.toString('base64') },
          'Incorrect number of padding bytes (106) found on decrypted data');
      });
    });
  });

  describe('iothread and main-loop', () => {
    it('stores the iothread properties', async () => {
      await add({ 'qom-type': 'iothread', id: 'io0', 'poll-max-ns': 1000, 'thread-pool-min': 2, 'thread-pool-max': 8 });
      expect(svc.objects.get('io0')?.props).toEqual({ 'poll-max-ns': 1000, 'thread-pool-min': 2, 'thread-pool-max': 8 });
      expect(svc.objects.isIothread('io0')).toBe(true);
    });

    it('refuses negative values', async () => {
      await fails({ 'qom-type': 'iothread', id: 'io', 'poll-grow': -1 }, 'poll-grow value must be in range [0, 9223372036854775807]');
    });

    it('refuses thread-pool-min above thread-pool-max (default 64)', async () => {
      await fails({ 'qom-type': 'iothread', id: 'io', 'thread-pool-min': 100 }, 'bad thread-pool-min/thread-pool-max values');
    });

    it('refuses a thread pool larger than INT_MAX', async () => {
      await fails({ 'qom-type': 'iothread', id: 'io', 'thread-pool-max': 3000000000 }, 'bad thread-pool-min/thread-pool-max values');
    });

    it('allows only one main-loop, which cannot be deleted', async () => {
      await add({ 'qom-type': 'main-loop', id: 'm0' });
      await fails({ 'qom-type': 'main-loop', id: 'm1' }, 'only one main-loop instance allowed');
      await expect(del('m0')).rejects.toMatchObject({ message: "object 'm0' is in use, can not be deleted" });
    });

    it('does not count a main-loop as an iothread', async () => {
      await add({ 'qom-type': 'main-loop', id: 'm0' });
      expect(svc.objects.isIothread('m0')).toBe(false);
    });
  });

  describe('throttle-group', () => {
    it('stores the limits', async () => {
      await add({ 'qom-type': 'throttle-group', id: 'tg', limits: { 'iops-total': 100, 'bps-read': 5 } });
      const cfg = svc.objects.throttleLimits('tg');
      expect(cfg?.buckets['iops-total'].avg).toBe(100);
      expect(cfg?.buckets['bps-read'].avg).toBe(5);
    });

    it('cannot be deleted while a throttle node uses it, and can afterwards', async () => {
      await add({ 'qom-type': 'throttle-group', id: 'tg', limits: { 'iops-total': 100 } });
      await svc.graph.add({ driver: 'throttle', 'node-name': 't0', 'throttle-group': 'tg', file: { driver: 'null-co' } });
      await expect(del('tg')).rejects.toMatchObject({ message: "object 'tg' is in use, can not be deleted" });
      await svc.graph.del('t0');
      await del('tg');
      expect(svc.objects.throttleLimits('tg')).toBeUndefined();
    });

    it('refuses a throttle node naming a group that does not exist', async () => {
      await expect(
        svc.graph.add({ driver: 'throttle', 'node-name': 't0', 'throttle-group': 'nope', file: { driver: 'null-co' } }),
      ).rejects.toMatchObject({ message: "Throttle group 'nope' does not exist" });
      expect(svc.graph.get('t0')).toBeUndefined();
    });

    it('takes the unstable x- aliases', async () => {
      await add({ 'qom-type': 'throttle-group', id: 'tg', 'x-iops-total': 100 });
      expect(svc.objects.throttleLimits('tg')?.buckets['iops-total'].avg).toBe(100);
    });

    it('refuses total and read/write limits together', async () => {
      await fails({ 'qom-type': 'throttle-group', id: 'tg', limits: { 'iops-total': 100, 'iops-read': 5 } },
        'bps/iops/max total values and read/write values cannot be used at the same time');
    });

    it('refuses values above 1e15 and negative values', async () => {
      const msg = 'bps/iops/max values must be within [0, 1000000000000000]';
      await fails({ 'qom-type': 'throttle-group', id: 'tg', limits: { 'bps-total': 1e18 } }, msg);
      await fails({ 'qom-type': 'throttle-group', id: 'tg', limits: { 'iops-total': -1 } }, msg);
      await fails({ 'qom-type': 'throttle-group', id: 'tg', 'x-iops-total': -1 }, 'Property values cannot be negative');
    });

    it('checks burst settings like QEMU', async () => {
      const t = (limits: Record<string, number>, msg: string): Promise<void> =>
        fails({ 'qom-type': 'throttle-group', id: 'tg', limits }, msg);
      await t({ 'iops-size': 100 }, 'iops size requires an iops value to be set');
      await t({ 'iops-total': 100, 'iops-total-max-length': 0 }, 'the burst length cannot be 0');
      await t({ 'iops-total': 100, 'iops-total-max-length': 5 }, 'burst length set without burst rate');
      await t({ 'iops-total': 100, 'iops-total-max': 50 }, 'bps_max/iops_max cannot be lower than bps/iops');
      await t({ 'iops-total-max': 100 }, 'bps_max/iops_max require corresponding bps/iops values');
      await t({ 'iops-total': 100, 'iops-total-max': 1e15, 'iops-total-max-length': 5 }, 'burst length too high for this burst rate');
      await t({ 'iops-total': 100, 'iops-total-max-length': 5e9 }, 'iops-total-max-length value must be in the range [0, 4294967295]');
    });

    it('words the x- burst length range error as QEMU 7.2 does', async () => {
      await fails({ 'qom-type': 'throttle-group', id: 'tg', 'x-iops-total-max-length': 5e9 },
        'x-iops-total-max-length value must be in therange [0, 4294967295]');
    });
  });

  describe('TLS credentials', () => {
    it('requires dir for x509 and psk', async () => {
      await fails({ 'qom-type': 'tls-creds-x509', id: 't' }, "Missing 'dir' property value");
      await fails({ 'qom-type': 'tls-creds-psk', id: 'p' }, "Missing 'dir' property value");
    });

    it('reports a missing CA certificate', async () => {
      const p = join(dir, 'none');
      await fails({ 'qom-type': 'tls-creds-x509', id: 't', dir: p },
        `Unable to access credentials ${p}/ca-cert.pem: No such file or directory`);
    });

    it.skipIf(!OPENSSL)('reports a missing server certificate for a server endpoint', async () => {
      const p = tlsDir('ca-only', { 'ca-cert.pem': 'ca-cert.pem' });
      await fails({ 'qom-type': 'tls-creds-x509', id: 't', dir: p, endpoint: 'server' },
        `Unable to access credentials ${p}/server-cert.pem: No such file or directory`);
    });

    it.skipIf(!OPENSSL)('accepts a client with only the CA certificate', async () => {
      const p = tlsDir('client', { 'ca-cert.pem': 'ca-cert.pem' });
      await add({ 'qom-type': 'tls-creds-x509', id: 't', dir: p });
      expect(svc.objects.tlsCreds('t')).toMatchObject({ kind: 'tls-creds', type: 'tls-creds-x509', endpoint: 'client' });
    });

    it.skipIf(!OPENSSL)('accepts a complete server directory', async () => {
      const p = tlsDir('server', { 'ca-cert.pem': 'ca-cert.pem', 'server-cert.pem': 'server-cert.pem', 'server-key.pem': 'server-key.pem' });
      await add({ 'qom-type': 'tls-creds-x509', id: 't', dir: p, endpoint: 'server' });
      expect(svc.objects.tlsCreds('t')).toMatchObject({ endpoint: 'server' });
    });

    it('refuses a CA file without certificates', async () => {
      const p = join(dir, 'bad');
      mkdirSync(p);
      writeFileSync(join(p, 'ca-cert.pem'), 'garbage\n');
      await fails({ 'qom-type': 'tls-creds-x509', id: 't', dir: p }, `Unable to import CA certificate list ${p}/ca-cert.pem`);
    });

    it.skipIf(!OPENSSL)('refuses a server certificate file without a certificate', async () => {
      const p = tlsDir('badcert', { 'ca-cert.pem': 'ca-cert.pem', 'server-key.pem': 'server-key.pem' });
      writeFileSync(join(p, 'server-cert.pem'), 'garbage\n');
      await fails({ 'qom-type': 'tls-creds-x509', id: 't', dir: p, endpoint: 'server' },
        `Unable to import server certificate ${p}/server-cert.pem: Base64 unexpected header error.`);
    });

    it.skipIf(!OPENSSL)('refuses a key that does not match the certificate', async () => {
      const p = tlsDir('mism', { 'ca-cert.pem': 'ca-cert.pem', 'server-cert.pem': 'server-cert.pem', 'server-key.pem': 'other-key.pem' });
      await fails({ 'qom-type': 'tls-creds-x509', id: 't', dir: p, endpoint: 'server' },
        `Cannot load certificate '${p}/server-cert.pem' & key '${p}/server-key.pem': The certificate and the given key do not match.`);
    });

    it.skipIf(!OPENSSL)('refuses an unparsable key even without the sanity check', async () => {
      const p = tlsDir('badkey', { 'ca-cert.pem': 'ca-cert.pem', 'server-cert.pem': 'server-cert.pem' });
      writeFileSync(join(p, 'server-key.pem'), 'garbage\n');
      await fails({ 'qom-type': 'tls-creds-x509', id: 't', dir: p, endpoint: 'server', 'sanity-check': false },
        `Cannot load certificate '${p}/server-cert.pem' & key '${p}/server-key.pem': The requested data were not available.`);
    });

    it('refuses an unreadable credential file with its errno text', async () => {
      const p = join(dir, 'noperm');
      mkdirSync(p);
      writeFileSync(join(p, 'keys.psk'), 'qemu:00\n');
      chmodSync(join(p, 'keys.psk'), 0);
      const root = process.getuid?.() === 0;
      if (root) return; // root reads anything
      await fails({ 'qom-type': 'tls-creds-psk', id: 'p', dir: p, endpoint: 'server' },
        `Unable to access credentials ${p}/keys.psk: Permission denied`);
    });

    it('checks the psk file and the client username', async () => {
      const p = join(dir, 'psk');
      mkdirSync(p);
      await fails({ 'qom-type': 'tls-creds-psk', id: 'p', dir: p, endpoint: 'server' },
        `Unable to access credentials ${p}/keys.psk: No such file or directory`);
      writeFileSync(join(p, 'keys.psk'), 'bob:0123456789abcdef\n');
      await fails({ 'qom-type': 'tls-creds-psk', id: 'p', dir: p }, `Username qemu not found in PSK file ${p}/keys.psk`);
      await add({ 'qom-type': 'tls-creds-psk', id: 'p', dir: p, username: 'bob' });
      await add({ 'qom-type': 'tls-creds-psk', id: 'ps', dir: p, endpoint: 'server' });
    });

    it('refuses a username on a psk server endpoint before looking at dir', async () => {
      await fails({ 'qom-type': 'tls-creds-psk', id: 'p', username: 'x', endpoint: 'server' },
        'username should not be set when endpoint=server');
    });

    it('accepts anonymous credentials without a directory', async () => {
      await add({ 'qom-type': 'tls-creds-anon', id: 'a', endpoint: 'server' });
      expect(svc.objects.tlsCreds('a')).toMatchObject({ kind: 'tls-creds', type: 'tls-creds-anon', endpoint: 'server' });
    });

    it('reports a dir that is a file for anonymous server credentials', async () => {
      const f = join(dir, 'file');
      writeFileSync(f, '');
      await fails({ 'qom-type': 'tls-creds-anon', id: 'a', dir: f, endpoint: 'server' },
        `Unable to access credentials ${f}/dh-params.pem: Not a directory`);
    });
  });

  describe('authz', () => {
    it('stores authz-simple and requires identity', async () => {
      await fails({ 'qom-type': 'authz-simple', id: 'a' }, "Parameter 'identity' is missing");
      await add({ 'qom-type': 'authz-simple', id: 'a', identity: 'CN=client' });
      expect(svc.objects.get('a')?.props).toEqual({ identity: 'CN=client' });
    });

    it('stores authz-list rules and checks each rule', async () => {
      await fails({ 'qom-type': 'authz-list', id: 'l', rules: [{ match: 'x' }] }, "Parameter 'rules[0].policy' is missing");
      await add({ 'qom-type': 'authz-list', id: 'l', policy: 'allow', rules: [{ match: 'a*', policy: 'deny', format: 'glob' }] });
      expect(svc.objects.get('l')?.type).toBe('authz-list');
    });
  });

  describe('users of objects', () => {
    const unixAddr = (p: string): Record<string, unknown> => ({ type: 'unix', data: { path: p } });
    const start = (extra: Record<string, unknown>): Promise<unknown> =>
      d.execute('nbd-server-start', { addr: unixAddr(join(dir, 'nbd.sock')), ...extra }, 'qmp');

    it('nbd-server-start keeps the unknown tls-creds error', async () => {
      await expect(start({ 'tls-creds': 'nope' })).rejects.toMatchObject({ message: "No TLS credentials with id 'nope'" });
      expect(svc.exports.serverRunning).toBe(false);
    });

    it('nbd-server-start refuses an object that is not TLS credentials', async () => {
      await add({ 'qom-type': 'secret', id: 's', data: 'x' });
      await expect(start({ 'tls-creds': 's' })).rejects.toMatchObject({ message: "Object with id 's' is not TLS credentials" });
    });

    it('nbd-server-start refuses client-endpoint credentials', async () => {
      await add({ 'qom-type': 'tls-creds-anon', id: 'c' });
      await expect(start({ 'tls-creds': 'c' })).rejects.toMatchObject({ message: 'Expected TLS credentials for a server endpoint' });
    });

    it('nbd-server-start takes server credentials (a TLS server)', async () => {
      await add({ 'qom-type': 'tls-creds-anon', id: 'srv', endpoint: 'server' });
      expect(await start({ 'tls-creds': 'srv' })).toMatchObject({ value: {} });
      expect(svc.exports.serverRunning).toBe(true);
    });

    it('nbd-server-start reports a bind error before the credentials', async () => {
      const bad = join(dir, 'missing', 'x.sock');
      await expect(d.execute('nbd-server-start', { addr: unixAddr(bad), 'tls-creds': 'nope' }, 'qmp')).rejects.toMatchObject({
        message: expect.stringMatching(/^Failed to bind socket to /),
      });
    });

    it('lets object-del remove credentials (QSD 7.2 does not check users)', async () => {
      await add({ 'qom-type': 'tls-creds-anon', id: 'srv', endpoint: 'server' });
      expect(await del('srv')).toEqual({});
    });

    describe('block-export-add iothread', () => {
      beforeEach(async () => {
        await start({});
        await d.execute('blockdev-add', { driver: 'null-co', 'node-name': 'n0' }, 'qmp');
      });
      const exp = (extra: Record<string, unknown>): Promise<unknown> =>
        d.execute('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'n0', ...extra }, 'qmp');

      it('accepts an existing iothread', async () => {
        await add({ 'qom-type': 'iothread', id: 'io0' });
        await exp({ iothread: 'io0' });
        expect(svc.exports.query().map((e) => e.id)).toEqual(['e0']);
      });

      it('accepts fixed-iothread with an existing iothread', async () => {
        await add({ 'qom-type': 'iothread', id: 'io0' });
        await exp({ iothread: 'io0', 'fixed-iothread': true });
        expect(svc.exports.query()).toHaveLength(1);
      });

      it('refuses an unknown iothread', async () => {
        await expect(exp({ iothread: 'nope' })).rejects.toMatchObject({ message: 'iothread "nope" not found' });
      });

      it('refuses an object that is not an iothread', async () => {
        await add({ 'qom-type': 'secret', id: 's', data: 'x' });
        await expect(exp({ iothread: 's' })).rejects.toMatchObject({ message: 'iothread "s" not found' });
      });

      it('reports an unknown node before an unknown iothread', async () => {
        await expect(exp({ 'node-name': 'nope', iothread: 'nope' })).rejects.toMatchObject({
          message: "Cannot find device='' nor node-name='nope'",
        });
      });
    });
  });
});
