/**
 * TLS settings built from credential material, the tls-authz decision, and the x509 subject in
 * QEMU's format.
 */
import { describe, expect, it } from 'vitest';
import { authorizePeer, nbdClientTls, nbdServerTls, type TlsCredsMaterial } from '../../../src/export/nbd-tls.js';
import { gnutlsDname } from '../../../src/nbd/tls.js';

describe('gnutlsDname', () => {
  it('joins Node\'s subject lines in certificate order without spaces', () => {
    expect(gnutlsDname('C=GB\nO=Example\nCN=client')).toBe('C=GB,O=Example,CN=client');
  });
});

describe('authorizePeer', () => {
  const allowOnly = (who: string) => (id: string) => (id === who ? undefined : 'denied');

  it('checks the x509 subject and words a denial like QEMU', () => {
    expect(authorizePeer({ dname: 'CN=a' }, allowOnly('CN=a'))).toBeUndefined();
    expect(authorizePeer({ dname: 'CN=b' }, allowOnly('CN=a'))).toBe('TLS x509 authz check for CN=b is denied');
  });

  it('checks the PSK username', () => {
    expect(authorizePeer({ pskIdentity: 'bob' }, allowOnly('alice'))).toBe('TLS PSK authz check for bob is denied');
  });

  it('passes lookup errors through and lets an anonymous peer in', () => {
    expect(authorizePeer({ dname: 'CN=a' }, () => 'Cannot find QAuthZ object ID x')).toBe('Cannot find QAuthZ object ID x');
    expect(authorizePeer({}, () => 'denied')).toBeUndefined();
  });
});

describe('nbdServerTls', () => {
  it('requires a verified client certificate by default (verify-peer)', () => {
    const m: TlsCredsMaterial = { type: 'x509', endpoint: 'server', ca: 'CA', cert: 'C', key: 'K', verifyPeer: true };
    const cfg = nbdServerTls(m, undefined);
    expect(cfg.serverOptions).toMatchObject({ requestCert: true, rejectUnauthorized: true, ca: 'CA', minVersion: 'TLSv1.2' });
    expect(cfg.authorize).toBeUndefined();
  });

  it('serves PSK on TLS 1.2 with the keys of the file', () => {
    const key = Buffer.from('00ff', 'hex');
    const cfg = nbdServerTls({ type: 'psk', endpoint: 'server', keys: new Map([['alice', key]]) }, () => undefined);
    expect(cfg.serverOptions.maxVersion).toBe('TLSv1.2');
    expect(cfg.pskKey?.('alice')).toBe(key);
    expect(cfg.pskKey?.('mallory')).toBeUndefined();
    expect(cfg.authorize?.({ pskIdentity: 'alice' })).toBeUndefined();
  });
});

describe('nbdClientTls', () => {
  const x509: TlsCredsMaterial = { type: 'x509', endpoint: 'client', ca: 'CA', verifyPeer: true };

  it('needs a host name to verify the server certificate', () => {
    expect(nbdClientTls(x509, undefined)).toBe('No hostname for certificate validation');
    expect(nbdClientTls({ ...x509, verifyPeer: false }, undefined)).toMatchObject({ rejectUnauthorized: false });
  });

  it('sends SNI for a DNS name only', () => {
    expect(nbdClientTls(x509, 'example.org')).toMatchObject({ servername: 'example.org', rejectUnauthorized: true });
    expect(nbdClientTls(x509, '127.0.0.1')).not.toHaveProperty('servername');
  });

  it('uses the PSK username (default qemu) and its key', () => {
    const key = Buffer.from('abcd', 'hex');
    const o = nbdClientTls({ type: 'psk', endpoint: 'client', keys: new Map([['qemu', key]]) }, undefined);
    expect(typeof o).toBe('object');
    if (typeof o === 'object') expect(o.pskCallback?.('')).toEqual({ psk: key, identity: 'qemu' });
  });
});
