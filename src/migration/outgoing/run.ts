/**
 * One outgoing move while it runs in this ferryd (`OutgoingRun`): what the job holds
 * (its control connection, cancellation, the guest probe, the migration watcher, the
 * QMP listener for the pause, the disk mirrors) and what it learns on the way (policy,
 * timeline, figures), with one `dispose()` that releases it all, whatever phase it ended
 * in. The source's phase functions (outgoing/: begin, prepare, perform, switchover,
 * finish, confirm) each take the run; the job's persisted phase (jobs.ts) is what a
 * restart drives from, and needs none of this.
 */
import type { ApiClient } from '../../api/client.ts';
import type { Report, Results, PlanView } from '../../api/protocol.ts';
import type { QmpClient, QmpEvent } from '../../qmp/client.ts';
import type { MigrationWatcher } from '../../qemu/migstatus.ts';
import type { Compression, CompressChoice } from '../../api/shapes.ts';
import type { MigrationHost, MigrationLog, DomainHandle, TunnelHome } from '../host.ts';
import type { JobStore, SourceJob, Mode } from '../jobs.ts';
import type { SourceEvent } from '../phases.ts';
import type { GuestProbe } from '../guestprobe.ts';
import type { DiskMirror, CopyDisk } from '../mirror.ts';
import type { Plan, OnTimeout, StrategyChoice } from '../plan.ts';
import type { Planner } from '../autopilot.ts';
import type { MemoryCheck } from '../memcheck.ts';
import type { MovePriority } from '../../api/protocol.ts';

/**
 * The source side as its phase functions see it: the host, the job store, the log, the
 * autopilot and the memory check, the phase step, and the runs and background drivers
 * of this ferryd (Source owns both registries).
 */
export interface OutgoingSide {
  readonly host: MigrationHost;
  readonly store: JobStore;
  readonly log: MigrationLog;
  readonly planner: Planner;
  readonly memcheck: MemoryCheck;
  /** Moves the job to its next phase and persists it (Source.step says when strictly). */
  step(j: SourceJob, e: SourceEvent): void;
  /** The run of a job that runs in this ferryd now, if any. */
  runOf(jobId: string): OutgoingRun | undefined;
  /** Opens a control connection to DEST (Source.connectPeer: a peer name, NAME, ADDRESS[:PORT]). */
  connect(dest: string): Promise<{ client: ApiClient; peer: Peer }>;
  /** Runs `f` as the job's one background driver: a second call while one runs does nothing. */
  driveOnce(jobId: string, what: string, f: () => Promise<void>): void;
}

/** The peer a move goes to: its name (from its certificate), address and relocation port. */
export interface Peer {
  name: string;
  address: string;
  port: number;
}

/** What the operator asked of a move (migration.start's params). */
/** A move as asked for: --compress may be auto, which the source resolves (source.ts) before the move opens. */
export type StartRequest = Omit<StartParams, 'compress' | 'compressWhy' | 'compressRatio' | 'touchedBytes'> & { compress?: CompressChoice };

export interface StartParams {
  domain: string;
  dest: string;
  live?: boolean;
  bandwidthMiBs?: number;
  maxDowntimeMs?: number;
  timeoutS?: number;
  insecure?: boolean;
  /** multifd channels: parallel streams, each encrypted on its own thread. */
  parallel?: number;
  /** Pages compressed before they are sent (multifd; default none). */
  compress?: Compression;
  /** Why compression is on or off, when the source chose it (--compress auto): the report's policy says so. */
  compressWhy?: string;
  /** zstd chosen from a sample: the share of the pages' bytes it leaves, for the plan's predictions. */
  compressRatio?: number;
  /** RAM holding data, as weighing compression measured it before Begin (the plan reuses it: PlanParams). */
  touchedBytes?: number | null;
  /** Compare guest RAM on both hosts before the destination runs; default: where dirty tracking is unreliable. */
  verifyMemory?: boolean;
  /** Measure guest-perceived downtime with a TCP SYN every 1 ms to the guest (default true). */
  probeGuest?: boolean;
  /** The operator's rule for a live move (default auto: the autopilot picks, migration/plan.ts). */
  strategy?: StrategyChoice;
  /** At the deadline, still in pre-copy: cancel, suspend the guest to finish, or switch to post-copy. */
  onTimeout?: OnTimeout;
  /** Copy the domain's writable disks to the destination's own storage while it runs (mirror.ts). */
  copyStorage?: boolean;
  /** With copyStorage: delete the source's disk files once the domain runs there (kept by default). */
  deleteSourceStorage?: boolean;
  /** Its place in this host's line of moves (migration/queue.ts): an evacuation goes before an operator's move, the balancer's last. */
  priority?: MovePriority;
}

/** The autopilot's state during one live move. */
export interface Autopilot {
  postcopyOn: boolean;
  pick: string;
  onTimeout: OnTimeout;
  switchAsked?: boolean;
  /** performance.now() when QEMU entered postcopy-active. */
  switchedAt?: number;
  /** auto-converge throttled the guest at some point. */
  throttled?: boolean;
  /** Why the switch to post-copy was asked for (reported once QEMU is in post-copy). */
  switchWhy?: string;
}

/** D's word (or the operator's) on a job past the point of no return. */
export interface Resolution {
  abandoned: boolean;
  reason?: string;
  /** The destination's RESUME (its clock); answeredAt: when its answer arrived (performance.now() here). */
  resumedAt?: number;
  answeredAt?: number;
  byOperator?: boolean;
  /** The destination's QEMU exited as the guest resumed there: handed over, crashed on arrival. */
  crashed?: boolean;
}

export class OutgoingRun {
  readonly policy: string[] = [];
  /** When each step ended, in ms since the request: where the time before the first byte goes. */
  readonly timeline: Record<string, number> = {};
  readonly stats: Partial<Report> = {};
  readonly mode: Mode;
  readonly wasRunning: boolean;
  readonly insecure: boolean;
  readonly maxDowntimeMs: number;
  readonly timeoutS: number;
  cancelled = false;
  readonly cancelledP: Promise<void>;
  private cancelFn: () => void = () => undefined;

  // Handed from phase to phase.
  /** The source QEMU (absent for a shut-off domain's definition). */
  q?: QmpClient;
  copyDisks: CopyDisk[] = [];
  homes: TunnelHome[] = [];
  /** The source QEMU's own settings, made while Begin runs there. */
  setupP: Promise<void> = Promise.resolve();
  planP?: Promise<{ plan: Plan; view: PlanView }>;
  postcopyWanted = false;
  postcopyOn = false;
  /** QEMU < 9 under TCG: dirty tracking can lose pages (the memory check). */
  engineLoses = false;
  begun?: Results['relocation.begin'];
  prepared?: Results['relocation.prepare'];
  /** performance.now() of the source QEMU's STOP event: the pause starts there. */
  stopAt: number | null = null;
  inPostcopy = false;
  fin?: Resolution;
  watch?: MigrationWatcher;
  probe?: GuestProbe;
  mirror?: DiskMirror;
  private readonly releases: (() => void)[] = [];
  /** The domain that moves. */
  readonly dom: DomainHandle;

  constructor(
    readonly side: OutgoingSide,
    readonly j: SourceJob,
    readonly p: StartParams,
    readonly link: { dom: DomainHandle; client: ApiClient; peer: Peer; defaults: { maxDowntimeMs: number; timeoutS: number } },
  ) {
    const defaults = link.defaults;
    this.dom = link.dom;
    this.mode = j.mode;
    this.wasRunning = j.wasRunning;
    this.insecure = !j.encrypted;
    this.maxDowntimeMs = p.maxDowntimeMs ?? defaults.maxDowntimeMs;
    this.timeoutS = p.timeoutS ?? defaults.timeoutS;
    this.cancelledP = new Promise<void>((r) => {
      this.cancelFn = () => {
        this.cancelled = true;
        r();
      };
    });
  }

  get t0(): number {
    return this.j.startedAt;
  }
  get client(): ApiClient {
    return this.link.client;
  }
  get peer(): Peer {
    return this.link.peer;
  }

  mark(k: string): void {
    this.timeline[k] = Date.now() - this.t0;
  }
  cancel(): void {
    this.cancelFn();
  }

  /** Notes the source QEMU's first STOP (the pause's start) until the run is disposed. */
  watchStop(q: QmpClient): void {
    const onStop = (e: QmpEvent): void => {
      if (e.event === 'STOP' && this.stopAt === null) this.stopAt = performance.now();
    };
    q.on('event', onStop);
    this.releases.push(() => q.off('event', onStop));
  }

  /** Stops noting STOP events (the switchover is over). */
  unwatchStop(): void {
    for (const f of this.releases.splice(0)) f();
  }

  /** The move's report so far, with `m` on top. */
  report(outcome: Report['outcome'], m: Partial<Report>): Report {
    const j = this.j;
    return {
      outcome,
      mode: this.mode,
      jobId: j.jobId,
      domain: this.p.domain,
      source: this.side.host.cfg.name,
      destination: this.peer.name,
      totalMs: Date.now() - this.t0,
      setupMs: null,
      downtimeMs: null,
      pauseMs: null,
      guestDowntimeMs: null,
      guestProbe: null,
      bytes: 0,
      passes: 0,
      throughputMBps: 0,
      encrypted: !this.insecure,
      bandwidthMiBs: this.p.bandwidthMiBs ?? null,
      maxDowntimeMs: this.maxDowntimeMs,
      policy: this.policy,
      memoryCheck: null,
      phase: j.phase,
      timeline: this.timeline,
      ...m,
    };
  }

  /** Releases everything the run holds, whatever phase it ended in. Idempotent. */
  async dispose(): Promise<void> {
    this.unwatchStop();
    const probe = this.probe;
    this.probe = undefined;
    if (probe) await probe.stop(0);
    this.watch?.dispose();
    this.mirror?.dispose();
    this.link.client.close();
  }
}
