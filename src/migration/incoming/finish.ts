/**
 * Destination phase finish: the stream loaded (the guest still paused), optionally its
 * RAM digested and repaired for the memory check, then the point of no return: the
 * phase persisted as finishing before the guest runs here, `cont`, announce-self, and
 * finished. Confirm (or the grace timer, if the source's Confirm is lost) closes the job.
 */
import { FerryError, asFerryError } from '../../errors.ts';
import { parseDomainConfig } from '../../domain/config.ts';
import { FINAL_STATUSES, qmpEventMs } from '../../qemu/migstatus.ts';
import { MigrationQmp } from '../../qemu/migration.ts';
import type { QmpClient } from '../../qmp/client.ts';
import type { Params } from '../../api/schema.ts';
import type { Results } from '../../api/protocol.ts';
import type { DomainHandle } from '../host.ts';
import { abandonLocal, undo } from './abandon.ts';
import type { IncomingRun } from './run.ts';

/** How long a finished incoming job waits for the source's Confirm before settling itself. */
export const CONFIRM_GRACE_MS = 20000;

const incomingOf = (q: QmpClient): MigrationQmp => new MigrationQmp(q, 'destination');

/** The loaded incoming domain and its QMP. */
export interface Loaded {
  dom: DomainHandle;
  q: QmpClient;
}

/**
 * Waits until the incoming QEMU has loaded the whole stream (it stays paused: it was
 * started with -S). Abandons if it never does. Legal only in phase prepared.
 */
export async function loaded(run: IncomingRun, what: string): Promise<Loaded> {
  const { j, host: h } = run;
  // Abandoned on its own (its QEMU died, its control connection dropped): say so plainly.
  if (j.phase === 'abandoned')
    throw new FerryError(
      'MIGRATION_FAILED',
      `Destination ${h.cfg.name} abandoned the migration of "${j.domain}": ${j.error?.message ?? 'no reason recorded'}`,
      { abandoned: true },
    );
  if (j.phase !== 'prepared') throw new FerryError('MIGRATION_ILLEGAL_PHASE', `Job ${j.jobId} is ${j.phase}, cannot ${what}`);
  const dom = h.find(j.domain);
  if (!dom || dom.rec.state.kind !== 'incoming' || !dom.qmp) {
    await abandonLocal(run, `no incoming QEMU to ${what}`);
    throw new FerryError('MIGRATION_FAILED', `Destination ${h.cfg.name} has no incoming QEMU for "${j.domain}"; abandoned`, {
      abandoned: true,
    });
  }
  const q = dom.qmp;
  const status = await loadStatus(run, q, what);
  const w = run.watch!;
  if (status !== 'paused' && status !== 'prelaunch' && !(j.postcopy && status === 'inmigrate' && w.status === 'postcopy-active')) {
    await abandonLocal(run, `incoming state did not load (status ${status})`);
    throw new FerryError(
      'MIGRATION_FAILED',
      `Destination ${h.cfg.name} could not load the state of "${j.domain}" (QEMU status ${status}); abandoned, the source keeps it`,
      { abandoned: true },
    );
  }
  return { dom, q };
}

/** The incoming QEMU's run state once its stream ended (or why it did not end well). */
async function loadStatus(run: IncomingRun, q: QmpClient, what: string): Promise<string> {
  const j = run.j;
  const w = run.watch;
  // The source asks only after its QEMU sent everything. If no stream has even
  // connected, the request is out of order: refuse at once instead of waiting.
  // (QEMU 10 says "setup" as soon as it listens, and "active" once a stream connected;
  // a source that finished sending is past that, give or take the main loop's turn.)
  const noStream = (): FerryError =>
    new FerryError('MIGRATION_PROTOCOL', `relocation: cannot ${what} job ${j.jobId} before any migration stream arrived`);
  if (!w || w.status === 'none') throw noStream();
  if (w.status === 'setup')
    await w.until(['active', ...FINAL_STATUSES], 2000).catch(() => {
      throw noStream();
    });
  try {
    // Post-copy: the source stopped its guest and sent the devices; the rest of RAM
    // follows as this guest runs. Its run state is inmigrate until QEMU has loaded them.
    const s = await w.until(j.postcopy ? [...FINAL_STATUSES, 'postcopy-active'] : FINAL_STATUSES, 120000);
    return s === 'completed' || s === 'postcopy-active' ? (await incomingOf(q).runState()).status : `migration ${s}`;
  } catch (e) {
    return (e as Error).message;
  }
}

/**
 * Digest: per-chunk SHA-256 of the loaded guest RAM, for the source to compare with
 * its own before anything runs here (qemu/memory.ts says why). Changes no phase: the
 * guest stays paused and the job stays prepared, so the source can still abandon.
 */
export async function digest(run: IncomingRun, chunks: number[] | undefined): Promise<Results['relocation.digest']> {
  const { j, host: h } = run;
  const { dom } = await loaded(run, 'digest its memory');
  if (chunks) {
    // Only these chunks (the ones just repaired): the check's second look.
    const r = await ramOrAbandon(run, 'read', () => h.ramChunkDigests(dom, chunks));
    return { bytes: r.bytes, chunkBytes: r.chunkBytes, chunks, digests: r.digests.toString('base64') };
  }
  const d = await ramOrAbandon(run, 'read', () => h.ramDigests(dom));
  run.log.info('incoming memory digested', { jobId: j.jobId, domain: j.domain, bytes: d.bytes, ms: d.ms });
  return { bytes: d.bytes, chunkBytes: d.chunkBytes, digests: d.digests.toString('base64'), ms: d.ms };
}

/**
 * Repair: the source's version of RAM that arrived different, written into the loaded
 * and still paused guest. The source already sent this guest's whole memory in the
 * stream, so this trusts it with nothing new; legal exactly when Digest is.
 */
export async function repair(run: IncomingRun, p: Params<'relocation.repair'>, attachment?: Buffer): Promise<Results['relocation.repair']> {
  const j = run.j;
  const { dom } = await loaded(run, 'repair its memory');
  const data = attachment ?? Buffer.alloc(0);
  if (data.length !== p.length)
    throw new FerryError('MIGRATION_PROTOCOL', `relocation.repair of job ${j.jobId}: ${data.length} bytes arrived, ${p.length} announced`);
  run.repairs++;
  if (run.repairs === 1)
    run.log.warn('incoming memory arrived different; rewriting it from the source', { jobId: j.jobId, domain: j.domain });
  await ramOrAbandon(run, 'write', () =>
    run.host.withRam(dom, true, async (ram) => {
      try {
        ram.write(p.offset, data);
      } catch (e) {
        // The peer's fault, not this host's: refused, and nothing changed.
        throw new FerryError('MIGRATION_PROTOCOL', `relocation.repair of job ${j.jobId}: ${(e as Error).message}`);
      }
    }),
  );
  return { written: data.length };
}

/**
 * Runs a RAM access. If this host cannot read or write the guest's RAM, it cannot
 * vouch for the guest, so it abandons; a refused request (the peer's fault) changes nothing.
 */
async function ramOrAbandon<T>(run: IncomingRun, verb: string, f: () => Promise<T>): Promise<T> {
  try {
    return await f();
  } catch (e) {
    if (e instanceof FerryError && e.code === 'MIGRATION_PROTOCOL') throw e;
    await abandonLocal(run, `could not ${verb} the incoming RAM: ${(e as Error).message}`);
    throw new FerryError(
      'MIGRATION_FAILED',
      `Destination ${run.host.cfg.name} could not ${verb} the incoming RAM of "${run.j.domain}" (${(e as Error).message}); abandoned, the source keeps it`,
      { abandoned: true },
    );
  }
}

/** Finish: wait for the state to load, then resume here. Point of no return. */
export async function finish(run: IncomingRun, running: boolean): Promise<Results['relocation.finish']> {
  const { j, host: h } = run;
  if (j.mode === 'definition') return finishDefinition(run);
  const { dom, q } = await loaded(run, 'finish');
  run.repairs = 0;
  // ---- point of no return: persisted before the guest runs here ----
  if (run.abandoning)
    throw new FerryError('MIGRATION_FAILED', `Destination ${h.cfg.name} is abandoning the migration of "${j.domain}"`, { abandoned: true });
  try {
    run.step({ type: 'resuming' });
  } catch (e) {
    // Not on disk, so not past the point of no return: give the guest back.
    await abandonLocal(run, `could not persist the point of no return: ${(e as Error).message}`);
    throw new FerryError(
      asFerryError(e).code,
      `Destination ${h.cfg.name} cannot write its state (${(e as Error).message}); abandoned before resuming "${j.domain}"`,
      { abandoned: true },
    );
  }
  // Cluster mode: the point of no return is etcd's, not ours. Until the record names
  // this host, the guest stays paused; a refusal gives it back to the source.
  if (!(await handOver(run))) {
    throw new FerryError(
      'MIGRATION_FAILED',
      `The cluster record of "${j.domain}" does not hand it to ${h.cfg.name} (the source took the move back); abandoned`,
      {
        abandoned: true,
      },
    );
  }
  await stopExports(run, q);
  let resumedAt: number | null = null;
  try {
    if (running) resumedAt = await resume(run, { dom, q });
  } catch (e) {
    // Stuck in finishing (QEMU cannot say whether the guest runs): the record is all
    // that matters now, and the source keeps asking; nothing stays held in memory.
    run.dispose();
    throw e;
  }
  // Tell the L2 segment where the MAC lives now (RARP), so no traffic is black-holed.
  if (!q.closed && dom.rec.config.nics.length)
    await incomingOf(q)
      .announce()
      .catch((e) => run.log.warn('announce-self failed', { error: String(e) }));
  const crashed = settleResumed(run, { dom, q }, running);
  streamTail(run, crashed);
  setTimeout(() => selfConfirm(run, `no Confirm from ${j.peer.name} within ${CONFIRM_GRACE_MS / 1000} s`), CONFIRM_GRACE_MS).unref();
  return { phase: j.phase, resumedAt, host: h.cfg.name, ...(crashed ? { crashed: true } : {}) };
}

/**
 * Cluster mode, in phase finishing: takes ownership in etcd for this job (cluster/ownership.ts).
 * Asked until etcd answers, for as long as it takes: the guest stays paused here and
 * the source's copy too, each settled by the same record as soon as either side reaches
 * etcd. True: the guest may run here. False: the source kept it; this side is undone.
 */
export async function handOver(run: IncomingRun): Promise<boolean> {
  const { j, host: h } = run;
  const own = h.ownership;
  if (!own) return true;
  for (let attempt = 1; ; attempt++) {
    let verdict: 'taken' | 'refused';
    try {
      verdict = await own.takeOver(j.domain, j.jobId, j.peer.name);
    } catch (e) {
      if (attempt === 1 || attempt % 20 === 0)
        run.log.warn('cannot take ownership in the cluster yet; the guest stays paused', { jobId: j.jobId, attempt, error: String(e) });
      await new Promise((r) => setTimeout(r, Math.min(2000, 250 * attempt)));
      continue;
    }
    if (verdict === 'taken') return true;
    const reason = `the cluster record does not hand "${j.domain}" to ${h.cfg.name} (the source ${j.peer.name} took the move back)`;
    run.log.warn('ownership refused at the point of no return; the guest never ran here', { jobId: j.jobId, domain: j.domain });
    await undo(run, reason, { type: 'resume-failed', reason });
    return false;
  }
}

/** Hands a taken domain back to the source, asked until etcd answers (the source resumes only on the record's word). */
async function giveBack(run: IncomingRun): Promise<void> {
  const { j, host: h } = run;
  for (let attempt = 1; h.ownership; attempt++) {
    try {
      return await h.ownership.giveBack(j.domain, j.jobId, j.peer.name);
    } catch (e) {
      if (attempt === 1 || attempt % 20 === 0)
        run.log.warn('cannot give ownership back yet', { jobId: j.jobId, attempt, error: String(e) });
      await new Promise((r) => setTimeout(r, Math.min(2000, 250 * attempt)));
    }
  }
}

/** `cont`, and when the guest resumed by QEMU's clock (null if its QEMU is gone). */
async function resume(run: IncomingRun, at: Loaded): Promise<number | null> {
  const { q } = at;
  const resumed = q
    .waitEvent('RESUME', 10000)
    .then(qmpEventMs)
    .catch(() => Date.now());
  resumed.catch(() => undefined);
  try {
    await incomingOf(q).cont();
  } catch (e) {
    // A QEMU that is gone may have run the guest first: that is a crash here (settleResumed).
    if (!q.closed) await resumeFailed(run, at, (e as Error).message);
  }
  return q.closed ? null : resumed;
}

/**
 * The domain's state after `cont`. A QEMU that died as it resumed may have run the
 * guest here, so the source must not run its copy again: the handover happened, and
 * the domain crashed on arrival. Returns whether it did.
 */
function settleResumed(run: IncomingRun, at: Loaded, running: boolean): boolean {
  const { j, host: h } = run;
  const { dom } = at;
  const crashed = at.q.closed;
  h.setBusy(dom, undefined);
  if (crashed) {
    run.log.error('the incoming QEMU exited as the guest resumed; the domain crashed here', { jobId: j.jobId, domain: j.domain });
    h.cleanupRuntime(dom);
    h.apply(dom, { type: 'crash', reason: 'QEMU exited as the guest resumed after a migration', at: Date.now() });
  } else {
    h.apply(dom, { type: 'incoming-done', running, at: Date.now() });
  }
  h.release(j.jobId);
  run.step({ type: 'resumed' });
  return crashed;
}

/** Post-copy: the stream (and a plain one's gate) lives until the last page is here; otherwise the run ends now. */
function streamTail(run: IncomingRun, crashed: boolean): void {
  const w = run.watch;
  if (!run.j.postcopy || !w || crashed || w.final) return run.dispose();
  run.stopDeadline();
  void w
    .until([...FINAL_STATUSES])
    .then(
      (s) => {
        run.j.streamEnd = s;
        run.side.store.saveLater(run.j);
        run.log.info('post-copy stream ended', { jobId: run.j.jobId, domain: run.j.domain, status: s });
      },
      () => undefined,
    )
    .finally(() => run.dispose());
}

/**
 * QEMU refused `cont` past the point of no return (say, a disk it cannot lock). If it
 * says the guest is not running, the guest never ran here: give it back (the source
 * resumes its copy on this word) instead of holding a job nobody can finish. If its
 * state is unknown, stay in finishing: the source keeps asking, and nothing runs twice.
 */
export async function resumeFailed(run: IncomingRun, at: Loaded, why: string): Promise<never> {
  const { j, host: h } = run;
  const st = await incomingOf(at.q)
    .runState()
    .catch(() => undefined);
  if (!st || st.running)
    throw new FerryError(
      'MIGRATION_FAILED',
      `Destination ${h.cfg.name} could not resume "${j.domain}" (${why}) and cannot tell whether it runs; the source keeps its copy paused`,
    );
  const reason = `QEMU on ${h.cfg.name} refused to run the guest (${why}); it never ran there`;
  run.log.error('could not resume an incoming guest; giving it back to the source', {
    jobId: j.jobId,
    domain: j.domain,
    error: why,
    status: st.status,
  });
  // Cluster mode: the record names this host; it names the source again before this side says it abandoned.
  await giveBack(run);
  await undo(run, reason, { type: 'resume-failed', reason });
  throw new FerryError(
    'MIGRATION_FAILED',
    `Destination ${h.cfg.name} could not resume "${j.domain}": ${why}. It never ran there, so the source keeps it`,
    { abandoned: true },
  );
}

/**
 * --copy-storage, at Finish (and its recovery): the copies are complete (the source
 * ended its mirrors before Finish), so nobody writes them from outside any more.
 */
export async function stopExports(run: IncomingRun, q: QmpClient): Promise<void> {
  if (run.j.createdDisks?.length) await incomingOf(q).nbdStop();
}

/** A shut-off domain's move: its definition, persisted through the same phases (and, in cluster mode, its record's handover). */
async function finishDefinition(run: IncomingRun): Promise<Results['relocation.finish']> {
  const j = run.j;
  if (j.phase !== 'begun') throw new FerryError('MIGRATION_ILLEGAL_PHASE', `Job ${j.jobId} is ${j.phase}, cannot finish`);
  const c = parseDomainConfig(Object.fromEntries(Object.entries(j.config).filter(([k]) => !k.startsWith('_'))));
  run.step({ type: 'prepared' });
  run.step({ type: 'resuming' });
  if (!(await handOver(run)))
    throw new FerryError('MIGRATION_FAILED', `The cluster record of "${j.domain}" does not hand it to ${run.host.cfg.name}`, {
      abandoned: true,
    });
  run.host.defineMoved(c);
  run.step({ type: 'resumed' });
  run.dispose();
  return { phase: j.phase, resumedAt: null, host: run.host.cfg.name };
}

/**
 * Confirm without the source: once the guest runs here and Finish was answered, the
 * source's Confirm only tidies up, and it can be lost (the source or this ferryd
 * died in between). Legal only from finished; changes nothing but the record.
 */
export function selfConfirm(run: IncomingRun, why: string): void {
  if (run.j.phase !== 'finished') return;
  run.log.info('confirming a finished job without the source', { jobId: run.j.jobId, domain: run.j.domain, why });
  run.step({ type: 'confirmed' });
  run.side.store.prune();
}
