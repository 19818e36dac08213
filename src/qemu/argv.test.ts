import { test } from 'node:test';
import assert from 'node:assert/strict';
import { domainArgv, tapName, STATE_FDSET } from './argv.ts';
import { parseDomainConfig } from '../domain/config.ts';

const base = {
  accel: 'tcg' as const,
  cpuModel: 'qemu64',
  machine: 'pc-i440fx-7.2',
  qmpPath: '/s/qmp.sock',
  consolePath: '/s/con.sock',
  taps: ['ftabc0'],
};

test('kernel boot uses qboot, a named CPU model and starts stopped', () => {
  const c = parseDomainConfig({
    name: 'web',
    memory: 256,
    vcpus: 2,
    boot: { kernel: '/i/vmlinux', initrd: '/i/initrd', cmdline: 'console=ttyS0' },
    nics: [{ network: 'lab', mac: '52:54:00:aa:bb:cc' }],
  });
  const a = domainArgv(c, base);
  const j = a.join(' ');
  assert.ok(j.includes('-cpu qemu64,enforce'));
  assert.ok(!j.includes('host'));
  assert.ok(j.includes('-machine pc-i440fx-7.2,accel=tcg'));
  assert.ok(j.includes('-bios /usr/share/qemu/qboot.rom -kernel /i/vmlinux -initrd /i/initrd -append console=ttyS0'));
  assert.ok(j.includes('-m 256M -smp 2'));
  assert.ok(a.includes('-S'));
  assert.ok(j.includes('tap,id=net0,ifname=ftabc0,script=no,downscript=no'));
  assert.ok(j.includes('mac=52:54:00:aa:bb:cc'));
  assert.ok(!a.includes('-incoming'));
});

test('disk boot sets bootindex and read-only; incoming adds -incoming defer', () => {
  const c = parseDomainConfig({
    name: 'p',
    memory: 64,
    boot: { disk: 0 },
    disks: [{ path: '/i/pattern.img', format: 'raw', readOnly: true }],
  });
  const a = domainArgv(c, { ...base, taps: [], incoming: true, preallocate: true });
  const j = a.join(' ');
  assert.ok(j.includes('file=/i/pattern.img,format=raw,if=none,id=disk0,readonly=on'));
  assert.ok(j.includes('virtio-blk-pci,drive=disk0,id=vblk0,bootindex=1'));
  assert.ok(j.includes('-incoming defer'));
  assert.ok(a.includes('-mem-prealloc'));
  assert.ok(!a.includes('-bios'));
});

test('tap names fit IFNAMSIZ', () => {
  assert.ok(tapName('6f1c2a3b-0000-4000-8000-000000000001', 7).length <= 15);
});

test('a floppy boot disk uses if=floppy and boot order a', () => {
  const c = parseDomainConfig({
    name: 'p',
    memory: 64,
    boot: { disk: 0 },
    disks: [{ path: '/i/pattern.img', format: 'raw', readOnly: true, bus: 'floppy' }],
  });
  const j = domainArgv(c, { ...base, taps: [] }).join(' ');
  assert.ok(j.includes('-drive file=/i/pattern.img,format=raw,if=floppy,index=0,readonly=on -boot order=a'));
  assert.ok(!j.includes('virtio-blk'));
});

test('confinement: always under -sandbox; with descriptors, QEMU opens no path of its own', () => {
  const c = parseDomainConfig({
    name: 'w',
    memory: 64,
    boot: { kernel: '/i/vmlinux', initrd: '/i/initrd.img', cmdline: 'console=ttyS0' },
    disks: [
      { path: '/i/a.img', format: 'raw', readOnly: true },
      { path: '/i/b.qcow2', format: 'qcow2', readOnly: false },
    ],
  });
  const a = domainArgv(c, { ...base, taps: [], fds: { kernel: 3, initrd: 4, disks: [5, 6] } });
  const j = a.join(' ');
  assert.ok(j.includes('-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny'));
  assert.ok(j.includes('-kernel /proc/self/fd/3 ') && j.includes('-initrd /proc/self/fd/4 '));
  assert.ok(j.includes('-add-fd fd=5,set=1,opaque=disk0 -drive file=/dev/fdset/1,format=raw,if=none,id=disk0,readonly=on'));
  assert.ok(
    j.includes(
      '-add-fd fd=6,set=2,opaque=disk1 -drive file=/dev/fdset/2,format=qcow2,if=none,id=disk1,readonly=off,file.auto-read-only=off',
    ),
    'a writable disk: one read-write descriptor, opened read-write at once',
  );
  assert.ok(!a.some((x) => x.includes('/i/')), 'no domain path on the command line');
  // A restore's save file: its own fd set, before -incoming.
  const r = domainArgv(c, { ...base, taps: [], incoming: true, fds: { disks: [5, 6], state: 7 } }).join(' ');
  assert.ok(r.includes(`-add-fd fd=7,set=${STATE_FDSET},opaque=state -incoming defer`));
  assert.ok(!j.includes('opaque=state'), 'no state fd set without a save file');
});

test('a qcow2 backing chain goes to QEMU as descriptors too, each level overriding the header', () => {
  const c = parseDomainConfig({
    name: 'v',
    memory: 64,
    boot: { kernel: '/i/vmlinux' },
    disks: [{ path: '/p/top.qcow2', format: 'qcow2' }],
  });
  const a = domainArgv(c, {
    ...base,
    taps: [],
    fds: {
      kernel: 3,
      disks: [4],
      backing: [
        [
          { fd: 5, format: 'qcow2' },
          { fd: 6, format: 'raw' },
        ],
      ],
    },
  });
  const j = a.join(' ');
  assert.ok(j.includes('-add-fd fd=5,set=100,opaque=disk0-backing0'));
  assert.ok(j.includes('-add-fd fd=6,set=101,opaque=disk0-backing1'));
  assert.ok(
    j.includes(
      'file=/dev/fdset/1,format=qcow2,if=none,id=disk0,readonly=off,file.auto-read-only=off,backing.driver=qcow2,backing.file.driver=file,backing.file.filename=/dev/fdset/100,backing.backing.driver=raw,backing.backing.file.driver=file,backing.backing.file.filename=/dev/fdset/101',
    ),
    j,
  );
  assert.ok(!j.includes('/p/'), 'no path of the chain reaches QEMU');
});
