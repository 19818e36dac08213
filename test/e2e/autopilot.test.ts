/**
 * The convergence autopilot in the lab (migration/plan.ts, Source's supervise):
 * - `--plan` measures a guest and predicts each strategy without moving anything;
 * - without --compress, the plan weighs compression for a 2.25 GiB guest, and keeps it off
 *   where post-copy may be needed;
 * - the 1 GiB memory-pattern guest (it rewrites every page, all the time) moves live over
 *   TLS inside --timeout 90 with a short final pause: pre-copy alone never converges,
 *   so the move switches to post-copy, and the checker proves its memory whole;
 * - a churning 1 GiB Linux guest over a 16 MiB/s link finishes inside --timeout 60 and
 *   a held TCP connection loses nothing;
 * - a guest whose config forbids post-copy never gets it: the plan says so, and a move
 *   that cannot converge is cancelled at its deadline with the guest running on;
 * - the link cut for 5 s during post-copy: both QEMUs pause, ferry resumes the stream
 *   by itself once the link is back, and the guest's memory is whole.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  ok,
  ferry,
  labUp,
  labDown,
  labState,
  inNs,
  createGuest,
  guestStatus,
  echoClient,
  waitFor,
  tmpFile,
  consoleLog,
  CHURN_48MIB,
  echoWhole,
} from '../helpers.ts';

async function runsOn(name: string): Promise<string[]> {
  const out: string[] = [];
  for (const h of ['host1', 'host2']) {
    const l = await ok(['-H', h, 'list', '--json']);
    if (l.some((d: { name: string; id: number | null }) => d.name === name && d.id !== null)) out.push(h);
  }
  return out;
}

describe('convergence autopilot (lab)', () => {
  before(async () => {
    await labUp(['--hosts', '2']);
  });
  after(async () => {
    await labDown();
  });

  test('--plan measures the guest and predicts every strategy; nothing moves', async () => {
    await createGuest('pattern', 'pat', 'host1', 1024);
    const v = await ok(['-H', 'host1', 'migrate', 'pat', 'host2', '--plan', '--timeout', '90', '--json']);
    assert.equal(v.domain, 'pat');
    assert.equal(v.destination, 'host2');
    assert.equal(v.ramBytes, 1024 * 1048576);
    assert.ok(v.dirtyRateMBps > 100, `the pattern guest dirties fast: ${v.dirtyRateMBps} MB/s`);
    assert.match(v.dirtyRateFrom, /calc-dirty-rate/);
    assert.deepEqual(v.predictions.map((p: { strategy: string }) => p.strategy).sort(), [
      'auto-converge',
      'multifd',
      'offline',
      'postcopy',
      'precopy',
    ]);
    const pre = v.predictions.find((p: { strategy: string }) => p.strategy === 'precopy');
    assert.equal(pre.converges, false, 'pre-copy alone cannot outrun it');
    assert.equal(v.pick, 'postcopy', v.reason);
    const text = await ok(['-H', 'host1', 'migrate', 'pat', 'host2', '--plan', '--timeout', '90']);
    assert.match(text, /Pick: postcopy/);
    // --verify-memory rules post-copy out: the plan knows it, names why, and throttles instead.
    const vm = await ok(['-H', 'host1', 'migrate', 'pat', 'host2', '--plan', '--verify-memory', '--timeout', '90', '--json']);
    assert.equal(vm.postcopyAllowed, false);
    assert.notEqual(vm.pick, 'postcopy', vm.reason);
    assert.match(vm.predictions.find((p: { strategy: string }) => p.strategy === 'postcopy').note, /--verify-memory/);
    assert.match(vm.predictions.find((p: { strategy: string }) => p.strategy === 'auto-converge').note, /throttled \(from \d+ %/);
    assert.deepEqual(await runsOn('pat'), ['host1'], 'a plan moves nothing');
    assert.deepEqual(await ok(['-H', 'host1', 'jobs', '--json']), [], 'and starts no job');
    // Under 2 GiB in use, no compression is weighed without --compress, and the plan says why.
    assert.equal(v.compress, 'none');
    assert.match(v.reason, /compression by default: none \([\d.]+ [GM]iB of RAM in use, under 2\.0 GiB/);
  });

  test('without --compress, the plan weighs compression for a guest with 2 GiB or more in use: off where post-copy may be needed, zstd where it is ruled out anyway', async () => {
    // The pattern guest touches all its RAM, and its pages (one counter byte each) compress.
    await createGuest('pattern', 'large', 'host1', 2304);
    try {
      const v = await ok(['-H', 'host1', 'migrate', 'large', 'host2', '--plan', '--timeout', '90', '--json']);
      assert.ok(v.touchedBytes >= 2 * 1024 ** 3, `touched ${v.touchedBytes}`);
      assert.equal(v.compress, 'none', v.reason);
      assert.match(
        v.reason,
        /compression by default: none: pre-copy is not predicted to fit the budget, and post-copy, the fallback there, cannot go with compression \(the sample alone would have chosen zstd/,
      );
      assert.equal(v.pick, 'postcopy', v.reason);
      const vm = await ok(['-H', 'host1', 'migrate', 'large', 'host2', '--plan', '--verify-memory', '--timeout', '90', '--json']);
      assert.equal(vm.compress, 'zstd', vm.reason);
      assert.match(
        vm.reason,
        /compression by default: zstd \(a sample of the guest's pages compresses to \d+ % of its size.*nothing lost: post-copy is off with --verify-memory/,
      );
      // --compress none is the operator's word: nothing is weighed.
      const none = await ok(['-H', 'host1', 'migrate', 'large', 'host2', '--plan', '--verify-memory', '--compress', 'none', '--json']);
      assert.equal(none.compress, 'none');
      assert.doesNotMatch(none.reason, /compression by default/);
    } finally {
      await ferry(['-H', 'host1', 'destroy', 'large']);
      await ferry(['-H', 'host1', 'delete', 'large']);
    }
  });

  test('the 1 GiB pattern guest moves live over TLS within --timeout 90, pause under 1 s, memory whole on host2', async () => {
    const r = await ferry(['-H', 'host1', 'migrate', 'pat', 'host2', '--live', '--timeout', '90', '--json'], { timeoutMs: 120000 });
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const rep = r.json;
    assert.equal(rep.outcome, 'succeeded');
    assert.equal(rep.encrypted, true);
    assert.equal(rep.strategy, 'postcopy', rep.policy.join('\n'));
    assert.ok(rep.totalMs < 90000, `total ${rep.totalMs} ms`);
    assert.ok(rep.pauseMs !== null && rep.pauseMs <= 1000, `pause ${rep.pauseMs} ms`);
    assert.equal(typeof rep.postcopy.windowMs, 'number');
    assert.ok(
      rep.policy.some((x: string) => x.startsWith('switched to post-copy')),
      rep.policy.join('\n'),
    );
    assert.ok(!rep.policy.some((x: string) => /suspend/.test(x)), 'finished without suspending the guest');
    assert.equal(rep.plan.pick, 'postcopy');
    const tl = rep.timeline;
    assert.ok(tl.destRunning < tl.postcopyCompleted && tl.postcopyCompleted <= tl.sourceClean, JSON.stringify(tl));
    assert.deepEqual(await runsOn('pat'), ['host2']);
    const v = await ok(['lab', 'verify', 'pat', '--json']);
    assert.equal(v.ok, true, JSON.stringify(v));
    assert.equal(v.host, 'host2');
    await ok(['-H', 'host2', 'destroy', 'pat']);
    await ok(['-H', 'host2', 'delete', 'pat']);
  });

  test('a churning 1 GiB Linux guest over a 16 MiB/s link finishes inside --timeout 60; its TCP connection loses nothing', async () => {
    const cfg = await createGuest('linux', 'web', 'host1', 1024);
    const ip = cfg.nics[0].ip.split('/')[0];
    await ok(['-H', 'host1', 'console', 'web', '--idle', '1500', '--max', '20000'], { input: CHURN_48MIB + '\n' });
    const before = guestStatus(ip);
    const echo = echoClient(ip, 20);
    await waitFor('echo connected', () => echo.lines.includes('connected'), 10000);
    await new Promise((res) => setTimeout(res, 2000));
    const r = await ferry(['-H', 'host1', 'migrate', 'web', 'host2', '--live', '--bandwidth', '16', '--timeout', '60', '--json'], {
      timeoutMs: 120000,
    });
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const rep = r.json;
    assert.equal(rep.outcome, 'succeeded', JSON.stringify(rep.error));
    assert.ok(rep.totalMs < 60000, `total ${rep.totalMs} ms`);
    assert.equal(rep.bandwidthMiBs, 16);
    assert.match(rep.plan.linkFrom, /--bandwidth 16/);
    await new Promise((res) => setTimeout(res, 1000));
    await echoWhole(echo);
    assert.equal(guestStatus(ip).bootId, before.bootId, 'same boot');
    assert.deepEqual(await runsOn('web'), ['host2']);
    // The plan counts the RAM that holds data, from a sample of its pages, not QEMU's
    // resident memory: here an incoming guest's RAM is resident whole after its move.
    const back = await ok(['-H', 'host2', 'migrate', 'web', 'host1', '--plan', '--json']);
    assert.ok(back.touchedBytes > 32 * 1048576 && back.touchedBytes < 512 * 1048576, `holding data: ${back.touchedBytes}`);
    await ok(['-H', 'host2', 'destroy', 'web']);
    await ok(['-H', 'host2', 'delete', 'web']);
  });

  test('a guest whose config forbids post-copy never gets it: the plan says so, and a move that cannot converge is cancelled at the deadline', async () => {
    const cfg = await ok(['lab', 'guest', 'pattern', 'nopc', '--json', '--memory', '512']);
    cfg.postcopy = false;
    await ok(['-H', 'host1', 'create', tmpFile('nopc.json', cfg), '--json']);
    await waitFor('nopc ready', () => consoleLog('host1', 'nopc').includes('ferry-pattern ready'), 60000);
    const v = await ok(['-H', 'host1', 'migrate', 'nopc', 'host2', '--plan', '--strategy', 'postcopy', '--json']);
    assert.equal(v.postcopyAllowed, false);
    assert.notEqual(v.pick, 'postcopy');
    assert.match(v.reason, /forbids it|forbidden/);
    const r = await ferry(
      [
        '-H',
        'host1',
        'migrate',
        'nopc',
        'host2',
        '--live',
        '--strategy',
        'postcopy',
        '--max-downtime',
        '50',
        '--timeout',
        '8',
        '--on-timeout',
        'cancel',
        '--json',
      ],
      { timeoutMs: 60000 },
    );
    assert.notEqual(r.code, 0);
    const rep = r.json;
    assert.equal(rep.outcome, 'failed');
    assert.equal(rep.error.code, 'MIGRATION_NOT_CONVERGING', JSON.stringify(rep.error));
    assert.ok(!rep.policy.some((x: string) => /post-copy offered|switched to post-copy/.test(x)), rep.policy.join('\n'));
    assert.deepEqual(await runsOn('nopc'), ['host1'], 'the guest runs on where it was');
    const ver = await ok(['lab', 'verify', 'nopc', '--json']);
    assert.equal(ver.ok, true);
  });

  test('post-copy with the link cut for 5 s: both sides pause, ferry resumes the stream when the link is back, nothing is lost', async () => {
    await createGuest('pattern', 'pc', 'host1', 512);
    const run = ferry(['-H', 'host1', 'migrate', 'pc', 'host2', '--live', '--strategy', 'postcopy', '--bandwidth', '64', '--json'], {
      timeoutMs: 180000,
    });
    await waitFor('post-copy', async () => (await ferry(['-H', 'host1', 'job', 'pc', '--json'])).json?.phase === 'postcopy', 60000, 200);
    await new Promise((res) => setTimeout(res, 1000));
    // host2 resets every data connection from host1 (the control port stays open): the
    // source's stream breaks at its next packet, and the destination never hears of it.
    const [h1] = labState().hosts;
    const rule = ['INPUT', '-p', 'tcp', '-s', h1.migAddress, '--dport', '49152:49215', '-j', 'REJECT', '--reject-with', 'tcp-reset'];
    assert.equal(inNs('host2', ['iptables', '-I', ...rule]).code, 0);
    try {
      await new Promise((res) => setTimeout(res, 5000));
    } finally {
      inNs('host2', ['iptables', '-D', ...rule]);
    }
    const r = await run;
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const rep = r.json;
    assert.equal(rep.outcome, 'succeeded', JSON.stringify(rep.error));
    assert.equal(rep.strategy, 'postcopy');
    assert.ok(rep.postcopy.recoveries >= 1, JSON.stringify(rep.postcopy));
    assert.ok(
      rep.policy.some((x: string) => /post-copy stream broke and was resumed after \d+ ms/.test(x)),
      rep.policy.join('\n'),
    );
    assert.deepEqual(await runsOn('pc'), ['host2']);
    const v = await ok(['lab', 'verify', 'pc', '--json']);
    assert.equal(v.ok, true, JSON.stringify(v));
    assert.deepEqual(
      await ok(['-H', 'host1', 'list', '--json']).then((l: { name: string }[]) => l.filter((d) => d.name === 'pc')),
      [],
      'nothing of it left on host1',
    );
  });
});
