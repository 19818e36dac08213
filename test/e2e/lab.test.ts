/**
 * `ferry lab up` builds real hosts; `ferry lab down` leaves nothing behind: no
 * namespaces, no bridges, no processes, no files. Down is idempotent and also works
 * after a crash that lost the lab's state file. A shaped migration link has the rate
 * asked (a real TCP transfer between two hosts, both ways).
 */
import { describe, test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { execFileSync, spawn } from 'node:child_process';
import path from 'node:path';
import { ok, fails, ferry, labDown, createGuest, inNs, labState, pidAlive, waitFor, ROOT } from '../helpers.ts';

const TCP_RATE = path.join(ROOT, 'test', 'tools', 'tcp-rate.mjs');

function namespaces(): string[] {
  return execFileSync('ip', ['netns', 'list'])
    .toString()
    .split('\n')
    .map((l) => l.split(' ')[0])
    .filter((n) => n.startsWith('ferry-'));
}

function qemuPidsIn(nss: string[]): number[] {
  return nss.flatMap((ns) =>
    execFileSync('ip', ['netns', 'pids', ns])
      .toString()
      .split('\n')
      .map(Number)
      .filter((n) => n > 0),
  );
}

describe('ferry lab', () => {
  after(async () => {
    await labDown();
  });

  test('up builds hosts, a client and a second segment; status and exec see them', async () => {
    await ferry(['lab', 'down']);
    const s = await ok(['lab', 'up', '--hosts', '3', '--segments', '2', '--host-memory', '512', '--json']);
    assert.deepEqual(namespaces().sort(), ['ferry-client', 'ferry-host1', 'ferry-host2', 'ferry-host3', 'ferry-switch']);
    assert.deepEqual(
      s.hosts.map((h: any) => h.address),
      ['198.18.0.11', '198.18.0.12', '198.18.0.13'],
    );
    assert.deepEqual(
      s.hosts.map((h: any) => h.migAddress),
      ['198.19.0.11', '198.19.0.12', '198.19.0.13'],
      'the migration network',
    );
    for (const h of s.hosts) assert.ok(pidAlive(h.pid));
    // host3's "lab" network sits on the second segment and subnet
    const i3 = await ok(['-H', 'host3', 'host', 'info', '--json']);
    assert.equal(i3.networks.lab.subnet, '198.18.1.0/24');
    assert.equal(i3.memory.offeredMiB, 512);
    const i1 = await ok(['-H', 'host1', 'host', 'info', '--json']);
    assert.equal(i1.networks.lab.subnet, '198.18.0.0/24');
    assert.ok(['tcg', 'kvm'].includes(i1.accel));
    assert.ok(i1.accelReason.length > 0);
    // the client reaches every host over the switch
    for (const h of s.hosts) {
      assert.equal(inNs('client', ['ip', 'neigh', 'flush', 'all']).code, 0);
      assert.equal(inNs('client', ['busybox', 'ping', '-c', '1', '-W', '2', h.address]).code, 0, `ping ${h.address}`);
    }
    const ex = await ferry(['lab', 'exec', 'host2', '--', 'ip', '-br', 'addr', 'show', 'br0']);
    assert.match(ex.stdout, /198\.18\.0\.12\/24/);
    // a remote API call over mutually authenticated TLS, from the client with the lab's
    // admin certificate; from inside host1 with host1's own (a peer's) it is forbidden
    const tlsList = await ferry([
      'lab',
      'exec',
      'client',
      '--',
      process.execPath,
      'bin/ferry.mjs',
      '-H',
      '198.19.0.12',
      'host',
      'info',
      '--json',
    ]);
    assert.equal(tlsList.code, 0, tlsList.stderr);
    assert.equal(JSON.parse(tlsList.stdout).name, 'host2');
    const asPeer = await ferry([
      'lab',
      'exec',
      'host1',
      '--',
      process.execPath,
      'bin/ferry.mjs',
      '-H',
      '198.19.0.12',
      'host',
      'info',
      '--json',
    ]);
    assert.equal(asPeer.code, 7);
    assert.equal(JSON.parse(asPeer.stdout).error.code, 'API_FORBIDDEN');
    await createGuest('pattern', 'p1', 'host2');
    const st = await ok(['lab', 'status', '--json']);
    assert.deepEqual(
      st.guests.map((g: any) => [g.name, g.host, g.state]),
      [['p1', 'host2', 'running']],
    );
    assert.equal(st.hosts.length, 3);
  });

  test('down removes namespaces, processes and files, and is idempotent', async () => {
    const nss = namespaces();
    const pids = qemuPidsIn(nss);
    assert.ok(pids.length >= 4, 'ferryds and a QEMU were running');
    const r = await ok(['lab', 'down', '--json']);
    assert.equal(r.namespaces.length, 5);
    assert.deepEqual(namespaces(), []);
    for (const p of pids) assert.equal(pidAlive(p), false, `pid ${p} ended`);
    assert.equal(fs.existsSync('/var/lib/ferry-lab'), false);
    const again = await ok(['lab', 'down', '--json']);
    assert.deepEqual(again.namespaces, []);
  });

  test("--link-rate shapes every host's migration link: the rate asked, both ways", async () => {
    await fails(['lab', 'up', '--hosts', '2', '--link-rate', 'fast'], 'CLI_USAGE', 2);
    await fails(['lab', 'up', '--hosts', '2', '--link-rate', '200gbit'], 'CLI_USAGE', 2);
    assert.deepEqual(namespaces(), [], 'a refused lab up builds nothing');
    const s = await ok(['lab', 'up', '--hosts', '2', '--link-rate', '200mbit', '--json']);
    assert.deepEqual(s.link, { rateBitsPerS: 200e6 });
    const [h1, h2] = labState().hosts;
    /** 24 MiB from one host to the other over their migration addresses, in Mbit/s. */
    const measure = async (from: any, to: any): Promise<{ mbps: number }> => {
      const srv = spawn('ip', ['netns', 'exec', to.namespace, process.execPath, TCP_RATE, 'serve', to.migAddress, '5201']);
      try {
        let out = '';
        srv.stdout.on('data', (d) => (out += d));
        await waitFor('the meter listening', () => out.includes('ready'), 5000, 20);
        const sent = inNs(from.name, [process.execPath, TCP_RATE, 'send', to.migAddress, '5201', '24'], 30000);
        assert.equal(sent.code, 0, sent.stderr);
        await waitFor('the meter done', () => out.trim().split('\n').length >= 2, 10000, 20);
        const r = JSON.parse(out.trim().split('\n')[1]);
        return { mbps: (r.bytes * 8) / (r.ms / 1000) / 1e6 };
      } finally {
        srv.kill();
      }
    };
    for (const [a, b] of [
      [h1, h2],
      [h2, h1],
    ]) {
      const m = await measure(a, b);
      assert.ok(m.mbps > 160 && m.mbps < 215, `${a.name} → ${b.name}: ${m.mbps.toFixed(1)} Mbit/s on a 200 Mbit/s link`);
    }
    assert.match((await ferry(['lab', 'status'])).stdout, /Migration links shaped: 200 Mbit\/s both ways/);
    await ok(['lab', 'down']);
  });

  test('down cleans up after a crash that lost the state file', async () => {
    await ok(['lab', 'up', '--hosts', '1', '--json']);
    await createGuest('pattern', 'p2', 'host1');
    const pids = qemuPidsIn(namespaces());
    const daemon = labState().hosts[0].pid;
    process.kill(daemon, 'SIGKILL');
    fs.rmSync('/var/lib/ferry-lab/lab.json');
    await ok(['lab', 'down']);
    assert.deepEqual(namespaces(), []);
    for (const p of pids) assert.equal(pidAlive(p), false);
    const up2 = await ferry(['lab', 'status', '--json']);
    assert.equal(up2.json.error.code, 'LAB_NOT_UP');
  });
});
