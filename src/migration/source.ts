/**
 * The source side of a migration, and the protocol's sequence:
 *
 *   CLI            source ferryd (S)                          destination ferryd (D)
 *    | migrate ---> |                                                   |
 *    |              |== TLS, mutual auth, hostsAllow =================>|  D's name: its certificate's CN
 *    |              |-- relocation.begin {version, facts, config, -->|  fast pre-flight; reserve;
 *    |              |     homes of its NICs, copyDisks}                |  away ends of tunnels (tunnels.ts);
 *    |              |   (meanwhile: S's QEMU migration settings)       |  disk copies created (mirror.ts);
 *    |              |                                                  |  start QEMU -S -incoming defer
 *    |              |                                                  |  (no listener) ‖ ARP L2 probe
 *    |              |<--- {dataPort, tunnels} (probe listener open) ---|
 *    |              |   home ends list D (here, or relocation.tunnel to the home host)
 *    |              |-- TCP connect to dataPort (≤3 s) --------------->|  firewall check
 *    |              |-- relocation.prepare --------------------------->|  ARP through the tunnels; persist
 *    |              |<------------- {dataPort, nbd} (TLS, authz) ------|  prepared; one-shot listener; NBD exports
 *    |              |== blockdev-mirror into D's NBD exports (TLS) ===>|  (--copy-storage) until all in sync
 *    |              |== QEMU migrate (TLS) ===========================>|  pre-copy passes (live) or stop+copy
 *    |  progress <--|   MIGRATION completed: S's guest stopped [switchover]
 *    |              |   mirrors end as point-in-time copies (block-job-cancel)
 *    |              |-- relocation.digest (--verify-memory) ---------->|  SHA-256 per RAM chunk; still paused
 *    |              |   digest own RAM, compare chunk by chunk         |
 *    |              |-- relocation.repair + raw bytes × differing ---->|  write source's bytes into its RAM
 *    |              |-- relocation.digest {chunks}; any differ → abandon
 *    |              |   persist finish  ── POINT OF NO RETURN ──       |
 *    |              |-- relocation.finish ---------------------------->|  persist finishing; NBD server off;
 *    |              |                                                  |  cont; announce-self
 *    |              |<------------------------------- {resumedAt} -----|  persist finished
 *    |              |   quit source QEMU, forget the definition;      |
 *    |              |   drop an away end here, its home stops flooding here
 *    |              |-- relocation.confirm --------------------------->|
 *    | <- report ---|                                                   |
 *
 * Each step is a phase file under outgoing/ (begin, prepare, perform with supervise,
 * switchover, finish, confirm; settle and postcopy past the point of no return; abandon
 * before it), each taking the move's run (outgoing/run.ts). This class is the driver:
 * the normal sequence (start), and the one from a persisted phase (drive) that failures,
 * lost answers and restarts all go through.
 *
 * Before `finish`, any failure abandons: S cancels QEMU's migration, resumes its guest
 * if it was running, and tells D to abandon (D also abandons by itself when the
 * control connection drops). From `finish` on, S resumes its copy only if D says
 * that it abandoned; if D cannot be asked, S keeps its copy paused and keeps asking.
 */
import os from 'node:os';
import { FerryError, asFerryError } from '../errors.ts';
import { hasProcess } from '../domain/state.ts';
import type { ApiClient } from '../api/client.ts';
import type { CancelResult, ResolveResult, PlanView } from '../api/protocol.ts';
import type { MigrationHost, MigrationLog, DomainHandle } from './host.ts';
import { sourceTransition, sourceCanAbandon, type SourceEvent } from './phases.ts';
import { Planner, withCompression } from './autopilot.ts';
import { MemoryCheck } from './memcheck.ts';
import type { JobStore, SourceJob, Report } from './jobs.ts';
import type { OutgoingRun, OutgoingSide, StartParams, StartRequest, Peer } from './outgoing/run.ts';
import { chooseCompression } from './plan.ts';
import { open, begin } from './outgoing/begin.ts';
import { MoveQueue } from './queue.ts';
import { prepare } from './outgoing/prepare.ts';
import { perform } from './outgoing/perform.ts';
import { switchover } from './outgoing/switchover.ts';
import { finish, moveDefinition } from './outgoing/finish.ts';
import { confirm } from './outgoing/confirm.ts';
import { abandon, resumeSource } from './outgoing/abandon.ts';
import { askDestination, driveFinish, settleFinish } from './outgoing/settle.ts';
import { drivePostcopy } from './outgoing/postcopy.ts';
import { dialPeer, leaveTunnels, redial, retire } from './outgoing/peer.ts';

export type { StartParams, StartRequest } from './outgoing/run.ts';

/** A destination at its incoming limits: the move tries again after this pause, doubling to the most, for at most this long. */
const BUSY_FIRST_MS = 500;
const BUSY_MAX_MS = 4000;
const BUSY_GIVE_UP_MS = 10 * 60000;

export class Source {
  /** The moves running in this ferryd (outgoing/run.ts), by job id: their cancellation and disk mirrors. */
  private readonly runs = new Map<string, OutgoingRun>();
  /** Jobs past the point of no return being settled in the background (driveFinish, drivePostcopy). */
  private readonly driving = new Map<string, Promise<void>>();
  private readonly side: OutgoingSide;

  /** The autopilot's measurements and plan (autopilot.ts). */
  readonly planner: Planner;
  /** This host's line of outgoing moves (limits.movesOut, limits.movesPerLink). */
  readonly queue: MoveQueue;

  constructor(
    private readonly host: MigrationHost,
    private readonly store: JobStore,
    private readonly log: MigrationLog,
  ) {
    this.planner = new Planner(host, store, log);
    this.queue = new MoveQueue(
      () => ({ outgoing: host.cfg.limits.movesOut, perLink: host.cfg.limits.movesPerLink }),
      () => host.emit('migration.queue', { host: host.cfg.name }),
    );
    this.side = {
      host,
      store,
      log,
      planner: this.planner,
      memcheck: new MemoryCheck(host, log),
      step: (j, e) => this.step(j, e),
      runOf: (jobId) => this.runs.get(jobId),
      connect: (dest) => this.connectPeer(dest),
      driveOnce: (jobId, what, f) => this.driveOnce(jobId, what, f),
    };
  }

  /**
   * Moves the job to its next phase and persists it. A phase that leads to a step
   * (everything up to finish-sent, the point of no return) must be on disk first: if it
   * cannot be written the job stays where it was and the error abandons the migration.
   * Events that record what already happened (dest-finished, abandon, dest-abandoned)
   * stay in memory and are retried until the disk has room.
   */
  private step(j: SourceJob, e: SourceEvent): void {
    const fact = e.type === 'dest-finished' || e.type === 'abandon' || e.type === 'dest-abandoned';
    if (!this.store.advance(j, sourceTransition(j.phase, e), !fact))
      this.log.warn('migration phase not persisted yet (retrying)', { jobId: j.jobId, phase: j.phase });
    this.log.info('migration phase', { role: 'source', jobId: j.jobId, domain: j.domain, phase: j.phase, event: e.type });
    this.host.emit('migration.phase', { domain: j.domain, jobId: j.jobId, role: 'source', phase: j.phase });
  }

  /** The job's one background driver: a second call while one runs does nothing. */
  private driveOnce(jobId: string, what: string, f: () => Promise<void>): void {
    if (this.driving.has(jobId)) return;
    const p = f()
      .catch((e) => this.log.error(`${what} failed`, { jobId, error: String(e) }))
      .finally(() => this.driving.delete(jobId));
    this.driving.set(jobId, p);
  }

  /**
   * Opens the control channel to DEST (a peer name, NAME, ADDRESS or ADDRESS:PORT): mutual
   * TLS, the peer named by its certificate (outgoing/peer.ts). Every phase dials through here.
   */
  connectPeer(dest: string): Promise<{ client: ApiClient; peer: Peer }> {
    return dialPeer(this.side, dest);
  }

  cancel(domain: string): CancelResult {
    if (this.queue.withdraw(domain)) return { jobId: '', domain, cancelling: true };
    const j = this.store.active(domain);
    if (!j || j.role !== 'source') throw new FerryError('JOB_NOT_FOUND', `No outgoing migration of "${domain}" on ${this.host.cfg.name}`);
    if (!sourceCanAbandon(j.phase))
      throw new FerryError(
        'MIGRATION_ILLEGAL_PHASE',
        `Migration of "${domain}" is in phase ${j.phase}, past the point of no return: it cannot be cancelled`,
      );
    const run = this.runs.get(j.jobId);
    if (!run) throw new FerryError('JOB_NOT_FOUND', `Migration of "${domain}" is not running in this ferryd`);
    run.cancel();
    return { jobId: j.jobId, domain, cancelling: true };
  }

  /**
   * A move, as libvirt's phases: begin (checks, the destination's pre-flight), prepare
   * (its listener), perform (disks, then RAM), switchover (the guest paused here: disk
   * copies end, the memory check), finish (the point of no return: the destination
   * resumes the guest) and confirm (this host lets go). Each phase takes the run
   * (outgoing/run.ts), which owns what the job holds. Refusals before a job exists are
   * thrown; after that the answer is the job's report, failures included.
   */
  async start(params: StartRequest): Promise<Report> {
    const dom0 = this.host.get(params.domain);
    // In line first (migration/queue.ts): nothing is reserved or dialled while a move waits.
    const slot = await this.queue.enter({
      domain: params.domain,
      dest: params.dest,
      live: params.live === true,
      priority: params.priority ?? 'operator',
      memoryMiB: dom0.rec.config.memoryMiB,
    });
    const t0 = Date.now();
    try {
      for (let pause = BUSY_FIRST_MS; ; pause = Math.min(pause * 2, BUSY_MAX_MS)) {
        const r = await this.startNow(await this.resolveCompress(params));
        if (r.outcome === 'succeeded') this.queue.observed(dom0.rec.config.memoryMiB, r.totalMs);
        // The destination takes as many incoming moves as its limits allow: back in line, in
        // the same place, and ask again (nothing was reserved; the try leaves no job behind).
        if (r.error?.code !== 'MIGRATION_DEST_BUSY' || Date.now() - t0 > BUSY_GIVE_UP_MS) return r;
        this.forgetBusy(params.domain);
        this.log.info('destination busy; the move waits in line', { domain: params.domain, dest: params.dest, pauseMs: pause });
        await slot.backOff(pause, `room at ${params.dest}: ${r.error.message}`);
      }
    } finally {
      slot();
    }
  }

  /** The job of a try the destination refused as busy: it never began, so `ferry jobs` does not list it. */
  private forgetBusy(domain: string): void {
    const j = this.store.latest(domain);
    if (j?.role === 'source' && j.phase === 'abandoned' && j.error?.code === 'MIGRATION_DEST_BUSY') this.store.discard(j);
  }

  private async startNow(params: StartParams): Promise<Report> {
    const run = await open(this.side, params);
    const { j, dom } = run;
    this.runs.set(j.jobId, run);
    try {
      await begin(run);
      if (run.mode === 'definition' || !run.q) return await moveDefinition(run);
      await prepare(run);
      await perform(run);
      await switchover(run);
      await finish(run);
      return await confirm(run);
    } catch (e) {
      return await this.failed(run, e);
    } finally {
      await run.dispose();
      this.host.setBusy(dom, undefined);
      this.runs.delete(j.jobId);
    }
  }

  /**
   * Any failure: the same driver as after a restart, from the phase on disk (abandon
   * before the point of no return, keep asking past it), and the report says why.
   */
  private async failed(run: OutgoingRun, e: unknown): Promise<Report> {
    const { j, p, peer } = run;
    let fe = asFerryError(e);
    if (run.cancelled && sourceCanAbandon(j.phase))
      fe = new FerryError(
        'MIGRATION_CANCELLED',
        `Migration of "${p.domain}" to ${peer.name} was cancelled; it keeps running on ${this.host.cfg.name}`,
      );
    if (this.store.jobs.has(j.jobId)) await this.drive(j, fe.message, run.client);
    const outcome =
      fe.code === 'MIGRATION_CANCELLED'
        ? 'cancelled'
        : j.phase === 'finish' || (j.phase === 'postcopy' && fe.code === 'MIGRATION_UNRESOLVED')
          ? 'unresolved'
          : 'failed';
    const r = run.report(outcome, { ...run.stats, error: { code: fe.code, message: fe.message } });
    j.report = r;
    j.error = r.error;
    if (this.store.jobs.has(j.jobId)) this.store.saveLater(j);
    // A busy destination's refusal is not the move's end: it waits in line and tries again (start).
    if (fe.code !== 'MIGRATION_DEST_BUSY') this.host.emit('migration.done', { domain: p.domain, report: r });
    return r;
  }

  /**
   * --compress auto, decided here, before the move opens (Begin tells the destination the
   * method and the channels): a sample of the guest's RAM, judged by plan.chooseCompression. A shut-off
   * domain moves as its definition: nothing to compress.
   */
  private async resolveCompress(req: StartRequest): Promise<StartParams> {
    const { compress, ...rest } = req;
    if (compress !== 'auto') return { ...rest, ...(compress ? { compress } : {}) };
    const dom = this.host.get(req.domain);
    const live = req.live === true && hasProcess(dom.rec.state);
    const c: ReturnType<typeof chooseCompression> = live
      ? chooseCompression(await this.host.compressibility(dom), os.cpus().length)
      : { compress: 'none', why: '--compress auto: no compression (not a live move)' };
    // The operator's --parallel wins over auto's channels.
    return withCompression(rest, c);
  }

  /** `ferry migrate DOMAIN DEST --plan`: the autopilot's plan for a live move; nothing moves. */
  async planOnly(req: StartRequest): Promise<PlanView> {
    let p = await this.resolveCompress({ ...req, live: true });
    const dom = this.host.get(p.domain);
    if (!hasProcess(dom.rec.state) || !dom.qmp)
      throw new FerryError(
        'DOMAIN_BAD_STATE',
        `Domain "${p.domain}" is not running: only a live move has a plan (a shut-off domain moves as its definition)`,
      );
    if (dom.busy) throw new FerryError('DOMAIN_BAD_STATE', `Domain "${p.domain}" is busy (${dom.busy})`);
    // The peer's name, as a move would learn it: from its certificate.
    const { client, peer } = await this.connectPeer(p.dest);
    client.close();
    if (peer.name === this.host.cfg.name)
      throw new FerryError('MIGRATION_SAME_HOST', `Cannot migrate domain "${p.domain}": ${p.dest} is this host`);
    // As the move would weigh it (outgoing/begin.ts open); the plan says why even for a small guest.
    if (req.compress === undefined && req.parallel === undefined) {
      p = withCompression(p, await this.planner.defaultCompression(dom, dom.qmp, peer.name, p));
    }
    const { view } = await this.planner.planFor(dom, dom.qmp, peer.name, p);
    return p.compressWhy ? { ...view, reason: `${view.reason}; ${p.compressWhy}` } : view;
  }

  /**
   * The driver of a job whose in-process context is gone or broken: a failure on the
   * normal path, a lost connection, a restart of ferryd. It acts on the persisted phase
   * alone, so all of them go through the same steps:
   *
   *   begin, prepare, perform, switchover → abandon: Finish was never sent, so the
   *       destination never ran the guest; cancel QEMU's stream, resume the guest if it
   *       ran, tell the destination (which abandons by itself too when we vanish)
   *   finish → ask the destination until it answers (driveFinish, in the background):
   *       finished → retire the copy here; abandoned → resume it; meanwhile it stays paused
   *   postcopy → follow the stream to its end (drivePostcopy), then retire; never resumed here
   *   confirmed, abandoned → the tail a crash may have cut: the phase is on disk before
   *       the copy here is retired or resumed, so a domain still "migrating-out" gets it now
   */
  async drive(j: SourceJob, why: string, client?: ApiClient): Promise<void> {
    const found = this.host.find(j.domain);
    const mine = found && found.rec.config.uuid === j.uuid ? found : undefined;
    switch (j.phase) {
      case 'begin':
      case 'prepare':
      case 'perform':
      case 'switchover':
        return this.abandonFrom(j, mine, { why, client });
      case 'finish':
        // The definition gone already means retirement had finished before a crash.
        if (!mine) return this.step(j, { type: 'dest-finished' });
        return driveFinish(this.side, j, mine);
      case 'postcopy':
        // The guest runs there; this QEMU still holds pages it needs. Never resumed here:
        // wait for the stream to complete, then retire.
        if (!mine) return this.step(j, { type: 'postcopy-done' });
        return drivePostcopy(this.side, j, mine);
      case 'confirmed':
      case 'abandoned':
        return this.finishTail(j, mine);
      default: {
        const never: never = j.phase;
        throw new FerryError('INTERNAL', `unknown source phase ${String(never)}`);
      }
    }
  }

  /** Before the point of no return: abandon, over the run's connection or a new one. */
  private async abandonFrom(j: SourceJob, mine: DomainHandle | undefined, how: { why: string; client?: ApiClient }): Promise<void> {
    if (!mine) return this.step(j, { type: 'abandon', reason: `${how.why}; the domain is gone from ${this.host.cfg.name}` });
    const c = how.client ?? (await redial(this.side, j).catch(() => undefined));
    try {
      await abandon(this.side, { j, dom: mine }, c, how.why);
    } finally {
      if (!how.client) c?.close();
    }
  }

  /** A settled job whose domain is still marked as leaving: the tail a crash cut. */
  private async finishTail(j: SourceJob, mine: DomainHandle | undefined): Promise<void> {
    if (!mine || mine.rec.state.kind !== 'migrating-out') return;
    if (this.store.latest(j.domain)?.jobId !== j.jobId) return; // only the newest job of a domain speaks for it
    this.log.warn('finishing a settled migration that a restart interrupted', { jobId: j.jobId, domain: j.domain, phase: j.phase });
    if (j.phase === 'confirmed') await retire(this.side, mine, j);
    else await resumeSource(this.side, mine, j.wasRunning);
  }

  /**
   * `ferry job resolve DOMAIN --assume-destination|--assume-source`: the operator's word
   * for a job past the point of no return that D has not settled. One last question to
   * D first: if it answers, its answer wins and a contrary assumption is refused.
   */
  async resolveByOperator(domain: string, assume: 'destination' | 'source'): Promise<ResolveResult> {
    const j = this.store.active(domain);
    if (!j || j.role !== 'source')
      throw new FerryError('JOB_NOT_FOUND', `No outgoing migration of "${domain}" on ${this.host.cfg.name} to resolve`);
    if (j.phase !== 'finish')
      throw new FerryError(
        'MIGRATION_ILLEGAL_PHASE',
        `Migration of "${domain}" is in phase ${j.phase}: only a job past the point of no return (finish) is resolved by hand; before it, use \`ferry job abort ${domain}\``,
      );
    const dom = this.host.get(domain);
    const answer = await askDestination(this.side, j, 2000).catch((e: unknown) => asFerryError(e).message);
    if (typeof answer !== 'string') {
      const theirs = answer.abandoned ? 'source' : 'destination';
      if (theirs !== assume)
        throw new FerryError(
          'MIGRATION_ILLEGAL_PHASE',
          `${j.peer.name} answered: ${answer.abandoned ? `it does not run "${domain}" (${answer.reason})` : `it runs "${domain}"`}; refusing --assume-${assume}. Nothing changed; the answer settles the job now`,
          { peerAnswered: theirs },
        );
      await settleFinish(this.side, j, dom, answer);
      return {
        jobId: j.jobId,
        domain,
        phase: j.phase,
        settledBy: 'destination',
        runsOn: answer.abandoned ? this.host.cfg.name : j.peer.name,
      };
    }
    this.log.warn('migration resolved by the operator', { jobId: j.jobId, domain, assume, peer: j.peer.name, lastError: answer });
    await settleFinish(
      this.side,
      j,
      dom,
      assume === 'source'
        ? { abandoned: true, reason: `the operator said ${j.peer.name} does not run it` }
        : { abandoned: false, reason: 'the operator said the destination runs it' },
    );
    return {
      jobId: j.jobId,
      domain,
      phase: j.phase,
      settledBy: 'operator',
      runsOn: assume === 'source' ? this.host.cfg.name : j.peer.name,
    };
  }

  /** The domain no longer runs here (moved on, or stopped): its away ends go, and their homes stop flooding here. */
  leaveTunnels(uuid: string, domain: string): Promise<void> {
    return leaveTunnels(this.side, uuid, domain);
  }
}
