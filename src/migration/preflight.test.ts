import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  checkOffer,
  tunnelsNeeded,
  vniFor,
  writeStorageMarkers,
  checkStorageMarkers,
  markerName,
  type SourceFacts,
  type DestFacts,
} from './preflight.ts';
import { PROTOCOL_VERSION as V } from './phases.ts';
import { parseDomainConfig } from '../domain/config.ts';
import { FerryError } from '../errors.ts';
import type { DomainConfig } from '../domain/config.ts';

/** checkOffer with the offer's two parts as arguments, as the table below reads best. */
const offer = (version: number, src: SourceFacts, dst: DestFacts, cfg: DomainConfig, running: boolean): void =>
  checkOffer({ version, src }, dst, cfg, running);

const c = parseDomainConfig({ name: 'web1', memory: 1024, boot: { kernel: '/k' }, nics: [{ network: 'lab', ip: '198.18.0.50/24' }] });
const src: SourceFacts = {
  name: 'host1',
  version: '0.1.0',
  qemuVersion: '10.0.2',
  arch: 'x86_64',
  accel: 'tcg',
  cpuModel: 'qemu64',
  cpuFeatures: ['sse2', 'lm'],
  machine: 'pc-i440fx-7.2',
  networks: { lab: { bridge: 'br0', subnet: '198.18.0.0/24' } },
};
const dst: DestFacts = {
  name: 'host2',
  qemuVersion: '10.0.2',
  arch: 'x86_64',
  accel: 'tcg',
  cpuFor: 'qemu64',
  cpuMissing: [],
  cpuCeiling: null,
  machines: ['pc-i440fx-7.2'],
  networks: { lab: { bridge: 'br0', subnet: '198.18.0.0/24' } },
  freeMiB: 4096,
  domainNames: [],
  domainUuids: [],
};

function code(f: () => void): string {
  try {
    f();
    return 'OK';
  } catch (e) {
    assert.ok(e instanceof FerryError);
    return e.code;
  }
}

test('a matching destination passes', () => {
  assert.equal(
    code(() => offer(V, src, dst, c, true)),
    'OK',
  );
});

test("a destination that cannot give the domain's CPU model (accelerator or cpuCeiling) is refused before anything moves, naming the features", () => {
  try {
    offer(V, src, { ...dst, cpuFor: 'Nehalem', cpuMissing: ['popcnt', 'sse4.1'], cpuCeiling: 'Opteron_G3' }, c, true);
    assert.fail('should refuse');
  } catch (e) {
    assert.ok(e instanceof FerryError);
    assert.equal(e.code, 'MIGRATION_DEST_CPU');
    assert.match(e.message, /CPU model Nehalem, and host2 cannot give popcnt, sse4\.1 \(tcg, cpuCeiling Opteron_G3\)/);
    assert.deepEqual(e.details, { model: 'Nehalem', missing: ['popcnt', 'sse4.1'] });
  }
  // A model its QEMU does not know at all.
  assert.equal(
    code(() => offer(V, src, { ...dst, cpuFor: 'Future-v9', cpuMissing: null }, c, true)),
    'MIGRATION_DEST_CPU',
  );
  // A shut-off domain moves as its definition: no CPU needed yet.
  assert.equal(
    code(() => offer(V, src, { ...dst, cpuMissing: ['avx512f'] }, c, false)),
    'OK',
  );
});

test('each mismatch is refused with its own code and a message that names the fix', () => {
  assert.equal(
    code(() => offer(V + 1, src, dst, c, true)),
    'MIGRATION_DEST_VERSION',
  );
  assert.equal(
    code(() => offer(V, src, { ...dst, name: 'host1' }, c, true)),
    'MIGRATION_SAME_HOST',
  );
  assert.equal(
    code(() => offer(V, src, { ...dst, domainNames: ['web1'] }, c, true)),
    'MIGRATION_DEST_EXISTS',
  );
  assert.equal(
    code(() => offer(V, src, { ...dst, domainUuids: [c.uuid] }, c, true)),
    'MIGRATION_DEST_EXISTS',
  );
  assert.equal(
    code(() => offer(V, src, { ...dst, arch: 'aarch64' }, c, true)),
    'MIGRATION_DEST_ARCH',
  );
  assert.equal(
    code(() => offer(V, src, { ...dst, accel: 'kvm' }, c, true)),
    'MIGRATION_DEST_ARCH',
  );
  assert.equal(
    code(() => offer(V, src, { ...dst, cpuMissing: ['sse2'] }, c, true)),
    'MIGRATION_DEST_CPU',
  );
  assert.equal(
    code(() => offer(V, src, { ...dst, machines: ['pc-i440fx-8.0'] }, c, true)),
    'MIGRATION_DEST_ENGINE',
  );
  assert.equal(
    code(() => offer(V, src, { ...dst, networks: {} }, c, true)),
    'MIGRATION_DEST_NETWORK',
  );
  try {
    offer(V, src, { ...dst, freeMiB: 512 }, c, true);
    assert.fail('should refuse');
  } catch (e) {
    assert.ok(e instanceof FerryError);
    assert.equal(e.code, 'MIGRATION_DEST_NO_MEMORY');
    assert.equal(e.message, 'Cannot migrate domain "web1": host2 has 512 MiB free, needs 1024 MiB');
  }
});

test("a shut-off domain needs no memory or CPU match, only the definition's needs", () => {
  assert.equal(
    code(() => offer(V, src, { ...dst, freeMiB: 0, accel: 'kvm', cpuMissing: null }, c, false)),
    'OK',
  );
  assert.equal(
    code(() => offer(V, src, { ...dst, networks: {} }, c, false)),
    'MIGRATION_DEST_NETWORK',
  );
});

test('regression (found by fuzzing): a Begin that is not an object is MIGRATION_PROTOCOL', async () => {
  const { parseBegin } = await import('../api/relocation.ts');
  for (const v of [null, 7, 'x', [1]])
    assert.throws(
      () => parseBegin(v as never),
      (e: unknown) => e instanceof FerryError && e.code === 'MIGRATION_PROTOCOL',
    );
});

test('engines: older to newer passes under the older machine type; newer to older is MIGRATION_DEST_ENGINE', () => {
  const old72 = { ...src, qemuVersion: '7.2.22', machine: 'pc-i440fx-7.2' };
  const new10 = { ...dst, qemuVersion: '10.0.2', machines: ['pc-i440fx-7.2', 'pc-i440fx-10.0'] };
  assert.equal(
    code(() => offer(V, old72, new10, c, true)),
    'OK',
  );
  // the source on 10.0 with a domain still on 7.2's machine type: still newer to older
  assert.equal(
    code(() =>
      offer(
        V,
        { ...src, qemuVersion: '10.0.2', machine: 'pc-i440fx-7.2' },
        { ...dst, qemuVersion: '7.2.22', machines: ['pc-i440fx-7.2'] },
        c,
        true,
      ),
    ),
    'MIGRATION_DEST_ENGINE',
  );
  assert.equal(
    code(() =>
      offer(
        V,
        { ...src, qemuVersion: '10.0.2', machine: 'pc-i440fx-10.0' },
        { ...dst, qemuVersion: '7.2.22', machines: ['pc-i440fx-7.2'] },
        c,
        true,
      ),
    ),
    'MIGRATION_DEST_ENGINE',
  );
  assert.equal(
    code(() => offer(V, { ...src, qemuVersion: '10.0.2' }, { ...dst, qemuVersion: '10.0.10' }, c, true)),
    'OK',
  );
  // a definition (no QEMU state) moves either way
  assert.equal(
    code(() => offer(V, { ...src, qemuVersion: '10.0.2' }, { ...dst, qemuVersion: '7.2.22', machines: [] }, c, false)),
    'OK',
  );
});

test('versions compare numerically, part by part', async () => {
  const { compareVersions } = await import('./preflight.ts');
  assert.ok(compareVersions('10.0.2', '7.2.22') > 0);
  assert.ok(compareVersions('7.2.22', '10.0.2') < 0);
  assert.equal(compareVersions('10.0', '10.0.0'), 0);
  assert.ok(compareVersions('10.0.10', '10.0.9') > 0);
});

test('shared storage is proven by a marker the destination reads back; a local copy, a stale or a planted marker is refused', () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-marker-'));
  try {
    const shared = path.join(root, 'shared');
    const other = path.join(root, 'other');
    fs.mkdirSync(shared);
    fs.mkdirSync(other);
    const job = '0b6f1c1e-6a55-4d8e-9a43-1f4b3c2d1e0f';
    const mk = (dir: string): ReturnType<typeof parseDomainConfig> =>
      parseDomainConfig({
        name: 'db',
        memory: 64,
        boot: { kernel: '/k' },
        disks: [{ path: path.join(dir, 'data.img') }, { path: path.join(other, 'ro.img'), readOnly: true }],
      });
    const m = writeStorageMarkers(mk(shared), job);
    assert.match(m.nonce, /^[0-9a-f]{32}$/);
    assert.deepEqual(fs.readdirSync(other), [], 'no marker beside a read-only file');
    assert.equal(
      code(() => checkStorageMarkers(mk(shared), { jobId: job, nonce: m.nonce }, 'host2', 'host1')),
      'OK',
    );
    // Another directory (what a host without the shared mount sees): refused.
    assert.equal(
      code(() => checkStorageMarkers(mk(other), { jobId: job, nonce: m.nonce }, 'host2', 'host1')),
      'MIGRATION_DEST_STORAGE',
    );
    // Another nonce (a marker of an earlier job, or none sent): refused.
    assert.equal(
      code(() => checkStorageMarkers(mk(shared), { jobId: job, nonce: 'f'.repeat(32) }, 'host2', 'host1')),
      'MIGRATION_DEST_STORAGE',
    );
    assert.equal(
      code(() => checkStorageMarkers(mk(shared), { jobId: job, nonce: '' }, 'host2', 'host1')),
      'MIGRATION_DEST_STORAGE',
    );
    // The marker's name is exclusive: a second writer for the same job fails instead of overwriting.
    assert.equal(
      code(() => writeStorageMarkers(mk(shared), job)),
      'MIGRATION_DEST_STORAGE',
    );
    m.remove();
    assert.deepEqual(fs.readdirSync(shared), []);
    // A symlink planted where the marker goes is not followed.
    fs.symlinkSync(path.join(root, 'elsewhere'), path.join(other, markerName(job)));
    fs.writeFileSync(path.join(root, 'elsewhere'), m.nonce);
    assert.equal(
      code(() => checkStorageMarkers(mk(other), { jobId: job, nonce: m.nonce }, 'host2', 'host1')),
      'MIGRATION_DEST_STORAGE',
    );
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
});

test("another subnet: a tunnel from the NIC's home, or a refusal where tunnels are off", () => {
  const home = { host: 'host1', address: '198.19.0.11', subnet: '198.18.0.0/24', vni: vniFor(c.uuid, 0) };
  const other = { name: 'host3', networks: { lab: { bridge: 'br1', subnet: '198.18.1.0/24' } }, tunnels: true, address: '198.19.0.13' };
  // Same subnet: nothing to carry.
  assert.equal(tunnelsNeeded(c, [home], { ...other, networks: { lab: { bridge: 'br0', subnet: '198.18.0.0/24' } } }, 'host1').size, 0);
  // Another subnet: NIC 0 gets its home's segment carried.
  assert.deepEqual([...tunnelsNeeded(c, [home], other, 'host1')], [[0, home]]);
  // A guest already away (on host3) moving home: its home subnet is where it goes, so no tunnel.
  assert.equal(
    tunnelsNeeded(
      c,
      [home],
      { name: 'host2', networks: { lab: { bridge: 'br0', subnet: '198.18.0.0/24' } }, tunnels: true, address: '198.19.0.12' },
      'host3',
    ).size,
    0,
  );
  assert.equal(
    code(() => tunnelsNeeded(c, [home], { ...other, tunnels: false }, 'host1')),
    'MIGRATION_DEST_L2',
  );
  // A home that claims to be the destination itself, on another subnet, is a lie.
  assert.equal(
    code(() => tunnelsNeeded(c, [{ ...home, host: 'host3' }], other, 'host2')),
    'MIGRATION_PROTOCOL',
  );
  const a = vniFor(c.uuid, 0);
  assert.ok(a >= 1 && a <= 0xffffff && a !== vniFor(c.uuid, 1), 'VNIs per NIC, in range');
});
