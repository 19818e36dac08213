/**
 * The proof operators use: an SSH session (OpenSSH's client in the lab's client
 * namespace, Dropbear in the guest) stays open across a live move there and back, no
 * line lost, and ends normally. `ferry lab ssh` returns the remote command's status.
 * A dense guest (`lab guest linux --fill`) holds the fill it was asked for, and
 * `fill-check` proves it intact across a compressed live move while its writer runs.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import os from 'node:os';
import { ferry, ok, fails, labUp, labDown, createGuest, waitFor, tmpFile, consoleLog, FERRY } from '../helpers.ts';

describe('an SSH session across live moves (lab)', () => {
  before(async () => {
    await labUp(['--hosts', '2']);
    await createGuest('linux', 'web', 'host1');
  });
  after(async () => {
    await labDown();
  });

  test('ferry lab ssh runs a command with the pinned host key and returns its exit status', async () => {
    const r = await ferry(['lab', 'ssh', 'web', '--', 'hostname; exit 7']);
    assert.equal(r.code, 7, r.stderr);
    assert.equal(r.stdout.trim(), 'web');
    assert.equal(r.stderr, '', 'no prompt, no warning');
  });

  test('a session printing a counter survives a live move there and back, no line lost, and ends normally', async () => {
    const loop =
      'rm -f /tmp/stop; i=0; while [ ! -e /tmp/stop ]; do i=$((i+1)); echo "tick $i $(hostname)"; sleep 0.1; done; echo "end $i"';
    const child = spawn(process.execPath, [FERRY, 'lab', 'ssh', 'web', '--', loop], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => {
      out += d;
    });
    child.stderr.on('data', (d) => {
      err += d;
    });
    const exited = new Promise<number>((r) => child.on('close', (c) => r(c ?? -1)));
    try {
      await waitFor('the first ticks', () => (out.match(/^tick /gm) ?? []).length >= 5, 20000);
      const there = await ok(['-H', 'host1', 'migrate', 'web', 'host2', '--live', '--json']);
      assert.equal(there.outcome, 'succeeded');
      const mid = (out.match(/^tick /gm) ?? []).length;
      const back = await ok(['-H', 'host2', 'migrate', 'web', 'host1', '--live', '--json']);
      assert.equal(back.outcome, 'succeeded');
      await waitFor('ticks after the second move', () => (out.match(/^tick /gm) ?? []).length >= mid + 10, 20000);
      const stop = await ferry(['lab', 'ssh', 'web', '--', 'touch /tmp/stop']);
      assert.equal(stop.code, 0, stop.stderr);
      assert.equal(await exited, 0, `the session ended normally: ${err}`);
    } finally {
      child.kill();
    }
    const lines = out.trim().split('\n');
    const ticks = lines.filter((l) => l.startsWith('tick ')).map((l) => Number(l.split(' ')[1]));
    assert.deepEqual(
      ticks,
      ticks.map((_, i) => i + 1),
      'every counter line arrived, in order',
    );
    assert.equal(lines.at(-1), `end ${ticks.length}`);
    assert.ok(ticks.length >= 20);
  });

  test('a dense guest: the fill it was asked for, intact (fill-check) across a live move that --compress auto chose to compress, while its writer runs', async () => {
    const guest = (extra: string[]): string[] => ['lab', 'guest', 'linux', 'dense', '--memory', '192', ...extra, '--json'];
    await fails(guest(['--fill', '160']), 'CLI_USAGE', 2); // no room left for the guest itself
    await fails(guest(['--fill', '64', '--fill-kind', 'zeros']), 'CLI_USAGE', 2);
    await fails(guest(['--dirty-rate', '4']), 'CLI_USAGE', 2);
    const cfg = await ok(guest(['--fill', '63', '--dirty-rate', '4']));
    await ok(['-H', 'host1', 'create', tmpFile('dense.json', cfg), '--json']);
    await waitFor('the fill done', () => consoleLog('host1', 'dense').includes('fill done: 63 MiB (mixed)'), 90000, 500);
    const sh = async (cmd: string): Promise<string> => {
      const r = await ferry(['lab', 'ssh', 'dense', '--', cmd]);
      assert.equal(r.code, 0, r.stderr);
      return r.stdout.trim();
    };
    // mixed: a third random, the rest the guest's own files; the writer's region apart.
    assert.equal(
      await sh('stat -c %s /run/fill/random /run/fill/text /run/dirty/region | tr "\\n" " "'),
      `${21 * 1048576} ${42 * 1048576} ${4 * 1048576}`,
    );
    const sum = await sh('fill-check');
    assert.match(sum, /^[0-9a-f]{64}$/);
    // --compress auto samples the guest's pages: mixed data compresses, so zstd.
    const r = await ok(['-H', 'host1', 'migrate', 'dense', 'host2', '--live', '--compress', 'auto', '--json']);
    assert.equal(r.outcome, 'succeeded');
    // Over two channels where the host has two cores (plan.ts AUTO_COMPRESS_CHANNELS).
    const channels = os.cpus().length >= 2 ? '2 channels' : '1 channel';
    assert.ok(r.policy.includes(`pages compressed with zstd (multifd, ${channels})`), r.policy.join('; '));
    assert.ok(
      r.policy.some((x: string) => /^--compress auto: zstd \(a sample of the guest's pages compresses to \d+ %/.test(x)),
      r.policy.join('; '),
    );
    assert.equal(await sh('hostname'), 'dense');
    assert.equal(await sh('fill-check'), sum, 'the fill arrived as written');
    await ok(['-H', 'host2', 'destroy', 'dense']);
    await ok(['-H', 'host2', 'delete', 'dense']);
  });
});
