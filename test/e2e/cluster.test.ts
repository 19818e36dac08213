/**
 * Cluster mode in a 3-host lab (`ferry lab up --cluster`: an etcd member in every
 * host, mutual TLS):
 * - host1's links cut while it runs an HA domain and a non-HA one: the HA domain runs
 *   again on another host (the one its keep-apart rule allows), once, and host1's copy stopped before the new one started
 *   (process exit and start times, read from /proc by the test, not from ferry); the
 *   non-HA domain runs on on host1; host1 back does not start the HA domain again;
 * - the control channel cut at the point of no return: the move settles from the
 *   ownership record at once (no `job resolve`), on exactly one host;
 * - one etcd member killed: starts and moves work; two: they are refused with
 *   CLUSTER_NO_QUORUM, the non-HA domain runs on, the HA domain is fenced, and once
 *   etcd is back it runs again where it was.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
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
  inNs,
  domainRecord,
  patternIntact,
  scrape,
  metricValue,
  startUi,
} from '../helpers.ts';

/** Milliseconds since boot, on the clock /proc/PID/stat's start times use (CLOCK_MONOTONIC without suspend). */
const bootMs = (): number => Number(process.hrtime.bigint() / 1000000n);
/** When a process started, in ms since boot (10 ms ticks, rounded down). */
function startedMs(pid: number): number {
  const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  return Number(st.slice(st.lastIndexOf(')') + 2).split(' ')[19]) * 10;
}

/** Polls a pid every 5 ms; `exitedBy()` is a time (ms since boot) by which it had exited, or null while it runs. */
function watchExit(pid: number): { exitedBy: () => number | null; stop: () => void } {
  let at: number | null = null;
  const t = setInterval(() => {
    if (at === null && !pidAlive(pid)) at = bootMs();
  }, 5);
  return { exitedBy: () => at, stop: () => clearInterval(t) };
}

/** Where domain `name` runs (state running), by each host's own list. */
async function runningOn(name: string, hosts = ['host1', 'host2', 'host3']): Promise<{ host: string; pid: number }[]> {
  const on: { host: string; pid: number }[] = [];
  for (const h of hosts) {
    const l = await ferry(['-H', h, 'list', '--json']);
    if (l.code !== 0) continue;
    if (l.json.some((d: any) => d.name === name && d.state === 'running'))
      on.push({ host: h, pid: (await ok(['-H', h, 'info', name, '--json'])).pid });
  }
  return on;
}

/** The highest raft term among the etcd members `host` reaches. */
async function etcdTerm(host: string): Promise<number> {
  const st = await ok(['-H', host, 'cluster', 'status', '--json']);
  return Math.max(...st.etcd.filter((e: any) => e.ok).map((e: any) => e.term));
}

/** The cluster's event log, one line per event (for a failed assertion's message). */
async function eventsTold(): Promise<string> {
  const r = await ferry(['-H', 'host1', 'events', '--json', '--limit', '60']);
  return r.code === 0 ? r.json.map((e: any) => `${e.at} ${e.by} ${e.type} ${e.detail}`).join('\n') : `(no events: ${r.stderr})`;
}

async function quorate(host: string): Promise<boolean> {
  const r = await ferry(['-H', host, 'cluster', 'status', '--json']);
  return r.code === 0 && r.json.lease.quorate === true;
}

describe('cluster mode (lab, 3 hosts, etcd)', () => {
  before(async () => {
    await labUp(['--hosts', '3', '--cluster']);
    for (const h of ['host1', 'host2', 'host3']) await waitFor(`${h} in the cluster`, () => quorate(h), 30000, 250);
  });
  after(async () => {
    await labDown();
  });

  test('standalone verbs on a cluster host, and bad input: each a stable code, nothing changed', async () => {
    const st = await ok(['-H', 'host2', 'cluster', 'status', '--json']);
    assert.equal(st.mode, 'cluster');
    assert.equal(st.etcd.length, 3);
    assert.ok(
      st.etcd.every((e: any) => e.ok),
      JSON.stringify(st.etcd),
    );
    assert.deepEqual(st.hosts.map((h: any) => h.name).sort(), ['host1', 'host2', 'host3']);
    assert.ok(st.haManager, 'an HA manager is elected');
    await fails(['-H', 'host1', 'ha', 'add', 'nosuch'], 'DOMAIN_NOT_FOUND', 3);
    await fails(['-H', 'host1', 'ha', 'add', 'x', '--priority', 'high'], 'API_BAD_REQUEST', 2);
    // etcd itself refuses a client without a certificate of the cluster's CA (mutual TLS).
    const s = labState();
    const plain = inNs(
      'client',
      ['etcdctl', `--endpoints=${s.cluster.endpoints[0]}`, '--insecure-skip-tls-verify', 'get', '/ferry/', '--prefix'],
      10000,
    );
    assert.notEqual(plain.code, 0, 'no client certificate, no answer');
  });

  test('host1 cut off: its HA domain runs once elsewhere (where its placement rule allows), after host1 stopped it; the non-HA one runs on; host1 back does not start it', async () => {
    await createGuest('pattern', 'ha1', 'host1');
    await createGuest('pattern', 'solo', 'host1');
    // A keep-apart rule decides where ha1 restarts: by memory alone host2 would take it
    // (host3 holds a larger domain), but ha1 must not join `anchor` there.
    await createGuest('pattern', 'anchor', 'host2', 64);
    await createGuest('pattern', 'ballast', 'host3', 512);
    for (const [h, d] of [
      ['host2', 'anchor'],
      ['host3', 'ballast'],
    ])
      await ok(['-H', h, 'pause', d, '--json']);
    await ok(['-H', 'host2', 'rule', 'add', 'spread', '--keep-apart', 'ha1', 'anchor', '--json']);
    const added = await ok(['-H', 'host2', 'ha', 'add', 'ha1', '--priority', '3', '--json']);
    assert.equal(added.owner, 'host1');
    assert.deepEqual(added.ha, { priority: 3 });
    const haPid = (await ok(['-H', 'host1', 'info', 'ha1', '--json'])).pid;
    const soloPid = (await ok(['-H', 'host1', 'info', 'solo', '--json'])).pid;
    const exit = watchExit(haPid);
    const soloExit = watchExit(soloPid);
    await ok(['lab', 'link', 'host1', 'down']);
    let moved: { host: string; pid: number };
    try {
      moved = await waitFor(
        'ha1 running elsewhere',
        async () => {
          const on = await runningOn('ha1', ['host2', 'host3']);
          return on.length ? on[0] : null;
        },
        60000,
        200,
      );
      assert.equal(moved.host, 'host3', 'the keep-apart rule kept ha1 off host2');
      const by = exit.exitedBy();
      assert.ok(by !== null, "host1's copy of ha1 still runs while another host runs it");
      const started = startedMs(moved.pid);
      assert.ok(by < started, `host1's copy exited by ${by} ms, the new one started at ${started} ms (since boot)`);
      // Once: exactly one other host, and it stays so.
      await new Promise((r) => setTimeout(r, 3000));
      assert.deepEqual(
        (await runningOn('ha1', ['host2', 'host3'])).map((x) => x.host),
        [moved.host],
      );
      // The non-HA domain never stopped on host1.
      assert.equal(soloExit.exitedBy(), null, 'solo kept running on host1');
      assert.ok(pidAlive(soloPid));
      await patternIntact('host1', 'solo', soloPid);
    } finally {
      await ok(['lab', 'link', 'host1', 'up']);
      exit.stop();
      soloExit.stop();
    }
    await waitFor('host1 back in the cluster', () => quorate('host1'), 30000, 250);
    await new Promise((r) => setTimeout(r, 2000));
    // host1 learned from etcd that ha1 is no longer its own: no copy there, and one in the cluster.
    const l1 = await ok(['-H', 'host1', 'list', '--json']);
    assert.ok(!l1.some((d: any) => d.name === 'ha1'), JSON.stringify(l1));
    assert.deepEqual(
      (await runningOn('ha1')).map((x) => x.host),
      [moved.host],
    );
    const all = await ok(['-H', 'host1', 'list', '--all', '--json']);
    const rec = all.find((d: any) => d.name === 'ha1');
    assert.equal(rec.owner, moved.host);
    assert.equal(rec.state, 'running');
    assert.equal(all.find((d: any) => d.name === 'solo').owner, 'host1');
    const ev = await ok(['-H', 'host3', 'events', '--json', '--limit', '100']);
    const types = ev.filter((e: any) => e.domain === 'ha1' || e.host === 'host1').map((e: any) => e.type);
    const told = ev.map((e: any) => `${e.at} ${e.by} ${e.type} ${e.detail}`).join('\n');
    for (const t of ['fenced', 'host-down', 'restarted', 'stale-copy']) assert.ok(types.includes(t), `event ${t} in:\n${told}`);
    // Restarted once: one "restarted" event for ha1.
    assert.equal(ev.filter((e: any) => e.domain === 'ha1' && e.type === 'restarted').length, 1, told);
    await ok(['lab', 'verify', 'ha1']);
    await ok(['-H', moved.host, 'destroy', 'ha1']);
    await ok(['-H', moved.host, 'delete', 'ha1']);
    await ok(['-H', 'host1', 'rule', 'remove', 'spread']);
    for (const [h, d] of [
      ['host2', 'anchor'],
      ['host3', 'ballast'],
    ]) {
      await ok(['-H', h, 'destroy', d]);
      await ok(['-H', h, 'delete', d]);
    }
  });

  test('host2 cut off with its ferryd frozen: the watchdog fences the HA domain before it runs elsewhere', async () => {
    await createGuest('pattern', 'ha3', 'host2');
    await ok(['-H', 'host2', 'ha', 'add', 'ha3']);
    // The watchdog is fed at every renewal (2.5 s): one feed with ha3 among its targets.
    await new Promise((r) => setTimeout(r, 3000));
    const pid = (await ok(['-H', 'host2', 'info', 'ha3', '--json'])).pid;
    const exit = watchExit(pid);
    const ferryd = labState().hosts[1].pid;
    process.kill(ferryd, 'SIGSTOP');
    let moved: { host: string; pid: number };
    let termBefore = 0;
    try {
      await ok(['lab', 'link', 'host2', 'down']);
      moved = await waitFor(
        'ha3 running elsewhere',
        async () => {
          const on = await runningOn('ha3', ['host1', 'host3']);
          return on.length ? on[0] : null;
        },
        60000,
        200,
      );
      const by = exit.exitedBy();
      assert.ok(by !== null && by < startedMs(moved.pid), `host2's copy exited by ${by}, the new one started at ${startedMs(moved.pid)}`);
      const wlog = fs.readFileSync(`${labState().hosts[1].stateDir}/watchdog.log`, 'utf8');
      assert.match(wlog, new RegExp(`fenced: killed QEMU pid ${pid}\\b`), 'the watchdog, not the frozen ferryd, killed it');
      // The raft term the others settled on without host2 (its etcd member is cut off too).
      termBefore = await etcdTerm('host1');
    } finally {
      process.kill(ferryd, 'SIGCONT');
      await ok(['lab', 'link', 'host2', 'up']);
      exit.stop();
    }
    await waitFor('host2 back in the cluster', () => quorate('host2'), 30000, 250);
    await new Promise((r) => setTimeout(r, 2000));
    // host2's etcd member came back without an election (pre-vote): a partitioned member that
    // campaigned alone returned with a higher term and deposed the leader, and the cluster was
    // leaderless long enough for moved.host to fence ha3 (CI, stop 37).
    const st = (await ok(['-H', 'host1', 'cluster', 'status', '--json'])).etcd;
    assert.deepEqual(
      st.map((e: any) => e.term),
      st.map(() => termBefore),
      `every member at term ${termBefore}: ${JSON.stringify(st)}`,
    );
    assert.ok(!(await ok(['-H', 'host2', 'list', '--json'])).some((d: any) => d.name === 'ha3'), 'host2 dropped its copy');
    assert.deepEqual(
      (await runningOn('ha3')).map((x) => x.host),
      [moved.host],
      await eventsTold(),
    );
    await ok(['-H', moved.host, 'destroy', 'ha3']);
    await ok(['-H', moved.host, 'delete', 'ha3']);
  });

  test('the control channel cut at the point of no return: settled from the ownership record at once, on one host', async () => {
    const pid = (await ok(['-H', 'host1', 'info', 'solo', '--json'])).pid;
    const m = ferry(['-H', 'host1', 'migrate', 'solo', 'host2', '--bandwidth', '16', '--json'], { timeoutMs: 120000 });
    await waitFor(
      'transfer under way',
      async () => {
        const j = await ok(['-H', 'host1', 'job', 'solo', '--json']);
        return j.phase === 'perform' && j.progress && j.progress.transferred > 4 * 1024 * 1024;
      },
      30000,
      200,
    );
    const [h1] = labState().hosts;
    const rule = ['INPUT', '-p', 'tcp', '-s', h1.migAddress, '--dport', '8002', '-j', 'REJECT', '--reject-with', 'tcp-reset'];
    assert.equal(inNs('host2', ['iptables', '-I', ...rule]).code, 0);
    try {
      await waitFor('finish', async () => (await ok(['-H', 'host1', 'job', 'solo', '--json'])).phase !== 'perform', 60000, 100);
      const t0 = Date.now();
      const r = await m;
      // Not unresolved, no operator: the record still named host1 (host2 never took it), so host1 took the move back.
      assert.equal(r.json.outcome, 'failed', JSON.stringify(r.json));
      assert.match(JSON.stringify(r.json), /cluster record/);
      assert.ok(Date.now() - t0 < 15000, `settled in ${Date.now() - t0} ms`);
      assert.deepEqual(
        (await runningOn('solo')).map((x) => x.host),
        ['host1'],
      );
      assert.equal((await ok(['-H', 'host1', 'info', 'solo', '--json'])).pid, pid);
      const rec = (await ok(['-H', 'host3', 'list', '--all', '--json'])).find((d: any) => d.name === 'solo');
      assert.equal(rec.owner, 'host1');
    } finally {
      inNs('host2', ['iptables', '-D', ...rule]);
    }
    // host2 never got Finish: it abandons at its deadline, and nothing of solo stays there.
    await waitFor('host2 cleaned up', () => domainRecord('host2', 'solo') === undefined, 60000, 500);
    await patternIntact('host1', 'solo', pid);
    // The next move goes through: the handover is etcd's transaction, and the record follows.
    await ok(['-H', 'host1', 'migrate', 'solo', 'host2', '--live', '--timeout', '20', '--on-timeout', 'suspend']);
    const rec = (await ok(['-H', 'host3', 'list', '--all', '--json'])).find((d: any) => d.name === 'solo');
    assert.equal(rec.owner, 'host2');
    assert.deepEqual(
      (await runningOn('solo')).map((x) => x.host),
      ['host2'],
    );
    await ok(['lab', 'verify', 'solo']);
  });

  test('one etcd member down: starts and moves work; two: refused with CLUSTER_NO_QUORUM, HA fenced, the rest runs on', async () => {
    await createGuest('pattern', 'ha2', 'host3');
    await ok(['-H', 'host3', 'ha', 'add', 'ha2']);
    const s = labState();
    const etcdOf = (h: string): number => s.hosts.find((x: any) => x.name === h).etcdPid;
    process.kill(etcdOf('host1'), 'SIGKILL');
    await waitFor('etcd on host1 gone', () => !pidAlive(etcdOf('host1')), 5000, 50);
    // Quorum of 2 out of 3: business as usual.
    await createGuest('pattern', 'late', 'host1');
    await ok(['-H', 'host1', 'migrate', 'late', 'host3', '--live', '--timeout', '20', '--on-timeout', 'suspend']);
    const solo = (await runningOn('solo'))[0];
    const ha2Pid = (await ok(['-H', 'host3', 'info', 'ha2', '--json'])).pid;
    const ha2Exit = watchExit(ha2Pid);
    process.kill(etcdOf('host2'), 'SIGKILL');
    const cutAt = bootMs();
    try {
      await waitFor('etcd on host2 gone', () => !pidAlive(etcdOf('host2')), 5000, 50);
      // No quorum: nothing new starts or moves.
      await fails(['-H', 'host3', 'migrate', 'late', 'host1', '--live'], 'CLUSTER_NO_QUORUM', 10);
      await ok(['-H', 'host3', 'pause', 'late']);
      await fails(['-H', 'host3', 'unpause', 'late'], 'CLUSTER_NO_QUORUM', 10);
      const cfg = await ok(['lab', 'guest', 'pattern', 'nope', '--json']);
      const f = `/tmp/ferry-cluster-nope-${process.pid}.json`;
      fs.writeFileSync(f, JSON.stringify(cfg));
      try {
        await fails(['-H', 'host2', 'create', f], 'CLUSTER_NO_QUORUM', 10);
      } finally {
        fs.rmSync(f, { force: true });
      }
      assert.ok(!(await ok(['-H', 'host2', 'list', '--json'])).some((d: any) => d.name === 'nope'), 'a refused create leaves nothing');
      // The HA domain is fenced within the lease TTL (10 s); the others run on.
      await waitFor('ha2 fenced', () => ha2Exit.exitedBy(), 15000, 100);
      assert.ok(ha2Exit.exitedBy()! - cutAt < 10000, `fenced ${ha2Exit.exitedBy()! - cutAt} ms after quorum was lost`);
      const info = await ok(['-H', 'host3', 'info', 'ha2', '--json']);
      assert.equal(info.state, 'shutoff');
      // The metrics say so too, from what ferryd holds (no etcd request per scrape).
      assert.equal(metricValue(scrape(s.hosts[2].migAddress), 'ferry_cluster_quorate{host="host3"}'), 0);
      await new Promise((r) => setTimeout(r, 2000));
      assert.ok(pidAlive(solo.pid), 'the non-HA domain runs on');
      assert.equal((await ok(['-H', 'host3', 'info', 'late', '--json'])).state, 'paused');
    } finally {
      ha2Exit.stop();
      await ok(['lab', 'etcd-start', 'host1']);
      await ok(['lab', 'etcd-start', 'host2']);
    }
    for (const h of ['host1', 'host2', 'host3']) await waitFor(`${h} quorate again`, () => quorate(h), 30000, 250);
    // The lease outlived the outage (etcd expires none without a leader): ha2 runs again where it was, once.
    await waitFor('ha2 running again', async () => (await runningOn('ha2')).length === 1, 30000, 250);
    assert.deepEqual(
      (await runningOn('ha2')).map((x) => x.host),
      ['host3'],
    );
    await ok(['-H', 'host3', 'unpause', 'late']);
    await ok(['lab', 'verify', 'late']);
    // Every host reports the whole cluster: quorate, one HA manager among them, ha2 running and marked.
    const pages = s.hosts.map((h: any) => ({ name: h.name, text: scrape(h.migAddress) }));
    for (const p of pages) assert.equal(metricValue(p.text, `ferry_cluster_quorate{host="${p.name}"}`), 1, p.name);
    assert.equal(
      pages.reduce(
        (n: number, p: { name: string; text: string }) => n + metricValue(p.text, `ferry_cluster_ha_manager{host="${p.name}"}`),
        0,
      ),
      1,
      'one HA manager',
    );
    assert.ok(metricValue(pages[0].text, 'ferry_cluster_domains{host="host1",state="running",ha="yes"}') >= 1, pages[0].text);
    await patternIntact(solo.host, 'solo', solo.pid);
  });

  test('the fleet seen whole: list --all, the dashboard and host evacuate read the etcd watches; evacuation moves an HA domain by handover', async () => {
    // The dashboard asks one ferryd's watch for the fleet, and hears cluster.changed when it changes.
    const { child: ui, url } = await startUi(['--listen', '127.0.0.1:0']);
    const sse = new AbortController();
    try {
      const token = new URL(url).searchParams.get('token')!;
      const api = (p: string): string => `${new URL(url).origin}${p}?token=${token}`;
      const state = async (): Promise<any> => (await fetch(api('/api/state'))).json();
      const before = await state();
      assert.equal(before.mode, 'cluster');
      assert.equal(before.quorate, true);
      assert.deepEqual(
        before.hosts.map((h: any) => h.name),
        ['host1', 'host2', 'host3'],
      );
      const row = (st: any, n: string): any => st.domains.find((d: any) => d.name === n);
      assert.equal(row(before, 'ha2').host, 'host3');
      assert.deepEqual(row(before, 'ha2').ha, { priority: 0 });
      let heard = '';
      const stream = await fetch(api('/api/events'), { signal: sse.signal });
      void (async () => {
        for await (const chunk of stream.body as any) heard += Buffer.from(chunk).toString();
      })().catch(() => undefined);

      // Placement from host3's watch: a --to host without a lease is named, not asked.
      const plan = await ok(['host', 'evacuate', 'host3', '--plan', '--to', 'host1', '--to', 'host9', '--json']);
      assert.equal(plan.outcome, 'planned');
      assert.ok(
        plan.domains.every((d: any) => d.to === 'host1'),
        JSON.stringify(plan.domains),
      );
      assert.match(plan.unreachable.join(), /host9 \(no live cluster lease/);
      // The evacuation itself: each move's handover is etcd's transaction, HA mark kept.
      const rep = await ok(['host', 'evacuate', 'host3', '--json'], { timeoutMs: 240000 });
      assert.equal(rep.outcome, 'done', JSON.stringify(rep.domains));
      const all = await ok(['-H', 'host1', 'list', '--all', '--json']);
      for (const d of rep.domains) {
        assert.equal(d.state, 'moved');
        const rec = all.find((r: any) => r.name === d.domain);
        assert.equal(rec.owner, d.to, `${d.domain}'s record names where it went`);
        assert.deepEqual(
          (await runningOn(d.domain)).map((x) => x.host),
          [d.to],
        );
      }
      assert.deepEqual(all.find((r: any) => r.name === 'ha2').ha, { priority: 0 }, 'the HA mark moved with it');
      await waitFor('cluster.changed reached the dashboard', () => heard.includes('event: cluster.changed'), 10000, 100);
      const after = await waitFor(
        'the dashboard shows the new owners',
        async () => {
          const st = await state();
          return rep.domains.every((d: any) => row(st, d.domain)?.host === d.to) ? st : null;
        },
        10000,
        200,
      );
      assert.equal(after.hosts.find((h: any) => h.name === 'host3').maintenance.on, true);
    } finally {
      sse.abort();
      ui.kill('SIGTERM');
      await ok(['host', 'maintenance', 'host3', 'off']);
    }
  });

  test('an HA domain whose QEMU dies on a live host restarts there, through a claim', async () => {
    const [at] = await runningOn('ha2');
    assert.ok(at, 'ha2 runs somewhere');
    const killedAt = bootMs();
    process.kill(at.pid, 'SIGKILL');
    const again = await waitFor(
      'ha2 running again',
      async () => {
        const on = await runningOn('ha2');
        return on.length === 1 && on[0].pid !== at.pid ? on[0] : null;
      },
      30000,
      200,
    );
    assert.equal(again.host, at.host, 'restarted where it crashed: its host is alive');
    assert.ok(startedMs(again.pid) >= killedAt - 10, 'a new QEMU, started after the old one died');
    const rec = (await ok(['-H', 'host1', 'list', '--all', '--json'])).find((d: any) => d.name === 'ha2');
    assert.equal(rec.owner, at.host);
    assert.equal(rec.state, 'running');
    const ev = await ok(['-H', 'host2', 'events', '--json', '--limit', '20']);
    assert.ok(
      ev.some((e: any) => e.domain === 'ha2' && e.type === 'restarted' && /after its QEMU died/.test(e.detail)),
      JSON.stringify(ev.slice(-5)),
    );
    await patternIntact(again.host, 'ha2', again.pid);
  });
});
