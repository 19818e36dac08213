/**
 * The autopilot's eyes (README "Autopilot"): before a live move it measures the guest's
 * dirty rate, estimates the link from the moves already made to that peer, and asks the
 * model (plan.ts) for every strategy's cost and the pick. Source runs it while Begin runs
 * on the destination, and `ferry migrate --plan` alone.
 */
import { measureDirtyRate } from '../qemu/migration.ts';
import type { Compression } from '../api/shapes.ts';
import os from 'node:os';
import { hasProcess } from '../domain/state.ts';
import type { QmpClient } from '../qmp/client.ts';
import type { PlanView } from '../api/protocol.ts';
import type { MigrationHost, DomainHandle, MigrationLog } from './host.ts';
import type { JobStore, SourceJob } from './jobs.ts';
import {
  plan as makePlan,
  linkRate,
  streamMsOf,
  chooseCompression,
  defaultCompression,
  DEFAULT_COMPRESSION,
  type CompressionChoice,
  type Plan,
  type StrategyChoice,
  type OnTimeout,
} from './plan.ts';
import { dirtyTrackingUnreliable } from '../qemu/memory.ts';

/**
 * How long calc-dirty-rate samples the guest (it runs while Begin and Prepare do). Short,
 * so that it ends before a small guest's stream does: in hand runs here a 500 ms window
 * that overlapped the switchover lengthened the pause. A slow dirtier then reads 0, which
 * changes no pick (it converges anyway); a fast one saturates the sample, which says
 * what matters: far faster than the link.
 */
export const DIRTY_SAMPLE_MS = 100;
/** What a link is assumed to carry before any move to that peer was measured (QEMU 10 here: TLS 2.3–5, plain 10–20 Gbit/s). */
export const ASSUMED_TLS_BYTES_PER_S = 250e6;
export const ASSUMED_PLAIN_BYTES_PER_S = 1000e6;
export const DEFAULT_MAX_DOWNTIME_MS = 300;
export const DEFAULT_TIMEOUT_S = 600;

/** The budget and rules of a move, as the plan needs them. */
export interface PlanParams {
  bandwidthMiBs?: number;
  maxDowntimeMs?: number;
  timeoutS?: number;
  insecure?: boolean;
  parallel?: number;
  compress?: Compression;
  /** With compress zstd from a sample: the share of the pages' bytes it leaves (plan.ts compressRatio). */
  compressRatio?: number;
  strategy?: StrategyChoice;
  onTimeout?: OnTimeout;
  verifyMemory?: boolean;
  /**
   * RAM holding data, when this move measured it already (defaultCompression, before
   * Begin): reading a sample of the guest's pages once per move is enough. Absent: measured.
   */
  touchedBytes?: number | null;
}

/**
 * `p` with a compression decision in it: the method, its channels (a --parallel already
 * there wins), and why, unless `say` is false (a decision the report need not mention).
 */
export function withCompression<T extends PlanParams & { compressWhy?: string }>(p: T, c: CompressionChoice, say = true): T {
  const parallel = p.parallel ?? c.parallel;
  return {
    ...p,
    compress: c.compress,
    ...(parallel !== undefined ? { parallel } : {}),
    ...(c.compress === 'zstd' && c.ratio !== undefined ? { compressRatio: c.ratio } : {}),
    ...(say ? { compressWhy: c.why } : {}),
  };
}

export class Planner {
  constructor(
    private readonly host: MigrationHost,
    private readonly store: JobStore,
    private readonly log: MigrationLog,
  ) {}

  /** The guest's dirty rate (qemu/migration.ts measureDirtyRate), bytes/s, or null when it could not be measured. */
  async dirtyRate(q: QmpClient, ms = DIRTY_SAMPLE_MS): Promise<number | null> {
    try {
      return await measureDirtyRate(q, ms);
    } catch (e) {
      this.log.warn('dirty rate not measured', { error: String(e) });
      return null;
    }
  }

  /**
   * What the link to `peer` carries: the median throughput of the last successful moves
   * there with the same encryption (their reports), else an assumption said as such;
   * --bandwidth caps it.
   */
  linkEstimate(peer: string, encrypted: boolean, capMiBs?: number): { bytesPerS: number; from: string } {
    // A move's rate is its bytes over the stream's own time (first byte to the end of the
    // copy), not over QEMU's total, which includes set-up and the final pause; less the
    // zero pages' scan, which each plan adds for its own guest (plan.linkRate).
    const rateOf = (j: SourceJob): number => {
      const r = j.report!;
      const stream = streamMsOf(r.timeline);
      return stream !== undefined ? linkRate(r.bytes, stream, r.plan?.ramBytes) : r.throughputMBps * 1e6;
    };
    const rates = [...this.store.jobs.values()]
      .filter(
        (j): j is SourceJob =>
          j.role === 'source' &&
          j.peer.name === peer &&
          j.encrypted === encrypted &&
          j.mode !== 'definition' &&
          j.report?.outcome === 'succeeded' &&
          (j.report.throughputMBps ?? 0) > 0 &&
          (j.report.bytes ?? 0) > 64 * 1048576 &&
          !j.report.bandwidthMiBs,
      )
      .sort((a, b) => b.startedAt - a.startedAt)
      .slice(0, 5)
      .map(rateOf)
      .sort((a, b) => a - b);
    let est = rates.length
      ? {
          bytesPerS: rates[Math.floor(rates.length / 2)],
          from: `median of the last ${rates.length} move${rates.length > 1 ? 's' : ''} to ${peer}`,
        }
      : {
          bytesPerS: encrypted ? ASSUMED_TLS_BYTES_PER_S : ASSUMED_PLAIN_BYTES_PER_S,
          from: `assumed: no earlier move to ${peer} of more than 64 MiB was measured`,
        };
    if (capMiBs && capMiBs * 1048576 < est.bytesPerS)
      est = {
        bytesPerS: capMiBs * 1048576,
        from: `--bandwidth ${capMiBs} MiB/s (${est.from.replace(/^assumed: /, 'link otherwise assumed; ')})`,
      };
    return est;
  }

  /** Cores not taken by the vCPUs of this host's running domains (multifd needs spare ones). */
  spareCores(): number {
    let busy = 0;
    for (const n of this.host.domainNames()) {
      const d = this.host.find(n);
      if (d && hasProcess(d.rec.state)) busy += d.rec.config.vcpus;
    }
    return Math.max(0, os.cpus().length - busy);
  }

  /** The autopilot's plan for moving `dom` to `peer` live: measured, modelled, picked. */
  async planFor(dom: DomainHandle, q: QmpClient, peer: string, p: PlanParams): Promise<{ plan: Plan; view: PlanView }> {
    const [dirty, touched] = await Promise.all([
      this.dirtyRate(q),
      p.touchedBytes !== undefined ? p.touchedBytes : this.host.touchedBytes(dom),
    ]);
    const link = this.linkEstimate(peer, p.insecure !== true, p.bandwidthMiBs);
    const c = dom.rec.config;
    // What rules post-copy out where the config allows it (planView names the config itself).
    const why = c.postcopy ? this.postcopyWhyNot(dom, p) : undefined;
    const input = {
      ramBytes: c.memoryMiB * 1048576,
      touchedBytes: touched === null ? undefined : Math.min(c.memoryMiB * 1048576, touched),
      dirtyBytesPerS: dirty ?? 0,
      linkBytesPerS: link.bytesPerS,
      linkFrom: link.from,
      ...(p.compress === 'zstd' && p.compressRatio !== undefined ? { compressRatio: p.compressRatio } : {}),
      maxDowntimeMs: p.maxDowntimeMs ?? DEFAULT_MAX_DOWNTIME_MS,
      timeoutS: p.timeoutS ?? DEFAULT_TIMEOUT_S,
      spareCores: this.spareCores(),
      postcopyAllowed: c.postcopy && why === undefined,
      strategy: p.strategy ?? 'auto',
      postcopyWhyNot: why,
    };
    return this.planView(makePlan(input), {
      domain: c.name,
      dest: peer,
      dirtyBytesPerS: dirty,
      onTimeout: p.onTimeout,
      compress: p.compress,
    });
  }

  /** Why post-copy is off for this move, or undefined when it is on the table. */
  postcopyWhyNot(dom: DomainHandle, p: PlanParams): string | undefined {
    if (!dom.rec.config.postcopy) return "post-copy is forbidden by the domain's config";
    if (dirtyTrackingUnreliable(dom.rec.runtime?.accel ?? this.host.accel.accel, this.host.qemu.version))
      return `post-copy is off: QEMU ${this.host.qemu.version} can lose dirty pages here, and post-copy leaves no moment to check the copy`;
    if (p.verifyMemory === true) return 'post-copy is off with --verify-memory (it compares both copies while both are paused)';
    // Compression first: its channels are multifd's too, and may not be the operator's --parallel.
    if ((p.compress ?? 'none') !== 'none')
      return 'post-copy is off with compression (it needs multifd, which QEMU 10.0 cannot combine with post-copy)';
    if ((p.parallel ?? 1) > 1) return 'post-copy is off with --parallel (QEMU 10.0 cannot combine it with multifd)';
    return undefined;
  }

  /**
   * A live move without --compress: whether it compresses (plan.ts defaultCompression),
   * measured here after the peer is known and before Begin tells it the method. Post-copy
   * asked for by --strategy or --on-timeout keeps it off. A step that fails counts as
   * "do not compress": the move goes on as it would have before.
   */
  async defaultCompression(
    dom: DomainHandle,
    q: QmpClient,
    peer: string,
    p: PlanParams,
  ): Promise<CompressionChoice & { considered: boolean; touchedBytes?: number | null }> {
    if (p.strategy === 'postcopy' || p.onTimeout === 'postcopy')
      return { compress: 'none', why: `${DEFAULT_COMPRESSION}: none (post-copy was asked for)`, considered: false };
    try {
      const touchedBytes = await this.host.touchedBytes(dom);
      const measured = { ...p, touchedBytes };
      const c = await defaultCompression({
        touchedBytes,
        sample: async () => chooseCompression(await this.host.compressibility(dom), os.cpus().length, DEFAULT_COMPRESSION),
        postcopyWhyNot: this.postcopyWhyNot(dom, p),
        predict: async (c) => (await this.planFor(dom, q, peer, withCompression(measured, c, false))).plan.predictions,
      });
      // The move's own plan (Begin) takes the same measurement.
      return { ...c, touchedBytes };
    } catch (e) {
      this.log.warn('compression by default not weighed', { error: String(e) });
      return { compress: 'none', why: `${DEFAULT_COMPRESSION}: none (not weighed: ${(e as Error).message})`, considered: false };
    }
  }

  /**
   * The plan as the API shows it. Its reason ends with why post-copy is not on the table,
   * if it is not: the plan's input says (postcopyWhyNot), else it is the domain's config.
   */
  planView(
    pl: Plan,
    about: {
      domain: string;
      dest: string;
      dirtyBytesPerS: number | null;
      onTimeout: OnTimeout | undefined;
      compress?: Compression;
    },
  ): { plan: Plan; view: PlanView } {
    const { domain, dest: peer, dirtyBytesPerS: dirty, onTimeout } = about;
    const i = pl.input;
    // With --strategy postcopy the plan's own reason says the config forbids it.
    const why =
      i.postcopyWhyNot ?? (!i.postcopyAllowed && i.strategy !== 'postcopy' ? "post-copy is forbidden by the domain's config" : undefined);
    const ms = (s: number): number | null => (Number.isFinite(s) ? Math.round(s * 1000) : null);
    const view: PlanView = {
      domain,
      destination: peer,
      ramBytes: i.ramBytes,
      touchedBytes: i.touchedBytes ?? null,
      dirtyRateMBps: dirty === null ? null : +(dirty / 1e6).toFixed(1),
      dirtyRateFrom:
        dirty === null ? 'not measured (calc-dirty-rate failed): assumed 0' : `calc-dirty-rate, page sampling over ${DIRTY_SAMPLE_MS} ms`,
      linkMBps: +(i.linkBytesPerS / 1e6).toFixed(1),
      linkFrom: i.linkFrom,
      maxDowntimeMs: i.maxDowntimeMs,
      timeoutS: i.timeoutS,
      spareCores: i.spareCores,
      postcopyAllowed: i.postcopyAllowed,
      compress: about.compress ?? 'none',
      compressRatio: i.compressRatio ?? null,
      strategy: i.strategy,
      onTimeout: onTimeout ?? (i.postcopyAllowed ? 'postcopy' : 'cancel'),
      pick: pl.pick,
      reason: pl.reason + (why ? `; ${why}` : ''),
      predictions: pl.predictions.map((x) => ({
        strategy: x.strategy,
        totalMs: ms(x.totalS),
        pauseMs: Number.isFinite(x.pauseMs) ? x.pauseMs : null,
        bytes: Number.isFinite(x.bytes) ? Math.round(x.bytes) : null,
        passes: x.passes,
        converges: x.converges,
        fitsBudget: x.fitsBudget,
        note: x.note,
      })),
    };
    return { plan: pl, view };
  }
}
