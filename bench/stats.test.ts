import { test } from 'node:test';
import assert from 'node:assert/strict';
import { outcomeRows, pairedRatio, parseNote, spread } from './stats.ts';

test('a note splits into its policy statements and its plan pick, the run-to-run figures left out', () => {
  const n =
    'post-copy offered (postcopy-ram, postcopy-preempt on both hosts); at the deadline: postcopy; plan: precopy: pre-copy fits --max-downtime 300 ms and --timeout 120 s: 1 pass, about 0.9 s and a 40 ms pause (dirty rate 0 MB/s by x; link 250 MB/s, y)';
  assert.deepEqual(parseNote(n), {
    policy: ['post-copy offered (postcopy-ram, postcopy-preempt on both hosts)', 'at the deadline: postcopy'],
    plan: 'precopy: pre-copy fits --max-downtime 300 ms and --timeout 120 s',
  });
  assert.deepEqual(parseNote('plan: postcopy: the budget needs it (a; b)'), { policy: [], plan: 'postcopy: the budget needs it' });
  assert.deepEqual(parseNote('connection refused'), { policy: ['connection refused'] });
});

test('one row per contender: outcomes counted, each statement once, each plan pick counted; quiet contenders left out', () => {
  const note = (pause: number): string => `multifd: 2 parallel channels; plan: precopy: pre-copy fits: 1 pass, a ${pause} ms pause (x; y)`;
  const rows = outcomeRows('Idle | 1 GiB', [
    { contender: 'ferry', outcome: 'succeeded', note: note(40) },
    { contender: 'ferry', outcome: 'succeeded', note: note(155) },
    { contender: 'ferry', outcome: 'failed', note: 'MIGRATION_FAILED: gone' },
    { contender: 'libvirt', outcome: 'succeeded', note: "libvirt's own job time 3 s" },
    { contender: 'qmp', outcome: 'succeeded' },
  ]);
  assert.deepEqual(rows, [
    '| Idle \\| 1 GiB | ferry | 2 succeeded, 1 failed | multifd: 2 parallel channels; MIGRATION_FAILED: gone | precopy: pre-copy fits (2×) |',
  ]);
});

test('spread: median, min, max and count', () => {
  assert.deepEqual(spread([3, 1, 2, 10]), { median: 3, min: 1, max: 10, n: 4 });
  assert.equal(spread([]), null);
});

test('pairedRatio: the median round, which a slow round of both cases does not skew; null without aligned rounds', () => {
  // Round 1 ran at half the speed of round 2. Each round's ratio: 2, 2 and 4; the ratio
  // of the medians, 8 ÷ 2 = 4, takes a from a fast round and b from a slow one.
  assert.equal(pairedRatio([4, 8, 8], [2, 4, 2]), 2);
  assert.equal(pairedRatio([4.4, 4, 2.2, 4], [2, 2, 1, 2]), 2.1);
  assert.equal(pairedRatio([1, 2], [1]), null);
  assert.equal(pairedRatio([1], [0]), null);
  assert.equal(pairedRatio(undefined, [1]), null);
});
