/**
 * cluster/ against a real etcd (one member on loopback, mutual TLS, no root): the
 * ownership record's compare-and-swaps under races, the lease and its fence, the
 * event log, and what a wrong certificate or a hand-edited record gets.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FerryError } from '../errors.ts';
import { startTestEtcd, etcdAvailable, type TestEtcd } from '../testing/etcd.ts';
import { Ownership, type ClaimFacts } from './ownership.ts';
import { Membership, memberStep, monoMs } from './member.ts';
import { EventLog } from './events.ts';
import { connectEtcd, getJson } from './etcd.ts';
import { aliveKey, domainKey, hostKey, parseHostFacts, parseOwnerRecord } from './records.ts';
import { HaManager } from './ha.ts';
import { caInit, issueHostCert } from '../tls/ca.ts';

const facts = (name: string): ClaimFacts => ({
  name,
  uuid: '00000000-0000-4000-8000-000000000001',
  config: { name },
  cpuModel: 'qemu64',
  accel: 'tcg',
  memoryMiB: 64,
  restartable: { ok: true, why: 'shared' },
});

const code = async (p: Promise<unknown>): Promise<string> =>
  p.then(
    () => 'ok',
    (e) => (e instanceof FerryError ? e.code : `thrown: ${String(e)}`),
  );

describe(
  'cluster state on a real etcd',
  { skip: !etcdAvailable() && 'etcd is not installed (scripts/install-packages.sh installs etcd-server)' },
  () => {
    let etcd: TestEtcd;
    before(async () => {
      etcd = await startTestEtcd();
    });
    after(async () => {
      await etcd?.stop();
    });

    test('claim: a new record, then only its owner may claim again (each claim a new generation)', async () => {
      const a = new Ownership(etcd.client('hostA'), 'hostA');
      const b = new Ownership(etcd.client('hostB'), 'hostB');
      await a.claim(facts('d1'), 'start');
      const r1 = (await a.get('d1'))!;
      assert.equal(r1.value.owner, 'hostA');
      assert.equal(r1.value.generation, 1);
      assert.equal(await code(b.claim(facts('d1'), 'start')), 'CLUSTER_OWNED_ELSEWHERE');
      assert.equal((await a.get('d1'))!.modRevision, r1.modRevision, 'a refused claim changes nothing');
      await a.claim(facts('d1'), 'unpause');
      assert.equal((await a.get('d1'))!.value.generation, 2);
    });

    test('the point of no return: takeOver and reclaim race, and exactly one of them wins every time', async () => {
      const src = new Ownership(etcd.client('hostA'), 'hostA');
      const dst = new Ownership(etcd.client('hostB'), 'hostB');
      let taken = 0;
      let kept = 0;
      for (let i = 0; i < 20; i++) {
        const name = `race${i}`;
        await src.claim(facts(name), 'start');
        await src.markMoving(name, `job${i}`, 'hostB');
        const [t, r] = await Promise.all([dst.takeOver(name, `job${i}`, 'hostA'), src.reclaim(name, `job${i}`)]);
        const rec = (await src.get(name))!.value;
        if (t === 'taken') {
          taken++;
          assert.equal(r, 'lost', `${name}: the destination took it, so the source must not resume`);
          assert.equal(rec.owner, 'hostB');
        } else {
          kept++;
          assert.equal(r, 'kept', `${name}: the destination was refused, so the source resumes`);
          assert.equal(rec.owner, 'hostA');
          assert.equal(rec.moving, null);
        }
        // Asked again, each side gets the same answer (a lost reply is asked again).
        assert.equal(await dst.takeOver(name, `job${i}`, 'hostA'), t);
        assert.equal(await src.reclaim(name, `job${i}`), r);
      }
      assert.equal(taken + kept, 20);
    });

    test('takeOver is refused for another job, from another source, or without a move mark', async () => {
      const src = new Ownership(etcd.client('hostA'), 'hostA');
      const dst = new Ownership(etcd.client('hostB'), 'hostB');
      const other = new Ownership(etcd.client('hostC'), 'hostC');
      await src.claim(facts('m1'), 'start');
      assert.equal(await dst.takeOver('m1', 'j1', 'hostA'), 'refused', 'no move marked');
      await src.markMoving('m1', 'j1', 'hostB');
      assert.equal(await dst.takeOver('m1', 'j2', 'hostA'), 'refused', 'another job');
      assert.equal(await dst.takeOver('m1', 'j1', 'hostC'), 'refused', 'another source');
      assert.equal(await other.takeOver('m1', 'j1', 'hostA'), 'refused', 'another destination');
      assert.equal(await dst.takeOver('m1', 'j1', 'hostA'), 'taken');
      // The destination could not run it after all: given back, the source keeps it.
      await dst.giveBack('m1', 'j1', 'hostA');
      assert.equal(await src.reclaim('m1', 'j1'), 'kept');
      assert.equal((await src.get('m1'))!.value.owner, 'hostA');
    });

    test("the watch's copy speeds a move up but never decides it: a stale copy means a fresh read", async () => {
      const src = new Ownership(etcd.client('hostA'), 'hostA');
      await src.claim(facts('c1'), 'start');
      const before = (await src.get('c1'))!; // no move mark yet
      await src.markMoving('c1', 'j1', 'hostB');
      // A destination whose watch has not seen the mark yet still takes the move.
      const stale = new Ownership(
        etcd.client('hostB'),
        'hostB',
        () => '',
        () => before,
      );
      assert.equal(await stale.takeOver('c1', 'j1', 'hostA'), 'taken');
      // One whose copy is the marked record, but the source took the move back since: refused.
      await src.claim(facts('c2'), 'start');
      await src.markMoving('c2', 'j2', 'hostB');
      const seenMarked = (await src.get('c2'))!;
      assert.equal(await src.reclaim('c2', 'j2'), 'kept');
      const late = new Ownership(
        etcd.client('hostB'),
        'hostB',
        () => '',
        (n) => (n === 'c2' ? seenMarked : undefined),
      );
      assert.equal(await late.takeOver('c2', 'j2', 'hostA'), 'refused');
      assert.equal((await src.get('c2'))!.value.owner, 'hostA');
    });

    test("two HA managers assigning the same dead host's domain: one write lands", async () => {
      const a = new Ownership(etcd.client('hostA'), 'hostA');
      const m1 = new Ownership(etcd.client('hostB'), 'hostB');
      const m2 = new Ownership(etcd.client('hostC'), 'hostC');
      await a.claim(facts('ha1'), 'start');
      await a.setHa('ha1', { priority: 1 });
      const seen = (await m1.get('ha1'))!;
      const [x, y] = await Promise.all([m1.assign(seen, 'hostB', 'test'), m2.assign(seen, 'hostC', 'test')]);
      assert.equal(Number(x) + Number(y), 1, 'exactly one assignment');
      const rec = (await a.get('ha1'))!.value;
      assert.equal(rec.state, 'restarting');
      assert.equal(rec.generation, 2);
      // The old owner, back, cannot run it.
      assert.equal(await code(a.claim(facts('ha1'), 'start')), 'CLUSTER_OWNED_ELSEWHERE');
    });

    test('a record not in the shape ferry writes is CLUSTER_BAD_RECORD and is not overwritten', async () => {
      const kv = etcd.client('hostA');
      await kv.put(domainKey('junk')).value('{"owner": 42}');
      const a = new Ownership(kv, 'hostA');
      assert.equal(await code(a.get('junk')), 'CLUSTER_BAD_RECORD');
      assert.equal(await code(a.claim(facts('junk'), 'start')), 'CLUSTER_BAD_RECORD');
      assert.equal(await kv.get(domainKey('junk')).string(), '{"owner": 42}');
      await kv.put(domainKey('notjson')).value('{');
      assert.equal(await code(a.get('notjson')), 'CLUSTER_BAD_RECORD');
    });

    test('a certificate from another CA is TLS_REFUSED, and nothing is read or written', async () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-rogue-'));
      try {
        caInit(path.join(dir, 'ca'), { name: 'rogue CA' });
        issueHostCert('rogue', { caDir: path.join(dir, 'ca'), outDir: path.join(dir, 'tls'), ips: ['127.0.0.1'] });
        // Its own CA file: etcd's server certificate is not trusted either way round.
        const c = connectEtcd({ endpoints: [etcd.endpoint], tlsDir: path.join(dir, 'tls') });
        try {
          assert.equal(await code(new Ownership(c, 'rogue').claim(facts('rogue1'), 'start')), 'TLS_REFUSED');
        } finally {
          c.close();
        }
        // The cluster's CA but a client certificate of another CA: etcd refuses the client.
        fs.copyFileSync(path.join(etcd.tlsDirOf('hostA'), 'ca-cert.pem'), path.join(dir, 'tls', 'ca-cert.pem'));
        const c2 = connectEtcd({ endpoints: [etcd.endpoint], tlsDir: path.join(dir, 'tls') });
        try {
          const r = await code(new Ownership(c2, 'rogue').claim(facts('rogue1'), 'start'));
          assert.ok(r === 'TLS_REFUSED' || r === 'CLUSTER_NO_QUORUM', r);
        } finally {
          c2.close();
        }
        assert.equal(await new Ownership(etcd.client('hostA'), 'hostA').get('rogue1'), null);
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });

    test('the event log: written in order, listed, followed', async () => {
      const log = new EventLog(etcd.client('hostA'), 'hostA');
      const got: string[] = [];
      const stop = await log.follow((e) => got.push(e.detail));
      await log.add({ type: 'fenced', domain: 'x', detail: 'one' });
      await log.add({ type: 'restarted', domain: 'x', detail: 'two' });
      const last = await log.list(2);
      assert.deepEqual(
        last.map((e) => e.detail),
        ['one', 'two'],
      );
      const t0 = Date.now();
      while (got.length < 2 && Date.now() - t0 < 5000) await new Promise((r) => setTimeout(r, 20));
      await stop();
      assert.deepEqual(got, ['one', 'two']);
    });

    /** A host's membership on the test etcd: TTL 4 s, margin 1 s, its lease file in `dir`. */
    const membership = (name: string, dir: string, memoryMiB = 1): Membership => {
      const kv = etcd.client(name);
      return new Membership({
        etcd: kv,
        members: [kv],
        name,
        ttlS: 4,
        marginS: 1,
        leaseFile: path.join(dir, `${name}.lease`),
        facts: () => ({
          name,
          ferry: 't',
          engine: '10',
          accel: 'tcg',
          cpuModel: 'qemu64',
          cpuModels: ['qemu64'],
          cpuCeiling: null,
          cores: 2,
          load: {},
          moves: [],
          dirty: {},
          memoryMiB,
          freeMiB: memoryMiB,
          networks: [],
          maintenance: false,
          relocation: 'x:1',
        }),
        log: { info: () => undefined, warn: () => undefined },
      });
    };
    const until = async (what: string, ok: () => boolean | Promise<boolean>, ms: number): Promise<void> => {
      const t0 = Date.now();
      while (!(await ok())) {
        if (Date.now() - t0 > ms) throw new Error(`${what}: not within ${ms} ms`);
        await new Promise((r) => setTimeout(r, 50));
      }
    };

    /** What etcd's new leader does for a dead host's lease: renews it, every second, without its heartbeat. */
    const keepLeaseAlive = (name: string, lease: string): NodeJS.Timeout => {
      const kv = etcd.client(name);
      return setInterval(() => {
        void kv.leaseClient
          .leaseKeepAlive()
          .then((ka) => {
            ka.write({ ID: lease });
            setTimeout(() => ka.end(), 200);
          })
          .catch(() => undefined);
      }, 1000);
    };

    /** The dead host's records (under its membership's lease), and the live host's HA manager (TTL 4 s, margin 1 s, delay 1 s). */
    const haPair = (dead: Membership, deadName: string, liveName: string) => {
      const kv = etcd.client(liveName);
      const mine = new Ownership(etcd.client(deadName), deadName, () => {
        const st = dead.state;
        return st.kind === 'member' ? st.lease : '';
      });
      const manager = new HaManager({
        etcd: kv,
        me: liveName,
        ownership: new Ownership(kv, liveName),
        events: new EventLog(kv, liveName),
        timings: { ttlS: 4, marginS: 1, restartDelayS: 1 },
        log: { info: () => undefined, warn: () => undefined },
      });
      return { kvE: kv, mine, manager };
    };

    /** Both hosts members, `domain` an HA domain of the dead one's, the live one's manager elected. */
    const haStart = async (
      o: { dead: Membership; live: Membership; mine: Ownership; manager: HaManager },
      domain: string,
    ): Promise<void> => {
      o.dead.start();
      o.live.start();
      await until('both hosts members', () => o.dead.state.kind === 'member' && o.live.state.kind === 'member', 10000);
      await o.mine.claim(facts(domain), 'start');
      await o.mine.setHa(domain, { priority: 0 });
      o.manager.start();
      await until('the live host is the HA manager', () => o.manager.isLeader, 10000);
    };

    test('a host whose lease outlives it (an etcd leader change renews every lease) is restarted after its heartbeat went silent', async () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-silent-'));
      const dead = membership('hostD', dir);
      const live = membership('hostE', dir, 4096);
      let lastBeat = 0;
      dead.on('renewed', (e: { renewedAt: number }) => (lastBeat = e.renewedAt));
      const { kvE, mine, manager } = haPair(dead, 'hostD', 'hostE');
      // As ferryd wires it (daemon/cluster.ts): the manager hears its own host's renewals and heartbeats.
      live.on('renewed', (e: { renewedAt: number }) => manager.renewed(e.renewedAt));
      live.on('beat', (e: { revision: string; at: number }) => manager.beat(e.revision, e.at));
      let keep: NodeJS.Timeout | undefined;
      try {
        await haStart({ dead, live, mine, manager }, 'silent1');
        // A guard that is not the heartbeat's current revision loses: the host beat since it was judged.
        const rec = (await mine.get('silent1'))!;
        assert.equal(await new Ownership(kvE, 'hostE').assign(rec, 'hostE', 'test', { key: aliveKey('hostD'), modRevision: '1' }), false);
        assert.equal((await mine.get('silent1'))!.value.owner, 'hostD');
        // hostD dies, but its lease lives on (as etcd's new leader keeps every lease for a TTL more).
        const st = dead.state;
        assert.equal(st.kind, 'member');
        const lease = st.kind === 'member' ? st.lease : '';
        await dead.stop(false);
        const diedAt = lastBeat;
        keep = keepLeaseAlive('hostD', lease);
        await until('silent1 given to hostE', async () => (await mine.get('silent1'))!.value.owner === 'hostE', 15000);
        const at = monoMs();
        const ttl = await kvE.leaseClient.leaseTimeToLive({ ID: lease, keys: false });
        assert.ok(Number(ttl.TTL) > 0, "hostD's lease is still alive: the heartbeat decided, not the lease");
        assert.ok(at - diedAt >= 5000, `restarted ${at - diedAt} ms after hostD's last renewal: not before TTL + delay (5000)`);
        assert.ok(at - diedAt < 9000, `restarted ${at - diedAt} ms after hostD's last renewal`);
        const got = (await mine.get('silent1'))!.value;
        assert.equal(got.state, 'restarting');
        assert.match(got.note, /hostD went silent/);
      } finally {
        clearInterval(keep);
        await manager.stop();
        await live.stop(true);
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });

    test('a manager whose own renewals lapsed judges no silence until it renews again, then counts a whole TTL + delay from there', async () => {
      // After a quorum loss every host's last heartbeat is old, and the manager may read
      // etcd again before its own first renewal: it must not take that for silence.
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-silent-'));
      const dead = membership('hostF', dir);
      const live = membership('hostG', dir, 4096);
      const { mine, manager } = haPair(dead, 'hostF', 'hostG');
      // hostG's renewals, fed by hand: stopped, they stand for etcd out of hostG's reach.
      let feed: NodeJS.Timeout | undefined = setInterval(() => manager.renewed(monoMs()), 500);
      manager.renewed(monoMs());
      let keep: NodeJS.Timeout | undefined;
      try {
        await haStart({ dead, live, mine, manager }, 'silent2');
        clearInterval(feed);
        const st = dead.state;
        const lease = st.kind === 'member' ? st.lease : '';
        await dead.stop(false);
        keep = keepLeaseAlive('hostF', lease);
        // Past TTL + delay of silence, with the manager sweeping every second: nothing, its own renewals being stale.
        await new Promise((r) => setTimeout(r, 7000));
        assert.equal((await mine.get('silent2'))!.value.owner, 'hostF', 'a manager out of touch restarted nothing');
        const back = monoMs();
        manager.renewed(back);
        feed = setInterval(() => manager.renewed(monoMs()), 500);
        await until('silent2 given to hostG', async () => (await mine.get('silent2'))!.value.owner === 'hostG', 15000);
        const at = monoMs() - back;
        assert.ok(at >= 5000, `restarted ${at} ms after the manager's renewal: not before TTL + delay (5000)`);
        assert.ok(at < 9000, `restarted ${at} ms after the manager's renewal`);
        assert.match((await mine.get('silent2'))!.value.note, /hostF went silent/);
      } finally {
        clearInterval(feed);
        clearInterval(keep);
        await manager.stop();
        await live.stop(true);
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });

    test('membership: a lease with the host facts under it; etcd silent → fence once, after TTL − margin', async () => {
      const kv = etcd.client('hostM');
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-lease-'));
      const m = membership('hostM', dir);
      const fences: number[] = [];
      let lastRenewal = 0;
      m.on('renewed', (e: { renewedAt: number }) => (lastRenewal = e.renewedAt));
      m.on('fence', () => fences.push(monoMs()));
      m.start();
      try {
        const t0 = Date.now();
        while (m.state.kind !== 'member' && Date.now() - t0 < 10000) await new Promise((r) => setTimeout(r, 50));
        assert.equal(m.state.kind, 'member');
        assert.ok(m.quorate());
        const f = await getJson(kv, hostKey('hostM'), parseHostFacts);
        assert.equal(f?.value.name, 'hostM');
        // etcd stops answering (frozen, as a partitioned member is to its clients).
        etcd.proc.kill('SIGSTOP');
        const stopAt = monoMs();
        while (!fences.length && monoMs() - stopAt < 8000) await new Promise((r) => setTimeout(r, 50));
        assert.equal(fences.length, 1, 'fenced once');
        assert.ok(fences[0] - lastRenewal >= 3000, `fenced ${fences[0] - lastRenewal} ms after the last renewal, TTL − margin is 3000`);
        assert.ok(
          fences[0] - lastRenewal < 4000,
          `fenced ${fences[0] - lastRenewal} ms after the last renewal: before the lease could expire (4000)`,
        );
        assert.equal(m.state.kind, 'fenced');
        assert.equal(m.quorate(), false);
      } finally {
        etcd.proc.kill('SIGCONT');
        await m.stop(true);
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });
  },
);

test('memberStep: the membership transitions', () => {
  const j = { kind: 'joining' } as const;
  const m = memberStep(j, { type: 'granted', lease: '7', at: 100 });
  assert.deepEqual(m, { kind: 'member', lease: '7', renewedAt: 100 });
  assert.deepEqual(memberStep(m, { type: 'renewed', at: 50 }), m, 'an older renewal never moves T back');
  const f = memberStep(m, { type: 'overdue' });
  assert.equal(f.kind, 'fenced');
  assert.deepEqual(memberStep(f, { type: 'renewed', at: 200 }), { kind: 'member', lease: '7', renewedAt: 200 });
  assert.deepEqual(memberStep(f, { type: 'expired' }), j);
  assert.deepEqual(memberStep(j, { type: 'renewed', at: 1 }), j, 'no renewal without a lease');
  assert.deepEqual(memberStep(m, { type: 'stop' }), { kind: 'stopped' });
  assert.deepEqual(memberStep({ kind: 'stopped' }, { type: 'granted', lease: '8', at: 1 }), { kind: 'stopped' });
});

test('parseOwnerRecord refuses what ferry did not write', () => {
  assert.throws(
    () => parseOwnerRecord({ name: 'x' }, 'k'),
    (e: FerryError) => e.code === 'CLUSTER_BAD_RECORD',
  );
});
