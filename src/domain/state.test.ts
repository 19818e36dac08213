import { test } from 'node:test';
import assert from 'node:assert/strict';
import { transition, IllegalTransitionError, type DomainState, type DomainEvent } from './state.ts';

const at = 1;
const running: DomainState = { kind: 'running', pid: 10, domid: 1, since: 0 };

test('the happy lifecycle: defined → running ⇄ paused → shut off', () => {
  let s: DomainState = { kind: 'defined' };
  s = transition(s, { type: 'start', pid: 10, domid: 1, at });
  assert.equal(s.kind, 'running');
  s = transition(s, { type: 'pause', at });
  assert.deepEqual(s, { kind: 'paused', pid: 10, domid: 1, since: 1 });
  s = transition(s, { type: 'resume', at });
  assert.equal(s.kind, 'running');
  s = transition(s, { type: 'stopped', reason: 'shutdown', at: 5 });
  assert.deepEqual(s, { kind: 'shutoff', reason: 'shutdown', at: 5 });
  s = transition(s, { type: 'start', pid: 11, domid: 2, at });
  assert.equal(s.kind, 'running');
});

test('illegal moves are typed errors with the from-state and event', () => {
  const cases: [DomainState, DomainEvent][] = [
    [{ kind: 'defined' }, { type: 'pause', at }],
    [
      { kind: 'shutoff', reason: 'shutdown', at },
      { type: 'resume', at },
    ],
    [running, { type: 'start', pid: 1, domid: 1, at }],
    [running, { type: 'resume', at }],
    [{ kind: 'defined' }, { type: 'stopped', reason: 'shutdown', at }],
    [running, { type: 'stopped', reason: 'migrated', at }],
    [running, { type: 'incoming-done', running: true, at }],
    [
      { kind: 'shutoff', reason: 'destroyed', at },
      { type: 'crash', reason: 'x', at },
    ],
    [running, { type: 'migrate-out-abandoned', running: true, at }],
  ];
  for (const [s, e] of cases) {
    assert.throws(
      () => transition(s, e, 'web'),
      (err: unknown) =>
        err instanceof IllegalTransitionError &&
        err.code === 'DOMAIN_BAD_STATE' &&
        err.from === s.kind &&
        err.event === e.type &&
        err.message.includes('"web"'),
      `${s.kind} + ${e.type}`,
    );
  }
});

test('a crash can be cleared by destroy or by starting again', () => {
  let s = transition(running, { type: 'crash', reason: 'qemu exited', at });
  assert.equal(s.kind, 'crashed');
  assert.equal(transition(s, { type: 'stopped', reason: 'destroyed', at }).kind, 'shutoff');
  s = transition(s, { type: 'start', pid: 3, domid: 2, at });
  assert.equal(s.kind, 'running');
});

test('migration out: abandon restores running or paused; success ends as shut off (migrated)', () => {
  const m = transition(running, { type: 'migrate-out', jobId: 'j1', at });
  assert.equal(m.kind, 'migrating-out');
  assert.equal(transition(m, { type: 'migrate-out-abandoned', running: true, at }).kind, 'running');
  assert.equal(transition(m, { type: 'migrate-out-abandoned', running: false, at }).kind, 'paused');
  assert.deepEqual(transition(m, { type: 'stopped', reason: 'migrated', at: 9 }), { kind: 'shutoff', reason: 'migrated', at: 9 });
  assert.throws(() => transition(m, { type: 'pause', at }), IllegalTransitionError);
});

test('incoming: only from a fresh definition, ends running or paused', () => {
  const i = transition({ kind: 'defined' }, { type: 'incoming', pid: 5, domid: 3, jobId: 'j', at });
  assert.equal(i.kind, 'incoming');
  assert.equal(transition(i, { type: 'incoming-done', running: true, at }).kind, 'running');
  assert.equal(transition(i, { type: 'incoming-done', running: false, at }).kind, 'paused');
  assert.throws(() => transition(running, { type: 'incoming', pid: 5, domid: 3, jobId: 'j', at }), IllegalTransitionError);
});
