/** A process's identity beside its pid: start time and owner, from /proc. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync, spawn } from 'node:child_process';
import { processStartTicks, processUid } from './process.ts';

test('start ticks are stable for a process and differ for a later one; the uid is the real one', async () => {
  const mine = processStartTicks(process.pid);
  assert.ok(Number.isInteger(mine) && mine! > 0);
  assert.equal(processStartTicks(process.pid), mine);
  assert.equal(processUid(process.pid), process.getuid!());
  spawnSync('sleep', ['0.05']); // let the clock tick (100 Hz) past this process's start
  const child = spawn('sleep', ['5']);
  try {
    const theirs = processStartTicks(child.pid!);
    assert.ok(theirs! > mine!, `${theirs} > ${mine}`);
  } finally {
    child.kill();
  }
  assert.equal(processStartTicks(2 ** 22 + 1), undefined);
  assert.equal(processUid(2 ** 22 + 1), undefined);
});
