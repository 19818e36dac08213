import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { UidPool, rangeClashes, processUids } from './uids.ts';
import { FerryError } from '../errors.ts';

test('hands out each uid once, skips uids that own a process, and runs out with HOST_UIDS_EXHAUSTED', () => {
  const busy = new Set<number>([5001]);
  const pool = new UidPool({ first: 5000, count: 3 }, () => busy);
  assert.deepEqual(pool.allocate('a'), { uid: 5000, gid: 5000 });
  assert.deepEqual(pool.allocate('b'), { uid: 5002, gid: 5002 }, '5001 still owns a process');
  assert.throws(
    () => pool.allocate('c'),
    (e: unknown) => e instanceof FerryError && e.code === 'HOST_UIDS_EXHAUSTED' && /qemu\.uids\.count/.test(e.message),
  );
  pool.release(5000);
  assert.equal(pool.allocate('c').uid, 5000, 'a released uid serves again');
});

test('uids on record are taken after a restart; ones outside the range are ignored', () => {
  const pool = new UidPool({ first: 7000, count: 2 }, () => new Set());
  pool.adopt([7000, 42]);
  assert.equal(pool.inUse, 1);
  assert.equal(pool.allocate('x').uid, 7001);
});

test('a range that passwd, group, subuid or subgid already uses is reported', () => {
  const etc = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-etc-'));
  try {
    fs.writeFileSync(path.join(etc, 'passwd'), 'root:x:0:0::/root:/bin/sh\nbob:x:9001:9001::/home/bob:/bin/sh\n');
    fs.writeFileSync(path.join(etc, 'group'), 'root:x:0:\n');
    fs.writeFileSync(path.join(etc, 'subuid'), 'bob:100000:65536\n');
    fs.writeFileSync(path.join(etc, 'subgid'), '');
    assert.deepEqual(rangeClashes({ first: 9000, count: 10 }, etc), ['passwd has bob with id 9001']);
    assert.deepEqual(rangeClashes({ first: 165000, count: 1000 }, etc), ['subuid gives bob 100000-165535']);
    assert.deepEqual(rangeClashes({ first: 0x70000000, count: 4096 }, etc), []);
  } finally {
    fs.rmSync(etc, { recursive: true, force: true });
  }
});

test('processUids sees this process', () => {
  assert.ok(processUids().has(process.getuid!()));
});
