/**
 * Every pre-flight and trust refusal, for real in the lab: each gets its code, comes
 * within seconds, and leaves the domain running on the source and nothing on the
 * destination (no QEMU, no definition, no reservation).
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { execFileSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import {
  ok,
  fails,
  labUp,
  labDown,
  createGuest,
  reconfigure,
  tlsCall,
  ferrydLog,
  inNs,
  tmpFile,
  labState,
  domainRecord,
} from '../helpers.ts';
import { caInit, issueHostCert } from '../../src/tls/ca.ts';
import { PROTOCOL_VERSION } from '../../src/migration/phases.ts';

const pids: Record<string, number> = {};

/** The domain still runs on host1 with the same QEMU, and `dest` holds nothing of it. */
async function untouched(dom: string, dest: string): Promise<void> {
  const info = await ok(['-H', 'host1', 'info', dom, '--json']);
  assert.equal(info.state, 'running', `${dom} still running on host1`);
  assert.equal(info.pid, pids[dom], `${dom} kept its QEMU`);
  assert.equal(domainRecord(dest, dom), undefined, `no definition of ${dom} on ${dest}`);
  const hi = await ok(['-H', dest, 'host', 'info', '--json']);
  assert.equal(hi.memory.reservedMiB, 0, `no reservation on ${dest}`);
  const list = await ok(['-H', dest, 'list', '--json']);
  assert.ok(!list.some((d: any) => d.name === dom), `${dom} not listed on ${dest}`);
}

async function refused(dom: string, dest: string, code: string, extra: string[] = []): Promise<any> {
  const t0 = Date.now();
  const r = await fails(['-H', 'host1', 'migrate', dom, dest, '--live', ...extra], code);
  assert.ok(Date.now() - t0 < 15000, `refusal took ${Date.now() - t0} ms`);
  assert.equal(r.json.outcome, 'failed');
  assert.equal(r.json.error.code, code);
  await untouched(dom, dest);
  return r.json;
}

describe('migration refusals (lab)', () => {
  before(async () => {
    await labUp(['--hosts', '3', '--segments', '2', '--host-memory', '1024']);
    await createGuest('linux', 'web', 'host1');
    await createGuest('pattern', 'pat', 'host1', 96);
    for (const d of ['web', 'pat']) pids[d] = (await ok(['-H', 'host1', 'info', d, '--json'])).pid;
  });
  after(async () => {
    inNs('host2', ['iptables', '-F', 'INPUT']);
    await labDown();
  });

  test('a firewall that drops the data ports is found within seconds, naming the range', async () => {
    assert.equal(inNs('host2', ['iptables', '-I', 'INPUT', '-p', 'tcp', '--dport', '49152:49215', '-j', 'DROP']).code, 0);
    try {
      const r = await refused('pat', 'host2', 'MIGRATION_DEST_PORT');
      assert.match(r.error.message, /49152-49215/);
    } finally {
      inNs('host2', ['iptables', '-D', 'INPUT', '-p', 'tcp', '--dport', '49152:49215', '-j', 'DROP']);
    }
  });

  test('not enough memory on the destination', async () => {
    await reconfigure('host2', (c) => {
      c.memory = 64;
    });
    const r = await refused('pat', 'host2', 'MIGRATION_DEST_NO_MEMORY');
    assert.equal(
      r.error.message,
      'Cannot migrate domain "pat": host2 has 64 MiB free, needs 96 MiB (it offers 64 MiB to domains, 0 MiB in use or reserved)',
    );
    // The offer is not enough: what the host really has (MemAvailable, less the margin) counts too.
    await reconfigure('host2', (c) => {
      c.memory = 1024;
      c.memoryMargin = 16 * 1024 * 1024;
    });
    const real = await refused('pat', 'host2', 'MIGRATION_DEST_NO_MEMORY');
    assert.match(real.error.message, /MiB available \(MemAvailable\).*16777216 MiB kept for the host \(memoryMargin\)/);
    const hi = await ok(['-H', 'host2', 'host', 'info', '--json']);
    assert.ok(hi.memory.availableMiB > 0 && hi.memory.freeMiB < 0, JSON.stringify(hi.memory));
    await reconfigure('host2', (c) => {
      delete c.memoryMargin;
    });
  });

  test('another accelerator, CPU model or missing network', async (t) => {
    // Another accelerator needs a host that has one: a machine without /dev/kvm cannot
    // run a ferryd forced to KVM (it refuses to start, QEMU_START_FAILED).
    if (fs.existsSync('/dev/kvm')) {
      await reconfigure('host2', (c) => {
        c.accel = 'kvm';
      });
      await refused('pat', 'host2', 'MIGRATION_DEST_ARCH');
    } else t.diagnostic('no /dev/kvm on this machine: the other-accelerator case is not tried');
    // A host capped below the domain's CPU model (an older CPU in a mixed fleet): refused in pre-flight.
    await reconfigure('host2', (c) => {
      delete c.accel;
      c.cpuCeiling = 'kvm32';
    });
    await refused('pat', 'host2', 'MIGRATION_DEST_CPU');
    // A CPU model this host's accelerator cannot provide: said by host info, refused
    // before QEMU (which runs with enforce) and before any migration.
    await reconfigure('host2', (c) => {
      delete c.cpuCeiling;
      c.cpuModel = 'Haswell';
    });
    const hi = await ok(['-H', 'host2', 'host', 'info', '--json']);
    assert.ok(hi.cpuUnavailable.includes('tsc-deadline'), JSON.stringify(hi.cpuUnavailable));
    const cfg = await ok(['lab', 'guest', 'pattern', 'cpux', '--json']);
    const r = await fails(['-H', 'host2', 'create', tmpFile('cpux.json', cfg)], 'QEMU_START_FAILED');
    assert.match(r.stderr + r.stdout, /CPU model Haswell needs .*tsc-deadline.*cannot provide \(tcg\)/);
    assert.equal(domainRecord('host2', 'cpux'), undefined, 'nothing defined');
    await reconfigure('host2', (c) => {
      delete c.cpuModel;
      c.networks = {};
    });
    await refused('web', 'host2', 'MIGRATION_DEST_NETWORK');
    await reconfigure('host2', (c) => {
      c.networks = {
        lab: { bridge: 'br0', subnet: '198.18.0.0/24', address: '198.18.0.12' },
        lab2: { bridge: 'br1', subnet: '198.18.1.0/24', address: '198.18.1.12' },
      };
    });
  });

  test('a destination on another L2 segment: by subnet (where it does not extend segments), and by a real ARP probe', async () => {
    await reconfigure('host3', (c) => {
      c.relocation.tunnels = false;
    });
    const r = await refused('web', 'host3', 'MIGRATION_DEST_L2');
    assert.match(r.error.message, /198\.18\.1\.0\/24.*relocation\.tunnels is false/);
    await reconfigure('host3', (c) => {
      delete c.relocation.tunnels;
    });
    // host3 now claims the same subnet, but its bridge is still on segment 2
    await reconfigure('host3', (c) => {
      c.networks.lab = { bridge: 'br1', subnet: '198.18.0.0/24', address: '198.18.1.13' };
    });
    const r2 = await refused('web', 'host3', 'MIGRATION_DEST_L2');
    assert.match(r2.error.message, /did not answer ARP/);
  });

  test('a disk not reachable at the same path', async () => {
    // In the lab's shared pool, then moved away: no longer at the same path anywhere.
    const dir = fs.mkdtempSync(path.join(labState().poolDir, 'disk-'));
    const img = path.join(dir, 'pattern.img');
    fs.copyFileSync(path.join(process.cwd(), 'images', 'pattern.img'), img);
    const cfg = await ok(['lab', 'guest', 'pattern', 'patd', '--json']);
    cfg.disks[0].path = img;
    await ok(['-H', 'host1', 'create', tmpFile('patd.json', cfg)]);
    pids.patd = (await ok(['-H', 'host1', 'info', 'patd', '--json'])).pid;
    fs.renameSync(dir, `${dir}.moved`);
    try {
      const r = await refused('patd', 'host2', 'MIGRATION_DEST_DISK');
      assert.match(r.error.message, /shared storage/);
    } finally {
      fs.renameSync(`${dir}.moved`, dir);
    }
    await ok(['-H', 'host1', 'destroy', 'patd']);
    await ok(['-H', 'host1', 'delete', 'patd']);
  });

  test('a writable disk that the destination has only as a local copy: refused, not shared storage', async () => {
    const dir = fs.mkdtempSync(path.join(labState().poolDir, 'local-'));
    const data = path.join(dir, 'data.img');
    fs.writeFileSync(data, Buffer.alloc(1 << 20));
    const cfg = await ok(['lab', 'guest', 'pattern', 'patw', '--json']);
    cfg.disks.push({ path: data, format: 'raw', bus: 'virtio' });
    await ok(['-H', 'host1', 'create', tmpFile('patw.json', cfg)]);
    pids.patw = (await ok(['-H', 'host1', 'info', 'patw', '--json'])).pid;
    // host2's ferryd runs in its own mount namespace (ip netns exec): there, and only
    // there, a tmpfs over the directory holds a same-sized copy at the same path.
    const h2 = String(labState().hosts[1].pid);
    const nsSh = (cmd: string): void => {
      execFileSync('nsenter', ['-t', h2, '-m', '--', 'sh', '-c', cmd]);
    };
    nsSh(`mount -t tmpfs -o size=4m ferry-test-local ${dir} && truncate -s 1M ${data}`);
    try {
      const r = await refused('patw', 'host2', 'MIGRATION_DEST_STORAGE');
      assert.match(r.error.message, /writable disk .*data\.img is not on storage that host1 and host2 share/);
      assert.deepEqual(
        fs.readdirSync(dir).filter((f) => f.startsWith('.ferry-shared-')),
        [],
        'the source removed its marker',
      );
    } finally {
      nsSh(`umount ${dir}`);
    }
    // Shared again: the same move goes through.
    await ok(['-H', 'host1', 'migrate', 'patw', 'host2']);
    assert.equal((await ok(['-H', 'host2', 'info', 'patw', '--json'])).state, 'running');
    await ok(['-H', 'host2', 'destroy', 'patw']);
    await ok(['-H', 'host2', 'delete', 'patw']);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('a domain of the same name on the destination; the source itself', async () => {
    const cfg = await ok(['lab', 'guest', 'pattern', 'pat', '--json']);
    await ok(['-H', 'host2', 'create', '--defer-start', tmpFile('pat.json', cfg)]);
    const t0 = Date.now();
    const r = await fails(['-H', 'host1', 'migrate', 'pat', 'host2', '--live'], 'MIGRATION_DEST_EXISTS');
    assert.ok(Date.now() - t0 < 15000);
    assert.equal(r.json.outcome, 'failed');
    assert.equal((await ok(['-H', 'host1', 'info', 'pat', '--json'])).pid, pids.pat);
    await ok(['-H', 'host2', 'delete', 'pat']);
    await fails(['-H', 'host1', 'migrate', 'pat', 'host1'], 'MIGRATION_SAME_HOST');
    await fails(['-H', 'host1', 'migrate', 'pat', 'nowhere.invalid'], 'HOST_UNKNOWN');
    await untouched('pat', 'host2');
  });

  test('an incompatible protocol version and malformed relocation messages', async () => {
    const host1Tls = labState().hosts[0].tlsDir;
    const begin = {
      version: 99,
      jobId: '00000000-0000-4000-8000-000000000001',
      mode: 'live',
      peer: {
        name: 'host1',
        version: '0.1.0',
        arch: 'x86_64',
        accel: 'tcg',
        cpuModel: 'qemu64',
        cpuFeatures: [],
        machine: 'pc-i440fx-7.2',
        networks: {},
      },
      domain: {
        config: { name: 'ghost', memory: 64, boot: { disk: 0 }, disks: [{ path: '/nonexistent', format: 'raw', readOnly: true }] },
        fileSizes: {},
        machine: 'pc-i440fx-7.2',
        cpuModel: 'qemu64',
      },
    };
    const v = tlsCall('host1', '198.19.0.12', host1Tls, { id: 1, action: 'relocation.begin', params: begin });
    assert.equal(v.lines[0].error.code, 'MIGRATION_DEST_VERSION');
    const bad = tlsCall('host1', '198.19.0.12', host1Tls, {
      id: 1,
      action: 'relocation.begin',
      params: { ...begin, version: PROTOCOL_VERSION, mode: 'teleport' },
    });
    assert.equal(bad.lines[0].error.code, 'MIGRATION_PROTOCOL');
    const liar = tlsCall('host1', '198.19.0.12', host1Tls, {
      id: 1,
      action: 'relocation.begin',
      params: { ...begin, version: PROTOCOL_VERSION, peer: { ...begin.peer, name: 'host3' } },
    });
    assert.equal(liar.lines[0].error.code, 'MIGRATION_PROTOCOL');
    const noJob = tlsCall('host1', '198.19.0.12', host1Tls, {
      id: 1,
      action: 'relocation.finish',
      params: { jobId: '00000000-0000-4000-8000-000000000002' },
    });
    assert.equal(noJob.lines[0].error.code, 'JOB_NOT_FOUND');
    const garbage = tlsCall('host1', '198.19.0.12', host1Tls, { id: 1, action: 'relocation.begin', params: { version: 'x' } });
    assert.equal(garbage.lines[0].error.code, 'API_BAD_REQUEST');
    assert.equal(domainRecord('host2', 'ghost'), undefined);
  });

  test('trust: no certificate, a foreign CA, a peer not in hostsAllow, no TLS at all', async () => {
    const none = tlsCall('host1', '198.19.0.12', 'none');
    assert.equal(none.lines[0]?.error?.code, 'TLS_REFUSED');
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-ca-'));
    caInit(path.join(tmp, 'ca'), { name: 'evil CA' });
    issueHostCert('host1', { caDir: path.join(tmp, 'ca'), outDir: path.join(tmp, 'foreign') });
    const foreign = tlsCall('host1', '198.19.0.12', path.join(tmp, 'foreign'));
    assert.equal(foreign.lines[0]?.error?.code, 'TLS_REFUSED');
    issueHostCert('intruder', { caDir: labState().caDir, outDir: path.join(tmp, 'intruder') });
    const intruder = tlsCall('host1', '198.19.0.12', path.join(tmp, 'intruder'));
    assert.equal(intruder.lines[0]?.error?.code, 'PEER_NOT_ALLOWED');
    // hostsAllow matches whole names: host[0-9]+ admits neither host1x nor evilhost1.
    for (const n of ['host1x', 'evilhost1']) {
      issueHostCert(n, { caDir: labState().caDir, outDir: path.join(tmp, n) });
      assert.equal(tlsCall('host1', '198.19.0.12', path.join(tmp, n)).lines[0]?.error?.code, 'PEER_NOT_ALLOWED', n);
    }
    const plain = tlsCall('host1', '198.19.0.12', 'plain', { id: 1, action: 'domain.list' });
    assert.ok(!plain.lines.some((l: any) => l && l.id === 1 && l.result), 'plain TCP gets no answer');
    const log = ferrydLog('host2');
    assert.match(log, /"msg":"refused peer".*"code":"TLS_REFUSED".*"peerName":null/);
    assert.match(log, /"msg":"refused peer".*"peerName":"host1".*"issuer":"evil CA"/);
    assert.match(log, /"msg":"refused peer".*"code":"PEER_NOT_ALLOWED".*"peerName":"intruder"/);
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  test('a real migration from a host that is not in hostsAllow', async () => {
    await reconfigure('host2', (c) => {
      c.relocation.hostsAllow = ['^host3$'];
    });
    const r = await refused('pat', 'host2', 'PEER_NOT_ALLOWED');
    assert.match(r.error.message, /host1/);
    assert.match(ferrydLog('host2'), /"msg":"refused peer".*"code":"PEER_NOT_ALLOWED".*"peerName":"host1"/);
  });
});
