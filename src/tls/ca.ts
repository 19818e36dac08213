/**
 * The cluster CA and host certificates, made with the openssl command.
 *
 * A host's TLS directory holds the names QEMU's tls-creds-x509 expects, so the same
 * files secure both the control channel (ferryd ⇄ ferryd) and the data channel
 * (QEMU ⇄ QEMU):
 *   ca-cert.pem                       the cluster CA
 *   server-cert.pem / server-key.pem  this host's certificate (serverAuth + clientAuth)
 *   client-cert.pem / client-key.pem  the same certificate, under QEMU's client names
 *   dh-params.pem                     RFC 7919's ffdhe2048 group (a published constant)
 * The CA's own key (ca-key.pem) stays in the CA directory, never in a host's.
 *
 * Without dh-params.pem, QEMU generates Diffie-Hellman parameters whenever a server
 * tls-creds-x509 is added: 0.15-1.1 s here, in the middle of every incoming migration's
 * setup. A well-known group is as safe as a fresh one (RFC 7919 section 1) and costs nothing.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FerryError } from '../errors.ts';
import { NAME_RE } from '../domain/config.ts';

function openssl(args: string[], cwd?: string): string {
  try {
    return execFileSync('openssl', args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] }).toString();
  } catch (e) {
    const err = e as { stderr?: Buffer; message: string };
    throw new FerryError('TLS_MISSING', `openssl ${args[0]} failed: ${err.stderr?.toString().trim() || err.message}`);
  }
}

export function caInit(dir: string, opts: { name?: string; days?: number; force?: boolean } = {}): { caCert: string } {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const cert = path.join(dir, 'ca-cert.pem');
  const key = path.join(dir, 'ca-key.pem');
  if (fs.existsSync(cert) && !opts.force) throw new FerryError('CLI_USAGE', `A CA already exists in ${dir} (use --force to replace it)`);
  openssl(['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', key]);
  fs.chmodSync(key, 0o600);
  openssl(['req', '-x509', '-new', '-key', key, '-sha256', '-days', String(opts.days ?? 3650), '-subj', `/O=ferry/CN=${opts.name ?? 'ferry cluster CA'}`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign', '-out', cert]);
  return { caCert: cert };
}

/** RFC 7919 ffdhe2048 (g = 2), PKCS#3 PEM; checked against the RFC's formula in ca.test.ts. */
export const FFDHE2048_PEM = `-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
`;

/**
 * Writes dh-params.pem into a host TLS directory that lacks it (ferryd does this at
 * start for directories made before ferry shipped it). Returns true if it wrote one.
 */
export function ensureDhParams(dir: string): boolean {
  const p = path.join(dir, 'dh-params.pem');
  if (fs.existsSync(p)) return false;
  fs.writeFileSync(p, FFDHE2048_PEM, { mode: 0o644 });
  return true;
}

export interface IssueOpts {
  caDir: string;
  outDir: string;
  ips?: string[];
  dnsNames?: string[];
  days?: number;
}

/** Issues NAME a certificate signed by the CA in caDir and writes a host TLS directory. */
export function issueHostCert(name: string, o: IssueOpts): { dir: string } {
  if (!NAME_RE.test(name)) throw new FerryError('CLI_USAGE', `Bad certificate name "${name}"`);
  const caCert = path.join(o.caDir, 'ca-cert.pem');
  const caKey = path.join(o.caDir, 'ca-key.pem');
  if (!fs.existsSync(caCert) || !fs.existsSync(caKey)) throw new FerryError('TLS_MISSING', `No CA in ${o.caDir}: run \`ferry ca init --dir ${o.caDir}\` first`);
  fs.mkdirSync(o.outDir, { recursive: true, mode: 0o700 });
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-cert-'));
  try {
    const key = path.join(tmp, 'key.pem');
    const csr = path.join(tmp, 'req.csr');
    const ext = path.join(tmp, 'ext.cnf');
    const sans = [`DNS:${name}`, ...(o.dnsNames ?? []).map((d) => `DNS:${d}`), ...(o.ips ?? []).map((i) => `IP:${i}`)];
    fs.writeFileSync(ext, [
      'basicConstraints=critical,CA:FALSE',
      'keyUsage=critical,digitalSignature,keyEncipherment,keyAgreement',
      'extendedKeyUsage=serverAuth,clientAuth',
      `subjectAltName=${sans.join(',')}`,
    ].join('\n') + '\n');
    openssl(['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', key]);
    openssl(['req', '-new', '-key', key, '-subj', `/O=ferry/CN=${name}`, '-out', csr]);
    const args = ['x509', '-req', '-in', csr, '-CA', caCert, '-CAkey', caKey, '-CAcreateserial', '-sha256', '-extfile', ext, '-out', path.join(tmp, 'cert.pem')];
    args.push('-days', String(o.days ?? 825));
    openssl(args, o.caDir);
    const certPem = fs.readFileSync(path.join(tmp, 'cert.pem'));
    const keyPem = fs.readFileSync(key);
    fs.copyFileSync(caCert, path.join(o.outDir, 'ca-cert.pem'));
    for (const role of ['server', 'client']) {
      fs.writeFileSync(path.join(o.outDir, `${role}-cert.pem`), certPem);
      fs.writeFileSync(path.join(o.outDir, `${role}-key.pem`), keyPem, { mode: 0o600 });
    }
    fs.writeFileSync(path.join(o.outDir, 'dh-params.pem'), FFDHE2048_PEM, { mode: 0o644 });
    return { dir: o.outDir };
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

export interface TlsFiles { ca: Buffer; cert: Buffer; key: Buffer }

export function loadTls(dir: string): TlsFiles {
  const f = (n: string): Buffer => {
    const p = path.join(dir, n);
    if (!fs.existsSync(p)) throw new FerryError('TLS_MISSING', `TLS file ${p} is missing (issue one with \`ferry host cert NAME --out ${dir}\`)`);
    return fs.readFileSync(p);
  };
  return { ca: f('ca-cert.pem'), cert: f('server-cert.pem'), key: f('server-key.pem') };
}

export function tlsPresent(dir: string): boolean {
  return ['ca-cert.pem', 'server-cert.pem', 'server-key.pem'].every((n) => fs.existsSync(path.join(dir, n)));
}
