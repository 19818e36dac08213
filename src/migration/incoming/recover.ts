/**
 * The destination's recovery entry points: `drive`, which settles a job from its
 * persisted phase alone (after a restart, the same steps as when ferryd runs on), and
 * `recoverPostcopy`, a new listener for a broken post-copy stream, and `streamLost`, the
 * end of a post-copy whose source QEMU failed the stream for good.
 */
import path from 'node:path';
import { FerryError } from '../../errors.ts';
import { killAndWait, qemuPidsWith, isOurQemu } from '../../qemu/process.ts';
import { MigrationWatcher, FINAL_STATUSES } from '../../qemu/migstatus.ts';
import { MigrationQmp, uri } from '../../qemu/migration.ts';
import type { QmpClient } from '../../qmp/client.ts';
import type { Results } from '../../api/protocol.ts';
import { abandonLocal } from './abandon.ts';
import { handOver, resumeFailed, stopExports, selfConfirm } from './finish.ts';
import { freeDataPort, openGate } from './prepare.ts';
import type { IncomingRun } from './run.ts';

/**
 * The driver of a job whose in-process context is gone (ferryd restarted), from its
 * persisted phase:
 *   begun, prepared → abandon: kill the incoming QEMU, forget the definition
 *   finishing → roll forward: the source persisted "finish" before asking and resumes
 *       its copy only on our word that we abandoned, which we give only if QEMU refuses
 *       to run the guest and says it is not running (resumeFailed)
 *   finished → the guest runs here; the source's Confirm went to the old process
 *   confirmed, abandoned → nothing
 */
export async function drive(run: IncomingRun, why: string): Promise<void> {
  const j = run.j;
  switch (j.phase) {
    case 'begun':
    case 'prepared':
      return abandonAfterRestart(run, why);
    case 'finishing': {
      const forward = rollForward(run).then(() =>
        selfConfirm(run, `rolled forward (${why}); the source's Confirm went to the old process`),
      );
      // Cluster mode: the handover waits for etcd, which may take a while; ferryd's start does not.
      if (run.host.ownership) return void forward.catch((e) => run.log.error('roll forward failed', { jobId: j.jobId, error: String(e) }));
      return forward;
    }
    case 'finished':
      selfConfirm(run, `${why} before the source confirmed`);
      return;
    case 'confirmed':
    case 'abandoned':
      return;
    default: {
      const never: never = j.phase;
      throw new FerryError('INTERNAL', `unknown destination phase ${String(never)}`);
    }
  }
}

/** Before Finish: undone, including a QEMU or taps that a crash left off the record. */
async function abandonAfterRestart(run: IncomingRun, why: string): Promise<void> {
  const { j, host: h } = run;
  await abandonLocal(run, `${why} in phase ${j.phase}`);
  // abandonLocal killed the QEMU on record. One started just before a crash may
  // not be on record yet: find the incoming one by its uuid and the run directory.
  for (const pid of qemuPidsWith(j.uuid, ['-incoming', h.runDir])) {
    run.log.warn('killing an incoming QEMU that was not on record', { jobId: j.jobId, pid });
    await killAndWait(pid, 0);
  }
  // Its taps, too: spawn creates them (named by uuid) before QEMU starts.
  const nics = (j.config as { nics?: unknown }).nics;
  h.removeTaps(j.uuid, Array.isArray(nics) ? nics.length : 0);
}

/** Finishing: the guest resumes here (the source waits for our word), unless QEMU refuses and says it never ran. */
async function rollForward(run: IncomingRun): Promise<void> {
  const { j, host: h } = run;
  const dom = h.find(j.domain);
  const mine = dom && dom.rec.config.uuid === j.uuid && dom.rec.state.kind === 'incoming' ? dom : undefined;
  // Cluster mode: forward only if the record hands the domain here (else undone: the source kept it).
  if (mine?.qmp && !(await handOver(run))) return;
  if (mine?.qmp) {
    const q = mine.qmp;
    await stopExports(run, q);
    try {
      await new MigrationQmp(q, 'destination').cont();
    } catch (e) {
      await resumeFailed(run, { dom: mine, q }, (e as Error).message).catch((err) =>
        run.log.warn('incoming guest not resumed', { jobId: j.jobId, error: String(err) }),
      );
      return;
    }
    await new MigrationQmp(q, 'destination').announce().catch(() => undefined);
    h.setBusy(mine, undefined);
    h.apply(mine, { type: 'incoming-done', running: true, at: Date.now() });
  } else if (mine) {
    h.cleanupRuntime(mine);
    h.apply(mine, { type: 'crash', reason: 'QEMU exited while resuming an incoming migration', at: Date.now() });
  }
  h.release(j.jobId);
  run.step({ type: 'resumed' });
}

/**
 * Recover: the post-copy stream broke (both QEMUs in postcopy-paused: the guest here
 * waits for pages only the source has). A new one-shot listener on the incoming QEMU
 * (migrate-recover), with the same TLS credentials and authz, or a new gate for a plain
 * stream; the source resumes into it. A destination QEMU that has not noticed the
 * break yet is paused first (migrate-pause): the source saw it break.
 */
export async function recoverPostcopy(run: IncomingRun): Promise<Results['relocation.recover']> {
  const { j, host: h } = run;
  if (!j.postcopy || (j.phase !== 'finished' && j.phase !== 'confirmed'))
    throw new FerryError(
      'MIGRATION_ILLEGAL_PHASE',
      `Job ${j.jobId} is ${j.phase}${j.postcopy ? '' : ' and not a post-copy'}: nothing to recover`,
    );
  const dom = h.find(j.domain);
  const q = dom && dom.rec.config.uuid === j.uuid ? dom.qmp : undefined;
  if (!dom || !q) throw new FerryError('MIGRATION_FAILED', `Destination ${h.cfg.name} has no QEMU for "${j.domain}" to recover`);
  await pausedInPostcopy(run, q);
  const port = await freeDataPort(run.side, j.jobId);
  if (!j.encrypted) await openGate(run, { sock: path.join(h.qemuDirOf(dom), 'recover.sock'), port, channels: 2 }, true);
  else await new MigrationQmp(q, 'destination').recover(uri.tcp(h.cfg.relocation.address, port));
  if (!run.watch) {
    // The run ended with the first stream: the resumed one holds it (its gate) until it ends.
    const w = new MigrationWatcher(q);
    run.watch = w;
    void w
      .until([...FINAL_STATUSES])
      .catch(() => undefined)
      .finally(() => run.dispose());
  }
  run.log.warn('post-copy stream broke; recovery listener open', { jobId: j.jobId, domain: j.domain, port });
  return { dataAddress: h.cfg.relocation.address, dataPort: port };
}

/** The incoming QEMU paused in post-copy (paused here if it has not noticed the break yet), else refused. */
async function pausedInPostcopy(run: IncomingRun, q: QmpClient): Promise<void> {
  const w = new MigrationWatcher(q);
  const mq = new MigrationQmp(q, 'destination');
  try {
    let st = (await mq.info()).status ?? 'none';
    if (st === 'postcopy-active') {
      await mq.pause();
      st = await w.until(['postcopy-paused', ...FINAL_STATUSES], 10000);
    }
    if (st !== 'postcopy-paused')
      throw new FerryError(
        'MIGRATION_ILLEGAL_PHASE',
        `The incoming QEMU of "${run.j.domain}" is ${st}, not paused in post-copy: nothing to recover`,
      );
  } finally {
    w.dispose();
  }
}

/** How long the incoming stream may take to show where it stands once the source's QEMU has failed it. */
const LOST_SETTLE_MS = 5000;

/**
 * The source's QEMU failed the post-copy stream for good (QEMU fails rather than pauses
 * when the break comes as it completes, and a failed migration cannot be resumed). If
 * every page arrived, the incoming stream completes here and the guest runs on. If not,
 * the guest waits for pages nobody can send any more: it is stopped and marked crashed
 * here, where its definition lives now, and `ferry start` boots it again. Never the
 * source's copy: the guest ran here, so its disks have moved on from it.
 */
export async function streamLost(run: IncomingRun, reason: string): Promise<Results['relocation.lost']> {
  const { j, host: h } = run;
  if (!j.postcopy || (j.phase !== 'finished' && j.phase !== 'confirmed'))
    throw new FerryError(
      'MIGRATION_ILLEGAL_PHASE',
      `Job ${j.jobId} is ${j.phase}${j.postcopy ? '' : ' and not a post-copy'}: its stream cannot be lost`,
    );
  // Ended already (and the domain may have moved on since): that answer stands, and says
  // whether this side crashed the guest for it (a second ask, from the source's driver).
  if (j.streamEnd) return { stream: j.streamEnd, crashed: j.error?.code === 'MIGRATION_POSTCOPY_LOST' };
  const dom = h.find(j.domain);
  const st = dom && dom.rec.config.uuid === j.uuid ? dom.rec.state : undefined;
  const q = dom?.qmp;
  if (!dom || !st || (st.kind !== 'running' && st.kind !== 'paused') || !q || q.closed)
    return { stream: st?.kind ?? 'gone', crashed: st?.kind === 'crashed' };
  const w = new MigrationWatcher(q);
  let stream: string;
  try {
    w.observe((await new MigrationQmp(q, 'destination').info().catch(() => ({ status: undefined }))).status);
    // The last bytes may still be on their way: completed (all here) or paused/failed (some never will be).
    stream = await w.until([...FINAL_STATUSES, 'postcopy-paused'], LOST_SETTLE_MS).catch(() => w.status);
  } finally {
    w.dispose();
  }
  if (stream === 'completed') {
    j.streamEnd = stream;
    run.side.store.saveLater(j);
    return { stream, crashed: false };
  }
  const why = `post-copy lost pages: ${reason} (the incoming stream was ${stream})`;
  run.log.error('the source failed the post-copy stream with pages still there; the guest cannot go on: stopped and marked crashed', {
    jobId: j.jobId,
    domain: j.domain,
    stream,
    reason,
  });
  // Crashed first, so that the QEMU's exit is not taken for a crash of its own.
  h.apply(dom, { type: 'crash', reason: why, at: Date.now() });
  h.cleanupRuntime(dom);
  if (isOurQemu(st.pid, j.uuid)) await killAndWait(st.pid, 0);
  j.error = { code: 'MIGRATION_POSTCOPY_LOST', message: why };
  j.streamEnd = stream;
  run.side.store.saveLater(j);
  run.dispose();
  return { stream, crashed: true };
}
