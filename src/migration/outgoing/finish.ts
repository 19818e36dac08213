/**
 * Source phase finish, the point of no return: persisted before the destination is
 * asked to run the guest. From here the source's copy never runs again unless the
 * destination says, in so many words, that it abandoned. A post-copy move then streams
 * the rest (postcopy.ts); a shut-off domain's definition takes the same step.
 */
import { FerryError } from '../../errors.ts';
import type { Report } from '../jobs.ts';
import { awaitPostcopy } from './postcopy.ts';
import { finishOrResolve, settleFinish } from './settle.ts';
import type { OutgoingRun, Resolution } from './run.ts';
import { ask } from '../ask.ts';

export async function finish(run: OutgoingRun): Promise<void> {
  const { j, p, peer, side: s } = run;
  const h = s.host;
  s.step(j, { type: 'finish-sent' });
  const fin = await confirmAbandon(run, await finishOrResolve(s, j, run.client, run.wasRunning));
  if (fin === null) {
    // D cannot be asked now: the source copy stays paused, and the driver (from the
    // failure path) keeps asking.
    throw new FerryError(
      'MIGRATION_UNRESOLVED',
      `Domain "${p.domain}": ${peer.name} has not said whether it resumed the guest (${j.waiting?.lastError ?? 'no answer'}). The copy on ${h.cfg.name} stays paused so that it never runs twice; ferryd keeps asking every few seconds and settles the moment ${peer.name} answers. Watch: \`ferry job ${p.domain}\`. If you know where it runs: \`ferry job resolve ${p.domain} --assume-destination|--assume-source\``,
    );
  }
  if (j.phase !== 'finish') {
    // Settled by the operator while we asked.
    throw new FerryError(
      j.phase === 'abandoned' ? 'MIGRATION_FAILED' : 'MIGRATION_UNRESOLVED',
      `Migration of "${p.domain}" was settled by the operator (\`ferry job resolve\`): it ${j.phase === 'abandoned' ? `runs on ${h.cfg.name}` : `runs on ${peer.name}`}`,
    );
  }
  if (fin.abandoned) {
    // The destination's word that it never ran the guest: the only way back from finish.
    await settleFinish(s, j, run.dom, fin);
    throw new FerryError(
      'MIGRATION_FAILED',
      `Destination ${peer.name} could not take domain "${p.domain}" (${fin.reason}); it keeps running on ${h.cfg.name}`,
    );
  }
  run.fin = fin;
  run.mark('destRunning');
  if (run.inPostcopy) await finishPostcopy(run);
  else s.step(j, { type: 'dest-finished' });
}

/**
 * Cluster mode: D's "abandoned" is checked against the record before the source
 * resumes; the record wins. Normally it still names the source ('kept'). If D took the
 * domain and could not give it back, the copy here stays paused and the job is
 * settled from the record (driveFinish) once D returns it.
 */
async function confirmAbandon(run: OutgoingRun, fin: Resolution | null): Promise<Resolution | null> {
  const own = run.side.host.ownership;
  if (!fin?.abandoned || !own) return fin;
  const v = await own.reclaim(run.j.domain, run.j.jobId).catch(() => 'unknown' as const);
  return v === 'kept' ? fin : null;
}

/**
 * Post-copy: the guest runs there; the pages it has not got yet are still here. This
 * QEMU lives until the stream completes (a broken stream is resumed within the
 * operator's budget, at least 60 s more), and its copy is never resumed.
 */
async function finishPostcopy(run: OutgoingRun): Promise<void> {
  const { j, stats, side: s } = run;
  s.step(j, { type: 'dest-running' });
  const pcStart = performance.now();
  const onRecovered = (n: number, ms: number): void => {
    run.policy.push(`post-copy stream broke and was resumed after ${ms} ms (${n} attempt${n > 1 ? 's' : ''})`);
    if (stats.postcopy) stats.postcopy.recoveries = (stats.postcopy.recoveries ?? 0) + 1;
  };
  try {
    if (!run.fin!.crashed)
      await awaitPostcopy(
        s,
        j,
        { q: run.q!, w: run.watch! },
        { deadline: Math.max(run.t0 + run.timeoutS * 1000, Date.now() + 60000), onRecovered },
      );
    j.waiting = undefined;
  } finally {
    run.watch!.dispose();
  }
  if (stats.postcopy) stats.postcopy.windowMs = Math.round(performance.now() - pcStart);
  run.mark('postcopyCompleted');
  s.step(j, { type: 'postcopy-done' });
}

/** A shut-off domain moves as its definition: the same point of no return, without a stream. */
export async function moveDefinition(run: OutgoingRun): Promise<Report> {
  const { j, client, side: s } = run;
  s.step(j, { type: 'dest-prepared' });
  s.step(j, { type: 'stream-completed' });
  s.step(j, { type: 'finish-sent' });
  // Past the point of no return, as for a running domain: only D's word settles it.
  const fin = await confirmAbandon(run, await finishOrResolve(s, j, client, false));
  if (fin === null) {
    // The caller's catch hands the job to the driver, which keeps asking.
    throw new FerryError(
      'MIGRATION_UNRESOLVED',
      `Definition of "${j.domain}": ${j.peer.name} has not said whether it took it (${j.waiting?.lastError ?? 'no answer'}); it stays here, locked, and ferryd keeps asking. Watch: \`ferry job ${j.domain}\``,
    );
  }
  if (j.phase !== 'finish')
    throw new FerryError('MIGRATION_FAILED', `Migration of "${j.domain}" was settled by the operator (\`ferry job resolve\`)`);
  if (fin.abandoned) {
    await settleFinish(s, j, run.dom, fin);
    throw new FerryError(
      'MIGRATION_FAILED',
      `Destination ${j.peer.name} could not take the definition of "${j.domain}" (${fin.reason}); it stays on ${s.host.cfg.name}`,
    );
  }
  s.step(j, { type: 'dest-finished' });
  s.host.forget(run.dom.rec.config.name);
  ask(client, 'relocation.confirm', { jobId: j.jobId }, { timeoutMs: 10000 }).catch(() => undefined);
  const r = run.report('succeeded', {});
  j.report = r;
  s.store.saveLater(j);
  return r;
}
