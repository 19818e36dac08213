/**
 * Domains outlive ferryd: kill -9 the daemon, the QEMU processes keep running, and a
 * restarted ferryd re-attaches and lists them again. A QEMU that died while its
 * ferryd was down is reported crashed.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { ok, labUp, labDown, createGuest, labState, pidAlive, guestStatus, waitFor } from '../helpers.ts';

describe('ferryd restart (lab, real QEMU)', () => {
  before(async () => {
    await labUp(['--hosts', '1']);
  });
  after(async () => {
    await labDown();
  });

  test('kill -9 ferryd: domains survive and are listed again after restart', async () => {
    const cfg = await createGuest('linux', 'web', 'host1');
    await createGuest('pattern', 'pat', 'host1');
    await ok(['-H', 'host1', 'pause', 'pat']);
    const before = await ok(['-H', 'host1', 'list', '--json']);
    const pids = await Promise.all(['web', 'pat'].map(async (d) => (await ok(['-H', 'host1', 'info', d, '--json'])).pid));
    const ip = cfg.nics[0].ip.split('/')[0];
    const st1 = guestStatus(ip);

    const daemon = labState().hosts[0].pid;
    process.kill(daemon, 'SIGKILL');
    await waitFor('ferryd gone', () => !pidAlive(daemon), 5000);
    for (const p of pids) assert.ok(pidAlive(p), `QEMU ${p} survived ferryd`);
    assert.ok(guestStatus(ip).counter >= st1.counter, 'the guest kept running');

    await ok(['lab', 'restart', 'host1']);
    const after = await ok(['-H', 'host1', 'list', '--json']);
    assert.deepEqual(
      after.map((d: any) => [d.name, d.id, d.state]),
      before.map((d: any) => [d.name, d.id, d.state]),
    );
    const pidsAfter = await Promise.all(['web', 'pat'].map(async (d) => (await ok(['-H', 'host1', 'info', d, '--json'])).pid));
    assert.deepEqual(pidsAfter, pids);
    // Re-attached for real: commands and the console work.
    await ok(['-H', 'host1', 'unpause', 'pat']);
    await ok(['lab', 'verify', 'pat']);
    const out = await ok(['-H', 'host1', 'console', 'web', '--idle', '2500', '--max', '20000'], { input: 'echo reattached-$((1+1))\n' });
    assert.match(out, /reattached-2/);
    assert.equal(guestStatus(ip).bootId, st1.bootId);
  });

  test('a QEMU that dies while ferryd is down is reported crashed, and can be started again', async () => {
    const daemon = labState().hosts[0].pid;
    const pid = (await ok(['-H', 'host1', 'info', 'pat', '--json'])).pid;
    process.kill(daemon, 'SIGKILL');
    await waitFor('ferryd gone', () => !pidAlive(daemon), 5000);
    process.kill(pid, 'SIGKILL');
    await waitFor('qemu gone', () => !pidAlive(pid), 5000);
    await ok(['lab', 'restart', 'host1']);
    const info = await ok(['-H', 'host1', 'info', 'pat', '--json']);
    assert.equal(info.state, 'crashed');
    await ok(['-H', 'host1', 'start', 'pat']);
    assert.equal((await ok(['-H', 'host1', 'info', 'pat', '--json'])).state, 'running');
  });

  test('a QEMU killed under a running ferryd is seen as a crash at once', async () => {
    const pid = (await ok(['-H', 'host1', 'info', 'pat', '--json'])).pid;
    process.kill(pid, 'SIGKILL');
    await waitFor('crash noticed', async () => (await ok(['-H', 'host1', 'info', 'pat', '--json'])).state === 'crashed', 10000);
    await ok(['-H', 'host1', 'destroy', 'pat']);
    assert.equal((await ok(['-H', 'host1', 'info', 'pat', '--json'])).state, 'shutoff');
  });
});
