/**
 * Post-copy past the point of no return: the guest runs on the destination and fetches
 * the pages still here. This QEMU streams them until the stream completes, resumes a
 * broken stream into a new listener there, and is never resumed itself.
 */
import { FerryError, asFerryError } from '../../errors.ts';
import { MigrationWatcher, FINAL_STATUSES, type MigrateInfo } from '../../qemu/migstatus.ts';
import { MigrationQmp, uri } from '../../qemu/migration.ts';
import type { QmpClient } from '../../qmp/client.ts';
import type { DomainHandle } from '../host.ts';
import type { SourceJob } from '../jobs.ts';
import { redial, retire } from './peer.ts';
import { progress } from './progress.ts';
import { keepTrying } from './retry.ts';
import type { OutgoingSide } from './run.ts';
import { ask } from '../ask.ts';

/** The source QEMU's stream and its watcher. */
export interface Stream {
  q: QmpClient;
  w: MigrationWatcher;
}

/**
 * Post-copy, after the destination's guest runs: this QEMU sends what is left (the
 * pages the guest faults on first) until the stream completes. The progress bar shows
 * the pages still here. A stream that fails leaves a guest that cannot finish: say so.
 * A broken stream is resumed (recover) until `deadline`; `onRecovered` hears of each.
 */
export async function awaitPostcopy(
  s: OutgoingSide,
  j: SourceJob,
  st: Stream,
  opts: { deadline?: number; onRecovered?: (attempts: number, ms: number) => void } = {},
): Promise<void> {
  const { q, w } = st;
  const mq = new MigrationQmp(q, 'source');
  const timer = setInterval(
    () =>
      void mq
        .info()
        .then((m) => progress(s, j, m, { passes: w.passes, maxDowntimeMs: 0 }))
        .catch(() => undefined),
    250,
  );
  try {
    for (;;) {
      const status = await w.until([...FINAL_STATUSES, 'postcopy-paused']);
      if (status === 'completed') return;
      if (status !== 'postcopy-paused') {
        const desc = (await mq.info().catch((): MigrateInfo => ({})))['error-desc'] ?? 'no reason given';
        return await streamFailed(s, j, `${s.host.cfg.name}'s QEMU ended the stream ${status} (${desc})`, opts.deadline ?? Infinity);
      }
      const t = performance.now();
      const attempts = await recoverPostcopy(s, j, st, opts.deadline ?? Infinity);
      opts.onRecovered?.(attempts, Math.round(performance.now() - t));
    }
  } catch (e) {
    if (e instanceof FerryError) throw e;
    throw new FerryError(
      'MIGRATION_FAILED',
      `The source QEMU of "${j.domain}" exited during post-copy: the guest on ${j.peer.name} has lost the pages it had not fetched`,
    );
  } finally {
    clearInterval(timer);
  }
}

/**
 * The post-copy stream broke and both QEMUs paused (postcopy-paused): the guest on the
 * destination waits for pages that only this QEMU has. Asks the destination for a new
 * one-shot listener (relocation.recover) and resumes the stream into it (migrate with
 * resume), with capped backoff until it takes or `deadline` passes (then
 * MIGRATION_UNRESOLVED: the job's driver goes on trying in the background). Never
 * resumes the copy here. Returns the attempts it took.
 */
async function recoverPostcopy(s: OutgoingSide, j: SourceJob, st: Stream, deadline: number): Promise<number> {
  s.log.warn('post-copy stream broke; recovering', { jobId: j.jobId, domain: j.domain, peer: j.peer.name });
  const how = { deadline, first: 1, warning: 'post-copy recovery failed; trying again', prefix: 'post-copy recovery: ' };
  const got = await keepTrying(s, j, how, async (): Promise<true | string> => {
    try {
      return await resumeInto(s, j, st);
    } catch (e) {
      if (st.q.closed)
        throw new FerryError(
          'MIGRATION_FAILED',
          `The source QEMU of "${j.domain}" exited while post-copy was paused: the guest on ${j.peer.name} cannot get the pages it had not fetched`,
        );
      return asFerryError(e).message;
    }
  });
  if (!got)
    throw new FerryError(
      'MIGRATION_UNRESOLVED',
      `The post-copy stream of "${j.domain}" to ${j.peer.name} broke and is not back yet (${j.waiting?.lastError.replace(/^post-copy recovery: /, '') ?? 'no answer'}): the guest there waits for pages only ${s.host.cfg.name} has. ferryd keeps trying to resume it (never the copy here). Watch: \`ferry job ${j.domain}\``,
    );
  s.log.info('post-copy recovered', { jobId: j.jobId, domain: j.domain, attempts: got.attempts });
  return got.attempts;
}

/**
 * This QEMU failed the post-copy stream instead of pausing it: it does so when the break
 * comes as the stream completes, and a failed migration cannot be resumed. Whether the
 * guest survives depends on what reached the destination, so ask it (relocation.lost)
 * until `deadline`: every page there is a move that succeeded; otherwise the destination
 * has stopped the guest and marked it crashed, and this says so.
 */
async function streamFailed(s: OutgoingSide, j: SourceJob, why: string, deadline: number): Promise<void> {
  const how = {
    deadline,
    first: 1,
    warning: 'the destination did not answer about a failed post-copy stream',
    prefix: 'post-copy stream failed: ',
  };
  // Answered already (to the command; this is the background driver's turn): the answer stands.
  const known = j.postcopy?.lost;
  if (!known) s.log.warn('the post-copy stream failed; asking the destination whether every page arrived', { jobId: j.jobId, why });
  const got = known
    ? { value: known }
    : await keepTrying(s, j, how, async () => {
        const client = await redial(s, j).catch((e: unknown) => asFerryError(e).message);
        if (typeof client === 'string') return client;
        try {
          return await ask(client, 'relocation.lost', { jobId: j.jobId, reason: why }, { timeoutMs: 15000 });
        } catch (e) {
          return asFerryError(e).message;
        } finally {
          client.close();
        }
      });
  if (!got)
    throw new FerryError(
      'MIGRATION_UNRESOLVED',
      `The post-copy stream of "${j.domain}" to ${j.peer.name} failed (${why}), and ${j.peer.name} has not said whether every page arrived (${j.waiting?.lastError.replace(/^post-copy stream failed: /, '') ?? 'no answer'}). ferryd keeps asking. Watch: \`ferry job ${j.domain}\``,
    );
  // Kept once it is final: every page there, or the guest there crashed.
  if (j.postcopy && !known && (got.value.stream === 'completed' || got.value.crashed)) {
    j.postcopy.lost = { stream: got.value.stream, crashed: got.value.crashed };
    s.store.saveLater(j);
  }
  if (got.value.stream === 'completed') {
    s.log.warn('the post-copy stream failed after its last page arrived: the move is complete', { jobId: j.jobId, why });
    return;
  }
  throw new FerryError(
    'MIGRATION_POSTCOPY_LOST',
    `The post-copy stream of "${j.domain}" to ${j.peer.name} failed with pages still on ${s.host.cfg.name} (${why}; QEMU cannot resume a failed stream). The guest on ${j.peer.name} could not go on: ${got.value.crashed ? `it is stopped and marked crashed there. Boot it again: \`ferry -H ${j.peer.name} start ${j.domain}\`` : `its stream there is ${got.value.stream}`}`,
  );
}

/** One try: the destination's new listener, and the stream resumed into it. */
async function resumeInto(s: OutgoingSide, j: SourceJob, st: Stream): Promise<true | string> {
  const client = await redial(s, j);
  try {
    const r = await ask(client, 'relocation.recover', { jobId: j.jobId }, { timeoutMs: 15000 });
    if (!Number.isInteger(r.dataPort) || r.dataPort < s.host.cfg.relocation.dataPorts[0] || r.dataPort > 65535)
      throw new FerryError('MIGRATION_PROTOCOL', `${j.peer.name} answered recover with port ${String(r.dataPort)}`);
    const back = st.w.next(['postcopy-active', 'completed', 'failed', 'postcopy-paused'], 15000);
    back.catch(() => undefined);
    await new MigrationQmp(st.q, 'source').migrate(uri.tcp(r.dataAddress, r.dataPort), true);
    const status = await back;
    if (status === 'postcopy-paused') throw new FerryError('MIGRATION_FAILED', 'the resumed stream broke again');
    return status !== 'failed' ? true : 'the resumed stream failed';
  } finally {
    client.close();
  }
}

/**
 * The driver of a job in post-copy whose command is gone (a restart, a lost answer):
 * follows the source QEMU's stream to its end, then retires the copy here. At most one
 * per job. A QEMU that is gone already ends it too: nothing here can help the guest.
 */
export function drivePostcopy(s: OutgoingSide, j: SourceJob, dom: DomainHandle): void {
  s.driveOnce(j.jobId, 'settling a post-copy', async () => {
    const q = dom.qmp;
    if (q && !q.closed) {
      const w = new MigrationWatcher(q);
      try {
        const m = await new MigrationQmp(q, 'source').info().catch((): MigrateInfo => ({}));
        // Its events so far went to a watcher that is gone: start from what QEMU says now.
        w.observe(m.status);
        if (m.status && m.status !== 'completed') {
          await awaitPostcopy(s, j, { q, w }).catch((e) => {
            j.error = { code: asFerryError(e).code, message: asFerryError(e).message };
            s.log.error('post-copy did not complete', { jobId: j.jobId, error: String(e) });
          });
        }
      } finally {
        w.dispose();
      }
    }
    j.waiting = undefined;
    s.step(j, { type: 'postcopy-done' });
    await retire(s, dom, j);
    s.store.saveLater(j);
    s.store.prune();
    s.host.emit('migration.settled', { domain: j.domain, jobId: j.jobId, phase: j.phase, reason: 'post-copy ended' });
  });
}
