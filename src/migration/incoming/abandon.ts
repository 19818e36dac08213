/**
 * The destination's way back, legal before Finish only: everything this side did is
 * undone (QEMU, taps, definition, reservation, probe, tunnels, disk copies) and the
 * source keeps the guest. Every cause comes here: the source's Abandon, its control
 * connection closing, its silence (the quiet deadline below), the incoming QEMU dying, a
 * failed step of this side, and a restart before Finish.
 */
import fs from 'node:fs';
import { killAndWait, isOurQemu } from '../../qemu/process.ts';
import { FINAL_STATUSES } from '../../qemu/migstatus.ts';
import type { DestEvent } from '../phases.ts';
import type { IncomingRun } from './run.ts';

/** Before Finish: the phases an abandon can still undo. */
export const undoable = (run: IncomingRun): boolean => run.j.phase === 'begun' || run.j.phase === 'prepared';

/**
 * The one deadline of a job that holds memory, a data port and a QEMU: a begun job
 * must be prepared within limits.reservationS of its Begin (armed once: other
 * messages do not extend it); a prepared job is abandoned once its source neither
 * sends a message nor streams for that long. Armed at Begin, after Prepare, and on
 * every message for the job.
 */
export function touch(run: IncomingRun): void {
  const j = run.j;
  if (j.phase === 'begun' && run.quiet) return;
  run.stopDeadline();
  if (!undoable(run)) return;
  const s = run.host.cfg.limits.reservationS;
  const t = setTimeout(() => {
    run.quiet = undefined;
    if (j.phase === 'begun') return void abandonQuietly(run, `no Prepare within ${s} s of Begin (limits.reservationS)`);
    if (j.phase !== 'prepared') return;
    const st = run.watch?.status;
    // A stream in flight is the source speaking, however long a pre-copy takes.
    if (st && st !== 'none' && st !== 'setup' && !FINAL_STATUSES.includes(st as never)) return touch(run);
    abandonQuietly(run, `the source ${j.peer.name} was quiet for ${s} s (limits.reservationS)`);
  }, s * 1000);
  t.unref();
  run.quiet = t;
}

/** The control connection closed: a job still before Finish is the source gone, which keeps (or resumes) its copy. */
export function controlClosed(run: IncomingRun): void {
  if (!undoable(run)) return;
  run.log.warn('source closed the control channel before Finish; abandoning', { jobId: run.j.jobId, domain: run.j.domain });
  abandonQuietly(run, 'the source closed the control channel before Finish');
}

/** An abandon nobody waits for: a failure is logged. */
export function abandonQuietly(run: IncomingRun, reason: string): void {
  abandonLocal(run, reason).catch((e) => run.log.error('abandon failed', { jobId: run.j.jobId, error: String(e) }));
}

/**
 * Undoes everything this side did. Idempotent, also when two causes race (the QEMU
 * died while Prepare was failing): the second joins the first.
 */
export function abandonLocal(run: IncomingRun, reason: string, fromPrepare = false): Promise<void> {
  if (run.abandoning) return run.abandoning;
  run.repairs = 0;
  if (!undoable(run)) return Promise.resolve();
  // Claimed synchronously, so that Finish cannot pass the point of no return meanwhile;
  // an in-flight Prepare is let finish first, so that everything it started is undone.
  const inflight = fromPrepare ? undefined : run.preparing;
  const starting = run.starting;
  const p: Promise<void> = (async () => {
    if (inflight) await inflight;
    if (starting) await starting.catch(() => undefined);
    if (undoable(run)) await undo(run, reason);
  })().finally(() => {
    run.abandoning = undefined;
  });
  run.abandoning = p;
  return p;
}

/**
 * The undoing itself (also for a QEMU that refused to run the guest past the point of
 * no return: `event` is then resume-failed).
 */
export async function undo(run: IncomingRun, reason: string, event: DestEvent = { type: 'abandon', reason }): Promise<void> {
  const { j, host: h } = run;
  run.closeProbe();
  const dom = h.find(j.domain);
  if (dom && (dom.rec.state.kind === 'incoming' || dom.rec.state.kind === 'defined') && dom.rec.config.uuid === j.uuid) {
    // A record still 'defined' has had no pid on it yet: the job's pid (if any) is the QEMU.
    if (dom.rec.state.kind === 'defined' && j.pid && isOurQemu(j.pid, j.uuid)) await killAndWait(j.pid, 0);
    await h.discardIncoming(dom);
  } else if (j.pid && isOurQemu(j.pid, j.uuid)) {
    // No record (a restart, or Prepare failed early): the pid on file must still be our QEMU.
    await killAndWait(j.pid, 0);
  }
  h.release(j.jobId);
  // Away ends opened for this guest (it never ran here, so it has no others here).
  h.closeAway(j.uuid);
  // Half-made disk copies: the source's disks stay the only live ones.
  for (const f of j.createdDisks ?? []) fs.rmSync(f, { force: true });
  if (j.createdDisks?.length) run.log.info('disk copies removed', { jobId: j.jobId, files: j.createdDisks });
  run.dispose();
  j.error = { code: 'MIGRATION_FAILED', message: reason };
  run.step(event);
  run.side.store.prune();
  run.log.info('incoming migration abandoned', { jobId: j.jobId, domain: j.domain, reason });
}
