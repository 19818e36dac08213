/**
 * Migration jobs, persisted in STATE/jobs/JOBID.json with atomic writes. A job's phase
 * is written *before* each irreversible step, so a restarted ferryd can settle it by
 * a switch on that phase (migration/recovery.ts).
 */
import fs from 'node:fs';
import path from 'node:path';
import { StateWriter, readJson } from '../util/fsx.ts';
import type { SourcePhase, DestPhase } from './phases.ts';
import type { Report, Mode, Progress } from '../api/protocol.ts';

export type { Mode };

// The report is part of the API's contract (the CLI prints it): defined in api/protocol.ts.
export type { Report };

interface JobBase {
  jobId: string;
  domain: string;
  uuid: string;
  mode: Mode;
  encrypted: boolean;
  startedAt: number;
  updatedAt: number;
  history: { phase: string; at: number }[];
  report?: Report;
  error?: { code: string; message: string };
}

export interface SourceJob extends JobBase {
  role: 'source';
  phase: SourcePhase;
  peer: { name: string; address: string; port: number };
  wasRunning: boolean;
  dataPort?: number;
  /** Live progress (not persisted on every poll). */
  progress?: Progress;
  /** Past the point of no return, while the destination cannot be asked: who, how often, why. */
  waiting?: Waiting;
  /**
   * Set once QEMU switched to post-copy: from then on the source QEMU serves pages until
   * the stream completes. `lost`: the destination's answer about a stream this QEMU
   * failed (relocation.lost), kept so that no later driver asks again.
   */
  postcopy?: { startedAt: number; lost?: { stream: string; crashed: boolean } };
  /** Home ends this move listed the destination in (daemon/tunnels.ts): retracted if it is abandoned. */
  tunnels?: { nic: number; home: string; remote: string }[];
  /** --copy-storage: the destination's NBD export, so an abandon can abort a connection a dead link holds. */
  nbd?: { address: string; port: number };
}

export interface Waiting {
  since: number;
  attempts: number;
  lastError: string;
  nextTryAt: number;
}

export interface DestJob extends JobBase {
  role: 'destination';
  phase: DestPhase;
  /** dn: the source's certificate subject, which alone may feed the incoming QEMU (tls-authz). */
  peer: { name: string; address: string; dn?: string };
  dataPort: number;
  memoryMiB: number;
  /** Persisted so recovery can act without the source. */
  config: Record<string, unknown>;
  /** The source may switch to post-copy (Begin said so): pages may still arrive after Finish. */
  postcopy?: boolean;
  /** Post-copy: how the incoming stream ended (QEMU's status), once it has. */
  streamEnd?: string;
  pid?: number;
  /** Disks this host created for a --copy-storage move: deleted if the move is abandoned. */
  createdDisks?: string[];
}

export type Job = SourceJob | DestJob;

export class JobStore {
  readonly jobs = new Map<string, Job>();
  readonly writer: StateWriter;
  constructor(
    readonly dir: string,
    onRetryFailed?: (file: string, error: string) => void,
  ) {
    this.writer = new StateWriter(onRetryFailed);
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  }

  load(): Job[] {
    for (const f of fs.readdirSync(this.dir)) {
      if (!f.endsWith('.json')) continue;
      try {
        const j = readJson<Job>(path.join(this.dir, f));
        this.jobs.set(j.jobId, j);
      } catch {
        /* a torn write cannot happen (atomic); a foreign file is ignored */
      }
    }
    return [...this.jobs.values()];
  }

  /** Persists the job as it is now; throws STATE_WRITE_FAILED (and keeps retrying) if it cannot. */
  save(j: Job): void {
    j.updatedAt = Date.now();
    this.jobs.set(j.jobId, j);
    this.writer.write(this.file(j), () => {
      const { progress: _p, ...rest } = j as SourceJob;
      return rest;
    });
  }

  /** For records of what already happened: never throws; retried until it lands. */
  saveLater(j: Job): boolean {
    try {
      this.save(j);
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Moves a job to its next phase (from its side's transition function) and persists
   * it. `strict`: the phase leads to an irreversible step, so it must be on disk first;
   * if it cannot be written the job stays where it was and STATE_WRITE_FAILED is thrown.
   * Otherwise the phase records what already happened: it stays in memory, the write is
   * retried until it lands, and false says it is not on disk yet.
   */
  advance<J extends Job>(j: J, phase: J['phase'], strict: boolean): boolean {
    const before = { phase: j.phase, n: j.history.length };
    j.phase = phase;
    j.history.push({ phase, at: Date.now() });
    try {
      this.save(j);
      return true;
    } catch (err) {
      if (!strict) return false;
      j.phase = before.phase;
      j.history.length = before.n;
      throw err;
    }
  }

  /** Forgets a job that never got anywhere (its first write failed). */
  discard(j: Job): void {
    this.jobs.delete(j.jobId);
    this.writer.drop(this.file(j));
    fs.rmSync(this.file(j), { force: true });
  }

  private file(j: Job): string {
    return path.join(this.dir, `${j.jobId}.json`);
  }

  /** Keeps the newest `keep` finished jobs per role, so `ferry jobs` shows recent history. */
  prune(keep = 20): void {
    const done = [...this.jobs.values()]
      .filter((j) => j.phase === 'confirmed' || j.phase === 'abandoned')
      .sort((a, b) => b.updatedAt - a.updatedAt);
    for (const j of done.slice(keep)) {
      this.jobs.delete(j.jobId);
      this.writer.drop(this.file(j));
      fs.rmSync(this.file(j), { force: true });
    }
  }

  active(domain: string): Job | undefined {
    return [...this.jobs.values()].find((j) => j.domain === domain && j.phase !== 'confirmed' && j.phase !== 'abandoned');
  }

  /** Every job of `domain` not yet confirmed or abandoned. */
  openJobs(domain: string): Job[] {
    return [...this.jobs.values()].filter((j) => j.domain === domain && j.phase !== 'confirmed' && j.phase !== 'abandoned');
  }

  latest(domain: string): Job | undefined {
    return [...this.jobs.values()].filter((j) => j.domain === domain).sort((a, b) => b.startedAt - a.startedAt)[0];
  }
}
