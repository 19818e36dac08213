/**
 * One incoming move while it runs in this ferryd (`IncomingRun`), and the side it runs
 * on (`IncomingSide`: the host, the job store, the log, the phase step). The run owns
 * everything the job holds in memory (the data-port probe, a plain stream's gate, the
 * quiet deadline, the incoming QEMU being started, its migration watcher, the tunnels,
 * an in-flight Prepare or abandon, the repair count), and `dispose()` releases it all.
 * The job's persisted phase (jobs.ts) is what a restart drives from: a run made for a
 * recovered job starts empty.
 */
import type net from 'node:net';
import type { MigrationHost, DomainHandle, MigrationLog, TunnelHome } from '../host.ts';
import type { JobStore, DestJob } from '../jobs.ts';
import type { DestEvent } from '../phases.ts';
import type { DataGate } from '../gate.ts';
import type { BeginMsg } from '../../api/relocation.ts';
import type { MigrationWatcher } from '../../qemu/migstatus.ts';

export interface IncomingSide {
  readonly host: MigrationHost;
  readonly store: JobStore;
  readonly log: MigrationLog;
  /** Moves the job to its next phase and persists it (Destination.step says when strictly). */
  step(j: DestJob, e: DestEvent): void;
  /** The job's run in this ferryd, made empty if it has none (a job recovered after a restart). */
  runOf(j: DestJob): IncomingRun;
  /** Drops the run from the side's registry (dispose calls it). */
  forget(run: IncomingRun): void;
}

/** A NIC whose segment comes through a tunnel: its away bridge here and its home. */
export interface AwayNic {
  bridge: string;
  home: TunnelHome;
}

export class IncomingRun {
  /** What the source offered at Begin; absent when this ferryd did not see the Begin. */
  begin?: BeginMsg;
  /** A short-lived plain listener on the data port, for the source to prove it reaches it. */
  probe?: net.Server;
  /** A plain-TCP job's data port, held by ferryd (gate.ts). */
  gate?: DataGate;
  /** Abandons the job if the source goes quiet before Finish (limits.reservationS). */
  quiet?: NodeJS.Timeout;
  /** The incoming QEMU started at Begin (resolves once configured). */
  starting?: Promise<DomainHandle>;
  /** The incoming QEMU's migration status, from its events. */
  watch?: MigrationWatcher;
  /** The NICs whose segment comes through a tunnel, by NIC index. */
  tunnels = new Map<number, AwayNic>();
  /** A Prepare in flight: an abandon waits for it, so that it undoes all Prepare started. */
  preparing?: Promise<void>;
  /** The abandon under way: a second cause joins it instead of starting another. */
  abandoning?: Promise<void>;
  /** Repair messages taken (the first is logged). */
  repairs = 0;

  constructor(
    readonly side: IncomingSide,
    readonly j: DestJob,
  ) {}

  get host(): MigrationHost {
    return this.side.host;
  }

  get log(): MigrationLog {
    return this.side.log;
  }

  /** Moves the job on (IncomingSide.step). */
  step(e: DestEvent): void {
    this.side.step(this.j, e);
  }

  /** Stops the probe listener now; connections still open (an outsider's) are not waited for. */
  closeProbe(): void {
    this.probe?.close();
    this.probe = undefined;
  }

  /** Stops the quiet deadline (a post-copy stream may be silent while the guest needs nothing). */
  stopDeadline(): void {
    if (this.quiet) clearTimeout(this.quiet);
    this.quiet = undefined;
  }

  /** Releases everything the run holds and leaves the side's registry. Idempotent. */
  dispose(): void {
    this.closeProbe();
    this.stopDeadline();
    this.gate?.close();
    this.gate = undefined;
    this.watch?.dispose();
    this.watch = undefined;
    this.starting = undefined;
    this.tunnels.clear();
    this.begin = undefined;
    this.side.forget(this);
  }
}
