/**
 * CI's fixed-seed slice of the fault campaign (reliability/faults.ts): seed 5's first
 * eight rounds inject packet loss, both QEMU kills, a full destination disk, a slow
 * link and a destination ferryd kill into live migrations of the pattern guest, and
 * every invariant must hold after each. The campaign builds and removes its own lab.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { ROOT } from '../helpers.ts';

test('fault campaign, seed 5, 8 rounds: every invariant holds', () => {
  const r = spawnSync(
    process.execPath,
    ['--import', 'tsx', path.join(ROOT, 'reliability', 'faults.ts'), '--seed', '5', '--count', '8', '--no-report'],
    { cwd: ROOT, timeout: 600000, encoding: 'utf8' },
  );
  process.stderr.write(r.stderr);
  const summary = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}');
  assert.equal(summary.injected, 8, `all 8 rounds ran: ${r.stdout}`);
  assert.deepEqual(summary.failed, [], 'no invariant broken');
  assert.equal(summary.survived, 8);
  assert.equal(r.status, 0);
  // The seed's schedule is deterministic (its timing is not): these faults are in it.
  for (const f of ['packet-loss', 'kill-dst-qemu', 'kill-src-qemu', 'disk-full', 'slow-link', 'kill-dst-ferryd'])
    assert.ok(summary.faults.includes(f), `${f} injected: ${summary.faults.join(', ')}`);
});
