/**
 * Migrations on this host: both sides, the jobs, the API actions and recovery.
 *
 * Recovery settles every unfinished job by a switch on its persisted phase:
 *   source  begin/prepare/perform/switchover → abandon: cancel QEMU's stream, resume
 *           the guest if it ran, tell the destination (which abandons by itself too)
 *   source  finish → Source.driveFinish, as after a lost Finish answer: ask the destination
 *           until it answers (capped backoff, no limit): finished → retire the source copy;
 *           abandoned/never resumed → resume it; meanwhile the copy stays paused
 *   dest    begun/prepared → abandon: kill the incoming QEMU, forget the definition
 *   dest    finishing → roll forward: the source will never resume its copy, so resume here
 *   dest    finished → nothing: the guest runs here; wait for confirm
 */
import path from 'node:path';
import { FerryError } from '../errors.ts';
import type { MigrationHost, MigrationLog } from './ports.ts';
import type { JobView } from '../api/protocol.ts';
import { killAndWait, qemuPidsWith } from '../qemu/process.ts';
import { JobStore, type SourceJob, type DestJob } from './jobs.ts';
import { Source } from './source.ts';
import { Destination } from './dest.ts';
import { destTransition, sourceTransition } from './phases.ts';

export class Migrations {
  readonly store: JobStore;
  readonly source: Source;
  readonly dest: Destination;

  constructor(readonly host: MigrationHost, readonly log: MigrationLog) {
    this.store = new JobStore(path.join(host.cfg.stateDir, 'jobs'), (file, error) => log.warn('job state write still failing; retrying', { file, error }));
    this.source = new Source(host, this.store, log);
    this.dest = new Destination(host, this.store, log);
  }

  jobs(): JobView[] {
    return [...this.store.jobs.values()].sort((a, b) => b.startedAt - a.startedAt).map((j) => this.view(j));
  }

  job(domain: string): JobView {
    const j = this.store.active(domain) ?? this.store.latest(domain);
    if (!j) throw new FerryError('JOB_NOT_FOUND', `No migration job for "${domain}" on ${this.host.cfg.name}`);
    return this.view(j);
  }

  view(j: SourceJob | DestJob): JobView {
    return {
      jobId: j.jobId, role: j.role, domain: j.domain, mode: j.mode, phase: j.phase, peer: j.peer.name, encrypted: j.encrypted,
      startedAt: new Date(j.startedAt).toISOString(), updatedAt: new Date(j.updatedAt).toISOString(),
      progress: (j as SourceJob).progress ?? null, waiting: (j as SourceJob).waiting ?? null, report: j.report ?? null, error: j.error ?? null, history: j.history,
    };
  }

  async recover(): Promise<void> {
    const jobs = this.store.load();
    for (const j of jobs) {
      if (j.phase === 'confirmed' || j.phase === 'abandoned') {
        if (j.role === 'source') await this.finishTail(j).catch((e) => this.log.error('recovery failed', { jobId: j.jobId, error: String(e) }));
        continue;
      }
      this.log.warn('recovering migration job', { jobId: j.jobId, role: j.role, domain: j.domain, phase: j.phase });
      try {
        if (j.role === 'destination') await this.recoverDest(j);
        else await this.recoverSource(j);
      } catch (e) {
        this.log.error('recovery failed', { jobId: j.jobId, error: String(e) });
      }
    }
  }

  /**
   * A source job's final phase is on disk before its tail has run: retiring the source
   * copy (confirmed) or resuming it (abandoned). A ferryd that died in between left the
   * domain "migrating-out" here: run the tail now. (Found by the aimed fault campaign:
   * the source ferryd killed a millisecond after "confirmed" left a stale copy behind.)
   */
  private async finishTail(j: SourceJob): Promise<void> {
    const live = this.host.find(j.domain);
    if (!live || live.rec.config.uuid !== j.uuid || live.rec.state.kind !== 'migrating-out') return;
    if (this.store.latest(j.domain)?.jobId !== j.jobId) return; // only the newest job of a domain speaks for it
    this.log.warn('finishing a settled migration that a restart interrupted', { jobId: j.jobId, domain: j.domain, phase: j.phase });
    if (j.phase === 'confirmed') await this.host.retireMigrated(live, j.peer);
    else await this.source.resumeSource(live, j.wasRunning);
  }

  private async recoverDest(j: DestJob): Promise<void> {
    const live = this.host.find(j.domain);
    const mine = live && live.rec.config.uuid === j.uuid ? live : undefined;
    switch (j.phase) {
      case 'begun':
      case 'prepared': {
        await this.dest.abandonLocal(j, `ferryd restarted in phase ${j.phase}`);
        // abandonLocal killed the QEMU on record. One started just before the crash may
        // not be on record yet: find the incoming one by its uuid and this run directory.
        for (const pid of qemuPidsWith(j.uuid, ['-incoming', this.host.runDir])) {
          this.log.warn('killing an incoming QEMU that was not on record', { jobId: j.jobId, pid });
          await killAndWait(pid, 0);
        }
        // Its taps, too: spawn creates them (named by uuid) before QEMU starts.
        const nics = Array.isArray((j.config as { nics?: unknown[] }).nics) ? (j.config as { nics: unknown[] }).nics.length : 0;
        this.host.removeTaps(j.uuid, nics);
        return;
      }
      case 'finishing': {
        // Roll forward: the source persisted "finish" before asking, and resumes its copy
        // only on our word that we abandoned, which we give only if QEMU refuses to run
        // the guest and says it is not running (Destination.resumeFailed).
        if (mine && mine.qmp && mine.rec.state.kind === 'incoming') {
          const q = mine.qmp;
          try {
            await q.execute('cont');
          } catch (e) {
            await this.dest.resumeFailed(j, mine, q, (e as Error).message).catch((err) => this.log.warn('incoming guest not resumed at restart', { jobId: j.jobId, error: String(err) }));
            return;
          }
          await mine.qmp.execute('announce-self', { initial: 50, max: 550, rounds: 5, step: 100 }).catch(() => undefined);
          this.host.setBusy(mine, undefined);
          this.host.apply(mine, { type: 'incoming-done', running: true, at: Date.now() });
        } else if (mine && mine.rec.state.kind === 'incoming') {
          this.host.cleanupRuntime(mine);
          this.host.apply(mine, { type: 'crash', reason: 'QEMU exited while resuming an incoming migration', at: Date.now() });
        }
        this.host.release(j.jobId);
        this.store.advance(j, destTransition(j.phase, { type: 'resumed' }), false);
        this.dest.selfConfirm(j, 'rolled forward at restart; the source\'s Confirm went to the old process');
        return;
      }
      case 'finished':
        // The guest runs here and Finish was answered (or the source will ask, and both
        // finished and confirmed mean success to it). Its Confirm died with our old
        // process: settle the job instead of leaving it open forever.
        this.dest.selfConfirm(j, 'ferryd restarted before the source confirmed');
        return;
    }
  }

  private async recoverSource(j: SourceJob): Promise<void> {
    const live = this.host.find(j.domain);
    if (!live || live.rec.config.uuid !== j.uuid) {
      // The definition is gone already: retirement had finished.
      if (j.phase === 'finish') this.store.advance(j, sourceTransition(j.phase, { type: 'dest-finished' }), false);
      return;
    }
    switch (j.phase) {
      case 'begin':
      case 'prepare':
      case 'perform':
      case 'switchover': {
        // Finish was never sent, so the destination never ran the guest.
        let client;
        try { client = (await this.source.connectPeer(`${j.peer.address}:${j.peer.port}`)).client; } catch { client = undefined; }
        await this.source.abandon(j, live, client, `source ferryd restarted in phase ${j.phase}`);
        client?.close();
        return;
      }
      case 'finish':
        // Past the point of no return: the same driver as after a lost Finish answer,
        // in the background so that start-up is not held up.
        this.source.driveFinish(j, live);
        return;
    }
  }
}
