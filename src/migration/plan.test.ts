import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
  plan,
  predict,
  precopyEtaS,
  linkRate,
  streamMsOf,
  chooseCompression,
  defaultCompression,
  DEFAULT_COMPRESSION,
  LARGE_GUEST_BYTES,
  type CompressionChoice,
  FIXED_PAUSE_MS,
  FIXED_OVERHEAD_S,
  MULTIFD_GAIN,
  AUTO_COMPRESS_MAX_RATIO,
  AUTO_COMPRESS_CHANNELS,
  COMPRESSED_PAGE_BYTES_PER_S,
  throttleInitialPct,
} from './plan.ts';
import { REPO_ROOT as REPO } from '../util/paths.ts';
import { IDLE_1G } from '../testing/plan.ts';
import { median, pairedRatio } from '../../bench/stats.ts';

const MiB = 1048576;
const base = IDLE_1G;

/** A bench result file's succeeded runs of one contender (bench/results/FILE). */
function succeededRuns<T>(file: string, contender: string): T[] {
  const runs = JSON.parse(fs.readFileSync(path.join(REPO, 'bench', 'results', file), 'utf8')).runs as (T & {
    contender: string;
    outcome: string;
  })[];
  return runs.filter((r) => r.contender === contender && r.outcome === 'succeeded');
}

test('plan: an idle guest converges by pre-copy in a few passes, and pre-copy is the pick', () => {
  const p = plan(base);
  const pre = p.predictions.find((x) => x.strategy === 'precopy')!;
  assert.ok(pre.converges && pre.fitsBudget);
  assert.ok(pre.passes <= 3, `passes ${pre.passes}`);
  // One pass of 1 GiB at 300 MiB/s, a second of what 1 MiB/s dirtied meanwhile.
  assert.ok(Math.abs(pre.totalS - FIXED_OVERHEAD_S - 1024 / 300) < 0.1, `total ${pre.totalS}`);
  assert.equal(p.pick, 'precopy');
});

test('plan: a guest that dirties as fast as the link never converges by pre-copy; post-copy is picked, bounded', () => {
  const p = plan({ ...base, dirtyBytesPerS: 400 * MiB });
  const pre = p.predictions.find((x) => x.strategy === 'precopy')!;
  assert.equal(pre.converges, false);
  assert.equal(pre.totalS, Infinity);
  assert.equal(p.pick, 'postcopy');
  const pc = p.predictions.find((x) => x.strategy === 'postcopy')!;
  assert.equal(pc.pauseMs, FIXED_PAUSE_MS);
  // One full pass, then at most all RAM again on demand.
  assert.ok(pc.totalS <= FIXED_OVERHEAD_S + (2 * 1024) / 300 + 0.01);
  assert.match(p.reason, /post-copy bounds the time/);
});

test('plan: post-copy forbidden by the config → auto-converge, which throttles until the passes shrink', () => {
  const p = plan({ ...base, dirtyBytesPerS: 400 * MiB, postcopyAllowed: false });
  assert.equal(p.pick, 'auto-converge');
  const ac = p.predictions.find((x) => x.strategy === 'auto-converge')!;
  assert.ok(ac.converges);
  assert.match(p.predictions.find((x) => x.strategy === 'postcopy')!.note, /forbidden/);
});

test('plan: auto-converge starts where the guest needs it, and the model steps as QEMU does (at most every two seconds)', () => {
  // The memory-pattern guest of reliability/verify-engine: 128 MiB, rewriting every page at 1.3 GB/s, over an assumed 250 MB/s.
  const fast = { ...base, ramBytes: 128 * MiB, dirtyBytesPerS: 1321e6, linkBytesPerS: 250e6, postcopyAllowed: false };
  assert.equal(throttleInitialPct(fast), 90, 'half the link is 125 MB/s: 90.5 % throttle, capped at 90 (QEMU steps on from there)');
  assert.equal(throttleInitialPct({ dirtyBytesPerS: 400 * MiB, linkBytesPerS: 300 * MiB }), 70, '1 − 150/400 = 62.5 %, rounded up to 70');
  assert.equal(
    throttleInitialPct({ dirtyBytesPerS: 100 * MiB, linkBytesPerS: 300 * MiB }),
    20,
    "a guest under half the link: QEMU's default",
  );
  assert.equal(throttleInitialPct({ dirtyBytesPerS: 0, linkBytesPerS: 300 * MiB }), 20);
  const ac = predict(fast).find((x) => x.strategy === 'auto-converge')!;
  assert.ok(ac.converges);
  // QEMU judges after a pass once a second has gone by, and throttles at the second high judgement: nothing shrinks before 2 s.
  assert.ok(ac.totalS > 2 && ac.totalS < 5, `total ${ac.totalS}`);
  assert.ok(ac.passes >= 4, `passes ${ac.passes}`);
  assert.match(ac.note, /from 90 %/);
});

test('plan: what rules post-copy out is named in its prediction and in the reason', () => {
  const why = 'post-copy is off with --verify-memory (it compares both copies while both are paused)';
  const p = plan({ ...base, strategy: 'postcopy', postcopyAllowed: false, postcopyWhyNot: why });
  assert.equal(p.pick, 'precopy');
  assert.match(p.reason, /--verify-memory/);
  assert.equal(p.predictions.find((x) => x.strategy === 'postcopy')!.note, why);
});

test('plan: multifd is never offered without two spare cores; offline pauses for the whole copy', () => {
  const pr = predict(base);
  assert.equal(pr.find((x) => x.strategy === 'multifd')!.fitsBudget, false);
  const off = pr.find((x) => x.strategy === 'offline')!;
  assert.ok(off.pauseMs > 3000);
  const withCores = predict({ ...base, spareCores: 2, dirtyBytesPerS: 350 * MiB });
  assert.ok(withCores.find((x) => x.strategy === 'multifd')!.converges, 'two channels outrun a guest that one cannot');
});

test("plan: the operator's rule wins, but never against the guest's config", () => {
  assert.equal(plan({ ...base, strategy: 'postcopy' }).pick, 'postcopy');
  assert.equal(plan({ ...base, strategy: 'postcopy', postcopyAllowed: false }).pick, 'precopy');
  assert.equal(plan({ ...base, strategy: 'precopy', dirtyBytesPerS: 400 * MiB }).pick, 'auto-converge');
});

test('plan: the ETA of a pre-copy in flight shrinks as it converges, and is infinite when it cannot', () => {
  const a = precopyEtaS(512 * MiB, 10 * MiB, 300 * MiB, 300);
  const b = precopyEtaS(128 * MiB, 10 * MiB, 300 * MiB, 300);
  assert.ok(a > b && b > 0);
  assert.equal(precopyEtaS(512 * MiB, 400 * MiB, 300 * MiB, 300), Infinity);
});

test('plan: untouched RAM is scanned, not sent: a mostly empty guest over a slow link is predicted by what it touched', () => {
  const p = predict({ ...base, linkBytesPerS: 16 * MiB, touchedBytes: 160 * MiB, dirtyBytesPerS: 0.5 * MiB });
  const pre = p.find((x) => x.strategy === 'precopy')!;
  assert.ok(pre.converges);
  assert.ok(pre.totalS > 9 && pre.totalS < 12, `total ${pre.totalS}`);
  assert.ok(pre.bytes < 200 * MiB);
  const full = predict({ ...base, linkBytesPerS: 16 * MiB, dirtyBytesPerS: 0.5 * MiB }).find((x) => x.strategy === 'precopy')!;
  assert.ok(full.totalS > 60, 'all of RAM at 16 MiB/s takes a minute');
});

test("a measured link rate leaves out the zero pages' scan, which each plan adds for its own guest", () => {
  const GiB = 1073741824;
  // The idle 1 GiB Linux guest of the bench: 83 MB sent in a 575 ms stream.
  assert.equal(Math.round(linkRate(83e6, 575) / 1e6), 144);
  const net = linkRate(83e6, 575, GiB);
  assert.ok(net > 240e6 && net < 270e6, `${net}`);
  // Planned again with that rate, the same guest takes about what it took, not 0.25 s more.
  const p = predict({
    ramBytes: GiB,
    touchedBytes: 83e6,
    dirtyBytesPerS: 0,
    linkBytesPerS: net,
    linkFrom: 'x',
    maxDowntimeMs: 300,
    timeoutS: 120,
    spareCores: 0,
    postcopyAllowed: true,
    strategy: 'auto',
  });
  const pre = p.find((x) => x.strategy === 'precopy')!;
  assert.ok(Math.abs(pre.totalS - (0.575 + FIXED_OVERHEAD_S)) < 0.01, `${pre.totalS}`);
  // An implausible scan (it would leave under a quarter of the stream) is not believed.
  assert.equal(linkRate(83e6, 100, 64 * GiB), 83e6 / 0.1);
});

test("a move's fixed cost is the bench's own result: a 1 GiB Linux move's total less its stream, median (bench/results/linux-1g-{idle,churn}.json)", () => {
  const over: number[] = [];
  for (const f of ['linux-1g-idle', 'linux-1g-churn']) {
    const runs = JSON.parse(fs.readFileSync(path.join(REPO, 'bench', 'results', `${f}.json`), 'utf8')).runs as {
      contender: string;
      outcome: string;
      reportTotalMs?: number;
      timeline?: Record<string, number>;
    }[];
    for (const r of runs) {
      const stream = streamMsOf(r.timeline);
      if (r.contender === 'ferry' && r.outcome === 'succeeded' && r.reportTotalMs && stream !== undefined)
        over.push(r.reportTotalMs - stream);
    }
  }
  assert.ok(over.length >= 10, `${over.length} runs with a timeline`);
  const m = (median(over) ?? NaN) / 1000;
  assert.ok(Math.abs(FIXED_OVERHEAD_S - m) <= 0.15, `FIXED_OVERHEAD_S ${FIXED_OVERHEAD_S} s, the bench measured ${m.toFixed(2)} s`);
});

test("the multifd gain is the stream bench's own result: two TLS channels over one, the median round (bench/results/tls-stream.json)", () => {
  const g = JSON.parse(fs.readFileSync(path.join(REPO, 'bench', 'results', 'tls-stream.json'), 'utf8')).gbps as Record<string, number[]>;
  const ratio = pairedRatio(g['tls-multifd2'], g['tls-default']);
  assert.ok(ratio !== null, 'the result file has both cases in every round');
  assert.ok(Math.abs(MULTIFD_GAIN - ratio) <= 0.1, `MULTIFD_GAIN ${MULTIFD_GAIN}, the bench measured ${ratio.toFixed(2)}×`);
});

test('--compress auto: zstd where the sampled pages compress to at most AUTO_COMPRESS_MAX_RATIO, over two channels where two cores are, with the reason', () => {
  const mixed = chooseCompression(0.55, 2);
  assert.equal(mixed.compress, 'zstd');
  assert.equal(mixed.parallel, AUTO_COMPRESS_CHANNELS);
  assert.match(mixed.why, /compresses to 55 % of its size.*over 2 channels/);
  const oneCore = chooseCompression(0.55, 1);
  assert.equal(oneCore.parallel, undefined);
  assert.match(oneCore.why, /over 1 channel/);
  assert.equal(chooseCompression(AUTO_COMPRESS_MAX_RATIO, 2).compress, 'zstd', 'the bound itself compresses');
  const random = chooseCompression(0.97, 2);
  assert.equal(random.compress, 'none');
  assert.equal(random.parallel, undefined, 'no compression, no channels of its own');
  assert.match(random.why, /only to 97 %/);
  const unknown = chooseCompression(null, 2);
  assert.equal(unknown.compress, 'none');
  assert.match(unknown.why, /too little .* to judge|could not be read/);
});

test('compression by default: only a large guest whose pages compress, and only where post-copy is not needed', async () => {
  const zstd = chooseCompression(0.55, 2, DEFAULT_COMPRESSION);
  const asked: string[] = [];
  // The 4 GiB dense guest: 3.2 GiB in use; the plan's input as the move would have it.
  const big = { ...base, ramBytes: 4096 * MiB, touchedBytes: 3300 * MiB, postcopyAllowed: false };
  const steps = (over: { touchedBytes?: number | null; sample?: CompressionChoice; postcopyWhyNot?: string; dirtyMiBs?: number }) => ({
    touchedBytes: over.touchedBytes === undefined ? big.touchedBytes : over.touchedBytes,
    sample: async () => {
      asked.push('sample');
      return over.sample ?? zstd;
    },
    postcopyWhyNot: over.postcopyWhyNot,
    predict: async (c: CompressionChoice) => {
      asked.push(`predict ${c.compress}/${c.parallel}`);
      return predict({ ...big, dirtyBytesPerS: (over.dirtyMiBs ?? 4) * MiB, compressRatio: c.ratio });
    },
  });
  // A small guest: nothing sampled, nothing said in the move's report.
  const small = await defaultCompression(steps({ touchedBytes: 79 * MiB }));
  assert.deepEqual([small.compress, small.considered, asked], ['none', false, []]);
  assert.match(small.why, /79 MiB of RAM in use, under 2\.0 GiB/);
  assert.equal((await defaultCompression(steps({ touchedBytes: null }))).considered, false, 'unknown counts as small');
  assert.equal((await defaultCompression(steps({ touchedBytes: LARGE_GUEST_BYTES - 1 }))).compress, 'none');
  // Large, but its pages do not compress: no plan is made.
  const random = await defaultCompression(steps({ sample: chooseCompression(0.97, 2, DEFAULT_COMPRESSION) }));
  assert.deepEqual([random.compress, random.considered, asked], ['none', true, ['sample']]);
  assert.match(random.why, /^compression by default: no compression \(.*only to 97 %/);
  // Large and compressible, post-copy off anyway: nothing is lost.
  asked.length = 0;
  const off = await defaultCompression(steps({ postcopyWhyNot: "post-copy is forbidden by the domain's config" }));
  assert.deepEqual([off.compress, off.parallel, asked], ['zstd', 2, ['sample']]);
  assert.match(off.why, /nothing lost: post-copy is forbidden/);
  // Post-copy on the table: compressed only where the plan fits pre-copy in the budget.
  asked.length = 0;
  const fits = await defaultCompression(steps({}));
  assert.deepEqual([fits.compress, fits.parallel, asked], ['zstd', 2, ['sample', 'predict zstd/2']]);
  assert.match(fits.why, /pre-copy fits the budget without post-copy \(predicted \d+\.\d s/);
  const churn = await defaultCompression(steps({ dirtyMiBs: 600 }));
  assert.deepEqual([churn.compress, churn.parallel, churn.considered], ['none', undefined, true]);
  assert.match(
    churn.why,
    /not predicted to fit the budget, and post-copy, the fallback there, cannot go with compression \(the sample alone would have chosen zstd over 2 channels\)$/,
  );
});

test('a compressed plan: pages cross at the link over the sampled ratio, up to what the cores compress, and its bytes are counted on the wire', () => {
  // A 1 Gbit/s link, the 4 GiB dense guest.
  const big = { ...base, ramBytes: 4096 * MiB, touchedBytes: 3300 * MiB, dirtyBytesPerS: 4 * MiB, linkBytesPerS: 100e6 };
  const by = (ps: ReturnType<typeof predict>, s: string) => ps.find((x) => x.strategy === s)!;
  const whole = by(predict(big), 'precopy');
  const half = by(predict({ ...big, compressRatio: 0.5 }), 'precopy');
  // 3300 MiB at 100 MB/s against 200 MB/s of pages: about half the time, half the bytes.
  assert.ok(Math.abs((whole.totalS - FIXED_OVERHEAD_S) / (half.totalS - FIXED_OVERHEAD_S) - 2) < 0.05, `${whole.totalS} vs ${half.totalS}`);
  assert.ok(Math.abs(whole.bytes / half.bytes - 2) < 0.05, `${whole.bytes} vs ${half.bytes}`);
  // The cores bound it: pages that compress to 10 % still cross at COMPRESSED_PAGE_BYTES_PER_S, not at ten times the link.
  const tiny = by(predict({ ...big, compressRatio: 0.1 }), 'precopy');
  assert.ok(tiny.totalS > (3300 * MiB) / COMPRESSED_PAGE_BYTES_PER_S, `${tiny.totalS}`);
  assert.equal(by(predict({ ...big, compressRatio: 0.05 }), 'precopy').totalS, tiny.totalS, 'half the bytes, no faster');
  // A guest dirtying faster than the link but slower than its pages cross it compressed: only the compressed move converges.
  const churn = { ...big, dirtyBytesPerS: 100e6 * 1.2 };
  assert.equal(by(predict(churn), 'precopy').converges, false);
  const c = by(predict({ ...churn, compressRatio: 0.5 }), 'precopy');
  assert.ok(c.converges && Number.isFinite(c.totalS), JSON.stringify(c));
  assert.match(
    by(predict({ ...churn, dirtyBytesPerS: 400e6, compressRatio: 0.5 }), 'precopy').note,
    /of pages \(95 MiB\/s at 50 %, at most 286 MiB\/s compressed\)/,
  );
  // No ratio, or a nonsense one: pages cross whole.
  for (const r of [undefined, 0, 1, 1.4]) assert.deepEqual(predict({ ...big, compressRatio: r }), predict(big), `ratio ${r}`);
  // The sample's ratio reaches the plan with the choice.
  assert.equal(chooseCompression(0.55, 2).ratio, 0.55);
  assert.equal(chooseCompression(0.97, 2).ratio, undefined);
});

test("the compressed pages' bound is the bench's own result: pages per second where the link was fast (bench/results/dense-4g-{10gbit,unshaped}-default.json)", () => {
  const rates: number[] = [];
  for (const f of ['dense-4g-10gbit-default.json', 'dense-4g-unshaped-default.json']) {
    const runs = succeededRuns<{ bytes: number; note: string; timeline: { firstByte: number; streamCompleted: number } }>(f, 'ferry');
    for (const r of runs) {
      // The move's own sample (its report's policy) turns the bytes sent back into pages.
      const ratio = Number(/compresses to (\d+) % of its size/.exec(r.note)![1]) / 100;
      rates.push(r.bytes / ratio / ((r.timeline.streamCompleted - r.timeline.firstByte) / 1000));
    }
  }
  assert.ok(rates.length >= 10, `${rates.length} runs`);
  const measured = median(rates)!;
  const k = COMPRESSED_PAGE_BYTES_PER_S / measured;
  assert.ok(
    k >= 0.8 && k <= 1.25,
    `COMPRESSED_PAGE_BYTES_PER_S ${COMPRESSED_PAGE_BYTES_PER_S / 1e6} MB/s against a measured ${(measured / 1e6).toFixed(0)} MB/s`,
  );
});

test("auto's two compressing channels are the bench's own result: faster where the CPU binds, no slower where the link does (bench/results/dense-4g-*-channels.json)", () => {
  const medTotal = (file: string, contender: string): number => {
    const xs = succeededRuns<{ totalMs: number | null }>(file, contender).map((r) => r.totalMs!);
    assert.ok(xs.length >= 5, `${file}: ${xs.length} checked runs of ${contender}`);
    return median(xs)!;
  };
  const gain = (file: string): number => medTotal(file, 'ferry-zstd-p2') / medTotal(file, 'ferry-zstd');
  assert.ok(
    gain('dense-4g-10gbit-channels.json') <= 0.95,
    `10 Gbit/s: two channels ÷ one ${gain('dense-4g-10gbit-channels.json').toFixed(2)}`,
  );
  assert.ok(
    gain('dense-4g-1gbit-channels.json') <= 1.05,
    `1 Gbit/s: two channels ÷ one ${gain('dense-4g-1gbit-channels.json').toFixed(2)}`,
  );
});
