/**
 * The CA and host certificates with real TLS on loopback: a host certificate is
 * accepted by a server that trusts the cluster CA, and an expired one, one from
 * another CA, or none at all is not.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { caInit, issueHostCert, loadTls, FFDHE2048_PEM, ensureDhParams } from './ca.ts';
import { FerryError } from '../errors.ts';

async function handshake(
  serverDir: string,
  clientDir: string | null,
): Promise<{ authorized: boolean; error: string | null; cn: string | null }> {
  const s = loadTls(serverDir);
  return new Promise((resolve) => {
    const server = tls.createServer({ ca: s.ca, cert: s.cert, key: s.key, requestCert: true, rejectUnauthorized: false }, (sock) => {
      const cert = sock.getPeerCertificate();
      resolve({
        authorized: sock.authorized,
        error: sock.authorizationError ? String(sock.authorizationError) : null,
        cn: cert?.subject ? String(cert.subject.CN) : null,
      });
      sock.end();
      server.close();
    });
    server.listen(0, '127.0.0.1', () => {
      const port = (server.address() as import('node:net').AddressInfo).port;
      const c = clientDir ? loadTls(clientDir) : undefined;
      const sock = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false, ...(c ? { cert: c.cert, key: c.key } : {}) });
      sock.on('error', () => undefined);
      sock.on('data', () => undefined);
    });
  });
}

test('host certificates: accepted from the cluster CA; refused when expired, foreign or missing', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-ca-'));
  try {
    caInit(path.join(dir, 'ca'));
    assert.throws(
      () => caInit(path.join(dir, 'ca')),
      (e: unknown) => e instanceof FerryError && e.code === 'CLI_USAGE',
    );
    issueHostCert('host1', { caDir: path.join(dir, 'ca'), outDir: path.join(dir, 'host1'), ips: ['198.18.0.11'] });
    issueHostCert('host2', { caDir: path.join(dir, 'ca'), outDir: path.join(dir, 'host2') });
    issueHostCert('stale', { caDir: path.join(dir, 'ca'), outDir: path.join(dir, 'stale'), days: 0 });
    caInit(path.join(dir, 'evil'));
    issueHostCert('host1', { caDir: path.join(dir, 'evil'), outDir: path.join(dir, 'forged') });
    for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem', 'client-cert.pem', 'client-key.pem'])
      assert.ok(fs.existsSync(path.join(dir, 'host1', f)), f);
    assert.ok(!fs.existsSync(path.join(dir, 'host1', 'ca-key.pem')), 'the CA key stays in the CA directory');
    assert.equal(fs.statSync(path.join(dir, 'host1', 'server-key.pem')).mode & 0o077, 0, 'keys are private');

    const good = await handshake(path.join(dir, 'host2'), path.join(dir, 'host1'));
    assert.deepEqual(good, { authorized: true, error: null, cn: 'host1' });
    await new Promise((r) => setTimeout(r, 1100)); // let a 0-day certificate's notAfter pass
    const stale = await handshake(path.join(dir, 'host2'), path.join(dir, 'stale'));
    assert.equal(stale.authorized, false);
    assert.equal(stale.error, 'CERT_HAS_EXPIRED');
    const forged = await handshake(path.join(dir, 'host2'), path.join(dir, 'forged'));
    assert.equal(forged.authorized, false);
    assert.equal(forged.cn, 'host1');
    const none = await handshake(path.join(dir, 'host2'), null);
    assert.equal(none.authorized, false);
    assert.throws(
      () => loadTls(path.join(dir, 'nowhere')),
      (e: unknown) => e instanceof FerryError && e.code === 'TLS_MISSING',
    );
    assert.throws(
      () => issueHostCert('x', { caDir: path.join(dir, 'nowhere'), outDir: path.join(dir, 'x') }),
      (e: unknown) => e instanceof FerryError && e.code === 'TLS_MISSING',
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('dh-params.pem is RFC 7919 ffdhe2048 (the formula from the RFC), written with every host certificate', () => {
  const der = Buffer.from(FFDHE2048_PEM.replace(/-----[A-Z ]+-----/g, '').replace(/\s+/g, ''), 'base64');
  // SEQUENCE { INTEGER p (257 bytes with a leading 0), INTEGER g }
  const i = der.indexOf(Buffer.from([0x02, 0x82, 0x01, 0x01]));
  assert.ok(i > 0);
  const p = BigInt('0x' + der.subarray(i + 4, i + 4 + 257).toString('hex'));
  assert.deepEqual([...der.subarray(i + 4 + 257)], [0x02, 0x01, 0x02], 'g = 2');
  // p = 2^2048 - 2^1984 + (floor(2^1918 * e) + 560316) * 2^64 - 1, e from its series in fixed point
  const SCALE = 2n ** 2100n;
  let e = 0n;
  let term = SCALE;
  for (let k = 1n; term > 0n; k++) {
    e += term;
    term /= k;
  }
  const p2 = 2n ** 2048n - 2n ** 1984n + ((2n ** 1918n * e) / SCALE + 560316n) * 2n ** 64n - 1n;
  assert.equal(p, p2);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-dh-'));
  try {
    caInit(path.join(dir, 'ca'));
    issueHostCert('h1', { caDir: path.join(dir, 'ca'), outDir: path.join(dir, 'h1') });
    assert.equal(fs.readFileSync(path.join(dir, 'h1', 'dh-params.pem'), 'utf8'), FFDHE2048_PEM);
    fs.rmSync(path.join(dir, 'h1', 'dh-params.pem'));
    assert.equal(ensureDhParams(path.join(dir, 'h1')), true);
    assert.equal(ensureDhParams(path.join(dir, 'h1')), false);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
