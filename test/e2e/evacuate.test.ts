/**
 * `ferry host evacuate`, maintenance and metrics, for real in a 3-host lab: host1's four
 * domains (a Linux guest with a client's TCP connection open to it, and three pattern
 * guests) leave it live, the evacuation is interrupted once and run again, nothing is
 * lost, and host1 stays empty in maintenance. A domain that cannot move is reported with
 * its reason while the others move, and --include-stopped moves a shut-off domain's
 * definition too. The metrics' histogram counts move with the moves. Standalone placement
 * rules: on every host, honoured by migrate and evacuate.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import {
  ok,
  fails,
  ferry,
  labUp,
  labDown,
  createGuest,
  tmpFile,
  inNs,
  guestStatus,
  echoClient,
  waitFor,
  FERRY,
  echoWhole,
  domainRecord,
  labState,
  ROOT,
  scrape,
  metricValue as value,
} from '../helpers.ts';

/**
 * Where each domain runs. A move under way lists it on both ends: it counts where its guest
 * runs, the source (`migrating-out`), not where QEMU waits for the stream (`incoming`).
 */
const where = async (): Promise<Record<string, string>> => {
  const out: Record<string, string> = {};
  for (const h of ['host1', 'host2', 'host3'])
    for (const d of await ok(['-H', h, 'list', '--json'])) if (d.id !== null && d.state !== 'incoming') out[d.name] = h;
  return out;
};
/** Domains whose guest still runs on host1 (one call, so a poll notices a departure quickly). */
const onHost1 = async (): Promise<number> =>
  (await ok(['-H', 'host1', 'list', '--json'])).filter((d: any) => d.id !== null && d.state !== 'incoming').length;

describe('host evacuation, maintenance and metrics (lab)', () => {
  let ip = '';
  let bootId = '';
  let before0 = '';
  before(async () => {
    await labUp(['--hosts', '3', '--host-memory', '512']);
    const cfg = await createGuest('linux', 'web', 'host1');
    ip = cfg.nics[0].ip.split('/')[0];
    bootId = guestStatus(ip).bootId;
    await createGuest('pattern', 'p1', 'host1', 64);
    await createGuest('pattern', 'p2', 'host1', 96);
    await createGuest('pattern', 'p3', 'host1', 64);
    before0 = scrape('198.19.0.11');
  });
  after(async () => {
    await labDown();
  });

  test('standalone placement rules: kept on every host, honoured by migrate and evacuate, bad ones refused everywhere', async () => {
    const everywhere = async (): Promise<string[][]> =>
      Promise.all(['host1', 'host2', 'host3'].map(async (h) => (await ok(['-H', h, 'rule', 'list', '--json'])).map((r: any) => r.name)));
    await fails(['-H', 'host1', 'rule', 'add', 'x', '--keep-apart', 'p1', 'nosuch'], 'RULE_UNKNOWN_DOMAIN', 3);
    await fails(['-H', 'host1', 'rule', 'add', 'x', '--avoid-hosts', 'host9', '--domains', 'p1'], 'RULE_UNKNOWN_HOST', 3);
    assert.deepEqual(await everywhere(), [[], [], []], 'a refused rule is stored nowhere');
    // p1 stays off host2: every host gets the rule, whichever one was asked.
    const added = await ok(['-H', 'host2', 'rule', 'add', 'far', '--avoid-hosts', 'host2', '--domains', 'p1', '--json']);
    assert.deepEqual([added.kind, added.hosts, added.domains, added.brokenNow], ['avoid-hosts', ['host2'], ['p1'], []]);
    assert.deepEqual(await everywhere(), [['far'], ['far'], ['far']]);
    await fails(['-H', 'host3', 'rule', 'add', 'far', '--keep-apart', 'p1', 'p2'], 'RULE_EXISTS', 3);
    await fails(['-H', 'host1', 'rule', 'add', 'near', '--prefer-hosts', 'host2', '--domains', 'p1'], 'RULE_CONTRADICTS', 3);
    assert.deepEqual(await everywhere(), [['far'], ['far'], ['far']]);
    // An explicit move that breaks it is refused, and nothing moves.
    const r = await ferry(['-H', 'host1', 'migrate', 'p1', 'host2', '--json']);
    assert.equal(r.code, 8, r.stdout + r.stderr);
    assert.equal(r.json.error.code, 'PLACEMENT_RULE');
    assert.match(r.json.error.message, /rule "far"/);
    // Without a destination, and in an evacuation's plan, p1 goes to host3.
    assert.equal((await ok(['-H', 'host1', 'migrate', 'p1', '--plan', '--json'])).placement.to, 'host3');
    const plan = await ok(['host', 'evacuate', 'host1', '--plan', '--json']);
    assert.equal(plan.domains.find((d: any) => d.domain === 'p1').to, 'host3', JSON.stringify(plan.domains));
    assert.deepEqual(Object.values(await where()), ['host1', 'host1', 'host1', 'host1']);
    await ok(['-H', 'host3', 'rule', 'remove', 'far']);
    assert.deepEqual(await everywhere(), [[], [], []]);
    // A rule its domains break where they run is kept, and the answer says how and what ends it.
    const apart = await ok(['-H', 'host3', 'rule', 'add', 'apart', '--keep-apart', 'p1', 'p2']);
    assert.match(apart, /broken where its domains run now: p1 on host1: keep-apart rule "apart": p2 runs on host1; /);
    assert.match(apart, /`ferry migrate` one of them to end it/);
    await ok(['-H', 'host1', 'rule', 'remove', 'apart']);
    assert.deepEqual(await everywhere(), [[], [], []]);
    await fails(['-H', 'host2', 'rule', 'remove', 'far'], 'RULE_NOT_FOUND', 3);
  });

  test('--plan: where each domain would go and the predicted time, moving nothing', async () => {
    const r = await ok(['host', 'evacuate', 'host1', '--plan', '--json']);
    assert.equal(r.outcome, 'planned');
    assert.equal(r.maintenance, false);
    assert.deepEqual(r.domains.map((d: any) => d.domain).sort(), ['p1', 'p2', 'p3', 'web']);
    for (const d of r.domains) {
      assert.ok(['host2', 'host3'].includes(d.to), JSON.stringify(d));
      assert.equal(typeof d.predictedMs, 'number', JSON.stringify(d));
      assert.equal(d.state, 'planned');
    }
    assert.equal(typeof r.predictedMs, 'number');
    // 512 MiB offered per host: the four are spread over both.
    assert.equal(new Set(r.domains.map((d: any) => d.to)).size, 2);
    assert.equal((await ok(['-H', 'host1', 'host', 'info', '--json'])).maintenance.on, false);
    assert.deepEqual(Object.values(await where()), ['host1', 'host1', 'host1', 'host1']);
  });

  test('evacuate with a TCP connection open to the Linux guest, interrupted once and run again: all leave live, nothing is lost', async () => {
    const echo = echoClient(ip, 10);
    await waitFor('echo connected', () => echo.lines.includes('connected'), 10000);
    // First run, interrupted once a domain has left.
    const first = spawn(process.execPath, [FERRY, 'host', 'evacuate', 'host1', '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    first.stderr.on('data', (d) => {
      err += d;
    });
    const firstDone = new Promise<number>((r) => first.on('close', (c, sig) => r(c ?? (sig ? 130 : -1))));
    await waitFor('a first domain left host1', async () => (await onHost1()) < 4, 120000, 100);
    first.kill('SIGINT');
    assert.equal(await firstDone, 130);
    assert.match(err, /interrupted; moves under way finish on their own/);
    // The moves under way finish on their own; at least the one the other queue has not started is still here.
    const left = await onHost1();
    assert.ok(left >= 1, `the interruption left ${left} on host1`);
    // Run again: it takes what is still there.
    const again = await ok(['host', 'evacuate', 'host1', '--json'], { timeoutMs: 300000 });
    assert.equal(again.outcome, 'done', JSON.stringify(again.domains));
    for (const d of again.domains) assert.equal(d.state, 'moved', JSON.stringify(d));
    const w = await where();
    for (const n of ['web', 'p1', 'p2', 'p3']) {
      assert.ok(['host2', 'host3'].includes(w[n]), `${n} on ${w[n]}`);
      if (n !== 'web') await ok(['lab', 'verify', n]);
    }
    await echoWhole(echo);
    assert.equal(guestStatus(ip).bootId, bootId, 'same boot');
    const hi = await ok(['-H', 'host1', 'host', 'info', '--json']);
    assert.equal(hi.maintenance.on, true);
    assert.equal(hi.memory.usedMiB, 0, 'host1 is empty');
  });

  test('metrics: the histogram counts moved with the migrations', async () => {
    const count = (t: string, m: string): number => value(t, `${m}_count{host="host1"}`);
    // A move the interrupted run left behind is counted when its report is final, which
    // (after the guest's answer from its new host) can come just after its domain left host1.
    await waitFor('the four moves counted', () => count(scrape('198.19.0.11'), 'ferry_migration_duration_seconds') >= 4, 15000, 250).catch(
      () => undefined,
    );
    const h1 = scrape('198.19.0.11');
    assert.match(h1, /# TYPE ferry_migration_pause_seconds histogram/);
    // Off loopback the page wants TLS and a certificate of the cluster's: no plain HTTP, no anonymous scrape.
    assert.notEqual(inNs('client', ['busybox', 'wget', '-q', '-T', '5', '-O-', 'http://198.19.0.11:9477/metrics']).code, 0, 'plain HTTP');
    const anon = inNs('client', [
      process.execPath,
      path.join(ROOT, 'test', 'tools', 'https-get.mjs'),
      '198.19.0.11',
      '9477',
      '/metrics',
      '-',
      labState().adminTlsDir,
    ]);
    assert.equal(anon.code, 2, `no client certificate: ${anon.stdout.slice(0, 200)}`);
    for (const name of ['web', 'p1', '198.18.']) assert.ok(!h1.includes(name), `the page names no domain or guest address (${name})`);
    // Guest-perceived downtime needs an address to probe: the Linux guest has one, the pattern guests none.
    for (const [m, n] of [
      ['ferry_migration_duration_seconds', 4],
      ['ferry_migration_pause_seconds', 4],
      ['ferry_migration_guest_downtime_seconds', 1],
    ] as const) {
      assert.equal(count(before0, m), 0, `${m} before`);
      assert.ok(count(h1, m) >= n, `${m}: ${count(h1, m)} after`);
    }
    assert.ok(value(h1, 'ferry_migrations_total{role="source",outcome="succeeded"}') >= 4);
    assert.ok(value(h1, 'ferry_migration_bytes_total{host="host1"}') > 0);
    assert.equal(value(h1, 'ferry_maintenance{host="host1"}'), 1);
    assert.equal(value(h1, 'ferry_memory_mib{kind="offered",host="host1"}'), 512);
    const incoming = ['198.19.0.12', '198.19.0.13'].map((a, i) =>
      value(scrape(a), `ferry_migrations_total{role="destination",outcome="succeeded",host="host${i + 2}"}`),
    );
    assert.ok(incoming[0] + incoming[1] >= 4, `incoming moves counted: ${incoming.join(' + ')}`);
  });

  test('in maintenance: no start, no incoming move, across a ferryd restart; a domain that cannot move is reported while the rest move; --include-stopped moves a definition', async () => {
    const f = tmpFile('p4.json', await ok(['lab', 'guest', 'pattern', 'p4', '--json']));
    const c = await fails(['-H', 'host1', 'create', f, '--json'], 'HOST_MAINTENANCE');
    assert.match(c.json.error.message, /host1 is in maintenance/);
    const w = await where();
    const m = await fails(['-H', w.p1, 'migrate', 'p1', 'host1', '--live', '--json'], 'MIGRATION_DEST_MAINTENANCE');
    assert.equal(m.json.outcome, 'failed');
    assert.equal(
      value(scrape('198.19.0.11'), 'ferry_refusals_total{side="destination",code="MIGRATION_DEST_MAINTENANCE"}'),
      1,
      'counted where it was refused',
    );
    await ok(['lab', 'restart', 'host1']);
    assert.equal((await ok(['-H', 'host1', 'host', 'info', '--json'])).maintenance.on, true, 'kept across a restart');
    await ok(['host', 'maintenance', 'host1', 'off']);
    // Now a guest with a disk of host1's own (no --copy-storage in an evacuation) and one that can go.
    await ok(['-H', 'host1', 'create', tmpFile('db.json', await ok(['lab', 'guest', 'linux', 'db', '--data-disk', '16', '--json']))]);
    await ok(['-H', 'host1', 'create', f]);
    // And a shut-off one: with --include-stopped its definition moves too, after the running ones.
    await ok(['-H', 'host1', 'create', '--defer-start', tmpFile('p5.json', await ok(['lab', 'guest', 'pattern', 'p5', '--json']))]);
    const r = await ferry(['host', 'evacuate', 'host1', '--include-stopped', '--json'], { timeoutMs: 300000 });
    assert.equal(r.code, 8, r.stdout + r.stderr);
    assert.equal(r.json.outcome, 'incomplete');
    assert.equal(r.json.error.code, 'EVACUATION_INCOMPLETE');
    const by = Object.fromEntries(r.json.domains.map((d: any) => [d.domain, d]));
    assert.equal(by.p4.state, 'moved');
    assert.equal(by.p4.move, 'live');
    assert.deepEqual([by.p5.state, by.p5.move, by.p5.predictedMs], ['moved', 'definition', null]);
    assert.ok(
      r.json.domains.findIndex((d: any) => d.domain === 'p5') > r.json.domains.findIndex((d: any) => d.domain === 'p4'),
      'the definition after the live move',
    );
    assert.equal(domainRecord('host1', 'p5'), undefined, 'p5 left host1');
    assert.equal(domainRecord(by.p5.to, 'p5').state.kind, 'defined', `p5 defined, not started, on ${by.p5.to}`);
    assert.equal(by.db.state, 'failed');
    assert.equal(by.db.error.code, 'MIGRATION_DEST_STORAGE');
    assert.match(by.db.error.message, /--copy-storage/);
    const w2 = await where();
    assert.equal(w2.db, 'host1');
    assert.notEqual(w2.p4, 'host1');
    assert.equal(value(scrape('198.19.0.11'), 'ferry_refusals_total{side="source",code="MIGRATION_DEST_STORAGE"}'), 1);
  });
});
