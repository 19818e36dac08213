import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MoveQueue } from './queue.ts';
import { FerryError } from '../errors.ts';

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

test('the line: at most N out and M per link; evacuations first; a full link holds up nobody else; ETAs in order', async () => {
  const q = new MoveQueue(() => ({ outgoing: 2, perLink: 1 }));
  const started: string[] = [];
  const releases = new Map<string, () => void>();
  const go = (domain: string, dest: string, priority: 'evacuation' | 'operator' | 'balance' = 'operator') =>
    void q.enter({ domain, dest, live: true, priority, memoryMiB: 100 }).then((rel) => {
      started.push(domain);
      releases.set(domain, rel);
    });
  go('a', 'h2');
  go('b', 'h2'); // the link to h2 is full: waits
  go('c', 'h3'); // another link: runs
  go('d', 'h4', 'balance');
  go('e', 'h4', 'evacuation');
  await tick();
  assert.deepEqual(started, ['a', 'c']);
  const v = q.views();
  assert.deepEqual(
    v.filter((x) => x.state === 'queued').map((x) => [x.domain, x.position]),
    [
      ['e', 1],
      ['b', 2],
      ['d', 3],
    ],
  );
  const etas = v.filter((x) => x.state === 'queued').map((x) => x.etaMs!);
  assert.ok(
    etas.every((x, i) => i === 0 || x >= etas[i - 1]),
    JSON.stringify(etas),
  );
  assert.match(v.find((x) => x.domain === 'b')!.waitingFor!, /the link to h2/);
  // A domain in line twice is refused.
  await assert.rejects(
    q.enter({ domain: 'b', dest: 'h3', live: true, priority: 'operator', memoryMiB: 1 }),
    (e: FerryError) => e.code === 'MIGRATION_IN_PROGRESS',
  );
  // c ends: the evacuation goes before the balancer's move, b still waits for its link.
  releases.get('c')!();
  await tick();
  assert.deepEqual(started, ['a', 'c', 'e']);
  // Withdrawn from the line: its caller hears MIGRATION_CANCELLED, and it never starts.
  const gone = q.enter({ domain: 'x', dest: 'h5', live: false, priority: 'balance', memoryMiB: 1 });
  assert.equal(q.withdraw('x'), true);
  await assert.rejects(gone, (e: FerryError) => e.code === 'MIGRATION_CANCELLED');
  releases.get('a')!();
  await tick();
  assert.deepEqual(started, ['a', 'c', 'e', 'b']);
  releases.get('e')!();
  await tick();
  assert.deepEqual(started, ['a', 'c', 'e', 'b', 'd']);
});

test('a move the destination refused as busy backs off in its place: the slot frees, it starts again after the pause, withdrawable meanwhile', async () => {
  const q = new MoveQueue(() => ({ outgoing: 1, perLink: 1 }));
  const a = await q.enter({ domain: 'a', dest: 'h2', live: true, priority: 'operator', memoryMiB: 100 });
  let bStarted = false;
  const b = q.enter({ domain: 'b', dest: 'h3', live: true, priority: 'operator', memoryMiB: 100 }).then((s) => {
    bStarted = true;
    return s;
  });
  await tick();
  assert.equal(bStarted, false);
  // a is refused busy: its slot goes to b at once; a waits its pause, shown with the reason.
  const back = a.backOff(150, 'room at h2: busy');
  await tick();
  assert.equal(bStarted, true);
  const v = q.views().find((x) => x.domain === 'a')!;
  assert.deepEqual([v.state, v.waitingFor], ['queued', 'room at h2: busy']);
  assert.ok(v.etaMs! >= 150, JSON.stringify(v));
  // b ends before the pause: a still waits for it, then starts by itself.
  (await b)();
  await tick();
  let aBack = false;
  void back.then(() => (aBack = true));
  await tick();
  assert.equal(aBack, false);
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(aBack, true);
  assert.equal(q.views().find((x) => x.domain === 'a')!.state, 'running');
  // Backed off again and withdrawn meanwhile: its caller hears MIGRATION_CANCELLED; giving the slot back after is harmless.
  const again = a.backOff(10000, 'room at h2: busy');
  assert.equal(q.withdraw('a'), true);
  await assert.rejects(again, (e: FerryError) => e.code === 'MIGRATION_CANCELLED');
  a();
  assert.deepEqual(q.views(), []);
});
