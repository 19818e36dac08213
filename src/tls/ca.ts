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
 *   ca-crl.pem                        revoked certificates (optional; `ferry ca revoke`)
 * The CA's own key (ca-key.pem) stays in the CA directory, never in a host's.
 *
 * A certificate says what it is in its subject's OU: `host` (a peer: relocation only)
 * or `admin` (management from afar). An admin certificate has clientAuth only, so it
 * can never serve as a host. Certificates without an OU (ferry < 0.3) count as hosts.
 * The CA keeps a copy of everything it issued (issued/NAME.pem) so that `ca revoke`
 * can find a certificate's serial by name.
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
  openssl([
    'req',
    '-x509',
    '-new',
    '-key',
    key,
    '-sha256',
    '-days',
    String(opts.days ?? 3650),
    '-subj',
    `/O=ferry/CN=${opts.name ?? 'ferry cluster CA'}`,
    '-addext',
    'basicConstraints=critical,CA:TRUE',
    '-addext',
    'keyUsage=critical,keyCertSign,cRLSign',
    '-out',
    cert,
  ]);
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

export type CertRole = 'host' | 'admin';
export const CERT_ROLES: readonly CertRole[] = ['host', 'admin'];

/** The role a peer certificate's subject claims (OU); hosts by default. */
export function certRole(subject: Record<string, unknown> | undefined | null): CertRole | undefined {
  const ou = subject?.OU;
  const v = Array.isArray(ou) ? ou : ou === undefined ? [] : [ou];
  if (v.length === 0) return 'host';
  if (v.length === 1 && CERT_ROLES.includes(v[0] as CertRole)) return v[0] as CertRole;
  return undefined;
}

export interface IssueOpts {
  caDir: string;
  /** host (default) or admin. */
  role?: CertRole;
  outDir: string;
  ips?: string[];
  dnsNames?: string[];
  days?: number;
}

/** Issues NAME a certificate signed by the CA in caDir and writes a TLS directory. */
export function issueHostCert(name: string, o: IssueOpts): { dir: string; role: CertRole } {
  const role = o.role ?? 'host';
  if (!NAME_RE.test(name)) throw new FerryError('CLI_USAGE', `Bad certificate name "${name}"`);
  const caCert = path.join(o.caDir, 'ca-cert.pem');
  const caKey = path.join(o.caDir, 'ca-key.pem');
  if (!fs.existsSync(caCert) || !fs.existsSync(caKey))
    throw new FerryError('TLS_MISSING', `No CA in ${o.caDir}: run \`ferry ca init --dir ${o.caDir}\` first`);
  fs.mkdirSync(o.outDir, { recursive: true, mode: 0o700 });
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-cert-'));
  try {
    const key = path.join(tmp, 'key.pem');
    const csr = path.join(tmp, 'req.csr');
    const ext = path.join(tmp, 'ext.cnf');
    const sans = [`DNS:${name}`, ...(o.dnsNames ?? []).map((d) => `DNS:${d}`), ...(o.ips ?? []).map((i) => `IP:${i}`)];
    fs.writeFileSync(
      ext,
      [
        'basicConstraints=critical,CA:FALSE',
        'keyUsage=critical,digitalSignature,keyEncipherment,keyAgreement',
        role === 'admin' ? 'extendedKeyUsage=clientAuth' : 'extendedKeyUsage=serverAuth,clientAuth',
        `subjectAltName=${sans.join(',')}`,
      ].join('\n') + '\n',
    );
    openssl(['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', key]);
    openssl(['req', '-new', '-key', key, '-subj', `/O=ferry/OU=${role}/CN=${name}`, '-out', csr]);
    const args = [
      'x509',
      '-req',
      '-in',
      csr,
      '-CA',
      caCert,
      '-CAkey',
      caKey,
      '-CAcreateserial',
      '-sha256',
      '-extfile',
      ext,
      '-out',
      path.join(tmp, 'cert.pem'),
    ];
    args.push('-days', String(o.days ?? 825));
    openssl(args, o.caDir);
    const certPem = fs.readFileSync(path.join(tmp, 'cert.pem'));
    const keyPem = fs.readFileSync(key);
    fs.mkdirSync(path.join(o.caDir, 'issued'), { recursive: true, mode: 0o700 });
    fs.writeFileSync(path.join(o.caDir, 'issued', `${name}.pem`), certPem);
    fs.copyFileSync(caCert, path.join(o.outDir, 'ca-cert.pem'));
    // An admin's directory has client files only: it cannot be a ferryd's TLS directory.
    for (const use of role === 'admin' ? ['client'] : ['server', 'client']) {
      fs.writeFileSync(path.join(o.outDir, `${use}-cert.pem`), certPem);
      fs.writeFileSync(path.join(o.outDir, `${use}-key.pem`), keyPem, { mode: 0o600 });
    }
    fs.writeFileSync(path.join(o.outDir, 'dh-params.pem'), FFDHE2048_PEM, { mode: 0o644 });
    const crl = path.join(o.caDir, 'ca-crl.pem');
    if (fs.existsSync(crl)) fs.copyFileSync(crl, path.join(o.outDir, 'ca-crl.pem'));
    return { dir: o.outDir, role };
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

/**
 * Revokes the certificate the CA issued to NAME and writes CA/ca-crl.pem (a CRL valid
 * for `days`), plus a copy into every `publish` directory (host TLS directories:
 * ferryd picks it up at the next connection, QEMU at the next migration).
 * openssl's `ca` keeps the revocation list in index.txt.
 */
export function revokeCert(
  name: string,
  o: { caDir: string; days?: number; publish?: string[] },
): { name: string; serial: string; crl: string; revoked: string[] } {
  if (!NAME_RE.test(name)) throw new FerryError('CLI_USAGE', `Bad certificate name "${name}"`);
  const caCert = path.join(o.caDir, 'ca-cert.pem');
  const caKey = path.join(o.caDir, 'ca-key.pem');
  if (!fs.existsSync(caCert) || !fs.existsSync(caKey)) throw new FerryError('TLS_MISSING', `No CA in ${o.caDir}`);
  const issued = path.join(o.caDir, 'issued', `${name}.pem`);
  if (!fs.existsSync(issued))
    throw new FerryError('TLS_MISSING', `The CA in ${o.caDir} has no record of a certificate for "${name}" (issued/${name}.pem)`);
  const serial = openssl(['x509', '-in', issued, '-noout', '-serial'])
    .trim()
    .replace(/^serial=/, '')
    .toUpperCase();
  const end = new Date(
    openssl(['x509', '-in', issued, '-noout', '-enddate'])
      .trim()
      .replace(/^notAfter=/, ''),
  );
  const subject = openssl(['x509', '-in', issued, '-noout', '-subject', '-nameopt', 'compat'])
    .trim()
    .replace(/^subject=\s*/, '');
  const utc = (d: Date): string => d.toISOString().replace(/[-:T]/g, '').slice(2, 14) + 'Z';
  const index = path.join(o.caDir, 'index.txt');
  const lines = fs.existsSync(index) ? fs.readFileSync(index, 'utf8').split('\n').filter(Boolean) : [];
  if (!lines.some((l) => l.split('\t')[3] === serial)) lines.push(['R', utc(end), utc(new Date()), serial, 'unknown', subject].join('\t'));
  fs.writeFileSync(index, lines.join('\n') + '\n');
  const cnf = path.join(o.caDir, 'crl.cnf');
  fs.writeFileSync(
    cnf,
    [
      '[ca]',
      'default_ca = ferry',
      '[ferry]',
      `database = ${index}`,
      `certificate = ${caCert}`,
      `private_key = ${caKey}`,
      `crlnumber = ${path.join(o.caDir, 'crlnumber')}`,
      'default_md = sha256',
      `default_crl_days = ${o.days ?? 30}`,
      '',
    ].join('\n'),
  );
  if (!fs.existsSync(path.join(o.caDir, 'crlnumber'))) fs.writeFileSync(path.join(o.caDir, 'crlnumber'), '01\n');
  const crl = path.join(o.caDir, 'ca-crl.pem');
  openssl(['ca', '-gencrl', '-config', cnf, '-out', crl]);
  for (const d of o.publish ?? []) fs.copyFileSync(crl, path.join(d, 'ca-crl.pem'));
  return { name, serial, crl, revoked: lines.map((l) => l.split('\t')[5] ?? '') };
}

export interface TlsFiles {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
  crl?: Buffer;
}

export function loadTls(dir: string): TlsFiles {
  const f = (n: string): Buffer => {
    const p = path.join(dir, n);
    if (!fs.existsSync(p))
      throw new FerryError('TLS_MISSING', `TLS file ${p} is missing (issue one with \`ferry host cert NAME --out ${dir}\`)`);
    return fs.readFileSync(p);
  };
  const crl = path.join(dir, 'ca-crl.pem');
  return {
    ca: f('ca-cert.pem'),
    cert: f('server-cert.pem'),
    key: f('server-key.pem'),
    ...(fs.existsSync(crl) ? { crl: fs.readFileSync(crl) } : {}),
  };
}

export function tlsPresent(dir: string): boolean {
  return ['ca-cert.pem', 'server-cert.pem', 'server-key.pem'].every((n) => fs.existsSync(path.join(dir, n)));
}
