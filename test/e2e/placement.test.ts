/**
 * Placement in a 3-host cluster lab (`ferry lab up --cluster`), host3 capped at an older
 * CPU (cpuCeiling Opteron_G3, as a mixed fleet's old host), 1 GiB offered per host,
 * two moves out at a time per host:
 * - CPU: the cluster's baseline; a Nehalem domain is never placed on host3, and a move
 *   there is refused in pre-flight naming the missing features; "cpu": "cluster" and a
 *   domain that names no model run the baseline;
 * - rules: bad rules refused with their codes; keep-apart steers `ferry migrate` without
 *   a destination and `host evacuate` (to host3, although host2 has more room); an
 *   explicit move that breaks it is PLACEMENT_RULE, --ignore-rules says so (the HA
 *   restart's choice under a rule: cluster.test.ts, where a host is cut off anyway);
 * - the balancer: four domains on host1, a keep-apart rule added for two of them (its
 *   breach mended by the first move), moves off host1 only, none breaking a rule,
 *   applied, and a second run recommends nothing; the automatic mode evens host1 out by
 *   itself, and a domain it moved (held) is not moved again;
 * - the move policy: ten moves asked at once all finish, never more than two at a time
 *   out of host1 and one at a time into each destination (its incoming limit: a refused
 *   move waits in its source's line and asks again); the dashboard shows the line.
 * Guests that only need to exist are paused: a spinning pattern guest takes a core
 * under TCG, and ten of them would slow every move here.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { ferry, ok, fails, labUp, labDown, tmpFile, waitFor, consoleLog, startUi, ferrydLog } from '../helpers.ts';

const HOSTS = ['host1', 'host2', 'host3'];

/** A pattern guest on `host`, its config patched (a CPU model), running its pattern, or created paused (`create --paused`, as xm create -p). */
async function guest(
  name: string,
  host: string,
  memoryMiB: number,
  o: { patch?: Record<string, unknown>; paused?: boolean } = {},
): Promise<void> {
  const cfg = await ok(['lab', 'guest', 'pattern', name, '--json', '--memory', String(memoryMiB)]);
  const info = await ok([
    '-H',
    host,
    'create',
    tmpFile(`${name}.json`, { ...cfg, ...o.patch }),
    '--json',
    ...(o.paused ? ['--paused'] : []),
  ]);
  if (o.paused) assert.equal(info.state, 'paused');
  else await waitFor(`${name} ready`, () => consoleLog(host, name).includes('ferry-pattern ready'), 60000);
}

/** The host each domain runs on, by each host's own list. */
async function where(): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const h of HOSTS) {
    const l = await ferry(['-H', h, 'list', '--json']);
    if (l.code === 0) for (const d of l.json) if (d.state === 'running' || d.state === 'paused') out[d.name] = h;
  }
  return out;
}

async function quorate(host: string): Promise<boolean> {
  const r = await ferry(['-H', host, 'cluster', 'status', '--json']);
  return r.code === 0 && r.json.lease.quorate === true;
}

async function remove(...names: string[]): Promise<void> {
  const w = await where();
  for (const n of names) {
    if (!w[n]) continue;
    await ok(['-H', w[n], 'destroy', n]);
    await ok(['-H', w[n], 'delete', n]);
  }
}

describe('placement (lab, 3 hosts, cluster, host3 capped at Opteron_G3)', () => {
  before(async () => {
    await labUp([
      '--hosts',
      '3',
      '--cluster',
      '--cpu-ceiling',
      'host3=Opteron_G3',
      '--host-memory',
      '1024',
      '--moves-out',
      '2',
      '--moves-in',
      '1',
    ]);
    for (const h of HOSTS) await waitFor(`${h} in the cluster`, () => quorate(h), 30000, 250);
    // The balancer's domains start now: their CPU load needs a window of samples (15 s), which the CPU test fills.
    await Promise.all(['b1', 'b2', 'b3', 'b4'].map((n) => guest(n, 'host1', 128, { paused: true })));
  });
  after(async () => {
    await labDown();
  });

  test('CPU: the baseline, a model above host3 never placed there, refused in pre-flight naming the features', async () => {
    const cpu = await ok(['-H', 'host2', 'cluster', 'cpu', '--json']);
    assert.equal(cpu.baseline, 'Opteron_G2', JSON.stringify(cpu));
    assert.equal(cpu.hosts.find((h: any) => h.name === 'host3').ceiling, 'Opteron_G3');
    assert.ok(!cpu.common.includes('Nehalem'));
    await guest('n1', 'host1', 64, { patch: { cpu: 'Nehalem' }, paused: true });
    await guest('c1', 'host1', 64, { patch: { cpu: 'cluster' }, paused: true });
    assert.equal((await ok(['-H', 'host1', 'info', 'c1', '--json'])).cpuModel, 'Opteron_G2');
    // A domain that names no model gets the baseline too, as EVC gives every VM its mode.
    assert.equal((await ok(['-H', 'host1', 'info', 'b1', '--json'])).cpuModel, 'Opteron_G2');
    // Refused at the destination's pre-flight, before anything is reserved: n1 runs on.
    const r = await ferry(['-H', 'host1', 'migrate', 'n1', 'host3', '--json']);
    assert.equal(r.code, 8);
    assert.equal(r.json.error.code, 'MIGRATION_DEST_CPU');
    assert.match(r.json.error.message, /CPU model Nehalem, and host3 cannot give .*sse4\.1.*cpuCeiling Opteron_G3/);
    assert.equal((await where()).n1, 'host1');
    // host3 has the most room (nothing runs there), yet placement never picks it for n1.
    const m = await ok(['-H', 'host1', 'migrate', 'n1', '--json']);
    assert.equal(m.destination, 'host2');
    assert.equal(m.placement.to, 'host2');
    // The baseline runs anywhere: c1 goes to host3.
    assert.equal((await ok(['-H', 'host1', 'migrate', 'c1', '--json'])).destination, 'host3');
    await remove('n1', 'c1');
  });

  test('the balancer: moves off the loaded host only, none breaking a rule, and nothing more once applied', async () => {
    const added = await ok(['-H', 'host1', 'rule', 'add', 'split', '--keep-apart', 'b1', 'b2', '--json']);
    try {
      // Both run on host1: the rule is broken from the start, and the answer says so.
      assert.deepEqual(added.brokenNow, [
        'b1 on host1: keep-apart rule "split": b2 runs on host1',
        'b2 on host1: keep-apart rule "split": b1 runs on host1',
      ]);
      // A rule added on one host binds the others at once: they read etcd, not their watch's copy,
      // for an operator's request (a balance plan asked of host2 right after once broke it).
      assert.ok((await ok(['-H', 'host3', 'rule', 'list', '--json'])).some((r: { name: string }) => r.name === 'split'));
      // Load is an average over a window: wait until every domain has one (15 s of samples), and a dirty rate (one domain per 5 s).
      await waitFor(
        'a CPU load and a dirty rate for every domain',
        async () => {
          const b = await ok(['-H', 'host2', 'cluster', 'balance', '--json']);
          return b.cpuJudged && b.moves.length > 0 && b.moves.every((m: any) => m.dirtyRateMBps !== null);
        },
        40000,
        1000,
      );
      const plan = await ok(['-H', 'host2', 'cluster', 'balance', '--threshold', '15', '--json']);
      assert.ok(plan.moves.length >= 2, JSON.stringify(plan));
      assert.ok(
        plan.moves.every((m: any) => m.from === 'host1'),
        JSON.stringify(plan.moves),
      );
      // The new rule is broken where b1 and b2 run: the first move ends that, and none puts them on one host again.
      assert.ok(['b1', 'b2'].includes(plan.moves[0].domain), JSON.stringify(plan.moves));
      assert.match(plan.moves[0].why, /on host1 it breaks keep-apart rule "split": b[12] runs on host1/);
      assert.deepEqual(plan.broken, []);
      const after = new Map(['b1', 'b2', 'b3', 'b4'].map((n) => [n, 'host1']));
      for (const m of plan.moves) after.set(m.domain, m.to);
      assert.notEqual(after.get('b1'), after.get('b2'));
      assert.ok(
        plan.plan.every((m: any) => m.predictedMs !== null),
        "each move has the autopilot's predicted time",
      );
      // Paused guests dirty nothing: measured by QEMU's calc-dirty-rate, published with their host's facts.
      assert.ok(
        plan.moves.every((m: any) => m.dirtyRateMBps === 0),
        JSON.stringify(plan.moves),
      );
      const applied = await ok(['-H', 'host2', 'cluster', 'balance', '--threshold', '15', '--apply', '--json']);
      assert.ok(
        applied.plan.every((m: any) => m.outcome === 'succeeded'),
        JSON.stringify(applied.plan),
      );
      const w = await where();
      for (const m of applied.plan) assert.equal(w[m.domain], m.to);
      // Right after: balanced, no move back (the moved domains' CPU is not judged on one sample).
      const again = await ok(['-H', 'host3', 'cluster', 'balance', '--threshold', '15', '--json']);
      assert.deepEqual(again.moves, []);
    } finally {
      // Removed even when an assertion above fails: the later tests list the rules.
      await ok(['-H', 'host1', 'rule', 'remove', 'split']);
    }
  });

  test('the automatic balancer: moves off the loaded host by itself, and never moves a held domain again', async () => {
    const B = ['b1', 'b2', 'b3', 'b4'];
    /** Every b on host1 again (operator moves), so host1 holds half its memory against a mean of a sixth. */
    const gather = async (): Promise<void> => {
      const w = await where();
      for (const n of B) if (w[n] !== 'host1') await ok(['-H', w[n], 'migrate', n, 'host1', '--json']);
    };
    const movesOf = async (): Promise<any[]> =>
      (await ok(['-H', 'host2', 'events', '--json', '--limit', '200'])).filter((e: any) => e.type === 'balance-move');
    await gather();
    // The moves --apply made above hold their domains too (a balancer's move, whoever asked).
    const appliedHeld = (await ok(['-H', 'host2', 'cluster', 'balance', '--json'])).held.map((h: any) => h.domain);
    assert.ok(appliedHeld.length >= 2 && appliedHeld.length < 4, JSON.stringify(appliedHeld));
    const free = B.filter((n) => !appliedHeld.includes(n));
    const set = await ok([
      '-H',
      'host3',
      'cluster',
      'balance',
      '--auto',
      'on',
      '--threshold',
      '15',
      '--hold',
      '600',
      '--interval',
      '5',
      '--json',
    ]);
    try {
      assert.deepEqual(set, { mode: 'auto', threshold: 15, holdSeconds: 600, intervalSeconds: 5, setting: true });
      // Held: moved by a balancer within its hold; only the others may go, and they do (host1 at 50% is far above mean 17% + 15).
      let w: Record<string, string> = {};
      await waitFor(
        'the automatic balancer to move the domains without a hold off host1',
        async () => {
          w = await where();
          return free.every((n) => w[n] && w[n] !== 'host1');
        },
        60000,
        1000,
      );
      const moved = B.filter((n) => w[n] !== 'host1');
      assert.ok(
        moved.every((n) => free.includes(n)),
        `moved ${moved}, but only ${free} were free of a hold`,
      );
      // Each move is in the event log and now held where it went, for the setting's hold time.
      const ev = await movesOf();
      for (const n of moved)
        assert.ok(
          ev.some((e: any) => e.domain === n && e.host === 'host1'),
          `${n}: ${JSON.stringify(ev)}`,
        );
      const b = await ok(['-H', 'host2', 'cluster', 'balance', '--json']);
      assert.equal(b.auto.mode, 'auto');
      for (const n of moved) {
        const h = b.held.find((x: any) => x.domain === n);
        assert.deepEqual([h?.from, h?.to, h?.holdSeconds], ['host1', w[n], 600]);
      }
      // All four held now: back on host1 by hand, none moves again, although host1 is far above the threshold.
      await gather();
      const before = ev.length;
      await new Promise((r) => setTimeout(r, 12000)); // two rounds of the 5 s interval
      const w2 = await where();
      assert.deepEqual(
        B.filter((n) => w2[n] !== 'host1'),
        [],
        'held domains must stay where they are',
      );
      assert.equal((await movesOf()).length, before, 'no balance move after the gather');
      const stuck = await ok(['-H', 'host1', 'cluster', 'balance', '--json']);
      assert.deepEqual(stuck.moves, []);
      assert.match(stuck.stuck, /host1 above the threshold/);
    } finally {
      const off = await ok(['-H', 'host1', 'cluster', 'balance', '--auto', 'off', '--json']);
      assert.equal(off.mode, 'off');
    }
    await fails(['-H', 'host1', 'cluster', 'balance', '--auto', 'maybe'], 'CLI_USAGE', 2);
    await remove(...B);
  });

  test('rules: bad ones refused; keep-apart steers migrate and evacuate; an explicit break is PLACEMENT_RULE unless --ignore-rules', async () => {
    await guest('a1', 'host1', 64, { paused: true });
    await guest('a2', 'host2', 64, { paused: true });
    // host3 holds the most, so by memory alone host2 would be every placement's choice.
    await guest('big', 'host3', 384, { paused: true });
    await fails(['-H', 'host1', 'rule', 'add', 'x', '--keep-apart', 'a1', 'nosuch'], 'RULE_UNKNOWN_DOMAIN', 3);
    await fails(['-H', 'host1', 'rule', 'add', 'x', '--avoid-hosts', 'host9', '--domains', 'a1'], 'RULE_UNKNOWN_HOST', 3);
    await fails(['-H', 'host1', 'rule', 'add', 'x', '--keep-apart', 'a1'], 'RULE_INVALID', 2);
    await fails(['-H', 'host1', 'rule', 'add', 'x', '--keep-apart', 'a1', 'a2', '--keep-together', 'a1', 'a2'], 'CLI_USAGE', 2);
    const added = await ok(['-H', 'host1', 'rule', 'add', 'spread', '--keep-apart', 'a1', 'a2', '--json']);
    assert.deepEqual([added.kind, added.domains], ['keep-apart', ['a1', 'a2']]);
    await fails(['-H', 'host2', 'rule', 'add', 'pair', '--keep-together', 'a1', 'a2'], 'RULE_CONTRADICTS', 3);
    await fails(['-H', 'host2', 'rule', 'add', 'spread', '--keep-apart', 'a1', 'big'], 'RULE_EXISTS', 3);
    await fails(['-H', 'host2', 'rule', 'remove', 'nosuch'], 'RULE_NOT_FOUND', 3);
    // Nothing stored by the refusals; every host reads the same rules.
    for (const h of HOSTS)
      assert.deepEqual(
        (await ok(['-H', h, 'rule', 'list', '--json'])).map((r: any) => r.name),
        ['spread'],
      );

    // An explicit move that breaks the rule: refused, nothing moved.
    const refused = await fails(['-H', 'host1', 'migrate', 'a1', 'host2'], 'PLACEMENT_RULE', 8);
    assert.match(refused.json.error.message, /keep-apart rule "spread": a2 runs on host2/);
    assert.equal((await where()).a1, 'host1');
    // Without a destination, placement picks host3 (host2 has more room) and says why.
    const plan = await ok(['-H', 'host1', 'migrate', 'a1', '--plan', '--json']);
    assert.equal(plan.placement.to, 'host3');
    // --ignore-rules moves a2 next to a1 anyway, and the report names the rule it broke.
    const forced = await ok(['-H', 'host2', 'migrate', 'a2', 'host1', '--ignore-rules', '--json']);
    assert.equal(forced.outcome, 'succeeded');
    assert.match(forced.rulesIgnored.join(), /keep-apart rule "spread": a1 runs on host1/);
    assert.equal((await ok(['-H', 'host1', 'migrate', 'a2', 'host2', '--json'])).outcome, 'succeeded');
    // Evacuating host1: a1 to host3, not to the roomier host2 where a2 runs.
    const ev = await ok(['host', 'evacuate', 'host1', '--json']);
    assert.equal(ev.outcome, 'done', JSON.stringify(ev.domains));
    assert.equal(ev.domains.find((d: any) => d.domain === 'a1').to, 'host3', JSON.stringify(ev.domains));
    const w = await where();
    assert.deepEqual([w.a1, w.a2], ['host3', 'host2']);
    await ok(['-H', 'host1', 'host', 'maintenance', 'host1', 'off']);
    await ok(['-H', 'host1', 'rule', 'remove', 'spread']);
    assert.deepEqual(await ok(['-H', 'host2', 'rule', 'list', '--json']), []);
    await remove('a1', 'a2', 'big');
  });

  test('ten moves asked at once: they queue, all finish, never more than two out of host1 at a time', async () => {
    const names = Array.from({ length: 10 }, (_, i) => `q${i + 1}`);
    await Promise.all(names.map((n) => guest(n, 'host1', 32, { paused: true })));
    // The dashboard shows the line too (from host1's published facts, through one ferryd's etcd watch).
    const { child: ui, url } = await startUi(['--listen', '127.0.0.1:0']);
    try {
      const token = new URL(url).searchParams.get('token')!;
      const state = async (): Promise<any> => (await fetch(`${new URL(url).origin}/api/state?token=${token}`)).json();
      const moves = names.map((n, i) => ferry(['-H', 'host1', 'migrate', n, i % 2 ? 'host3' : 'host2', '--json'], { timeoutMs: 300000 }));
      // While they run: the rest wait in line, each with its place and an ETA, in `ferry jobs` and on the dashboard.
      const [line, shown] = await Promise.all([
        waitFor(
          'moves waiting in line',
          async () => {
            const j = await ok(['-H', 'host1', 'jobs', '--json']);
            const q = j.filter((x: any) => x.phase === 'queued');
            return q.length >= 3 ? q : null;
          },
          20000,
          100,
        ),
        waitFor(
          'the dashboard showing moves in line',
          async () => {
            const st = await state();
            const q = st.queue.filter((x: any) => x.state === 'queued');
            return q.length >= 2 ? st : null;
          },
          20000,
          100,
        ),
      ]);
      assert.ok(
        line.every((x: any) => x.queue.etaMs > 0 && x.queue.position >= 1),
        JSON.stringify(line),
      );
      const waiting = shown.queue.filter((x: any) => x.state === 'queued');
      assert.ok(
        waiting.every(
          (x: any) => x.host === 'host1' && names.includes(x.domain) && x.position >= 1 && x.etaMs > 0 && x.priority === 'operator',
        ),
        JSON.stringify(waiting),
      );
      assert.ok(shown.queue.filter((x: any) => x.state === 'running').length <= 2, JSON.stringify(shown.queue));
      // The last in line: the dashboard reads the hosts' lines and the cluster's records one
      // after the other, and the first in line may start moving between the two reads.
      const last = waiting.reduce((a: any, b: any) => (b.position > a.position ? b : a));
      const row = shown.domains.find((d: any) => d.name === last.domain);
      assert.match(row.state, new RegExp(`^queued #${last.position} → host[23] \\(operator\\)$`));
      const done = await Promise.all(moves);
      for (const r of done) assert.equal(r.json?.outcome, 'succeeded', r.stdout || r.stderr);
      // From the jobs' own phase history: at most two between begin and the end, at any moment.
      const jobs = (await ok(['-H', 'host1', 'jobs', '--json'])).filter((j: any) => names.includes(j.domain) && j.role === 'source');
      assert.equal(jobs.length, 10);
      const spans = jobs.map((j: any) => [j.history[0].at, j.history[j.history.length - 1].at]);
      const most = Math.max(...spans.map(([s]: number[]) => spans.filter(([a, b]: number[]) => a <= s && s < b).length));
      assert.ok(most <= 2, `${most} moves at once: ${JSON.stringify(spans)}`);
      assert.ok(most === 2, 'two at a time, not one: the limit is used');
      // Each destination takes one at a time into its limit (incomingTotal 1): the second move to it
      // was refused busy and waited in host1's line, and no try left a job behind.
      for (const h of ['host2', 'host3']) {
        const inc = (await ok(['-H', h, 'jobs', '--json'])).filter((j: any) => names.includes(j.domain) && j.role === 'destination');
        assert.equal(inc.length, 5, `${h}: ${inc.map((j: any) => j.domain)}`);
        // Counted as the limit counts them: from Begin until the destination leaves "prepared" (Finish).
        const sp = inc.map((j: any) => [j.history[0].at, j.history.find((x: any) => x.phase !== 'begun' && x.phase !== 'prepared').at]);
        const top = Math.max(...sp.map(([s]: number[]) => sp.filter(([a, b]: number[]) => a <= s && s < b).length));
        assert.equal(top, 1, `${h} took ${top} at once: ${JSON.stringify(sp)}`);
      }
      assert.match(ferrydLog('host1'), /destination busy; the move waits in line/);
    } finally {
      ui.kill('SIGTERM');
    }
    await remove(...names);
  });
});
