/**
 * TLS for the NBD server and the `driver=nbd` client: the credentials of a `tls-creds-*` object
 * (read from its directory by qmp/objects.ts when the object was created, as QEMU does) turned
 * into the plain Node TLS options the NBD engine runs with (src/nbd/tls.ts), plus the
 * `tls-authz` check after the handshake.
 *
 * Versions and ciphers (GnuTLS peers: qemu-img, qemu-nbd, libnbd):
 * - x509: TLS 1.2 and 1.3, Node's default ciphers. GnuTLS clients negotiate TLS 1.3.
 * - psk: TLS 1.2 only. Node's `pskCallback` serves TLS 1.2 PSK cipher suites; in TLS 1.3
 *   OpenSSL only offers PSK through session callbacks Node does not expose. GnuTLS clients
 *   (QEMU's priority `NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK`, libnbd's likewise) fall back to
 *   TLS 1.2 and agree on ECDHE-PSK with AES-GCM/CBC or plain PSK.
 * - anon: TLS 1.2 anonymous Diffie-Hellman (`ADH`), which OpenSSL only allows at security
 *   level 0 (QEMU's clients use `NORMAL:+ANON-DH`).
 */
import tls from 'node:tls';
import { isIP } from 'node:net';
import type { NbdTlsPeer, NbdTlsServerConfig } from '../nbd/tls.js';

/** What a `tls-creds-*` object holds once created (files read, key decrypted). */
export type TlsCredsMaterial =
  | {
      type: 'x509';
      endpoint: 'client' | 'server';
      /** ca-cert.pem (required). */
      ca: string;
      /** ca-crl.pem, when present. */
      crl?: string;
      /** server-cert.pem / client-cert.pem (the client's is optional). */
      cert?: string;
      /** The matching private key, unencrypted PEM. */
      key?: string;
      /** dh-params.pem (server), when present. */
      dhparam?: string;
      /** `verify-peer` (default on): a server requires and checks a client certificate. */
      verifyPeer: boolean;
    }
  | {
      type: 'psk';
      endpoint: 'client' | 'server';
      /** keys.psk: username -> key (server: every line; client: its own username only). */
      keys: ReadonlyMap<string, Buffer>;
      /** Client: the username it presents. */
      username?: string;
      dhparam?: string;
    }
  | { type: 'anon'; endpoint: 'client' | 'server'; dhparam?: string };

/** TLS 1.2 PSK suites GnuTLS offers by default, strongest first (OpenSSL names). */
export const PSK_CIPHERS = [
  'ECDHE-PSK-CHACHA20-POLY1305',
  'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
  'PSK-CHACHA20-POLY1305',
  'PSK-AES256-CBC-SHA384',
  'PSK-AES128-CBC-SHA256',
].join(':');

/** Anonymous DH suites (TLS 1.2); OpenSSL refuses them above security level 0. */
export const ANON_CIPHERS = 'ADH-AES256-GCM-SHA384:ADH-AES128-GCM-SHA256:ADH-AES256-SHA256:ADH-AES128-SHA256:@SECLEVEL=0';

/**
 * The `tls-authz` decision for a peer: undefined when allowed, else QEMU's message. `check`
 * answers for one identity (object lookup errors included, see ObjectRegistry.authzCheck).
 */
export function authorizePeer(
  peer: NbdTlsPeer,
  check: (identity: string) => string | undefined,
): string | undefined {
  if (peer.dname !== undefined) {
    const err = check(peer.dname);
    if (err !== undefined) return err === 'denied' ? `TLS x509 authz check for ${peer.dname} is denied` : err;
    return undefined;
  }
  if (peer.pskIdentity !== undefined) {
    const err = check(peer.pskIdentity);
    if (err !== undefined) return err === 'denied' ? `TLS PSK authz check for ${peer.pskIdentity} is denied` : err;
    return undefined;
  }
  // x509 with verify-peer=off (no client certificate asked for) or anon: no name to check;
  // QEMU skips tls-authz then, and so do we.
  return undefined;
}

/**
 * The NBD server's TLS settings for a server-endpoint credential object. `authzCheck` is set
 * when `tls-authz` names an object (looked up per client, as QEMU does).
 */
export function nbdServerTls(
  m: TlsCredsMaterial,
  authzCheck: ((identity: string) => string | undefined) | undefined,
): NbdTlsServerConfig {
  let serverOptions: tls.TlsOptions;
  let pskKey: ((identity: string) => Buffer | undefined) | undefined;
  switch (m.type) {
    case 'x509':
      serverOptions = {
        ca: m.ca,
        ...(m.cert === undefined ? {} : { cert: m.cert }),
        ...(m.key === undefined ? {} : { key: m.key }),
        ...(m.crl === undefined ? {} : { crl: m.crl }),
        ...(m.dhparam === undefined ? {} : { dhparam: m.dhparam }),
        requestCert: m.verifyPeer,
        rejectUnauthorized: m.verifyPeer,
        minVersion: 'TLSv1.2',
      };
      break;
    case 'psk': {
      const keys = m.keys;
      serverOptions = { ciphers: PSK_CIPHERS, minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' };
      if (m.dhparam !== undefined) serverOptions.dhparam = m.dhparam;
      pskKey = (identity) => keys.get(identity);
      break;
    }
    case 'anon':
      serverOptions = {
        ciphers: ANON_CIPHERS,
        minVersion: 'TLSv1.2',
        maxVersion: 'TLSv1.2',
        dhparam: m.dhparam ?? 'auto',
      };
      break;
  }
  const cfg: NbdTlsServerConfig = { serverOptions };
  if (pskKey !== undefined) cfg.pskKey = pskKey;
  if (authzCheck !== undefined) cfg.authorize = (peer) => authorizePeer(peer, authzCheck);
  return cfg;
}

/**
 * Node TLS client options for `driver=nbd` with client-endpoint credentials, or QEMU's error.
 * `hostname` is `tls-hostname`, else the server's inet host (QEMU's rule); x509 with
 * verify-peer checks the server certificate against the CA and that name.
 */
export function nbdClientTls(m: TlsCredsMaterial, hostname: string | undefined): tls.ConnectionOptions | string {
  switch (m.type) {
    case 'x509': {
      const o: tls.ConnectionOptions = {
        ca: m.ca,
        ...(m.cert === undefined ? {} : { cert: m.cert }),
        ...(m.key === undefined ? {} : { key: m.key }),
        ...(m.crl === undefined ? {} : { crl: m.crl }),
        minVersion: 'TLSv1.2',
        rejectUnauthorized: m.verifyPeer,
      };
      if (hostname !== undefined && isIP(hostname) === 0) o.servername = hostname;
      if (m.verifyPeer) {
        if (hostname === undefined) return 'No hostname for certificate validation';
        o.checkServerIdentity = (_name, cert) => tls.checkServerIdentity(hostname, cert);
      } else {
        o.checkServerIdentity = () => undefined;
      }
      return o;
    }
    case 'psk': {
      const user = m.username ?? 'qemu';
      const key = m.keys.get(user);
      if (key === undefined) return `Username ${user} not found in PSK file`;
      return {
        ciphers: PSK_CIPHERS,
        minVersion: 'TLSv1.2',
        maxVersion: 'TLSv1.2',
        pskCallback: () => ({ psk: key, identity: user }),
        checkServerIdentity: () => undefined,
      };
    }
    case 'anon':
      // No certificate to check: the channel is encrypted, the server is not authenticated.
      return { ciphers: ANON_CIPHERS, minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2', rejectUnauthorized: false };
  }
}
