import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseDomainConfig, stableMac, domainConfigToJson } from './config.ts';
import { FerryError } from '../errors.ts';

const good = {
  name: 'web',
  memory: 128,
  vcpus: 1,
  boot: { kernel: '/img/vmlinux', initrd: '/img/initrd.img', cmdline: 'console=ttyS0' },
  nics: [{ network: 'lab', ip: '198.18.0.50/24' }],
};

test('a good config is completed with uuid and a stable MAC', () => {
  const c = parseDomainConfig(good);
  assert.match(c.uuid, /^[0-9a-f-]{36}$/);
  assert.equal(c.nics[0].mac, stableMac(c.uuid, 0));
  assert.match(c.nics[0].mac, /^52:54:00:/);
  // round trip keeps everything, including the generated values
  assert.deepEqual(parseDomainConfig(domainConfigToJson(c)), c);
});

test('the MAC is stable for a given uuid and differs per NIC', () => {
  const u = '6f1c2a3b-0000-4000-8000-000000000001';
  assert.equal(stableMac(u, 0), stableMac(u, 0));
  assert.notEqual(stableMac(u, 0), stableMac(u, 1));
});

function invalid(raw: unknown, field: string): void {
  assert.throws(
    () => parseDomainConfig(raw),
    (e: unknown) =>
      e instanceof FerryError && e.code === 'CONFIG_INVALID' && (e.details!.errors as string[]).some((x) => x.startsWith(field)),
    `expected an error on ${field}`,
  );
}

test('bad configs get CONFIG_INVALID naming the field', () => {
  invalid(null, '(root)');
  invalid([], '(root)');
  invalid({ ...good, name: '' }, 'name');
  invalid({ ...good, name: '../etc' }, 'name');
  invalid({ ...good, memory: 'lots' }, 'memory');
  invalid({ ...good, memory: 8 }, 'memory');
  invalid({ ...good, memory: 1.5 }, 'memory');
  invalid({ ...good, vcpus: 0 }, 'vcpus');
  invalid({ ...good, uuid: 'nope' }, 'uuid');
  invalid({ ...good, boot: {} }, 'boot');
  invalid({ ...good, boot: { kernel: 'relative/vmlinux' } }, 'boot.kernel');
  invalid({ ...good, boot: { kernel: '/a,b' } }, 'boot.kernel');
  invalid({ ...good, boot: { disk: 0 } }, 'boot.disk');
  invalid({ ...good, disks: [{ path: '/x', format: 'vmdk' }] }, 'disks[0].format');
  invalid({ ...good, disks: 'x' }, 'disks');
  invalid({ ...good, nics: [{ network: 'lab', mac: '01:00:00:00:00:01' }] }, 'nics[0].mac');
  invalid({ ...good, nics: [{ network: 'lab', mac: 'zz' }] }, 'nics[0].mac');
  invalid({ ...good, nics: [{ network: 'lab', ip: '300.1.1.1' }] }, 'nics[0].ip');
  invalid(
    {
      ...good,
      nics: [
        { network: 'lab', mac: '52:54:00:00:00:01' },
        { network: 'lab', mac: '52:54:00:00:00:01' },
      ],
    },
    'nics[1].mac',
  );
  invalid({ ...good, colour: 'blue' }, 'colour');
});

test('all problems are reported at once', () => {
  try {
    parseDomainConfig({ name: 'x', memory: -1, vcpus: 'a', boot: {} });
    assert.fail('should throw');
  } catch (e) {
    assert.ok(e instanceof FerryError);
    assert.equal((e.details!.errors as string[]).length, 3);
    assert.match(e.message, /^Invalid domain config "x": memory: /);
  }
});

test('regression (found by fuzzing): prototype-less objects in any field are refused, not thrown on', () => {
  const bare = Object.create(null);
  for (const raw of [
    { ...good, boot: { disk: bare } },
    { ...good, boot: { kernel: bare } },
    { ...good, disks: [{ path: bare }] },
    { ...good, nics: [{ network: bare, mac: bare }] },
  ]) {
    assert.throws(
      () => parseDomainConfig(raw),
      (e: unknown) => e instanceof FerryError && e.code === 'CONFIG_INVALID',
    );
  }
});

test('a config cannot ask for a uid, a user, a device node or extra QEMU arguments: unknown fields are refused', () => {
  for (const k of ['uid', 'gid', 'user', 'devices', 'qemuArgs']) invalid({ ...good, [k]: k === 'uid' ? 0 : ['/dev/kvm'] }, k);
  invalid({ ...good, nics: [{ network: 'lab', tap: '/dev/net/tun' }] }, 'nics[0].tap');
  invalid({ ...good, disks: [{ path: '/img/d.qcow2', format: 'qcow2', owner: 0 }] }, 'disks[0].owner');
});
