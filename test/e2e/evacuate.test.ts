/**
 * `ferry host evacuate` and maintenance, for real in the lab: a host's running domains
 * leave it live for its peers, one that cannot move is reported with its reason while
 * the others still move, and a host in maintenance starts nothing and takes nothing in.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { ok, fails, ferry, labUp, labDown, createGuest, labState, tmpFile, inNs } from '../helpers.ts';

const where = async (): Promise<Record<string, string>> => {
  const out: Record<string, string> = {};
  for (const h of ['host1', 'host2', 'host3']) for (const d of await ok(['-H', h, 'list', '--json'])) if (d.id !== null) out[d.name] = h;
  return out;
};

describe('host evacuation and maintenance (lab)', () => {
  before(async () => {
    await labUp(['--hosts', '3', '--host-memory', '512']);
    await createGuest('pattern', 'p1', 'host1', 64);
    await createGuest('pattern', 'p2', 'host1', 96);
    await createGuest('pattern', 'p3', 'host1', 64);
    // A guest with a disk of host1's own: it cannot leave without --copy-storage.
    const cfg = await ok(['lab', 'guest', 'linux', 'db', '--data-disk', '16', '--json']);
    await ok(['-H', 'host1', 'create', tmpFile('db.json', cfg)]);
  });
  after(async () => { await labDown(); });

  test('--plan: where each domain would go and the predicted time, moving nothing', async () => {
    const r = await ok(['host', 'evacuate', 'host1', '--plan', '--json']);
    assert.equal(r.outcome, 'planned');
    assert.equal(r.maintenance, false);
    assert.deepEqual(r.domains.map((d: any) => d.domain).sort(), ['db', 'p1', 'p2', 'p3']);
    for (const d of r.domains) {
      assert.ok(['host2', 'host3'].includes(d.to), JSON.stringify(d));
      assert.equal(typeof d.predictedMs, 'number', JSON.stringify(d));
      assert.equal(d.state, 'planned');
    }
    assert.equal(typeof r.predictedMs, 'number');
    // Spread: 512 MiB offered per host cannot take all of them on one.
    assert.equal(new Set(r.domains.map((d: any) => d.to)).size, 2);
    assert.equal((await ok(['-H', 'host1', 'host', 'info', '--json'])).maintenance.on, false);
    assert.deepEqual(Object.values(await where()), ['host1', 'host1', 'host1', 'host1']);
  });

  test('evacuate: the movable domains leave live, the one that cannot is reported, and host1 is in maintenance', async () => {
    const r = await ferry(['host', 'evacuate', 'host1', '--json'], { timeoutMs: 300000 });
    assert.equal(r.code, 8, r.stdout + r.stderr);
    const rep = r.json;
    assert.equal(rep.outcome, 'incomplete');
    assert.equal(rep.error.code, 'EVACUATION_INCOMPLETE');
    const by = Object.fromEntries(rep.domains.map((d: any) => [d.domain, d]));
    for (const n of ['p1', 'p2', 'p3']) {
      assert.equal(by[n].state, 'moved', JSON.stringify(by[n]));
      assert.equal(typeof by[n].report.totalMs, 'number');
    }
    assert.equal(by.db.state, 'failed');
    assert.equal(by.db.error.code, 'MIGRATION_DEST_STORAGE');
    const w = await where();
    assert.equal(w.db, 'host1');
    for (const n of ['p1', 'p2', 'p3']) {
      assert.ok(['host2', 'host3'].includes(w[n]), `${n} on ${w[n]}`);
      await ok(['lab', 'verify', n]);
    }
    const hi = await ok(['-H', 'host1', 'host', 'info', '--json']);
    assert.equal(hi.maintenance.on, true);
    assert.match(hi.maintenance.since, /^\d{4}-/);
  });

  test('metrics: each ferryd serves what happened, in Prometheus text format', async () => {
    const scrape = (addr: string): string => {
      const r = inNs('client', ['busybox', 'wget', '-q', '-O-', `http://${addr}:9477/metrics`]);
      assert.equal(r.code, 0, r.stderr);
      return r.stdout;
    };
    /** The sample of `name` whose labels include all of `series`' (in any order); 0 if none. */
    const value = (text: string, series: string): number => {
      const [, name, want] = /^([a-z_]+)\{(.*)\}$/.exec(series)!;
      const pairs = want.split(',');
      const line = text.split('\n').find((l) => l.startsWith(`${name}{`) && pairs.every((p) => l.slice(0, l.lastIndexOf(' ')).includes(p)));
      return line ? Number(line.split(' ').pop()) : 0;
    };
    const h1 = scrape('198.19.0.11');
    assert.match(h1, /# TYPE ferry_migration_pause_seconds histogram/);
    assert.ok(value(h1, 'ferry_migrations_total{role="source",outcome="succeeded",host="host1"}') >= 3, h1);
    assert.ok(value(h1, 'ferry_migration_pause_seconds_count{host="host1"}') >= 3);
    assert.ok(value(h1, 'ferry_migration_bytes_total{host="host1"}') > 0);
    assert.equal(value(h1, 'ferry_refusals_total{side="source",code="MIGRATION_DEST_STORAGE",host="host1"}'), 1);
    assert.equal(value(h1, 'ferry_maintenance{host="host1"}'), 1);
    assert.equal(value(h1, 'ferry_domains{state="running",host="host1"}'), 1, 'db is still there');
    assert.equal(value(h1, 'ferry_memory_mib{kind="offered",host="host1"}'), 512);
    const incoming = ['198.19.0.12', '198.19.0.13'].map((a, i) => value(scrape(a), `ferry_migrations_total{role="destination",outcome="succeeded",host="host${i + 2}"}`));
    assert.equal(incoming[0] + incoming[1], 3, `incoming moves counted: ${incoming.join(' + ')}`);
  });

  test('in maintenance: no start, no incoming move; it survives a ferryd restart; off again, starts work', async () => {
    const cfg = await ok(['lab', 'guest', 'pattern', 'p4', '--json']);
    const f = tmpFile('p4.json', cfg);
    const c = await fails(['-H', 'host1', 'create', f, '--json'], 'HOST_MAINTENANCE');
    assert.match(c.json.error.message, /host1 is in maintenance/);
    const w = await where();
    const m = await fails(['-H', w.p1, 'migrate', 'p1', 'host1', '--live', '--json'], 'MIGRATION_DEST_MAINTENANCE');
    assert.equal(m.json.outcome, 'failed');
    assert.equal((await where()).p1, w.p1, 'p1 stays where it is');
    await ok(['lab', 'restart', 'host1']);
    assert.equal((await ok(['-H', 'host1', 'host', 'info', '--json'])).maintenance.on, true, 'kept across a restart');
    // Run again: it takes what is still there (db), which still cannot move.
    const again = await ferry(['host', 'evacuate', 'host1', '--json'], { timeoutMs: 120000 });
    assert.equal(again.code, 8);
    assert.deepEqual(again.json.domains.map((d: any) => [d.domain, d.state]), [['db', 'failed']]);
    await ok(['-H', 'host1', 'destroy', 'db']);
    const done = await ok(['host', 'evacuate', 'host1', '--json']);
    assert.equal(done.outcome, 'done');
    assert.deepEqual(done.domains, []);
    await ok(['host', 'maintenance', 'host1', 'off']);
    await ok(['-H', 'host1', 'create', f]);
    assert.equal((await where()).p4, 'host1');
    assert.ok(fs.existsSync(path.join(labState().dir, 'host1', 'disks', 'db-data.qcow2')), 'the disk of the domain that stayed is untouched');
  });
});
