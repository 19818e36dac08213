import { test } from 'node:test';
import assert from 'node:assert/strict';
import { place, makespanMs, type Candidate } from './placement.ts';

const host = (name: string, freeMiB: number, o: Partial<Candidate> = {}): Candidate => ({
  name,
  freeMiB,
  cpuModel: 'qemu64',
  networks: ['lab'],
  maintenance: false,
  ...o,
});
const dom = (name: string, memoryMiB: number, o: { networks?: string[]; dirtyRateMBps?: number } = {}) => ({
  name,
  memoryMiB,
  cpuModel: 'qemu64',
  networks: ['lab'],
  ...o,
});

test('small and quiet first, each to the host with the most memory left, one move each', () => {
  const a = place(
    [dom('big', 512), dom('small', 64), dom('busy', 64, { dirtyRateMBps: 90 }), dom('quiet', 64, { dirtyRateMBps: 1 })],
    [host('h2', 600), host('h3', 700)],
  );
  assert.deepEqual(
    a.map((x) => [x.domain, x.to]),
    [
      ['small', 'h3'],
      ['quiet', 'h3'],
      ['busy', 'h2'],
      ['big', 'h3'],
    ],
  );
});

test("a domain nobody can take is reported with every host's reason; the rest are placed", () => {
  const a = place(
    [dom('web', 256, { networks: ['lab', 'dmz'] }), dom('db', 128)],
    [host('h2', 1024, { maintenance: true }), host('h3', 100), host('h4', 1024, { cpuModel: 'Nehalem' }), host('h5', 512)],
  );
  const web = a.find((x) => x.domain === 'web')!;
  assert.equal(web.to, null);
  assert.match(web.why, /h2 is in maintenance/);
  assert.match(web.why, /h3 lacks network dmz|h3 has 100 MiB free/);
  assert.match(web.why, /h4 runs CPU model Nehalem/);
  assert.match(web.why, /h5 lacks network dmz/);
  assert.equal(a.find((x) => x.domain === 'db')!.to, 'h5');
  assert.equal(place([dom('x', 64)], [])[0].why, 'no other host to move to (--to, or "peers" in ferryd.json)');
});

test('the makespan: N at once per destination, destinations in parallel', () => {
  const moves = [
    { to: 'a', ms: 10 },
    { to: 'a', ms: 10 },
    { to: 'a', ms: 10 },
    { to: 'b', ms: 25 },
  ];
  assert.equal(makespanMs(moves, 1), 30);
  assert.equal(makespanMs(moves, 2), 25);
  assert.equal(makespanMs([], 2), 0);
});

test('--include-stopped: a shut-off domain needs no free memory, goes after the running ones, and takes none from them', () => {
  const a = place([{ ...dom('off', 4096), stopped: true }, dom('run', 256)], [host('h2', 300), host('h3', 200, { networks: [] })]);
  assert.deepEqual(
    a.map((x) => [x.domain, x.to]),
    [
      ['run', 'h2'],
      ['off', 'h2'],
    ],
  );
  assert.match(a[1].why, /shut off: its definition moves/);
  // Still bound by CPU model and networks.
  assert.equal(place([{ ...dom('off', 64, { networks: ['dmz'] }), stopped: true }], [host('h2', 1024)])[0].to, null);
});
