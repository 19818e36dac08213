/**
 * scripts/install.sh, staged under a directory (--destdir: no packages, no systemctl):
 * the config it writes loads in ferryd, the certificate comes from the given CA, and
 * the systemd unit keeps domains alive across ferryd restarts and passes systemd's check.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { loadDaemonConfig } from '../../src/daemon/config.ts';
import { caInit } from '../../src/tls/ca.ts';

const ROOT = path.resolve(import.meta.dirname, '..', '..');

test('install.sh lays down config, certificate and unit; a second run keeps them', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-install-'));
  try {
    const ca = path.join(dir, 'ca');
    caInit(ca, { name: 'test CA' });
    const dest = path.join(dir, 'root');
    const run = () =>
      spawnSync(
        'bash',
        [
          path.join(ROOT, 'scripts', 'install.sh'),
          '--destdir',
          dest,
          '--name',
          'h1',
          '--address',
          '198.19.0.50',
          '--peer',
          'h2=198.19.0.51',
          '--network',
          'lab=br0,198.18.0.0/24,198.18.0.50',
          '--metrics',
          '127.0.0.1:9477',
          '--ca',
          ca,
          '--no-start',
        ],
        { encoding: 'utf8' },
      );
    const r = run();
    assert.equal(r.status, 0, r.stderr + r.stdout);
    const cfg = loadDaemonConfig(path.join(dest, 'etc', 'ferry', 'ferryd.json'), {}, ROOT);
    assert.equal(cfg.name, 'h1');
    assert.equal(cfg.relocation.address, '198.19.0.50');
    assert.deepEqual(cfg.relocation.hostsAllow, ['h2@198.19.0.51']);
    assert.deepEqual(cfg.peers, { h2: '198.19.0.51:8002' });
    assert.deepEqual(cfg.metrics, { address: '127.0.0.1', port: 9477 });
    assert.equal(cfg.storage.localDir, '/var/lib/ferry/disks');
    assert.ok(cfg.storage.pools.includes('/var/lib/ferry/disks'), 'the local directory is a pool');
    const tls = path.join(dest, 'etc', 'ferry', 'tls');
    const v = spawnSync('openssl', ['verify', '-CAfile', path.join(ca, 'ca-cert.pem'), path.join(tls, 'server-cert.pem')], {
      encoding: 'utf8',
    });
    assert.equal(v.status, 0, v.stderr);
    assert.match(
      spawnSync('openssl', ['x509', '-noout', '-subject', '-in', path.join(tls, 'server-cert.pem')], { encoding: 'utf8' }).stdout,
      /CN ?= ?h1/,
    );
    // Key and directory modes: private keys 0600 root, the CA's key stays with the CA.
    const mode = (p: string): number => fs.statSync(p).mode & 0o777;
    assert.equal(mode(path.join(ca, 'ca-key.pem')), 0o600);
    assert.equal(mode(ca) & 0o077, 0, "the CA directory is its owner's alone");
    for (const f of fs.readdirSync(tls)) {
      const st = fs.statSync(path.join(tls, f));
      assert.equal(st.uid, 0, `${f} is root's`);
      if (f.endsWith('-key.pem')) assert.equal(st.mode & 0o777, 0o600, `${f} is 0600`);
    }
    assert.ok(!fs.readdirSync(tls).includes('ca-key.pem'), 'no CA key on the host');
    assert.equal(mode(tls) & 0o077, 0, "the host's TLS directory is root's alone");
    const unit = fs.readFileSync(path.join(dest, 'etc', 'systemd', 'system', 'ferryd.service'), 'utf8');
    assert.match(unit, /^KillMode=process$/m, 'QEMUs are never killed with ferryd');
    assert.match(unit, /^Restart=on-failure$/m);
    assert.match(
      unit,
      new RegExp(
        `^ExecStart=${process.execPath.replace(/[/.]/g, '\\$&')} /opt/ferry/bin/ferryd\\.mjs --config /etc/ferry/ferryd\\.json$`,
        'm',
      ),
    );
    const check = spawnSync('systemd-analyze', ['verify', path.join(dest, 'etc', 'systemd', 'system', 'ferryd.service')], {
      encoding: 'utf8',
    });
    if (check.error === undefined) assert.doesNotMatch(check.stderr, /ferryd\.service/, check.stderr);
    // Idempotent: what is there is kept.
    fs.appendFileSync(path.join(dest, 'etc', 'ferry', 'ferryd.json'), '\n');
    const before = fs.readFileSync(path.join(dest, 'etc', 'ferry', 'ferryd.json'), 'utf8');
    const again = run();
    assert.equal(again.status, 0, again.stderr);
    assert.match(again.stdout, /kept .*ferryd\.json/);
    assert.match(again.stdout, /kept the certificate/);
    assert.equal(fs.readFileSync(path.join(dest, 'etc', 'ferry', 'ferryd.json'), 'utf8'), before);
    // Bad input changes nothing.
    const bad = spawnSync('bash', [path.join(ROOT, 'scripts', 'install.sh'), '--destdir', path.join(dir, 'other'), '--name', 'h1'], {
      encoding: 'utf8',
    });
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /--address/);
    assert.equal(fs.existsSync(path.join(dir, 'other')), false);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
