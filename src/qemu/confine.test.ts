import { test } from 'node:test';
import assert from 'node:assert/strict';
import { confinedCommand, privateDevNodes, hostDevice } from './confine.ts';

test('the private /dev holds the basic nodes and only the wanted ones the host has, those owned by the domain', () => {
  const nodes = privateDevNodes(['null', 'no-such-device']);
  assert.deepEqual(
    nodes.map((n) => n.name),
    ['null', 'zero', 'full', 'random', 'urandom', 'null'],
  );
  const last = nodes.at(-1)!;
  assert.deepEqual([last.major, last.minor, last.mode, last.domainOwned], [1, 3, 0o600, true]);
  assert.ok(nodes.slice(0, 5).every((n) => n.mode === 0o666 && !n.domainOwned));
  assert.equal(hostDevice('no-such-device'), undefined);
  assert.equal(hostDevice('..'), undefined, 'a directory is no device');
});

test('the launcher gets every value as an argument and ends with the binary and its argv untouched', () => {
  const { cmd, args } = confinedCommand('/usr/bin/qemu', ['-name', 'guest=a;rm -rf /', '-S'], { uid: 70000, gid: 70000 }, [
    { name: 'net/tun', major: 10, minor: 200, mode: 0o600, domainOwned: true },
  ]);
  assert.equal(cmd, 'unshare');
  assert.deepEqual(args.slice(0, 5), ['--mount', '--propagation', 'private', 'sh', '-c']);
  const script = args[5];
  assert.doesNotMatch(script, /70000|qemu|tun/, 'no value is spliced into the script');
  assert.deepEqual(args.slice(6), [
    'ferry-qemu-launch',
    '70000',
    '70000',
    'net/tun',
    '10',
    '200',
    '600',
    '1',
    '--',
    '/usr/bin/qemu',
    '-name',
    'guest=a;rm -rf /',
    '-S',
  ]);
});
