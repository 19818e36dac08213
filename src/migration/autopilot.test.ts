import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Planner } from './autopilot.ts';
import { plan, type PlanInput } from './plan.ts';
import { IDLE_1G } from '../testing/plan.ts';
import type { MigrationHost, MigrationLog } from './host.ts';
import type { JobStore } from './jobs.ts';

const input = IDLE_1G;
// planView reads only the plan: the host, the jobs and the log are never touched.
const planner = new Planner({} as MigrationHost, {} as JobStore, {} as MigrationLog);
const reason = (i: PlanInput): string =>
  planner.planView(plan(i), { domain: 'web', dest: 'host2', dirtyBytesPerS: i.dirtyBytesPerS, onTimeout: undefined }).view.reason;

test("planView: the reason ends with why post-copy is off: what the plan's input says, else the domain's config", () => {
  assert.doesNotMatch(reason(input), /post-copy is/, 'offered: nothing to say');
  assert.match(reason({ ...input, postcopyAllowed: false }), /; post-copy is forbidden by the domain's config$/);
  const why = 'host2 cannot take post-copy';
  assert.match(reason({ ...input, postcopyAllowed: false, postcopyWhyNot: why }), /; host2 cannot take post-copy$/);
  // Asked for by --strategy postcopy: the plan's own reason already says the config forbids it.
  const asked = reason({ ...input, postcopyAllowed: false, strategy: 'postcopy' });
  assert.match(asked, /^post-copy was asked for, but the domain's config forbids it/);
  assert.doesNotMatch(asked, /; post-copy is forbidden/);
});

test('compression by default stays off where the operator asked for post-copy, before anything is measured', async () => {
  // The host and the QMP client are never touched: a throw would show.
  const dom = {} as Parameters<Planner['defaultCompression']>[0];
  const q = {} as Parameters<Planner['defaultCompression']>[1];
  for (const p of [{ strategy: 'postcopy' as const }, { onTimeout: 'postcopy' as const }]) {
    const c = await planner.defaultCompression(dom, q, 'host2', p);
    assert.deepEqual([c.compress, c.considered], ['none', false]);
    assert.match(c.why, /post-copy was asked for/);
  }
});
