/**
 * The destination side of a migration: a state loop driven by the source's messages,
 * as in Cloud Hypervisor's receiver. Each message goes to its phase file under
 * incoming/ (begin, prepare, finish, abandon, recover), with the job's run
 * (incoming/run.ts), which owns what the job holds. Every message is untrusted input:
 * it is checked against the phase, the job and the TLS identity of the peer that sent it.
 *
 *   source                    destination (this side)
 *     |-- relocation.begin ----->|  begin.ts: checks; job persisted; reserve; QEMU -S
 *     |-- relocation.prepare --->|  prepare.ts: persisted prepared; one-shot listener
 *     |== QEMU stream ==========>|
 *     |-- relocation.digest ---->|  finish.ts: loaded; RAM digests (--verify-memory)
 *     |-- relocation.repair ---->|  finish.ts: the source's bytes written, still paused
 *     |-- relocation.finish ---->|  finish.ts: persisted finishing ── point of no return
 *     |                          |  cont; announce-self; finished
 *     |-- relocation.confirm --->|  confirmed (or by itself after CONFIRM_GRACE_MS)
 *     |-- relocation.abandon --->|  abandon.ts (also: control connection closed, quiet)
 *     |-- relocation.recover --->|  recover.ts: post-copy stream broke: a new listener
 *     |-- relocation.lost ------>|  recover.ts: the source failed it for good: all here, or crashed
 *   restart: recover.ts drive(), from the persisted phase
 */
import { FerryError } from '../errors.ts';
import { parseBegin } from '../api/relocation.ts';
import type { Params } from '../api/schema.ts';
import type { Results } from '../api/protocol.ts';
import type { MigrationHost, MigrationLog, RelocationContext } from './host.ts';
import { destTransition, type DestEvent } from './phases.ts';
import type { JobStore, DestJob } from './jobs.ts';
import { IncomingRun, type IncomingSide } from './incoming/run.ts';
import { begin } from './incoming/begin.ts';
import { prepare } from './incoming/prepare.ts';
import { digest, repair, finish } from './incoming/finish.ts';
import { abandonLocal, abandonQuietly, touch } from './incoming/abandon.ts';
import { drive, recoverPostcopy, streamLost } from './incoming/recover.ts';

export class Destination {
  /** The incoming moves this ferryd holds something for, by job id (incoming/run.ts). */
  private readonly runs = new Map<string, IncomingRun>();
  private readonly side: IncomingSide;

  constructor(
    private readonly host: MigrationHost,
    private readonly store: JobStore,
    private readonly log: MigrationLog,
  ) {
    this.side = {
      host,
      store,
      log,
      step: (j, e) => this.step(j, e),
      runOf: (j) => this.runOf(j),
      forget: (run) => {
        if (this.runs.get(run.j.jobId) === run) this.runs.delete(run.j.jobId);
      },
    };
    host.on('qemu.gone', (ev: { domain: string; pid: number }) => {
      for (const j of store.jobs.values()) {
        if (j.role === 'destination' && j.domain === ev.domain && j.pid === ev.pid && j.phase === 'prepared') {
          this.log.warn('incoming QEMU died during the transfer', { jobId: j.jobId, domain: j.domain });
          abandonQuietly(this.runOf(j), 'destination QEMU exited during the transfer');
        }
      }
    });
  }

  private runOf(j: DestJob): IncomingRun {
    let run = this.runs.get(j.jobId);
    if (!run) {
      run = new IncomingRun(this.side, j);
      this.runs.set(j.jobId, run);
    }
    return run;
  }

  /**
   * Moves the job to its next phase and persists it. Before an irreversible step
   * (prepared, resuming) the phase must be on disk first: if it cannot be written the
   * job stays where it was and STATE_WRITE_FAILED goes back to the source, which
   * abandons. Events that record what already happened (resumed, confirmed, abandon:
   * its undoing is done) stay in memory and are retried until the disk has room.
   */
  private step(j: DestJob, e: DestEvent): void {
    const strict = e.type === 'prepared' || e.type === 'resuming';
    if (!this.store.advance(j, destTransition(j.phase, e), strict))
      this.log.warn('migration phase not persisted yet (retrying)', { jobId: j.jobId, phase: j.phase });
    this.log.info('migration phase', { role: 'destination', jobId: j.jobId, domain: j.domain, phase: j.phase });
    this.host.emit('migration.phase', { domain: j.domain, jobId: j.jobId, role: 'destination', phase: j.phase });
  }

  /** The job a message names, if it is an incoming one of the peer that sent it. */
  private job(jobId: unknown, ctx: RelocationContext): DestJob {
    const j = typeof jobId === 'string' ? this.store.jobs.get(jobId) : undefined;
    if (!j || j.role !== 'destination')
      throw new FerryError(
        'JOB_NOT_FOUND',
        `No incoming migration job ${typeof jobId === 'string' ? jobId.slice(0, 40) : '?'} on ${this.host.cfg.name}`,
      );
    if (ctx.caller.transport === 'tls' && ctx.caller.peerName !== j.peer.name)
      throw new FerryError('MIGRATION_PROTOCOL', `Job ${j.jobId} belongs to ${j.peer.name}, not ${ctx.caller.peerName}`);
    return j;
  }

  /** The run of the job a message names; the message is the source speaking, so the quiet deadline is re-armed. */
  private run(jobId: unknown, ctx: RelocationContext): IncomingRun {
    const j = this.job(jobId, ctx);
    // A job that holds nothing (finished, or settled) gets a run for this message only.
    const run = this.runs.get(j.jobId) ?? new IncomingRun(this.side, j);
    touch(run);
    return run;
  }

  /** Begin: pre-flight, the job, its reservation and its stopped QEMU (incoming/begin.ts). */
  async begin(p: Params<'relocation.begin'>, ctx: RelocationContext): Promise<Results['relocation.begin']> {
    return await begin(this.side, parseBegin(p), ctx);
  }

  /** Prepare: the one-shot listener (incoming/prepare.ts). */
  async prepare(p: Params<'relocation.prepare'>, ctx: RelocationContext): Promise<Results['relocation.prepare']> {
    return await prepare(this.run(p.jobId, ctx));
  }

  /** Digest: the loaded RAM's chunk digests, for the memory check (incoming/finish.ts). */
  async digest(p: Params<'relocation.digest'>, ctx: RelocationContext): Promise<Results['relocation.digest']> {
    return await digest(this.run(p.jobId, ctx), p.chunks);
  }

  /** Repair: the source's bytes written into the paused guest (incoming/finish.ts). */
  async repair(p: Params<'relocation.repair'>, ctx: RelocationContext, attachment?: Buffer): Promise<Results['relocation.repair']> {
    return await repair(this.run(p.jobId, ctx), p, attachment);
  }

  /** Finish: the point of no return, the guest resumed here (incoming/finish.ts). */
  async finish(p: Params<'relocation.finish'>, ctx: RelocationContext): Promise<Results['relocation.finish']> {
    return await finish(this.run(p.jobId, ctx), p.running !== false);
  }

  confirm(p: Params<'relocation.confirm'>, ctx: RelocationContext): Results['relocation.confirm'] {
    const j = this.job(p.jobId, ctx);
    if (j.phase !== 'confirmed') {
      this.step(j, { type: 'confirmed' });
      this.store.prune();
    }
    return { phase: j.phase };
  }

  async abandon(p: Params<'relocation.abandon'>, ctx: RelocationContext): Promise<Results['relocation.abandon']> {
    const j = this.job(p.jobId, ctx);
    if (j.phase === 'abandoned') return { phase: j.phase };
    if (j.phase !== 'begun' && j.phase !== 'prepared')
      throw new FerryError(
        'MIGRATION_ILLEGAL_PHASE',
        `Job ${j.jobId} is ${j.phase} on ${this.host.cfg.name}: past the point of no return, it cannot be abandoned`,
      );
    await abandonLocal(this.runOf(j), p.reason?.slice(0, 500) ?? 'the source abandoned');
    return { phase: j.phase };
  }

  /** Recover: a broken post-copy stream gets a new listener (incoming/recover.ts). */
  async recover(p: Params<'relocation.recover'>, ctx: RelocationContext): Promise<Results['relocation.recover']> {
    return await recoverPostcopy(this.runOf(this.job(p.jobId, ctx)));
  }

  /** Lost: the source's QEMU failed a post-copy stream for good (incoming/recover.ts). */
  async lost(p: Params<'relocation.lost'>, ctx: RelocationContext): Promise<Results['relocation.lost']> {
    return await streamLost(this.runOf(this.job(p.jobId, ctx)), p.reason?.slice(0, 500) ?? 'the source failed the stream');
  }

  status(p: Params<'relocation.status'>, ctx: RelocationContext): Results['relocation.status'] {
    try {
      const j = this.job(p.jobId, ctx);
      if (j.phase === 'begun' || j.phase === 'prepared') touch(this.runOf(j));
      return { phase: j.phase, domain: j.domain };
    } catch (e) {
      if (e instanceof FerryError && e.code === 'JOB_NOT_FOUND') return { phase: 'unknown' };
      throw e;
    }
  }

  /** After a restart: the job settled from its persisted phase (incoming/recover.ts). */
  async drive(j: DestJob, why: string): Promise<void> {
    const run = this.runOf(j);
    try {
      await drive(run, why);
    } finally {
      // Settled or handed over: nothing of it stays held (an abandon disposed it already).
      if (j.phase !== 'begun' && j.phase !== 'prepared') run.dispose();
    }
  }
}
