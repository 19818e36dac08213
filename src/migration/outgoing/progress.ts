/**
 * What a move shows while it runs: QEMU's counters turned into the job's progress (the
 * CLI's bar, `ferry job`, the dashboard), with the ETA from the plan's model, and the
 * completed stream's figures for the report.
 */
import { MigrationQmp } from '../../qemu/migration.ts';
import type { MigrateInfo } from '../../qemu/migstatus.ts';
import type { QmpClient } from '../../qmp/client.ts';
import type { Progress } from '../../api/protocol.ts';
import type { SourceJob, Report } from '../jobs.ts';
import { precopyEtaS } from '../plan.ts';
import type { OutgoingSide } from './run.ts';

/** What QEMU reports it sends and what the guest dirties, in bytes per second. */
export function rates(m: MigrateInfo): { rate: number; dirty: number } {
  const ram = m.ram ?? {};
  return { rate: ((ram.mbps ?? 0) * 1e6) / 8, dirty: (ram['dirty-pages-rate'] ?? 0) * (ram['page-size'] ?? 4096) };
}

/** The figures a progress update needs besides QEMU's answer: passes seen so far and the pause the ETA model allows. */
export interface Counting {
  passes: number;
  maxDowntimeMs: number;
}

/**
 * Publishes a query-migrate answer as the job's progress (the CLI's bar, `ferry job`);
 * returns the ETA in seconds (Infinity: never, at the rates QEMU reports now).
 */
export function progress(s: OutgoingSide, j: SourceJob, m: MigrateInfo, c: Counting): number {
  const ram = m.ram ?? {};
  const done = m.status === 'completed';
  const total = ram.total ?? 0;
  const remaining = done ? 0 : (ram.remaining ?? total);
  const { rate: sending, dirty } = rates(m);
  const rate = done ? 0 : sending;
  const post = (m.status ?? '').startsWith('postcopy');
  const pass = ram['dirty-sync-count'] ?? c.passes;
  // The ETA from the same model as the plan: a pre-copy pass that re-sends dirtied
  // pages is not progress lost. The bar itself never runs backwards.
  const eta = done ? 0 : rate <= 0 ? null : post ? remaining / rate : precopyEtaS(remaining, dirty, rate, c.maxDowntimeMs);
  const ramPct = done ? 100 : total ? Math.min(100, ((total - remaining) / total) * 100) : 0;
  // With disks copied first (--copy-storage), the bar spans both: the disks' share is done.
  const disk = s.runOf(j.jobId)?.mirror?.last;
  const share = disk ? diskShare(s, j, disk.total) : 0;
  const raw = share * 100 + (1 - share) * ramPct;
  const stage = done
    ? 'completed'
    : post
      ? `post-copy: ${(remaining / 1048576).toFixed(0)} MiB still on ${s.host.cfg.name}`
      : m.status === 'device' || m.status === 'pre-switchover'
        ? 'switchover'
        : `pre-copy pass ${pass}`;
  const prog: Progress = {
    domain: j.domain,
    jobId: j.jobId,
    status: m.status,
    phase: j.phase,
    percent: Math.max(raw, j.progress?.percent ?? 0),
    transferred: ram.transferred ?? 0,
    remaining,
    total,
    rateMBps: rate / 1e6,
    pass: c.passes,
    etaS: eta === null || !Number.isFinite(eta) ? null : eta,
    elapsedMs: Date.now() - j.startedAt,
    dirtyRate: done ? 0 : (ram['dirty-pages-rate'] ?? 0),
    throttlePct: done ? 0 : (m['cpu-throttle-percentage'] ?? 0),
    stage,
    ...(disk ? { disk } : {}),
  };
  publish(s, j, prog);
  return eta ?? Infinity;
}

/** The job's progress, on the job and to whoever listens (the API's progress stream). */
export function publish(s: OutgoingSide, j: SourceJob, prog: Progress): void {
  j.progress = prog;
  s.host.emit('migration.progress', prog);
}

/**
 * The completed stream's figures, asked once the guest runs on the destination: QEMU
 * may say "completed" before it fills in total-time and downtime, and waiting for
 * them must not lengthen the guest's pause.
 */
export async function streamStats(s: OutgoingSide, j: SourceJob, q: QmpClient, passes: number): Promise<Partial<Report>> {
  const mq = new MigrationQmp(q, 'source');
  let m = await mq.info().catch((): MigrateInfo => ({}));
  for (let i = 0; i < 20 && !((m['total-time'] ?? 0) > 0); i++) {
    await new Promise((r) => setTimeout(r, 5));
    m = await mq.info().catch(() => m);
  }
  const r2 = m.ram ?? {};
  const bytes = r2.transferred ?? 0;
  const totalTime = m['total-time'] ?? Date.now() - j.startedAt;
  progress(s, j, { ...m, status: 'completed' }, { passes, maxDowntimeMs: 0 });
  return {
    downtimeMs: m.downtime ?? null,
    bytes,
    passes: r2['dirty-sync-count'] ?? passes,
    throughputMBps: totalTime > 0 ? +(bytes / 1e6 / (totalTime / 1000)).toFixed(1) : 0,
  };
}

/** The disks' part of the whole move's bytes (disks, then RAM), for one progress bar. */
export function diskShare(s: OutgoingSide, j: SourceJob, diskTotal: number): number {
  const ram = (s.host.find(j.domain)?.rec.config.memoryMiB ?? 0) * 1048576;
  return diskTotal + ram > 0 ? diskTotal / (diskTotal + ram) : 0;
}
