/**
 * Past the point of no return (phase finish): only the destination's word settles a
 * move. Finish is sent; a lost answer is asked for again, with capped backoff, for as
 * long as it takes; the answer (or the operator's) is applied exactly once.
 */
import { asFerryError } from '../../errors.ts';
import type { ApiClient } from '../../api/client.ts';
import type { DomainHandle } from '../host.ts';
import type { SourceJob } from '../jobs.ts';
import { resumeSource } from './abandon.ts';
import { redial, retire, retractTunnels } from './peer.ts';
import { drivePostcopy } from './postcopy.ts';
import { keepTrying, FINISH_ASK_FOREGROUND_MS } from './retry.ts';
import type { OutgoingSide, Resolution } from './run.ts';
import { ask } from '../ask.ts';

/**
 * Sends Finish. If the answer is lost, asks D until it can tell, for at most
 * `FINISH_ASK_FOREGROUND_MS` while the operator's command waits; null if D still
 * has not said (the caller hands the job to `driveFinish`).
 */
export async function finishOrResolve(s: OutgoingSide, j: SourceJob, client: ApiClient, running: boolean): Promise<Resolution | null> {
  try {
    const r = await ask(client, 'relocation.finish', { jobId: j.jobId, running }, { timeoutMs: 150000 });
    return { abandoned: false, resumedAt: r.resumedAt ?? undefined, answeredAt: performance.now(), crashed: r.crashed === true };
  } catch (e) {
    const fe = asFerryError(e);
    if (fe.details?.abandoned) return { abandoned: true, reason: fe.message };
    s.log.warn('finish answer lost; asking the destination', { jobId: j.jobId, error: fe.message });
    return resolveAfterFinish(s, j, Date.now() + FINISH_ASK_FOREGROUND_MS);
  }
}

/**
 * One question to D about a job past the point of no return: its answer, or why
 * there is none yet. A D that never resumed is made to abandon before we say so.
 */
export async function askDestination(s: OutgoingSide, j: SourceJob, timeoutMs = 5000): Promise<Resolution | string> {
  const client = await redial(s, j);
  try {
    const st = await ask(client, 'relocation.status', { jobId: j.jobId }, { timeoutMs });
    if (st.phase === 'finished' || st.phase === 'confirmed') return { abandoned: false };
    if (st.phase === 'finishing') return `${j.peer.name} is resuming the guest`;
    if (st.phase === 'abandoned' || st.phase === 'unknown') return { abandoned: true, reason: `${j.peer.name} reports ${st.phase}` };
    // begun/prepared: D never resumed; make it abandon before we resume.
    const ab = await ask(client, 'relocation.abandon', { jobId: j.jobId, reason: 'finish was not delivered' }, { timeoutMs });
    if (ab.phase === 'abandoned') return { abandoned: true, reason: `${j.peer.name} abandoned after a lost Finish` };
    return `${j.peer.name} answered abandon with phase ${ab.phase}`;
  } finally {
    client.close();
  }
}

/**
 * Cluster mode: the ownership record answers instead of D (cluster/ownership.ts). The
 * move is taken back unless D already took it; whichever compare-and-swap landed first
 * decides, so D can never resume after we were told 'kept'. D is then told to abandon
 * (best effort: it refuses itself at its own handover, and its quiet deadline ends it).
 */
async function askRecord(s: OutgoingSide, j: SourceJob): Promise<Resolution> {
  const v = await s.host.ownership!.reclaim(j.domain, j.jobId);
  if (v === 'lost') return { abandoned: false, reason: `the cluster record names ${j.peer.name}` };
  void redial(s, j)
    .then((client) =>
      ask(client, 'relocation.abandon', { jobId: j.jobId, reason: 'the source took the move back' }, { timeoutMs: 5000 }).finally(() =>
        client.close(),
      ),
    )
    .catch(() => undefined);
  return {
    abandoned: true,
    reason: `the cluster record still named ${s.host.cfg.name}: the move was taken back before ${j.peer.name} took it`,
  };
}

/**
 * Asks D until it answers, with capped backoff, for as long as it takes (or until
 * `deadline`: then null). The job shows who is asked, how often and why it failed
 * (`ferry job`, the CLI's progress). Returns early if the operator settled the job.
 */
export async function resolveAfterFinish(s: OutgoingSide, j: SourceJob, deadline = Infinity): Promise<Resolution | null> {
  // A driver taking over from the command's own wait goes on counting where it stopped.
  const how = {
    deadline,
    first: (j.waiting?.attempts ?? 0) + 1,
    warning: 'destination not answering about a finished transfer; the source copy stays paused',
    prefix: '',
  };
  const got = await keepTrying(s, j, how, async () => {
    if (j.phase !== 'finish') return { abandoned: j.phase === 'abandoned', reason: 'settled by the operator', byOperator: true };
    try {
      return s.host.ownership ? await askRecord(s, j) : await askDestination(s, j);
    } catch (e) {
      return asFerryError(e).message;
    }
  });
  if (got && got.attempts > 1 && !got.value.byOperator)
    s.log.info('destination answered about a finished transfer', {
      jobId: j.jobId,
      attempts: got.attempts,
      abandoned: got.value.abandoned,
    });
  return got?.value ?? null;
}

/**
 * The one driver for a job past the point of no return whose destination has not
 * answered: after a lost Finish, after a restart, whatever the path. Asks until
 * D answers, then settles. At most one per job.
 */
export function driveFinish(s: OutgoingSide, j: SourceJob, dom: DomainHandle): void {
  s.driveOnce(j.jobId, 'settling a finished transfer', async () => {
    const r = await resolveAfterFinish(s, j);
    if (r && !r.byOperator) await settleFinish(s, j, dom, r);
  });
}

/**
 * Applies D's answer (or the operator's word) to a job in `finish`: the phase
 * changes first, synchronously, so that two answers can never both act.
 */
export async function settleFinish(s: OutgoingSide, j: SourceJob, dom: DomainHandle, r: Resolution): Promise<void> {
  if (j.phase !== 'finish') return;
  if (!r.abandoned && j.postcopy) {
    // Post-copy: the guest runs there, fetching what is still here.
    s.step(j, { type: 'dest-running' });
    j.waiting = undefined;
    s.store.saveLater(j);
    drivePostcopy(s, j, dom);
    return;
  }
  if (r.abandoned) {
    s.step(j, { type: 'dest-abandoned', reason: r.reason ?? 'destination abandoned' });
    await retractTunnels(s, j);
    await resumeSource(s, dom, j.wasRunning);
    s.log.warn('migration settled: the domain stays here', { jobId: j.jobId, domain: j.domain, reason: r.reason });
  } else {
    s.step(j, { type: 'dest-finished' });
    await retire(s, dom, j);
    s.log.info('migration settled: the domain runs on the destination', { jobId: j.jobId, domain: j.domain, peer: j.peer.name });
    void redial(s, j)
      .then((client) => ask(client, 'relocation.confirm', { jobId: j.jobId }, { timeoutMs: 10000 }).finally(() => client.close()))
      .catch(() => undefined);
  }
  j.waiting = undefined;
  if (j.report)
    j.report = { ...j.report, outcome: r.abandoned ? 'failed' : 'succeeded', phase: j.phase, ...(r.abandoned ? {} : { error: undefined }) };
  s.store.saveLater(j);
  s.store.prune();
  s.host.emit('migration.settled', { domain: j.domain, jobId: j.jobId, phase: j.phase, reason: r.reason ?? null });
}
