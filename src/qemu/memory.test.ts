import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ramRanges, dirtyTrackingUnreliable } from './memory.ts';

const G = 1024 * 1048576;

test('RAM below the PCI hole is one range from 0', () => {
  assert.deepEqual(ramRanges(128, 'pc-i440fx-7.2'), [{ start: 0, size: 128 * 1048576 }]);
  assert.deepEqual(ramRanges(3583, 'pc-i440fx-7.2'), [{ start: 0, size: 3583 * 1048576 }]);
});

test('large guests are split around the PCI hole as each machine does', () => {
  assert.deepEqual(ramRanges(4096, 'pc-i440fx-7.2'), [{ start: 0, size: 3 * G }, { start: 4 * G, size: 1 * G }]);
  assert.deepEqual(ramRanges(3584, 'pc-i440fx-7.2'), [{ start: 0, size: 3 * G }, { start: 4 * G, size: 0.5 * G }]);
  assert.deepEqual(ramRanges(4096, 'pc-q35-7.2'), [{ start: 0, size: 2 * G }, { start: 4 * G, size: 2 * G }]);
  assert.deepEqual(ramRanges(2048, 'pc-q35-7.2'), [{ start: 0, size: 2 * G }]);
});

test('only TCG on QEMU before 9.0 has the dirty-tracking bug', () => {
  assert.equal(dirtyTrackingUnreliable('tcg', '7.2.18'), true);
  assert.equal(dirtyTrackingUnreliable('tcg', '8.2.2'), true);
  assert.equal(dirtyTrackingUnreliable('tcg', '9.0.0'), false);
  assert.equal(dirtyTrackingUnreliable('kvm', '7.2.18'), false);
  assert.equal(dirtyTrackingUnreliable('tcg', 'garbage'), true);
});
