/**
 * Test credentials for NBD over TLS, made with the openssl command line: a CA with a server
 * certificate (CN=localhost, SAN localhost and 127.0.0.1) and a client certificate
 * (`C=GB,O=Example,CN=client`), a second unrelated CA with its own client, laid out the way
 * QEMU's tls-creds-x509 `dir` wants them; and a keys.psk file.
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { findTool, requireTool } from './nbd-tools.js';

export interface TlsTestCreds {
  /** ca-cert.pem, server-cert.pem, server-key.pem */
  serverDir: string;
  /** ca-cert.pem, client-cert.pem, client-key.pem (signed by the server's CA) */
  clientDir: string;
  /** A client whose certificate and CA are unknown to the server. */
  otherClientDir: string;
  /** keys.psk with users alice and bob. */
  pskDir: string;
  /** keys.psk with a wrong key for alice. */
  wrongPskDir: string;
  /** The client certificate's subject as QEMU prints it. */
  clientDname: string;
}

/** openssl is there (else the TLS tests skip; under CI=true they fail, see requireTool). */
export function haveOpenssl(): boolean {
  return findTool('openssl') !== undefined || requireTool('openssl') !== undefined;
}

function openssl(cwd: string, args: string[]): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

/** A CA (EC P-256 keys: quick to make) and certificates signed by it, in `dir`. */
function makePki(dir: string): void {
  mkdirSync(dir, { recursive: true });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  openssl(dir, ['req', '-x509', ...ec, '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2',
    '-subj', '/O=Example/CN=Test CA', '-addext', 'basicConstraints=critical,CA:TRUE',
    '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  const leaf = (name: string, subj: string, ext: string): void => {
    writeFileSync(join(dir, `${name}.ext`), ext);
    openssl(dir, ['req', ...ec, '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', subj]);
    openssl(dir, ['x509', '-req', '-in', `${name}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem',
      '-CAcreateserial', '-out', `${name}-cert.pem`, '-days', '2', '-extfile', `${name}.ext`]);
  };
  const common = 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n';
  leaf('server', '/O=Example/CN=localhost',
    `${common}extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n`);
  leaf('client', '/C=GB/O=Example/CN=client', `${common}extendedKeyUsage=clientAuth\n`);
}

function layout(from: string, to: string, files: string[]): string {
  mkdirSync(to, { recursive: true });
  for (const f of files) copyFileSync(join(from, f), join(to, f));
  return to;
}

/** Make every credential under `root` (openssl must be installed: see haveOpenssl). */
export function makeTlsCreds(root: string): TlsTestCreds {
  const pki = join(root, 'pki');
  const other = join(root, 'pki-other');
  makePki(pki);
  makePki(other);
  const pskDir = join(root, 'psk');
  mkdirSync(pskDir, { recursive: true });
  writeFileSync(join(pskDir, 'keys.psk'), `alice:${'a1'.repeat(32)}\nbob:${'b0'.repeat(16)}\n`);
  const wrongPskDir = join(root, 'psk-wrong');
  mkdirSync(wrongPskDir, { recursive: true });
  writeFileSync(join(wrongPskDir, 'keys.psk'), `alice:${'a2'.repeat(32)}\n`);
  return {
    serverDir: layout(pki, join(root, 'server'), ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']),
    clientDir: layout(pki, join(root, 'client'), ['ca-cert.pem', 'client-cert.pem', 'client-key.pem']),
    otherClientDir: layout(other, join(root, 'other-client'), ['ca-cert.pem', 'client-cert.pem', 'client-key.pem']),
    pskDir,
    wrongPskDir,
    clientDname: 'C=GB,O=Example,CN=client',
  };
}
