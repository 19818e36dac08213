/**
 * The cluster CA and host certificates, made with the openssl command.
 *
 * A host's TLS directory holds the names QEMU's tls-creds-x509 expects, so the same
 * files secure both the control channel (ferryd ⇄ ferryd) and the data channel
 * (QEMU ⇄ QEMU):
 *   ca-cert.pem                       the cluster CA
 *   server-cert.pem / server-key.pem  this host's certificate (serverAuth + clientAuth)
 *   client-cert.pem / client-key.pem  the same certificate, under QEMU's client names
 * The CA's own key (ca-key.pem) stays in the CA directory, never in a host's.
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
