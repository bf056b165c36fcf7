#!/usr/bin/env node
// npm run bench:tls [-- ROUNDS [SIZE_MIB]]
//
// NBD throughput over TLS, blockd vs qemu-storage-daemon: both serve the same raw image over a
// unix socket with tls-creds-x509 (certificates made here with openssl), and nbdcopy copies the
// export to null: (read) and a file into it (write), rounds interleaved (blockd, qsd, qsd,
// blockd, ...) so that a busy machine hurts both alike. The same runs without TLS give the
// baseline, and blockd without TLS on Node's net.Socket (BLOCKD_NET=node, the socket layer a TLS
// server runs on) separates the cost of TLS from that of leaving the native socket layer.
// Reported per case: median MiB/s and the server's CPU seconds per GiB moved (from
// /proc/PID/stat), which varies less than wall time when other work shares the CPUs.
// Needs openssl, nbdcopy (libnbd-bin), qemu-storage-daemon.
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, mkdirSync, copyFileSync, readFileSync, rmSync, writeFileSync, openSync, writeSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomFillSync } from 'node:crypto';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const ROUNDS = Number(process.argv[2] ?? 5);
const SIZE_MIB = Number(process.argv[3] ?? 256);
const TICK = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;

const dir = mkdtempSync(join(tmpdir(), 'bench-tls-'));
const children = [];
function cleanup() {
  for (const c of children) if (c.exitCode === null) c.kill('SIGTERM');
  rmSync(dir, { recursive: true, force: true });
}
process.on('exit', cleanup);
process.on('SIGTERM', () => process.exit(143));
process.on('SIGINT', () => process.exit(130));

function openssl(cwd, args) {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

// ---- credentials (EC P-256, as a modern deployment would use)
const pki = join(dir, 'pki');
mkdirSync(pki);
const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
openssl(pki, ['req', '-x509', ...ec, '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-subj', '/CN=bench CA',
  '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
const leaf = (name, subj, ext) => {
  writeFileSync(join(pki, `${name}.ext`), `basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n${ext}`);
  openssl(pki, ['req', ...ec, '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', subj]);
  openssl(pki, ['x509', '-req', '-in', `${name}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial',
    '-out', `${name}-cert.pem`, '-days', '2', '-extfile', `${name}.ext`]);
};
leaf('server', '/CN=localhost', 'extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost\n');
leaf('client', '/CN=client', 'extendedKeyUsage=clientAuth\n');
const serverDir = join(dir, 'server');
const clientDir = join(dir, 'client');
mkdirSync(serverDir);
mkdirSync(clientDir);
for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']) copyFileSync(join(pki, f), join(serverDir, f));
for (const f of ['ca-cert.pem', 'client-cert.pem', 'client-key.pem']) copyFileSync(join(pki, f), join(clientDir, f));

// ---- images: the export (incompressible data) and the file written into it
function makeImage(path) {
  const fd = openSync(path, 'w');
  const chunk = Buffer.alloc(1 << 20);
  for (let i = 0; i < SIZE_MIB; i++) writeSync(fd, randomFillSync(chunk));
  closeSync(fd);
}
const img = { blockd: join(dir, 'blockd.raw'), qsd: join(dir, 'qsd.raw'), node: join(dir, 'node.raw') };
const src = join(dir, 'src.raw');
makeImage(img.blockd);
copyFileSync(img.blockd, img.qsd);
copyFileSync(img.blockd, img.node);
makeImage(src);

// ---- servers: blockd and QSD, each with and without TLS
async function startServer(name, binary, tls, env = {}) {
  const sock = join(dir, `${name}.sock`);
  const pidfile = join(dir, `${name}.pid`);
  const args = [
    ...(tls ? ['--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${serverDir}`] : []),
    '--blockdev', `driver=file,node-name=f,filename=${img[binary === 'qsd' ? 'qsd' : env.BLOCKD_NET ? 'node' : 'blockd']}`,
    '--blockdev', 'driver=raw,node-name=r,file=f',
    '--nbd-server', `addr.type=unix,addr.path=${sock}${tls ? ',tls-creds=tls0' : ''}`,
    '--export', 'type=nbd,id=e,node-name=r,name=x,writable=on',
    '--pidfile', pidfile,
  ];
  const cmd = binary === 'qsd' ? 'qemu-storage-daemon' : join(ROOT, 'bin', 'blockd');
  const c = spawn(cmd, binary === 'qsd' ? args : ['--log-level', 'warn', ...args], {
    stdio: ['ignore', 'ignore', 'inherit'],
    env: { ...process.env, ...env },
  });
  children.push(c);
  for (let i = 0; i < 600 && !existsSync(pidfile); i++) await new Promise((r) => setTimeout(r, 50));
  if (!existsSync(pidfile)) throw new Error(`${name} did not start`);
  return { name, sock, pid: c.pid, tls };
}

function cpuSeconds(pid) {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const rest = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return (Number(rest[11]) + Number(rest[12])) / TICK; // utime, stime
}

function uri(s) {
  return s.tls
    ? `nbds+unix:///x?socket=${s.sock}&tls-certificates=${clientDir}`
    : `nbd+unix:///x?socket=${s.sock}`;
}

function runCase(s, op) {
  const args = op === 'read' ? [uri(s), 'null:'] : [src, uri(s)];
  const cpu0 = cpuSeconds(s.pid);
  const t0 = process.hrtime.bigint();
  execFileSync('nbdcopy', args, { stdio: ['ignore', 'ignore', 'inherit'] });
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu = cpuSeconds(s.pid) - cpu0;
  return { mibs: SIZE_MIB / secs, cpuPerGiB: (cpu * 1024) / SIZE_MIB };
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

const servers = [
  await startServer('blockd-tls', 'blockd', true),
  await startServer('qsd-tls', 'qsd', true),
  await startServer('blockd-plain', 'blockd', false),
  await startServer('qsd-plain', 'qsd', false),
  await startServer('blockd-netsock', 'blockd', false, { BLOCKD_NET: 'node' }),
];
const results = new Map();
const order = (r) => (r % 2 === 0 ? servers : [...servers].reverse());
for (const op of ['read', 'write']) {
  // One untimed pass each: page cache and connection paths warm.
  for (const s of servers) runCase(s, op);
  for (let r = 0; r < ROUNDS; r++) {
    for (const s of order(r)) {
      const key = `${op} ${s.name}`;
      if (!results.has(key)) results.set(key, []);
      results.get(key).push(runCase(s, op));
    }
  }
}

console.log(`nbdcopy of ${SIZE_MIB} MiB over a unix socket, ${ROUNDS} interleaved rounds, medians`);
console.log('case                 MiB/s   server CPU s/GiB');
for (const [key, rs] of results) {
  const mibs = median(rs.map((x) => x.mibs));
  const cpu = median(rs.map((x) => x.cpuPerGiB));
  console.log(`${key.padEnd(20)} ${mibs.toFixed(0).padStart(6)}   ${cpu.toFixed(2).padStart(6)}`);
}
for (const op of ['read', 'write']) {
  const m = (n) => median(results.get(`${op} ${n}`).map((x) => x.mibs));
  const c = (n) => median(results.get(`${op} ${n}`).map((x) => x.cpuPerGiB));
  console.log(
    `${op}: blockd/qsd throughput over TLS ${(m('blockd-tls') / m('qsd-tls')).toFixed(2)}x ` +
      `(plain ${(m('blockd-plain') / m('qsd-plain')).toFixed(2)}x); ` +
      `TLS costs blockd ${(c('blockd-tls') - c('blockd-plain')).toFixed(2)} CPU s/GiB ` +
      `(${(c('blockd-tls') - c('blockd-netsock')).toFixed(2)} over net.Socket), qsd ${(c('qsd-tls') - c('qsd-plain')).toFixed(2)}`,
  );
}
// The servers keep the event loop alive: stop them (and remove the temp dir) now.
process.exit(0);
