/**
 * The convergence model: what each way of moving a running guest will cost, from three
 * figures measured before the move (guest RAM, its dirty rate, the link's goodput), and
 * the pick that fits the operator's budget (--max-downtime, --timeout).
 *
 * Pre-copy sends all RAM, then what the guest dirtied meanwhile, pass after pass; pass
 * n+1 carries min(RAM, dirty rate × duration of pass n). It converges once one pass
 * fits in the downtime limit; if the guest dirties as fast as the link carries, the
 * passes never shrink. Auto-converge throttles the vCPUs until they do (QEMU steps the
 * throttle at most every two seconds: ThrottleModel; ferry picks where it starts: throttleInitialPct). Post-copy sends
 * one pre-copy pass, then runs the guest on the destination and fetches the rest on
 * demand: its pause is the device state alone, its cost that for that window the
 * guest's memory lives on two hosts. Offline stops the guest for one pass.
 *
 * Pure: unit-tested beside it, and the same function answers `--plan` and picks for a move.
 */
import { QEMU_THROTTLE_INITIAL_PCT } from '../qemu/migration.ts';

export type Strategy = 'precopy' | 'auto-converge' | 'multifd' | 'postcopy' | 'offline';
export type StrategyChoice = 'auto' | 'precopy' | 'postcopy';
export type OnTimeout = 'cancel' | 'suspend' | 'postcopy';

export interface PlanInput {
  ramBytes: number;
  /**
   * RAM that holds data (the non-zero pages, from a sample of them; at most ramBytes):
   * zero pages cost QEMU a scan and a marker, not a send. Absent: all of it.
   */
  touchedBytes?: number;
  /** Bytes the guest dirties per second (calc-dirty-rate). */
  dirtyBytesPerS: number;
  /** What the link carries per second for this move (after --bandwidth). */
  linkBytesPerS: number;
  /**
   * A compressed move: the share of its pages' bytes that cross the link (the sample's
   * ratio, chooseCompression), so pages go 1/ratio times as fast as the link and bytes
   * are counted on the wire. Absent: pages cross whole (no compression, or no sample).
   */
  compressRatio?: number;
  /** Where linkBytesPerS comes from, in words. */
  linkFrom: string;
  maxDowntimeMs: number;
  timeoutS: number;
  /** Cores not busy with guests: multifd needs one per extra channel. */
  spareCores: number;
  /** Post-copy is on the table: the guest's config allows it ("postcopy": false forbids it) and nothing about this move rules it out. */
  postcopyAllowed: boolean;
  /** Why it is not, when something other than the config rules it out (--verify-memory, --compress, the engine). */
  postcopyWhyNot?: string;
  /** The operator's rule, if any (--strategy). */
  strategy: StrategyChoice;
}

export interface Prediction {
  strategy: Strategy;
  /** From the first byte to the guest running on the destination, seconds. */
  totalS: number;
  /** The guest's final pause, ms. */
  pauseMs: number;
  bytes: number;
  passes: number;
  /** Finishes at all (pre-copy that never shrinks does not). */
  converges: boolean;
  /** Within --max-downtime and --timeout. */
  fitsBudget: boolean;
  note: string;
}

export interface Plan {
  input: PlanInput;
  predictions: Prediction[];
  pick: Strategy;
  reason: string;
}

/** Device state and the final handshake: the pause no RAM figure explains (measured: 20–60 ms under TCG). */
export const FIXED_PAUSE_MS = 40;
/**
 * What every move costs beyond its stream (Begin, the incoming QEMU, Finish, retiring the
 * source): the median of a move's total less its stream in the bench's 1 GiB Linux moves
 * (bench/results/linux-1g-{idle,churn}.json, about 0.65 s on the bench host; plan.test.ts
 * checks the figure against them). It was 0.15 s until the first pass counted the RAM
 * holding data: the plans of small guests then ran long anyway, and hid it.
 */
export const FIXED_OVERHEAD_S = 0.65;
/** A pre-copy that has not converged after this many passes will not. */
const MAX_PASSES = 30;
/**
 * What a second multifd TLS channel adds on these machines: two channels over one in
 * the median round of bench/results/tls-stream.json (BENCHMARKS.md "TLS and the stream
 * alone"); plan.test.ts fails when a new run of that bench moves it by more than 0.1.
 */
export const MULTIFD_GAIN = 1.8;
/**
 * --compress auto: zstd when a sample of the guest's non-zero pages deflates (level 1) to
 * at most this share of its size. The evidence (BENCHMARKS.md, dense-1g-*): a guest of
 * mixed data (a third random; sampled at 63 %) sent 0.65 of the bytes with zstd and moved
 * in 0.68× the time over a 1 Gbit/s link, 0.72× over the unshaped one. A random-filled
 * guest (sampled at 91 %) moved in 0.56× too, but for multifd's own thread, not for
 * compression (7 % fewer bytes): this rule judges compression alone.
 */
export const AUTO_COMPRESS_MAX_RATIO = 0.8;

/**
 * --compress auto: how many channels compress when it chose zstd. Two, where the host has
 * two cores: each multifd channel compresses on its own thread, and a single one is what
 * binds once the link is fast. The evidence (BENCHMARKS.md, dense-4g-*-channels: the 4 GiB
 * dense guest, 5 runs each, interleaved, checked against its result files by plan.test.ts):
 * over 10 Gbit/s two channels took 0.85× one channel's time (and 0.81× libvirt's best
 * flags, which use two); over 1 Gbit/s, where the link binds, they cost nothing measurable.
 */
export const AUTO_COMPRESS_CHANNELS = 2;

/**
 * --compress auto's choice from the sampled ratio (AUTO_COMPRESS_MAX_RATIO) and the host's
 * cores: the method, its channels (AUTO_COMPRESS_CHANNELS), and the reason the report gives.
 */
export function chooseCompression(ratio: number | null, cores: number, who = '--compress auto'): CompressionChoice {
  if (ratio === null)
    return {
      compress: 'none',
      why: `${who}: no compression (too little of the guest's RAM is in use to judge, or it could not be read)`,
    };
  const pct = `${Math.round(ratio * 100)} %`;
  if (ratio > AUTO_COMPRESS_MAX_RATIO)
    return {
      compress: 'none',
      why: `${who}: no compression (a sample of the guest's pages compresses only to ${pct} of its size; zstd from ${AUTO_COMPRESS_MAX_RATIO * 100} % down)`,
    };
  const two = cores >= AUTO_COMPRESS_CHANNELS;
  return {
    compress: 'zstd',
    ratio,
    ...(two ? { parallel: AUTO_COMPRESS_CHANNELS } : {}),
    why: `${who}: zstd (a sample of the guest's pages compresses to ${pct} of its size; zstd from ${AUTO_COMPRESS_MAX_RATIO * 100} % down), ${two ? `over ${AUTO_COMPRESS_CHANNELS} channels, each compressing on its own core` : `over 1 channel (this host has ${cores} core)`}`,
  };
}

/** A compression decision: the method, its channels, and the reason the report gives. */
export interface CompressionChoice {
  compress: 'zstd' | 'none';
  parallel?: number;
  /** zstd from a sample: the share of the pages' bytes it left (the plan's compressRatio). */
  ratio?: number;
  why: string;
}

/**
 * From this much RAM in use a guest is large: a live move the operator gave no --compress
 * considers compressing it. Below it a move sends little and takes seconds either way, and
 * ferry's downtime figures (BENCHMARKS.md) were measured on the uncompressed path; the same
 * size makes multifd come on by itself where post-copy is forbidden (outgoing/begin.ts).
 */
export const LARGE_GUEST_BYTES = 2 * 1024 ** 3;

/** What defaultCompression asks for, each only when the step before says go on. */
export interface DefaultCompressionSteps {
  /** RAM in use (null: unknown, which counts as small). */
  touchedBytes: number | null;
  /** chooseCompression on a sample of the guest's pages. */
  sample: () => Promise<CompressionChoice>;
  /** Why post-copy is off for this move anyway; undefined when it is on the table. */
  postcopyWhyNot: string | undefined;
  /** The plan's predictions as the move would run with `c` (compressed, so post-copy ruled out). */
  predict: (c: CompressionChoice) => Promise<Prediction[]>;
}

/** How the report names a decision of defaultCompression's. */
export const DEFAULT_COMPRESSION = 'compression by default';

/**
 * What a live move sends when the operator gave no --compress (README "Tuning",
 * compression by default): compressed only for a large guest (LARGE_GUEST_BYTES) whose
 * pages compress (chooseCompression, named DEFAULT_COMPRESSION), and only where
 * compressing takes away nothing the move may need.
 * QEMU 10.0 cannot combine multifd with post-copy, the fallback at the deadline, so either
 * post-copy is off anyway, or the plan with compression fits pre-copy (one channel or
 * several) in the budget. `considered` is false for a guest too small to weigh: the move's
 * report then says nothing about it. A small guest costs no sample, a guest that does not
 * compress no plan.
 */
export async function defaultCompression(s: DefaultCompressionSteps): Promise<CompressionChoice & { considered: boolean }> {
  const who = DEFAULT_COMPRESSION;
  if ((s.touchedBytes ?? 0) < LARGE_GUEST_BYTES)
    return {
      compress: 'none',
      why: `${who}: none (${s.touchedBytes === null ? 'RAM in use unknown' : `${mb(s.touchedBytes)} of RAM in use`}, under ${mb(LARGE_GUEST_BYTES)}; --compress zstd|auto compresses anyway)`,
      considered: false,
    };
  const c = await s.sample();
  if (c.compress === 'none') return { ...c, considered: true };
  if (s.postcopyWhyNot !== undefined) return { ...c, why: `${c.why}; nothing lost: ${s.postcopyWhyNot}`, considered: true };
  const fits = (await s.predict(c)).filter((x) => (x.strategy === 'precopy' || x.strategy === 'multifd') && x.fitsBudget);
  if (fits.length)
    return {
      ...c,
      why: `${c.why}; pre-copy fits the budget without post-copy (predicted ${fits[0].totalS.toFixed(1)} s)`,
      considered: true,
    };
  return {
    compress: 'none',
    why: `${who}: none: pre-copy is not predicted to fit the budget, and post-copy, the fallback there, cannot go with compression (the sample alone would have chosen zstd over ${c.parallel ?? 1} channel${(c.parallel ?? 1) > 1 ? 's' : ''})`,
    considered: true,
  };
}

/**
 * Pages per second that zstd (level 1) and TLS get through on two cores, one channel or
 * two: the bound of a compressed move where the link is fast (on the bench host,
 * dense-4g-10gbit-default and dense-4g-unshaped-default: about 280 MB/s of pages, median;
 * plan.test.ts checks the figure against them). A faster host is predicted long.
 */
export const COMPRESSED_PAGE_BYTES_PER_S = 300e6;

/** How fast QEMU scans zero pages it need not send (a marker each). */
const ZERO_SCAN_BYTES_PER_S = 4e9;

/** A finished move's stream, from its report's timeline: first byte to the end of the copy (post-copy's, if it switched); undefined if not recorded. */
export function streamMsOf(tl: Record<string, number> | undefined): number | undefined {
  const end = tl?.postcopyCompleted ?? tl?.streamCompleted;
  return end !== undefined && tl?.firstByte !== undefined && end > tl.firstByte ? end - tl.firstByte : undefined;
}

/**
 * A finished move's link rate, for the next plans: its bytes over the stream's own time,
 * less the time QEMU spent scanning the RAM it did not send. The plan adds that scan for
 * each guest (firstPass); left inside the rate, it was counted twice, and plans of guests
 * with much untouched RAM ran about 25 % long. A scan estimate that would leave less
 * than a quarter of the stream is not believed.
 */
export function linkRate(bytes: number, streamMs: number, ramBytes?: number): number {
  const s = streamMs / 1000;
  const scan = ramBytes ? Math.max(0, ramBytes - bytes) / ZERO_SCAN_BYTES_PER_S : 0;
  return bytes / (s - scan >= s / 4 ? s - scan : s);
}

/** The first pass: what has to be sent, and the time it takes with the zero pages' scan. */
function firstPass(i: PlanInput, b: number): { bytes: number; s: number } {
  const sent = Math.min(i.ramBytes, i.touchedBytes ?? i.ramBytes);
  return { bytes: sent, s: sent / b + (i.ramBytes - sent) / ZERO_SCAN_BYTES_PER_S };
}

/**
 * QEMU's auto-converge (migration/ram.c, migration_trigger_throttle): it judges the guest
 * at the end of a pass, and only once at least THROTTLE_PERIOD_S has gone by since it
 * last judged. A period in which the guest dirtied more than half of what was sent
 * (throttle-trigger-threshold 50) is high; every second high period throttles: first to
 * cpu-throttle-initial, then THROTTLE_STEP more each time, up to 99 %. So a step takes
 * two periods of at least a second: from QEMU's default 20 % to 90 % is seven steps,
 * about 15 s, during which a guest that dirties far faster than the link does not
 * converge (measured here: a 128 MiB guest dirtying 1.3 GB/s took 16–39 s).
 */
const THROTTLE_PERIOD_S = 1;
const THROTTLE_STEP = 0.1;
const THROTTLE_MAX = 0.99;
/** The highest start ferry sets: the dirty rate is a 100 ms sample, and QEMU steps on from there if it was not enough. */
const THROTTLE_INITIAL_MAX_PCT = 90;
/** A throttled pre-copy the model gives up on (it always converges at 99 %, but not within any budget). */
const MAX_THROTTLED_PASSES = 5000;

/**
 * Where auto-converge should start, %: the throttle at which the guest dirties at most
 * half of what the link carries, QEMU's own trigger (so one step instead of seven),
 * rounded up to QEMU's 10 % steps, between QEMU's default and THROTTLE_INITIAL_MAX_PCT.
 * It acts only if QEMU's trigger fires: a guest that converges is never throttled.
 */
export function throttleInitialPct(i: Pick<PlanInput, 'dirtyBytesPerS' | 'linkBytesPerS'>): number {
  if (i.dirtyBytesPerS <= 0 || i.linkBytesPerS <= 0) return QEMU_THROTTLE_INITIAL_PCT;
  const need = 1 - i.linkBytesPerS / 2 / i.dirtyBytesPerS;
  const pct = Math.ceil((need * 100 - 1e-9) / 10) * 10;
  return Math.min(THROTTLE_INITIAL_MAX_PCT, Math.max(QEMU_THROTTLE_INITIAL_PCT, pct));
}

/** QEMU's throttle as the passes go by (see THROTTLE_PERIOD_S): fed each pass's time and bytes, it says the throttle for the next. */
class ThrottleModel {
  pct = 0;
  private since = 0;
  private dirtied = 0;
  private sent = 0;
  private high = 0;
  constructor(private readonly initial: number) {}

  pass(at: number, sent: number, dirtied: number): number {
    this.sent += sent;
    this.dirtied += dirtied;
    if (at - this.since < THROTTLE_PERIOD_S) return this.pct;
    if (this.dirtied > this.sent * 0.5 && ++this.high >= 2) {
      this.high = 0;
      this.pct = this.pct === 0 ? this.initial : Math.min(THROTTLE_MAX, this.pct + THROTTLE_STEP);
    }
    this.since = at;
    this.dirtied = 0;
    this.sent = 0;
    return this.pct;
  }
}

function precopy(i: PlanInput, b: number, throttle: boolean): Omit<Prediction, 'strategy' | 'fitsBudget' | 'note'> {
  const fp = firstPass(i, b);
  const model = throttle ? new ThrottleModel(throttleInitialPct(i) / 100) : null;
  let x = fp.bytes;
  let total = 0;
  let bytes = 0;
  let pct = 0;
  for (let pass = 1; pass <= (throttle ? MAX_THROTTLED_PASSES : MAX_PASSES); pass++) {
    const t = pass === 1 ? fp.s : x / b;
    if (t * 1000 <= i.maxDowntimeMs && pass > 1) {
      return {
        totalS: FIXED_OVERHEAD_S + total + t,
        pauseMs: Math.round(t * 1000 + FIXED_PAUSE_MS),
        bytes: bytes + x,
        passes: pass,
        converges: true,
      };
    }
    total += t;
    bytes += x;
    const next = Math.min(i.ramBytes, i.dirtyBytesPerS * (1 - pct) * t);
    if (model) pct = model.pass(total, x, next);
    x = next;
    if (x === 0) return { totalS: FIXED_OVERHEAD_S + total, pauseMs: FIXED_PAUSE_MS, bytes, passes: pass, converges: true };
  }
  return { totalS: Infinity, pauseMs: Infinity, bytes: Infinity, passes: MAX_PASSES, converges: false };
}

export function predict(input: PlanInput): Prediction[] {
  // Compressed, every model runs on page bytes: the link's rate over the ratio, up to what
  // the cores compress (the move is multifd already, so no channel gain on top); the bytes
  // each prediction reports are put back on the wire's scale at the end.
  const r = input.compressRatio !== undefined && input.compressRatio > 0 && input.compressRatio < 1 ? input.compressRatio : 1;
  const i: PlanInput = r < 1 ? { ...input, linkBytesPerS: Math.min(input.linkBytesPerS / r, COMPRESSED_PAGE_BYTES_PER_S) } : input;
  const b = Math.max(1, i.linkBytesPerS);
  const fits = (p: { pauseMs: number; totalS: number }): boolean => p.pauseMs <= i.maxDowntimeMs && p.totalS <= i.timeoutS;
  const out: Prediction[] = [];
  const pre = precopy(i, b, false);
  out.push({
    strategy: 'precopy',
    ...pre,
    fitsBudget: fits(pre),
    note: pre.converges
      ? passes(pre.passes)
      : `the guest dirties ${mb(i.dirtyBytesPerS)}/s against a link of ${mb(b)}/s${r < 1 ? ` of pages (${mb(input.linkBytesPerS)}/s at ${Math.round(r * 100)} %, at most ${mb(COMPRESSED_PAGE_BYTES_PER_S)}/s compressed)` : ''}: the passes do not shrink`,
  });
  const ac = precopy(i, b, true);
  out.push({
    strategy: 'auto-converge',
    ...ac,
    fitsBudget: fits(ac),
    note: ac.converges
      ? `${passes(ac.passes)}; the guest's vCPUs are throttled (from ${throttleInitialPct(i)} %, up to 99 %) until it converges`
      : 'does not converge even at 99 % throttle',
  });
  if (i.spareCores >= 2) {
    const mf = precopy(i, r < 1 ? b : b * MULTIFD_GAIN, false);
    out.push({
      strategy: 'multifd',
      ...mf,
      fitsBudget: fits(mf),
      note: r < 1 ? 'the compressed move is multifd already' : `2 channels, each encrypted on its own core (×${MULTIFD_GAIN} measured)`,
    });
  } else {
    out.push({
      strategy: 'multifd',
      totalS: Infinity,
      pauseMs: Infinity,
      bytes: Infinity,
      passes: 0,
      converges: false,
      fitsBudget: false,
      note: `needs 2 spare cores; this host has ${i.spareCores}`,
    });
  }
  if (i.postcopyAllowed) {
    const fp = firstPass(i, b);
    const rest = Math.min(i.ramBytes, i.dirtyBytesPerS * fp.s);
    const pc = { totalS: FIXED_OVERHEAD_S + fp.s + rest / b, pauseMs: FIXED_PAUSE_MS, bytes: fp.bytes + rest, passes: 1, converges: true };
    out.push({
      strategy: 'postcopy',
      ...pc,
      fitsBudget: fits(pc),
      note: `one pre-copy pass, then the guest runs on the destination for ${(rest / b).toFixed(1)} s while ${mb(rest)} are fetched: losing either host in that window loses the guest`,
    });
  } else {
    out.push({
      strategy: 'postcopy',
      totalS: Infinity,
      pauseMs: Infinity,
      bytes: Infinity,
      passes: 0,
      converges: false,
      fitsBudget: false,
      note: i.postcopyWhyNot ?? 'forbidden by the domain\'s config ("postcopy": false)',
    });
  }
  const ofp = firstPass(i, b);
  const off = {
    totalS: FIXED_OVERHEAD_S + ofp.s,
    pauseMs: Math.round(ofp.s * 1000 + FIXED_PAUSE_MS),
    bytes: ofp.bytes,
    passes: 1,
    converges: true,
  };
  out.push({ strategy: 'offline', ...off, fitsBudget: fits(off), note: 'the guest is stopped for the whole copy' });
  return r === 1 ? out : out.map((x) => ({ ...x, bytes: x.bytes * r }));
}

/**
 * The pick for a live move. Pre-copy when it fits the budget (nothing to risk, nothing
 * to throttle); else multifd where it fits; else post-copy where allowed (the guest keeps
 * its full speed and the time is bounded); else auto-converge (slows the guest); else
 * the pre-copy that comes nearest, and the deadline's rule applies.
 */
export function plan(i: PlanInput): Plan {
  const predictions = predict(i);
  const by = (s: Strategy): Prediction => predictions.find((p) => p.strategy === s)!;
  const budget = `--max-downtime ${i.maxDowntimeMs} ms and --timeout ${i.timeoutS} s`;
  if (i.strategy === 'postcopy') {
    if (!i.postcopyAllowed)
      return {
        input: i,
        predictions,
        pick: 'precopy',
        reason: `post-copy was asked for, but ${i.postcopyWhyNot ?? 'the domain\'s config forbids it ("postcopy": false)'}`,
      };
    return { input: i, predictions, pick: 'postcopy', reason: 'post-copy was asked for (--strategy postcopy)' };
  }
  if (i.strategy === 'precopy')
    return {
      input: i,
      predictions,
      pick: by('auto-converge').fitsBudget && !by('precopy').fitsBudget ? 'auto-converge' : 'precopy',
      reason: 'pre-copy was asked for (--strategy precopy); auto-converge throttles the guest if it does not converge',
    };
  for (const s of ['precopy', 'multifd', 'postcopy', 'auto-converge'] as const) {
    const p = by(s);
    if (!p.fitsBudget) continue;
    const why: Record<typeof s, string> = {
      precopy: `pre-copy fits ${budget}: ${passes(p.passes)}, about ${p.totalS.toFixed(1)} s and a ${p.pauseMs} ms pause`,
      multifd: `pre-copy alone does not fit ${budget}; two channels do`,
      postcopy: `pre-copy does not fit ${budget} (${by('precopy').note}); post-copy bounds the time to about ${p.totalS.toFixed(1)} s with a ${p.pauseMs} ms pause`,
      'auto-converge': `pre-copy does not fit ${budget} and post-copy ${i.postcopyAllowed ? 'does not either' : 'is forbidden'}; throttling the guest does`,
    };
    return { input: i, predictions, pick: s, reason: why[s] };
  }
  return {
    input: i,
    predictions,
    pick: i.postcopyAllowed ? 'postcopy' : 'auto-converge',
    reason: `nothing fits ${budget}; ${i.postcopyAllowed ? 'post-copy comes nearest and bounds the time' : 'throttling the guest comes nearest'}`,
  };
}

function passes(n: number): string {
  return n === 1 ? '1 pass' : `${n} passes`;
}

function mb(bytes: number): string {
  return bytes >= 1 << 30 ? `${(bytes / (1 << 30)).toFixed(1)} GiB` : `${(bytes / 1048576).toFixed(0)} MiB`;
}

/**
 * Time left for a pre-copy from where it stands (remaining bytes, the dirty rate and
 * the rate QEMU reports now), for the ETA: the same recurrence as the plan, so the bar
 * and the plan agree. Infinity when it does not converge.
 */
export function precopyEtaS(remaining: number, dirtyBytesPerS: number, linkBytesPerS: number, maxDowntimeMs: number): number {
  if (linkBytesPerS <= 0) return Infinity;
  let x = remaining;
  let t = 0;
  for (let pass = 0; pass < MAX_PASSES; pass++) {
    const d = x / linkBytesPerS;
    t += d;
    if (d * 1000 <= maxDowntimeMs) return t;
    x = Math.min(x, dirtyBytesPerS * d);
    if (x === 0) return t;
    if (dirtyBytesPerS >= linkBytesPerS) return Infinity;
  }
  return Infinity;
}
