import { test } from 'node:test';
import assert from 'node:assert/strict';
import { checkPattern, patternRange } from './checker.ts';

test('uniform and one-step patterns are consistent, including wrap-around', () => {
  assert.equal(checkPattern(Uint8Array.from([5, 5, 5, 5])).ok, true);
  const r = checkPattern(Uint8Array.from([6, 6, 5, 5, 5]));
  assert.equal(r.ok, true);
  assert.equal(r.edge, 2);
  assert.equal(checkPattern(Uint8Array.from([0, 0, 255, 255])).ok, true);
});

test('a lost page, a second step or a step up is caught', () => {
  const lost = checkPattern(Uint8Array.from([6, 6, 0, 5, 5]));
  assert.equal(lost.ok, false);
  assert.equal(lost.bad[0].page, 2);
  assert.equal(checkPattern(Uint8Array.from([7, 6, 5])).ok, false);
  assert.equal(checkPattern(Uint8Array.from([5, 6])).ok, false);
  assert.equal(checkPattern(Uint8Array.from([5, 5, 3])).ok, false);
  assert.equal(checkPattern(new Uint8Array(0)).ok, false);
});

test('range fields: 0 means to the end of RAM', () => {
  const b = Buffer.alloc(512);
  b.writeUInt32LE(1, 0x1f0);
  assert.deepEqual(patternRange(b, 128), { startMiB: 1, endMiB: 128 });
  b.writeUInt32LE(64, 0x1f4);
  assert.deepEqual(patternRange(b, 128), { startMiB: 1, endMiB: 64 });
});
