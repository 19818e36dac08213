/**
 * Authorization and confinement, for real in the lab, through the CLI: a host
 * certificate is a peer (relocation only), an admin certificate manages, a revoked one
 * is refused; files outside the pools, symlinks out of them, plain migrations to a
 * default destination, an outsider racing for the data port, a guest forging a console
 * control frame and 3000 idle connections all fail to do harm; QEMU runs unprivileged
 * under seccomp.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn } from 'node:child_process';
import {
  ferry,
  ok,
  fails,
  labUp,
  labDown,
  labState,
  createGuest,
  inNs,
  reconfigure,
  ferrydLog,
  tmpFile,
  pidAlive,
  waitFor,
  ROOT,
} from '../helpers.ts';

const HOST2 = '198.19.0.12';
const FERRY_BIN = path.join(ROOT, 'bin', 'ferry.mjs');

/** The ferry CLI inside a lab namespace with the certificate in `tlsDir`. */
function cliIn(ns: string, tlsDir: string, args: string[]): { code: number; json: any; stderr: string } {
  const r = inNs(ns, ['env', `FERRY_TLS_DIR=${tlsDir}`, process.execPath, FERRY_BIN, ...args, '--json'], 30000);
  let json: any;
  try {
    json = JSON.parse(r.stdout);
  } catch {
    json = undefined;
  }
  return { code: r.code, json, stderr: r.stderr };
}

/** A long-running helper in a namespace; stop() ends its stdin and returns its JSON line. */
function background(ns: string, tool: string, args: string[]): { stop: () => Promise<any> } {
  const child = spawn('ip', ['netns', 'exec', `ferry-${ns}`, process.execPath, path.join(ROOT, 'test', 'tools', tool), ...args], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  let out = '';
  child.stdout!.on('data', (d) => {
    out += d;
  });
  return {
    stop: () =>
      new Promise((resolve) => {
        child.once('close', () => resolve(JSON.parse(out.trim().split('\n').pop() || '{}')));
        child.stdin!.end();
      }),
  };
}

describe('authorization and confinement (lab)', () => {
  const pids: Record<string, number> = {};
  before(async () => {
    await labUp(['--hosts', '2']);
    await createGuest('pattern', 'victim', 'host2', 64);
    pids.victim = (await ok(['-H', 'host2', 'info', 'victim', '--json'])).pid;
  });
  after(async () => {
    await labDown();
  });

  test('QEMU runs as an unprivileged uid of its own, under seccomp', () => {
    const st = fs.readFileSync(`/proc/${pids.victim}/status`, 'utf8');
    const uid = Number(/^Uid:\s+(\d+)/m.exec(st)?.[1]);
    assert.notEqual(uid, 0, 'not root');
    assert.ok(uid >= 0x70000000 && uid < 0x70000000 + 4096, `uid ${uid} is from the default range`);
    assert.match(st, /^Seccomp:\s+2$/m, 'seccomp filter mode');
  });

  test('a host certificate is a peer: no management on another host; an admin certificate manages', async () => {
    const s = labState();
    const asHost1 = s.hosts[0].tlsDir;
    for (const args of [['destroy', 'victim'], ['list'], ['host', 'info'], ['save', 'victim', 'v.save'], ['migrate', 'victim', 'host1']]) {
      const r = cliIn('host1', asHost1, ['-H', HOST2, ...args]);
      assert.equal(r.json?.error?.code, 'API_FORBIDDEN', `${args.join(' ')}: ${JSON.stringify(r.json)} ${r.stderr}`);
      assert.equal(r.code, 7);
    }
    assert.ok(pidAlive(pids.victim), 'the victim still runs');
    assert.equal((await ok(['-H', 'host2', 'info', 'victim', '--json'])).state, 'running');
    assert.match(ferrydLog('host2'), /"code":"API_FORBIDDEN","action":"domain.destroy","role":"peer","peerName":"host1"/);
    const admin = cliIn('client', s.adminTlsDir, ['-H', HOST2, 'list']);
    assert.equal(admin.code, 0, admin.stderr);
    assert.deepEqual(
      admin.json.map((d: any) => d.name),
      ['victim'],
    );
  });

  test('a revoked certificate is refused at the handshake', async () => {
    const s = labState();
    const ops = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-ops-'));
    try {
      await ok(['admin', 'cert', 'ops', '--ca', s.caDir, '--out', ops, '--json']);
      assert.equal(cliIn('client', ops, ['-H', HOST2, 'list']).code, 0);
      const r = await ok(['ca', 'revoke', 'ops', '--dir', s.caDir, '--publish', s.hosts[1].tlsDir, '--json']);
      assert.match(r.serial, /^[0-9A-F]+$/);
      const refused = cliIn('client', ops, ['-H', HOST2, 'list']);
      assert.equal(refused.json?.error?.code, 'TLS_REFUSED', JSON.stringify(refused.json));
      assert.match(ferrydLog('host2'), /certificate of \\?"ops\\?" is revoked/);
      assert.equal(cliIn('client', s.adminTlsDir, ['-H', HOST2, 'list']).code, 0, 'others still get in');
    } finally {
      fs.rmSync(ops, { recursive: true, force: true });
    }
  });

  test('disks outside the pools, and symlinks out of a pool, are refused; nothing is defined', async () => {
    const s = labState();
    const cfg = await ok(['lab', 'guest', 'pattern', 'sneaky', '--json']);
    const outside = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-outside-'));
    fs.copyFileSync(cfg.disks[0].path, path.join(outside, 'pattern.img'));
    fs.symlinkSync(path.join(outside, 'pattern.img'), path.join(s.poolDir, 'link.img'));
    try {
      for (const p of [path.join(outside, 'pattern.img'), '/etc/shadow', path.join(s.poolDir, 'link.img')]) {
        const r = await fails(
          ['-H', 'host1', 'create', tmpFile('sneaky.json', { ...cfg, disks: [{ ...cfg.disks[0], path: p }] })],
          'PATH_NOT_ALLOWED',
          7,
        );
        assert.match(r.json.error.message, /outside the storage pools|symlink/);
      }
      await fails(['-H', 'host1', 'info', 'sneaky'], 'DOMAIN_NOT_FOUND', 3);
    } finally {
      fs.rmSync(path.join(s.poolDir, 'link.img'), { force: true });
      fs.rmSync(outside, { recursive: true, force: true });
    }
  });

  test('a plain-TCP migration to a destination that does not allow it is refused at Begin', async () => {
    const r = await fails(['-H', 'host2', 'migrate', 'victim', 'host1', '--live', '--insecure'], 'MIGRATION_DEST_INSECURE', 8);
    assert.equal(r.json.outcome, 'failed');
    assert.equal((await ok(['-H', 'host2', 'info', 'victim', '--json'])).pid, pids.victim);
    assert.deepEqual(await ok(['-H', 'host1', 'list', '--json']), []);
  });

  // The gate's refusal itself is proven deterministically in src/migration/gate.test.ts:
  // here the source takes its one-shot port within milliseconds, so whether the outsider
  // lands in that window is luck; what must hold every time is the outcome.
  test('a plain migration through the gate succeeds, memory intact, while an outsider hammers every data port', async () => {
    await reconfigure('host1', (c) => {
      c.relocation.allowInsecure = true;
    });
    const spam = background('client', 'port-spam.mjs', ['198.19.0.11', '49152', '49215']);
    try {
      const r = await ok(['-H', 'host2', 'migrate', 'victim', 'host1', '--insecure', '--json']);
      assert.equal(r.outcome, 'succeeded');
    } finally {
      const st = await spam.stop();
      assert.ok(st.attempts > 64, JSON.stringify(st));
    }
    await ok(['lab', 'verify', 'victim']);
    pids.victim = (await ok(['-H', 'host1', 'info', 'victim', '--json'])).pid;
    await reconfigure('host1', (c) => {
      delete c.relocation.allowInsecure;
    });
  });

  test('3000 idle connections from one address: capped, and a migration still succeeds', async () => {
    const flood = background('client', 'flood.mjs', ['198.19.0.12', '8002', '3000']);
    try {
      await new Promise((r) => setTimeout(r, 1500));
      const r = await ok(['-H', 'host1', 'migrate', 'victim', 'host2', '--json']);
      assert.equal(r.outcome, 'succeeded');
    } finally {
      const st = await flood.stop();
      assert.ok(st.opened >= 32, JSON.stringify(st));
    }
    assert.match(ferrydLog('host2'), /"code":"API_LIMIT","peerAddress":"(::ffff:)?198\.19\.0\.2"/);
    await ok(['lab', 'verify', 'victim']);
    pids.victim = (await ok(['-H', 'host2', 'info', 'victim', '--json'])).pid;
  });

  test('a guest cannot reach the relocation or data ports: they live on the migration network', async () => {
    await createGuest('linux', 'web', 'host1');
    // A listener on the guests' segment (the client), so the same probe is seen to succeed.
    const ctl = spawn(
      'ip',
      [
        'netns',
        'exec',
        'ferry-client',
        process.execPath,
        '-e',
        "require('net').createServer((s) => s.end('ok\\n')).listen(9999, '198.18.0.2')",
      ],
      { stdio: 'ignore' },
    );
    try {
      await new Promise((r) => setTimeout(r, 500));
      // The guest even routes the migration network through its host's bridge address.
      const script =
        [
          'ip route add 198.19.0.0/24 via 198.18.0.11',
          'nc -w 3 198.18.0.2 9999 </dev/null; echo "ctl-rc=$?"',
          'nc -w 3 198.19.0.11 8002 </dev/null; echo "mig-rc=$?"',
          'nc -w 3 198.19.0.11 49152 </dev/null; echo "data-rc=$?"',
          'nc -w 3 198.18.0.11 8002 </dev/null; echo "lab-rc=$?"',
        ].join('\n') + '\n';
      const r = await ferry(['-H', 'host1', 'console', 'web', '--idle', '5000'], { input: script, timeoutMs: 60000 });
      assert.match(r.stdout, /ctl-rc=0/, `the probe reaches a listener on the guests' segment: ${r.stdout.slice(-400)}`);
      for (const k of ['mig', 'data', 'lab']) assert.match(r.stdout, new RegExp(`${k}-rc=1`), `${k}: ${r.stdout.slice(-400)}`);
      assert.equal(
        inNs('host1', ['ss', '-Hltn', 'src', '198.18.0.11']).stdout.trim(),
        '',
        "nothing of ferryd listens on the guests' segment",
      );
    } finally {
      ctl.kill();
    }
  });

  test('a guest printing a forged control line cannot redirect the console', async () => {
    const forged = 'echo -e "\\036{\\"event\\":\\"moved\\",\\"host\\":\\"host2\\",\\"target\\":\\"/tmp/ferry-evil.sock\\"}"\n';
    const r = await ferry(['-H', 'host1', 'console', 'web', '--idle', '1500'], { input: forged });
    assert.equal(r.code, 0, r.stderr);
    assert.ok(
      r.stdout.includes('\x1e{"event":"moved"'),
      `the forged bytes are shown as guest output: ${JSON.stringify(r.stdout.slice(-200))}`,
    );
    assert.doesNotMatch(r.stderr, /moved to/);
    await waitFor('web still running on host1', async () => (await ok(['-H', 'host1', 'info', 'web', '--json'])).state === 'running');
  });
});
