/**
 * QEMU's migration followed to its end through MIGRATION events; a timer reads the byte
 * counters (QEMU has no event for them) for the progress bar and applies the autopilot
 * (the switch to post-copy) and the deadline (--on-timeout). One Supervisor per stream.
 */
import { FerryError } from '../../errors.ts';
import { FINAL_STATUSES, type MigrateInfo } from '../../qemu/migstatus.ts';
import { MigrationQmp } from '../../qemu/migration.ts';
import type { Report } from '../jobs.ts';
import { progress, rates } from './progress.ts';
import type { OutgoingRun, Autopilot } from './run.ts';

/** Follows the run's stream until it completes, fails, is cancelled or enters post-copy; the figures of the stream. */
export async function supervise(run: OutgoingRun, auto: Autopilot): Promise<Partial<Report>> {
  return new Supervisor(run, auto).follow();
}

class Supervisor {
  private cancelSent = false;
  private timedOut = false;
  private suspended = false;
  private ticking = false;
  private readonly mq: MigrationQmp;

  constructor(
    private readonly run: OutgoingRun,
    private readonly auto: Autopilot,
  ) {
    this.mq = new MigrationQmp(run.q!, 'source');
    void run.cancelledP.then(() => this.cancel());
  }

  private get w(): NonNullable<OutgoingRun['watch']> {
    return this.run.watch!;
  }

  async follow(): Promise<Partial<Report>> {
    const { j, t0 } = this.run;
    const timer = setInterval(() => void this.tick(), 200);
    let status: string;
    try {
      status = await this.w.until(this.auto.postcopyOn ? [...FINAL_STATUSES, 'postcopy-active'] : FINAL_STATUSES);
    } catch {
      throw new FerryError('MIGRATION_FAILED', `The source QEMU of "${j.domain}" exited during the migration`);
    } finally {
      clearInterval(timer);
    }
    const active = this.w.at.get('active');
    const setupMs = active !== undefined ? Math.max(0, Math.round(active - t0)) : null;
    return this.outcome(status, setupMs);
  }

  private cancel(): void {
    if (this.cancelSent) return;
    this.cancelSent = true;
    this.mq.cancel().catch(() => undefined);
  }

  /**
   * Post-copy starts once QEMU says so (status postcopy-active): the switch is asked
   * for at most once, and only while the stream is active.
   */
  private async toPostcopy(why: string): Promise<void> {
    const auto = this.auto;
    if (auto.switchAsked || !auto.postcopyOn || this.w.status !== 'active') return;
    auto.switchAsked = true;
    try {
      await this.mq.startPostcopy();
      // Said once QEMU is there: a pre-copy may still complete first.
      auto.switchWhy = why;
    } catch (e) {
      this.run.policy.push(`post-copy refused by QEMU (${(e as Error).message}); pre-copy goes on`);
    }
  }

  private async tick(): Promise<void> {
    const { run, w } = this;
    if (this.ticking || w.final || w.status === 'postcopy-active') return;
    this.ticking = true;
    try {
      // A disk copy that broke (--copy-storage) ends the move: the guest stays here.
      const mirror = run.mirror;
      if (mirror?.failed && !this.cancelSent) {
        run.policy.push(`disk copy failed: ${mirror.failed}`);
        this.cancel();
      }
      if (mirror) mirror.last = await mirror.progress().catch(() => mirror.last);
      const m = await this.mq.info();
      const etaS = progress(run.side, run.j, m, { passes: w.passes, maxDowntimeMs: run.maxDowntimeMs });
      if ((m['cpu-throttle-percentage'] ?? 0) > 0) this.auto.throttled = true;
      await this.autopilot(m, etaS);
      await this.deadline();
    } catch {
      /* QEMU gone: the watcher says so */
    } finally {
      this.ticking = false;
    }
  }

  /**
   * The autopilot: the plan's post-copy switches once the first full pass is sent; any
   * other plan switches (where post-copy is offered) when the live figures say pre-copy
   * will miss the deadline.
   */
  private async autopilot(m: MigrateInfo, etaS: number): Promise<void> {
    const { run, auto } = this;
    if (run.mode !== 'live' || !auto.postcopyOn || auto.switchAsked || m.status !== 'active') return;
    const elapsed = (Date.now() - run.t0) / 1000;
    const ram = m.ram ?? {};
    const pass = ram['dirty-sync-count'] ?? this.w.passes;
    if (auto.pick === 'postcopy' && pass >= 2)
      return this.toPostcopy(`the plan's pick, after the first full pass (${elapsed.toFixed(1)} s)`);
    if (auto.pick === 'postcopy' || pass < 3 || elapsed + etaS <= run.timeoutS * 0.8) return;
    const { rate, dirty } = rates(m);
    await this.toPostcopy(
      `pre-copy would miss the budget: pass ${pass} after ${elapsed.toFixed(1)} s, ${((ram.remaining ?? 0) / 1e6).toFixed(0)} MB left, the guest dirties ${(dirty / 1e6).toFixed(0)} MB/s against ${(rate / 1e6).toFixed(0)} MB/s sent (ETA ${Number.isFinite(etaS) ? `${etaS.toFixed(1)} s` : 'never'})`,
    );
  }

  /** The deadline, still in pre-copy: the operator's rule (--on-timeout). */
  private async deadline(): Promise<void> {
    const { run, auto } = this;
    const { timeoutS, policy } = run;
    if ((Date.now() - run.t0) / 1000 <= timeoutS || this.cancelSent || this.suspended || auto.switchAsked) return;
    if (run.mode === 'live' && auto.onTimeout === 'postcopy' && auto.postcopyOn) {
      await this.toPostcopy(`deadline of ${timeoutS} s reached (--on-timeout postcopy)`);
    } else if (run.mode === 'live' && auto.onTimeout === 'suspend') {
      // As virsh migrate --timeout-suspend: the guest stops and the rest is copied
      // while it does not run; the pause is as long as that copy.
      this.suspended = true;
      await this.mq.stop().then(
        () => policy.push(`deadline of ${timeoutS} s reached (--on-timeout suspend): guest suspended to finish the copy`),
        (e) => policy.push(`suspend refused by QEMU: ${(e as Error).message}`),
      );
    } else {
      this.timedOut = true;
      policy.push(`deadline of ${timeoutS} s reached: cancelled`);
      this.cancel();
    }
  }

  /** What the stream's end means for the move: its figures, or the error that abandons it. */
  private async outcome(status: string, setupMs: number | null): Promise<Partial<Report>> {
    const { run, auto, w } = this;
    const { j, policy } = run;
    if (status === 'failed') {
      const m = await this.mq.info().catch((): MigrateInfo => ({}));
      throw new FerryError('MIGRATION_FAILED', `QEMU's migration of "${j.domain}" failed: ${m['error-desc'] ?? 'no reason given'}`);
    }
    if (status === 'cancelled') throw this.cancelled();
    if (auto.switchWhy && status === 'completed') policy.push(`post-copy was asked for (${auto.switchWhy}), but pre-copy completed first`);
    if (status === 'postcopy-active') {
      policy.push(`switched to post-copy: ${auto.switchWhy ?? 'QEMU entered post-copy'}`);
      auto.switchedAt = performance.now();
      return { setupMs, passes: w.passes, strategy: 'postcopy' };
    }
    return { setupMs, passes: w.passes, ...(this.suspended ? { strategy: 'suspend' } : {}) };
  }

  /** Why QEMU's stream ended cancelled: a broken disk copy, the deadline, the operator, or QEMU itself. */
  private cancelled(): FerryError {
    const { j, mode, timeoutS, maxDowntimeMs, policy } = this.run;
    const diskFailed = this.run.mirror?.failed;
    if (diskFailed)
      return new FerryError(
        'MIGRATION_FAILED',
        `Copying the disks of "${j.domain}" failed (${diskFailed}); cancelled, the domain keeps running on the source with its own disks`,
      );
    if (this.timedOut && mode === 'live')
      return new FerryError(
        'MIGRATION_NOT_CONVERGING',
        `Migration of "${j.domain}" did not converge within ${timeoutS} s with pauses of at most ${maxDowntimeMs} ms (${policy.join('; ')}); cancelled, the domain keeps running on the source. Allow post-copy (--on-timeout postcopy, where the domain's config permits it), accept a longer pause (--max-downtime, or --on-timeout suspend), or migrate offline`,
      );
    if (this.timedOut)
      return new FerryError(
        'TIMEOUT',
        `Migration of "${j.domain}" did not finish within ${timeoutS} s; cancelled, the domain keeps running on the source`,
      );
    if (this.run.cancelled) return new FerryError('MIGRATION_CANCELLED', 'cancelled');
    return new FerryError('MIGRATION_FAILED', `QEMU cancelled the migration of "${j.domain}"`);
  }
}
