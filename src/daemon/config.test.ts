/** ferryd.json: defaults, every problem named at once with the stable code, and the sections' rules. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseDaemonConfig, DEFAULT_LIMITS, DEFAULT_DATA_PORTS } from './config.ts';
import { FerryError } from '../errors.ts';

const problems = (raw: unknown): string[] => {
  try {
    parseDaemonConfig(raw, '/repo');
  } catch (e) {
    assert.ok(e instanceof FerryError && e.code === 'CONFIG_INVALID', String(e));
    return (e.details?.errors as string[]) ?? [e.message];
  }
  return [];
};

test('an empty config gets the documented defaults', () => {
  const c = parseDaemonConfig({ name: 'h1' }, '/repo');
  assert.equal(c.stateDir, '/var/lib/ferry');
  assert.equal(c.apiSocket, '/var/lib/ferry/ferryd.sock');
  assert.deepEqual(c.relocation, {
    address: '127.0.0.1',
    port: 8002,
    hostsAllow: [],
    dataPorts: DEFAULT_DATA_PORTS,
    allowInsecure: false,
    acceptPostcopy: true,
    tunnels: true,
  });
  assert.deepEqual(c.limits, DEFAULT_LIMITS);
  assert.deepEqual(c.storage.pools, ['/repo/images', '/var/lib/ferry/disks'], 'the local directory is a pool');
  assert.equal(c.metrics, null);
  assert.equal(c.qemuUids?.first, 1879048192);
});

test('every problem is named in one CONFIG_INVALID, section by section', () => {
  const got = problems({
    bogus: 1,
    relocation: { port: 0, allowInsecure: 'yes', dataPorts: [5, 4], extra: true },
    networks: { lab: { bridge: 'br0' } },
    qemu: { user: 'qemu', uids: { first: 1 } },
    storage: { pools: ['/'] },
    limits: { connections: 0, nope: 1 },
    metrics: 'somewhere',
    cpuModel: 'host',
  });
  for (const f of [
    'bogus: unknown key',
    'relocation.port',
    'relocation.allowInsecure',
    'relocation.dataPorts',
    'relocation.extra: unknown key',
    'networks.lab.subnet',
    'qemu.user',
    'qemu.uids',
    'storage.pools',
    'limits.connections',
    'limits.nope: unknown key',
    'metrics',
    'cpuModel',
  ]) {
    assert.ok(
      got.some((g) => g.startsWith(f)),
      `${f} in ${JSON.stringify(got)}`,
    );
  }
  assert.deepEqual(problems([]), ['Invalid ferryd config: it must be a JSON object']);
});

test('sections parse what they promise', () => {
  const c = parseDaemonConfig(
    {
      name: 'h2',
      qemu: { user: 'root', binary: '/opt/qemu/bin/qemu-system-x86_64', dataDirs: ['/opt/qemu/share'] },
      networks: { lab: { bridge: 'br-lab', subnet: '198.18.0.0/24', address: '198.18.0.2/24' } },
      storage: { pools: ['/srv/images'], localDir: '/srv/local' },
      metrics: '[::1]:9477',
      limits: { connections: 9 },
    },
    '/repo',
  );
  assert.equal(c.qemuUids, null, 'qemu.user root: unconfined');
  assert.deepEqual(c.qemu, { binary: '/opt/qemu/bin/qemu-system-x86_64', dataDirs: ['/opt/qemu/share'] });
  assert.deepEqual(c.networks.lab, { bridge: 'br-lab', subnet: '198.18.0.0/24', address: '198.18.0.2' });
  assert.deepEqual(c.storage.pools, ['/srv/images', '/srv/local']);
  assert.deepEqual(c.metrics, { address: '::1', port: 9477 });
  assert.equal(c.limits.connections, 9);
  assert.equal(c.limits.incomingTotal, DEFAULT_LIMITS.incomingTotal);
});

test('cluster: off unless configured; https endpoints only; timings that keep the fence before the expiry', () => {
  assert.equal(parseDaemonConfig({ name: 'h1' }, '/repo').cluster, null);
  const c = parseDaemonConfig({ name: 'h1', tlsDir: '/t', cluster: { endpoints: ['https://10.0.0.1:2379'] } }, '/repo').cluster;
  assert.deepEqual(c, { endpoints: ['https://10.0.0.1:2379'], leaseTtlS: 10, fenceMarginS: 3, restartDelayS: 2, tlsDir: '/t' });
  assert.deepEqual(problems({ cluster: { endpoints: ['http://10.0.0.1:2379'] } }).length, 1, 'plain http refused');
  assert.match(problems({ cluster: { endpoints: [] } })[0], /^cluster\.endpoints: /);
  assert.match(problems({ cluster: { endpoints: ['https://a:1'], leaseTtlS: 2 } })[0], /^cluster\.leaseTtlS: /);
  assert.match(problems({ cluster: { endpoints: ['https://a:1'], leaseTtlS: 10, fenceMarginS: 6 } })[0], /^cluster\.fenceMarginS: .*half/);
  assert.match(problems({ cluster: { endpoints: ['https://a:1'], extra: 1 } })[0], /^cluster\.extra: unknown key/);
  assert.match(problems({ cluster: 'yes' })[0], /^cluster: /);
});
