import { test } from 'node:test';
import assert from 'node:assert/strict';
import { sourceTransition, destTransition, IllegalPhaseError, type SourcePhase, type DestPhase } from './phases.ts';

test('source: the full path to confirmed', () => {
  let p: SourcePhase = 'begin';
  for (const t of ['dest-accepted', 'dest-prepared', 'stream-started', 'stream-completed', 'finish-sent', 'dest-finished'] as const)
    p = sourceTransition(p, { type: t });
  assert.equal(p, 'confirmed');
});

test('source: abandon is legal before the point of no return, and only then', () => {
  for (const p of ['begin', 'prepare', 'perform', 'switchover'] as SourcePhase[])
    assert.equal(sourceTransition(p, { type: 'abandon', reason: 'x' }), 'abandoned');
  for (const p of ['finish', 'confirmed', 'abandoned'] as SourcePhase[])
    assert.throws(() => sourceTransition(p, { type: 'abandon', reason: 'x' }), IllegalPhaseError);
  // past the point of no return, only the destination's own word abandons
  assert.equal(sourceTransition('finish', { type: 'dest-abandoned', reason: 'never resumed' }), 'abandoned');
  assert.throws(() => sourceTransition('perform', { type: 'dest-abandoned', reason: 'x' }), IllegalPhaseError);
});

test('source: out-of-order events are refused', () => {
  assert.throws(
    () => sourceTransition('begin', { type: 'dest-prepared' }),
    (e: unknown) => e instanceof IllegalPhaseError && e.code === 'MIGRATION_ILLEGAL_PHASE',
  );
  assert.throws(() => sourceTransition('prepare', { type: 'stream-completed' }), IllegalPhaseError);
  assert.throws(() => sourceTransition('perform', { type: 'finish-sent' }), IllegalPhaseError);
  assert.throws(() => sourceTransition('confirmed', { type: 'dest-accepted' }), IllegalPhaseError);
});

test('destination: path, abandon window and replays', () => {
  let p: DestPhase = 'begun';
  for (const t of ['prepared', 'resuming', 'resumed', 'confirmed'] as const) p = destTransition(p, { type: t });
  assert.equal(p, 'confirmed');
  assert.equal(destTransition('begun', { type: 'abandon', reason: 'x' }), 'abandoned');
  assert.equal(destTransition('prepared', { type: 'abandon', reason: 'x' }), 'abandoned');
  for (const q of ['finishing', 'finished', 'confirmed', 'abandoned'] as DestPhase[])
    assert.throws(() => destTransition(q, { type: 'abandon', reason: 'x' }), IllegalPhaseError);
  // a replayed prepare or finish is refused
  assert.throws(() => destTransition('prepared', { type: 'prepared' }), IllegalPhaseError);
  assert.throws(() => destTransition('finished', { type: 'resuming' }), IllegalPhaseError);
});
