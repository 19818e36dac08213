/**
 * Two engines side by side: host1 runs Debian 12's own QEMU 7.2 (unpacked under a
 * prefix by scripts/old-engine.sh, ferryd.json "qemu"), host2 the default QEMU 10.
 * - host info names each engine, and flags 7.2's unreliable live dirty tracking;
 * - older → newer works, under the older versioned machine type; QEMU 7.2 under TCG
 *   loses dirty pages once the vCPU's TLB has grown (six started-and-cancelled
 *   migrations), so the source's memory check rewrites the stale RAM before the guest
 *   runs on host2, and the pattern checker proves it; the destination daemon killed
 *   during that repair leaves the domain running on its source;
 * - newer → older is refused in pre-flight (MIGRATION_DEST_ENGINE) and changes nothing,
 *   for a domain still on 7.2's machine type as well as for one on 10.0's.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import {
  ferry,
  ok,
  fails,
  labUp,
  labDown,
  createGuest,
  labState,
  waitFor,
  pidAlive,
  domainRecord,
  ferrydLog,
  patternIntact,
  hostClean,
  reconfigure,
  ROOT,
} from '../helpers.ts';

describe('mixed engines: QEMU 7.2 and QEMU 10 (lab)', () => {
  let srcPid = 0;
  before(async () => {
    const bin = execFileSync('bash', [path.join(ROOT, 'scripts', 'old-engine.sh')])
      .toString()
      .trim();
    const prefix = path.resolve(path.dirname(bin), '..', '..');
    await labUp(['--hosts', '2']);
    await reconfigure('host1', (c) => {
      c.qemu = { binary: bin, dataDirs: [path.join(prefix, 'usr', 'share', 'qemu'), '/usr/share/seabios'] };
    });
  });
  after(async () => {
    await labDown();
  });

  test("host info names each host's engine", async () => {
    const h1 = await ok(['-H', 'host1', 'host', 'info', '--json']);
    const h2 = await ok(['-H', 'host2', 'host', 'info', '--json']);
    assert.match(h1.qemuVersion, /^7\.2\./);
    assert.match(h2.qemuVersion, /^10\./);
    assert.equal(h1.machine, 'pc-i440fx-7.2');
    assert.equal(h1.engine.liveDirtyTrackingReliable, false);
    assert.equal(h2.engine.liveDirtyTrackingReliable, true);
    const text = await ok(['-H', 'host1', 'host', 'info']);
    assert.match(text, /engine\s+QEMU 7\.2\.\d+ .*unreliable/);
  });

  test("7.2 → 10: stale RAM from 7.2's dirty tracking is rewritten before the guest runs on host2", async () => {
    await createGuest('pattern', 'pat', 'host1', 128);
    srcPid = (await ok(['-H', 'host1', 'info', 'pat', '--json'])).pid;
    // Grow the vCPU's TLB: each dirty-log start/stop flushes it and a full TLB doubles.
    for (let i = 0; i < 6; i++) {
      const w = await fails(
        ['-H', 'host1', 'migrate', 'pat', 'host2', '--live', '--bandwidth', '8', '--timeout', '1'],
        'MIGRATION_NOT_CONVERGING',
      );
      assert.equal(w.json.outcome, 'failed');
    }
    // The destination daemon killed while the stale RAM is being rewritten: still before
    // the point of no return, so the domain must resume on the source.
    const rewriting = (): number => ferrydLog('host2').split('rewriting it from the source').length - 1;
    const before = rewriting();
    const m = ferry(['-H', 'host1', 'migrate', 'pat', 'host2', '--live', '--json']);
    await waitFor('the repair under way', () => rewriting() > before, 60000, 20);
    const d = labState().hosts[1].pid;
    process.kill(d, 'SIGKILL');
    await waitFor('ferryd gone', () => !pidAlive(d), 5000);
    await ok(['lab', 'restart', 'host2']);
    const killed = await m;
    assert.notEqual(killed.code, 0);
    assert.equal(killed.json.outcome, 'failed');
    await patternIntact('host1', 'pat', srcPid);
    await hostClean('host2', 'pat');

    const r = await ok(['-H', 'host1', 'migrate', 'pat', 'host2', '--live', '--json']);
    assert.equal(r.outcome, 'succeeded');
    assert.ok(
      r.policy.some((p: string) => p.startsWith('memory check on: QEMU 7.2')),
      r.policy.join('; '),
    );
    // Post-copy would leave no moment to check the copy: never offered on such an engine.
    assert.ok(
      r.policy.some((p: string) => p.startsWith('post-copy not offered: QEMU 7.2')),
      r.policy.join('; '),
    );
    assert.equal(r.memoryCheck.bytes, 128 * 1048576);
    // Without the repair these pages would be stale: the pattern check below would fail.
    assert.ok(r.memoryCheck.repairedBytes > 0, `QEMU 7.2 lost no pages this time: ${JSON.stringify(r.memoryCheck)}`);
    assert.ok(ferrydLog('host1').includes('guest memory arrived different and was repaired'));
    await ok(['lab', 'verify', 'pat']);
    const info = await ok(['-H', 'host2', 'info', 'pat', '--json']);
    assert.equal(info.state, 'running');
    assert.equal(info.host, 'host2');
    // Still the machine type it was started with, now under QEMU 10.
    assert.equal(domainRecord('host2', 'pat').runtime.machine, 'pc-i440fx-7.2');
  });

  test('10 → 7.2 is refused in pre-flight, and nothing changes', async () => {
    const pid2 = (await ok(['-H', 'host2', 'info', 'pat', '--json'])).pid;
    const r = await fails(['-H', 'host2', 'migrate', 'pat', 'host1', '--live'], 'MIGRATION_DEST_ENGINE', 8);
    assert.match(r.json.error.message, /QEMU 7\.2\.\d+, older than the source's 10\./);
    await patternIntact('host2', 'pat', pid2);
    await hostClean('host1', 'pat');
    // A domain started under QEMU 10 (its 10.0 machine type) is refused too.
    await createGuest('pattern', 'pat10', 'host2', 64);
    assert.match(domainRecord('host2', 'pat10').runtime.machine, /^pc-i440fx-10\./);
    await fails(['-H', 'host2', 'migrate', 'pat10', 'host1'], 'MIGRATION_DEST_ENGINE', 8);
    assert.equal((await ok(['-H', 'host2', 'info', 'pat10', '--json'])).state, 'running');
    assert.equal(domainRecord('host1', 'pat10'), undefined);
  });
});
