import { test } from 'node:test';
import assert from 'node:assert/strict';
import { placeAll, choose, broken, makespanMs, type HostView, type DomainView } from './place.ts';
import { checkRule, contradiction, type Rule } from './rules.ts';
import { autoSkip, balance } from './balance.ts';
import { baseline } from './cpu.ts';
import { FerryError } from '../errors.ts';

const host = (name: string, freeMiB: number, o: Partial<HostView> = {}): HostView => ({
  name,
  memoryMiB: 2048,
  freeMiB,
  cpuModel: 'qemu64',
  cpuModels: ['qemu64', 'Nehalem'],
  accel: 'tcg',
  networks: ['lab'],
  maintenance: false,
  cores: 2,
  ...o,
});
const dom = (name: string, memoryMiB: number, o: Partial<DomainView> = {}): DomainView => ({
  name,
  host: 'h1',
  memoryMiB,
  cpuModel: 'qemu64',
  networks: ['lab'],
  ...o,
});
const rule = (name: string, kind: Rule['kind'], domains: string[], hosts: string[] = []): Rule => ({ name, kind, domains, hosts });
const none = { rules: [] as Rule[], where: new Map<string, string>() };

test('small and quiet first, each to the host with the most memory left, one move each', () => {
  const a = placeAll(
    [dom('big', 512), dom('small', 64), dom('busy', 64, { dirtyRateMBps: 90 }), dom('quiet', 64, { dirtyRateMBps: 1 })],
    [host('h2', 600), host('h3', 700)],
    none,
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
  const a = placeAll(
    [dom('web', 256, { networks: ['lab', 'dmz'] }), dom('db', 128, { cpuModel: 'Nehalem' })],
    [host('h2', 1024, { maintenance: true }), host('h3', 100), host('h4', 1024, { cpuModels: ['qemu64'] }), host('h5', 512)],
    none,
  );
  const web = a.find((x) => x.domain === 'web')!;
  assert.equal(web.to, null);
  assert.match(web.why, /h2 is in maintenance/);
  assert.match(web.why, /h3 lacks network dmz|h3 has 100 MiB free/);
  assert.match(web.why, /h5 lacks network dmz/);
  // The CPU: h4's ceiling leaves it no Nehalem, so db goes to h5 although h4 has more room.
  assert.equal(a.find((x) => x.domain === 'db')!.to, 'h5');
  assert.match(
    choose(dom('db', 128, { cpuModel: 'Nehalem' }), [host('h4', 1024, { cpuModels: ['qemu64'] })], none).why,
    /h4 cannot give CPU model Nehalem/,
  );
  assert.equal(placeAll([dom('x', 64)], [], none)[0].why, 'no other host to move to');
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
  const a = placeAll([{ ...dom('off', 4096), stopped: true }, dom('run', 256)], [host('h2', 300), host('h3', 200, { networks: [] })], none);
  assert.deepEqual(
    a.map((x) => [x.domain, x.to]),
    [
      ['run', 'h2'],
      ['off', 'h2'],
    ],
  );
  assert.match(a[1].why, /shut off: its definition moves/);
  // Still bound by networks.
  assert.equal(placeAll([{ ...dom('off', 64, { networks: ['dmz'] }), stopped: true }], [host('h2', 1024)], none)[0].to, null);
});

test('keep-apart: a domain never joins its rule partner; an evacuation spreads a group; nothing left is reported, not broken', () => {
  const apart = rule('spread', 'keep-apart', ['a1', 'a2', 'a3']);
  const where = new Map([['a2', 'h2']]);
  // h2 has the most room, but a2 runs there.
  assert.equal(choose(dom('a1', 64), [host('h2', 1500), host('h3', 500)], { rules: [apart], where }).to, 'h3');
  // Both a1 and a3 leave h1: they go to different hosts although h3 has room for both.
  const ev = placeAll([dom('a1', 64), dom('a3', 64)], [host('h2', 100, { name: 'h2' }), host('h3', 1500), host('h4', 200)], {
    rules: [apart],
    where: new Map([['a2', 'h2']]),
  });
  assert.deepEqual(new Set(ev.map((x) => x.to)), new Set(['h3', 'h4']));
  const stuck = choose(dom('a1', 64), [host('h2', 1500)], { rules: [apart], where });
  assert.equal(stuck.to, null);
  assert.match(stuck.why, /keep-apart rule "spread": a2 runs on h2/);
});

test('keep-together follows the partner; prefer and avoid steer, and only the HA restart may break them', () => {
  const together = rule('pair', 'keep-together', ['web', 'db']);
  assert.equal(choose(dom('web', 64), [host('h2', 1500), host('h3', 500)], { rules: [together], where: new Map([['db', 'h3']]) }).to, 'h3');
  const prefer = rule('fast', 'prefer-hosts', ['web'], ['h3']);
  const c = choose(dom('web', 64), [host('h2', 1500), host('h3', 500)], { rules: [prefer], where: new Map() });
  assert.equal(c.to, 'h3');
  assert.match(c.why, /preferred by rule "fast"/);
  const avoid = rule('not-h2', 'avoid-hosts', ['web'], ['h2']);
  const only = [host('h2', 1500)];
  assert.equal(choose(dom('web', 64), only, { rules: [avoid], where: new Map() }).to, null);
  const ha = choose(dom('web', 64), only, { rules: [avoid], where: new Map(), softMayBreak: true });
  assert.equal(ha.to, 'h2');
  assert.match(ha.broke.join(), /avoid-hosts rule "not-h2"/);
  // A hard rule gives way to nothing, not even an HA restart.
  const apart = rule('spread', 'keep-apart', ['web', 'db']);
  assert.equal(choose(dom('web', 64), only, { rules: [apart], where: new Map([['db', 'h2']]), softMayBreak: true }).to, null);
  assert.deepEqual(
    broken('web', 'h2', new Map([['db', 'h2']]), [apart, avoid]).map((b) => b.rule.name),
    ['spread', 'not-h2'],
  );
});

test('a new rule: unknown names, malformed and contradicting rules are refused with their code, nothing else', () => {
  const known = { domains: new Set(['a', 'b', 'c']), hosts: new Set(['h1', 'h2']) };
  const code = (r: Rule, existing: Rule[] = []): string => {
    try {
      checkRule(r, existing, known);
      return 'OK';
    } catch (e) {
      return (e as FerryError).code;
    }
  };
  assert.equal(code(rule('r', 'keep-apart', ['a', 'b'])), 'OK');
  assert.equal(code(rule('r', 'keep-apart', ['a', 'zz'])), 'RULE_UNKNOWN_DOMAIN');
  assert.equal(code(rule('r', 'prefer-hosts', ['a'], ['h9'])), 'RULE_UNKNOWN_HOST');
  assert.equal(code(rule('r', 'keep-apart', ['a'])), 'RULE_INVALID');
  assert.equal(code(rule('r', 'keep-apart', ['a', 'a'])), 'RULE_INVALID');
  assert.equal(code(rule('r', 'avoid-hosts', ['a'])), 'RULE_INVALID');
  assert.equal(code(rule('r', 'keep-together', ['a', 'b'], ['h1'])), 'RULE_INVALID');
  assert.equal(code(rule('r', 'keep-apart', ['a', 'b']), [rule('r', 'keep-apart', ['b', 'c'])]), 'RULE_EXISTS');
  // keep-apart a,c against keep-together a-b and b-c: a chain binds a and c to one host.
  const chain = [rule('t1', 'keep-together', ['a', 'b']), rule('t2', 'keep-together', ['b', 'c'])];
  assert.equal(code(rule('x', 'keep-apart', ['a', 'c']), chain), 'RULE_CONTRADICTS');
  assert.equal(code(rule('x', 'avoid-hosts', ['a'], ['h1']), [rule('p', 'prefer-hosts', ['a', 'b'], ['h1', 'h2'])]), 'RULE_CONTRADICTS');
  assert.equal(contradiction([...chain, rule('y', 'keep-apart', ['a', 'h'])]), null);
});

test('the balancer: fewest moves off the hot host, none breaking a rule, and nothing more once balanced (no ping-pong)', () => {
  const hosts = [host('h1', 2048 - 4 * 256), host('h2', 2048), host('h3', 2048)];
  const doms = ['d1', 'd2', 'd3', 'd4'].map((n) => dom(n, 256, { cpu: 0.1 }));
  const apart = rule('spread', 'keep-apart', ['d1', 'd2']);
  const b = balance(hosts, doms, { rules: [apart], threshold: 0.1 });
  assert.ok(b.moves.length >= 1 && b.moves.length <= 3, JSON.stringify(b.moves));
  assert.ok(b.moves.every((m) => m.from === 'h1'));
  assert.ok(
    b.after.every((l) => l.mem - b.mean.mem <= 0.1 + 1e-9),
    JSON.stringify(b.after),
  );
  // Apply them: a second run recommends nothing.
  const moved = new Map(b.moves.map((m) => [m.domain, m.to]));
  const hosts2 = hosts.map((h) => {
    const delta = b.moves.filter((m) => m.to === h.name).length * 256 - (h.name === 'h1' ? b.moves.length * 256 : 0);
    return { ...h, freeMiB: h.freeMiB - delta };
  });
  const doms2 = doms.map((d) => ({ ...d, host: moved.get(d.name) ?? d.host }));
  assert.deepEqual(balance(hosts2, doms2, { rules: [apart], threshold: 0.1 }).moves, []);
  // A rule that every move would break: nothing recommended, and why.
  const pinned = balance(hosts, doms, { rules: [rule('stay', 'prefer-hosts', ['d1', 'd2', 'd3', 'd4'], ['h1'])], threshold: 0.1 });
  assert.deepEqual(pinned.moves, []);
  assert.match(pinned.stuck ?? '', /h1 above the threshold/);
  // Hosts in maintenance are the evacuation's: neither source nor target.
  const maint = balance([host('h1', 0, { maintenance: true }), host('h2', 2048)], doms, { rules: [], threshold: 0.1 });
  assert.deepEqual(maint.moves, []);
});

test('the balancer ends rule breaches first (a rule added after placement), then balances; what it cannot end it names', () => {
  const hosts = [host('h1', 2048 - 2 * 128), host('h2', 2048), host('h3', 2048)];
  const apart = rule('split', 'keep-apart', ['d1', 'd2']);
  // Load alone would move nothing (threshold 50 %): the breach alone asks for a move.
  const doms = ['d1', 'd2'].map((n) => dom(n, 128, { cpu: 0 }));
  const b = balance(hosts, doms, { rules: [apart], threshold: 0.5 });
  assert.equal(b.moves.length, 1, JSON.stringify(b.moves));
  assert.match(b.moves[0].why, /on h1 it breaks keep-apart rule "split": d[12] runs on h1/);
  assert.notEqual(b.moves[0].to, 'h1');
  assert.deepEqual(b.broken, []);
  // Applied, nothing more.
  const doms2 = doms.map((d) => (d.name === b.moves[0].domain ? { ...d, host: b.moves[0].to } : d));
  const again = balance(hosts, doms2, { rules: [apart], threshold: 0.5 });
  assert.deepEqual([again.moves, again.broken], [[], []]);
  // keep-together across two hosts: one joins the other, to the host that leaves the load more even.
  const pair = rule('pair', 'keep-together', ['a', 'b']);
  const tog = balance(
    [host('h1', 2048 - 512), host('h2', 2048 - 128), host('h3', 2048)],
    [dom('a', 512, { cpu: 0 }), dom('b', 128, { host: 'h2', cpu: 0 })],
    {
      rules: [pair],
      threshold: 0.5,
    },
  );
  assert.deepEqual(
    tog.moves.map((m) => [m.domain, m.from, m.to]),
    [['b', 'h2', 'h1']],
  );
  // A soft rule an HA restart broke: the domain goes back to a preferred host.
  const pref = balance(hosts, [dom('p', 128, { host: 'h3', cpu: 0 })], {
    rules: [rule('home', 'prefer-hosts', ['p'], ['h2'])],
    threshold: 0.5,
  });
  assert.deepEqual(
    pref.moves.map((m) => [m.domain, m.to]),
    [['p', 'h2']],
  );
  // Held, or nowhere to go: no move, and the breach is named.
  const held = balance(hosts, doms, { rules: [apart], threshold: 0.5, held: new Set(['d1', 'd2']) });
  assert.deepEqual(held.moves, []);
  assert.equal(held.broken.length, 2);
  assert.match(held.broken[0], /^d1 on h1: keep-apart rule "split": d2 runs on h1$/);
  const full = balance([host('h1', 0), host('h2', 64, { memoryMiB: 64 })], doms, { rules: [apart], threshold: 0.5 });
  assert.deepEqual(full.moves, []);
  assert.equal(full.broken.length, 2);
  // A breach mended never costs the load pass its moves: four on h1 against two empty hosts, d1 and d2 apart after.
  const four = balance(
    [host('h1', 0), host('h2', 2048), host('h3', 2048)],
    ['d1', 'd2', 'd3', 'd4'].map((n) => dom(n, 256, { cpu: 0 })),
    {
      rules: [apart],
      threshold: 0.1,
    },
  );
  assert.match(four.moves[0].why, /keep-apart rule "split"/);
  const at = new Map(['d1', 'd2', 'd3', 'd4'].map((n) => [n, 'h1']));
  for (const m of four.moves) at.set(m.domain, m.to);
  assert.notEqual(at.get('d1'), at.get('d2'));
  assert.ok(
    four.after.every((l) => l.mem - four.mean.mem <= 0.1 + 1e-9),
    JSON.stringify(four.after),
  );
});

test('the CPU baseline: the most capable model every host can give; a host with a ceiling lowers it', () => {
  const features = {
    qemu64: ['a', 'b', 'svm'],
    Nehalem: ['a', 'b', 'c', 'd'],
    'Nehalem-v1': ['a', 'b', 'c', 'd'],
    Opteron_G2: ['a', 'b', 'x'],
  };
  const b = baseline(
    [
      { name: 'h1', cpuModels: ['qemu64', 'Nehalem', 'Nehalem-v1', 'Opteron_G2'], cpuModel: 'qemu64' },
      { name: 'h2', cpuModels: ['qemu64', 'Nehalem', 'Nehalem-v1', 'Opteron_G2'], cpuModel: 'qemu64' },
    ],
    features,
  )!;
  assert.equal(b.model, 'Nehalem');
  const capped = baseline(
    [
      { name: 'h1', cpuModels: ['qemu64', 'Nehalem', 'Opteron_G2'], cpuModel: 'qemu64' },
      { name: 'h3', cpuModels: ['qemu64', 'Opteron_G2'], cpuModel: 'qemu64' },
    ],
    features,
  )!;
  assert.equal(capped.model, 'Opteron_G2');
  assert.deepEqual(capped.common, ['Opteron_G2', 'qemu64']);
  assert.equal(
    baseline(
      [
        { name: 'h1', cpuModels: ['Nehalem'], cpuModel: 'x' },
        { name: 'h2', cpuModels: ['qemu64'], cpuModel: 'x' },
      ],
      features,
    ),
    null,
  );
});

test('the balancer judges CPU only on a window of measures: a domain just moved (no load yet) leaves CPU out', () => {
  const hosts = [host('h1', 2048 - 256), host('h2', 2048 - 256)];
  const doms = [dom('busy', 256, { cpu: 1.8 }), dom('fresh', 256, { host: 'h2' })];
  const b = balance(hosts, doms, { rules: [], threshold: 0.2 });
  assert.equal(b.cpuJudged, false);
  assert.deepEqual(b.unmeasured, ['fresh']);
  assert.deepEqual(b.moves, []);
  // Measured: two busy domains on h1 (90% of its cores) and an idle one on h2: one busy domain moves.
  const judged = balance(hosts, [dom('b1', 128, { cpu: 0.9 }), dom('b2', 128, { cpu: 0.9 }), { ...doms[1], cpu: 0 }], {
    rules: [],
    threshold: 0.2,
  });
  assert.equal(judged.cpuJudged, true);
  assert.equal(judged.moves.length, 1);
  assert.match(judged.moves[0].why, /h1 CPU 90% against a mean of 45%/);
});

test('the automatic balancer: held domains stay put; a round is skipped while anything moves, waits or is in maintenance', () => {
  const hosts = [host('h1', 0), host('h2', 2048), host('h3', 2048)];
  const doms = ['d1', 'd2', 'd3', 'd4'].map((n) => dom(n, 256, { host: 'h1', cpu: 0 }));
  const free = balance(hosts, doms, { rules: [], threshold: 0.1 });
  assert.ok(free.moves.length >= 2, JSON.stringify(free.moves));
  // Every domain held (moved by the balancer lately): nothing may move, and the output says why.
  const allHeld = balance(hosts, doms, { rules: [], threshold: 0.1, held: new Set(['d1', 'd2', 'd3', 'd4']) });
  assert.deepEqual(allHeld.moves, []);
  assert.match(allHeld.stuck ?? '', /h1 above the threshold/);
  // Some held: only the others move.
  const someHeld = balance(hosts, doms, { rules: [], threshold: 0.1, held: new Set(['d1', 'd2']) });
  assert.ok(someHeld.moves.length >= 1);
  assert.ok(
    someHeld.moves.every((m) => m.domain === 'd3' || m.domain === 'd4'),
    JSON.stringify(someHeld.moves),
  );

  const fleet = { quorate: true, hosts, moving: [] as string[], queued: 0 };
  assert.equal(autoSkip(fleet, 'h1'), null);
  assert.match(autoSkip({ ...fleet, quorate: false }, 'h1') ?? '', /cannot reach etcd/);
  assert.match(autoSkip({ ...fleet, hosts: [host('h1', 0), host('h2', 0, { maintenance: true })] }, 'h1') ?? '', /h2 in maintenance/);
  assert.match(autoSkip({ ...fleet, moving: ['d9'] }, 'h1') ?? '', /d9 moving/);
  assert.match(autoSkip({ ...fleet, queued: 2 }, 'h1') ?? '', /2 move\(s\) waiting/);
  assert.match(autoSkip(fleet, 'h9') ?? '', /h9 has no live lease/);
  assert.match(autoSkip({ ...fleet, hosts: [host('h1', 0)] }, 'h1') ?? '', /one host/);
});

test('the balancer: among moves that even the load out as well, the one that dirties least goes (cheapest to move live)', () => {
  const hosts = [host('h1', 0), host('h2', 2048)];
  const doms = [
    dom('busy', 256, { host: 'h1', cpu: 0, dirtyRateMBps: 80 }),
    dom('quiet', 256, { host: 'h1', cpu: 0, dirtyRateMBps: 2 }),
    dom('new', 256, { host: 'h1', cpu: 0, dirtyRateMBps: null }),
  ];
  const b = balance(hosts, doms, { rules: [], threshold: 0.1, maxMoves: 1 });
  assert.deepEqual(
    b.moves.map((m) => [m.domain, m.dirtyRateMBps]),
    [['quiet', 2]],
  );
  // Not measured yet ranks after any measured rate, even a high one: it may be a busier writer still.
  const b2 = balance(hosts, [doms[0], doms[2]], { rules: [], threshold: 0.1, maxMoves: 1 });
  assert.deepEqual(
    b2.moves.map((m) => [m.domain, m.dirtyRateMBps]),
    [['busy', 80]],
  );
});
