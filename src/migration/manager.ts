/**
 * Migrations on this host: both sides, the jobs, their views, and recovery after a
 * restart, which hands every job to its side's driver (`drive`, from the persisted
 * phase: see Source.drive and Destination.drive).
 */
import path from 'node:path';
import { FerryError } from '../errors.ts';
import type { MigrationHost, MigrationLog } from './host.ts';
import type { JobView } from '../api/protocol.ts';
import { JobStore, type SourceJob, type DestJob } from './jobs.ts';
import { Source } from './source.ts';
import { Destination } from './dest.ts';

export class Migrations {
  readonly store: JobStore;
  readonly source: Source;
  readonly dest: Destination;

  constructor(
    readonly host: MigrationHost,
    readonly log: MigrationLog,
  ) {
    this.store = new JobStore(path.join(host.cfg.stateDir, 'jobs'), (file, error) =>
      log.warn('job state write still failing; retrying', { file, error }),
    );
    this.source = new Source(host, this.store, log);
    this.dest = new Destination(host, this.store, log);
    // A domain that stops away from its segment needs its tunnel no more (a move has its own path).
    host.on('domain.state', (ev) => {
      const stopped = (ev.state?.kind === 'shutoff' && ev.state.reason !== 'migrated') || ev.state?.kind === 'crashed';
      const d = stopped ? host.find(ev.domain) : undefined;
      if (d)
        void this.source
          .leaveTunnels(d.rec.config.uuid, ev.domain)
          .catch((e) => log.warn('tunnel not closed', { domain: ev.domain, error: String(e) }));
    });
  }

  /** Every job, and before them the moves still waiting in this host's line (no job yet: phase "queued"). */
  jobs(): JobView[] {
    const queued: JobView[] = this.source.queue
      .views()
      .filter((q) => q.state === 'queued')
      .map((q) => ({
        jobId: '',
        role: 'source',
        domain: q.domain,
        mode: q.live ? 'live' : 'offline',
        phase: 'queued',
        peer: q.dest,
        encrypted: true,
        startedAt: q.since,
        updatedAt: q.since,
        progress: null,
        waiting: null,
        report: null,
        error: null,
        history: [],
        queue: q,
      }));
    return [...queued, ...[...this.store.jobs.values()].sort((a, b) => b.startedAt - a.startedAt).map((j) => this.view(j))];
  }

  job(domain: string): JobView {
    const j = this.store.active(domain) ?? this.store.latest(domain);
    if (!j) throw new FerryError('JOB_NOT_FOUND', `No migration job for "${domain}" on ${this.host.cfg.name}`);
    return this.view(j);
  }

  view(j: SourceJob | DestJob): JobView {
    return {
      jobId: j.jobId,
      role: j.role,
      domain: j.domain,
      mode: j.mode,
      phase: j.phase,
      peer: j.peer.name,
      encrypted: j.encrypted,
      startedAt: new Date(j.startedAt).toISOString(),
      updatedAt: new Date(j.updatedAt).toISOString(),
      progress: (j as SourceJob).progress ?? null,
      waiting: (j as SourceJob).waiting ?? null,
      report: j.report ?? null,
      error: j.error ?? null,
      history: j.history,
    };
  }

  /**
   * After a restart: every job goes to its side's driver, which acts on the persisted
   * phase alone (Source.drive, Destination.drive): the same steps a failure or a lost
   * answer takes while ferryd runs.
   */
  async recover(): Promise<void> {
    for (const j of this.store.load()) {
      if (j.phase !== 'confirmed' && j.phase !== 'abandoned')
        this.log.warn('recovering migration job', { jobId: j.jobId, role: j.role, domain: j.domain, phase: j.phase });
      try {
        if (j.role === 'destination') await this.dest.drive(j, 'ferryd restarted');
        else await this.source.drive(j, `source ferryd restarted in phase ${j.phase}`);
      } catch (e) {
        this.log.error('recovery failed', { jobId: j.jobId, error: String(e) });
      }
    }
  }
}
