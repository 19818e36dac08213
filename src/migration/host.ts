/**
 * What migration/ needs from the host it runs on, declared here and implemented by
 * daemon/ (Host, Logger, the API server's connection), which wires it at start-up.
 * migration/ imports no daemon module: data flows one way, daemon → migration.
 *
 * Migration changes a domain only through the intent methods below; the domain's
 * record, process and console stay the host's to manage.
 */
import type { DomainConfig, NetworkConfig } from '../domain/config.ts';
import type { DomainEvent, DomainState } from '../domain/state.ts';
import type { QmpClient } from '../qmp/client.ts';
import type { Accel } from '../qemu/argv.ts';
import type { QemuFacts } from '../qemu/probe.ts';
import type { GuestRam, RamDigests } from '../qemu/memory.ts';

export interface MigrationLog {
  debug(msg: string, f?: Record<string, unknown>): void;
  info(msg: string, f?: Record<string, unknown>): void;
  warn(msg: string, f?: Record<string, unknown>): void;
  error(msg: string, f?: Record<string, unknown>): void;
}

/** Who sent a relocation request, as the API server authenticated it. */
export interface RelocationContext {
  caller: { transport: 'unix' | 'tls'; peerName?: string; peerDn?: string; peerAddress?: string };
  onClose(fn: () => void): void;
}

/** The host settings migration reads (a subset of ferryd.json). */
export interface MigrationSettings {
  name: string;
  stateDir: string;
  tlsDir: string;
  relocation: {
    address: string;
    port: number;
    dataPorts: [number, number];
    allowInsecure: boolean;
    acceptPostcopy: boolean;
    tunnels: boolean;
  };
  peers: Record<string, string>;
  networks: Record<string, NetworkConfig>;
  limits: { incomingPerPeer: number; incomingTotal: number; reservationS: number; movesOut: number; movesPerLink: number };
  /** localDir: where --copy-storage creates an incoming domain's disks. */
  storage: { localDir: string };
}

/** A domain as migration sees it: read-only, changed through MigrationHost. */
export interface DomainHandle {
  readonly rec: {
    readonly config: DomainConfig;
    readonly state: DomainState;
    readonly runtime?: { machine: string; cpuModel: string; accel: Accel };
  };
  readonly qmp?: QmpClient;
  /** What owns the domain's process right now, if anything (save, a migration…). */
  readonly busy?: string;
}

/**
 * Where a NIC's segment lives: the host that bridges it, its migration address, the
 * subnet, its tunnel's VNI, and the home host's own address on the segment (`ip`, what
 * a new away host ARPs for through the tunnel while the guest still runs elsewhere).
 */
/** Where a NIC's segment lives (a relocation message's shape: api/relocation.ts). */
export type { TunnelHome } from '../api/relocation.ts';
import type { TunnelHome } from '../api/relocation.ts';

/**
 * Cluster mode's side of a move (cluster/ownership.ts has the sequence): the record in
 * etcd, not either host's memory, says who runs the domain once Finish was sent.
 */
export interface MoveOwnership {
  /** Source, before the domain leaves: the record names the job and its destination. */
  markMoving(domain: string, job: string, to: string): Promise<void>;
  /** Destination, at the point of no return: 'taken' means resume here, 'refused' means never. */
  takeOver(domain: string, job: string, from: string): Promise<'taken' | 'refused'>;
  /** Destination, when a guest it took could not run after all: the source may have it back. */
  giveBack(domain: string, job: string, to: string): Promise<void>;
  /** Source, when the answer is lost or a refusal: 'kept' means resume here, 'lost' means the destination owns it. */
  reclaim(domain: string, job: string): Promise<'kept' | 'lost'>;
  /** NAME → ADDRESS:PORT of every live cluster host, as this host's etcd watch sees them. */
  liveHosts(): Record<string, string>;
}

/** A host's peers by name: ferryd.json "peers" over the live cluster hosts (an entry in "peers" wins). */
export function knownPeers(peers: Record<string, string>, ownership: MoveOwnership | null): Record<string, string> {
  return { ...ownership?.liveHosts(), ...peers };
}

export interface MigrationHost {
  readonly cfg: MigrationSettings;
  /** Cluster mode's ownership record (null: standalone, today's protocol alone decides). */
  readonly ownership: MoveOwnership | null;
  /** NAME → ADDRESS:PORT of the hosts this one knows: ferryd.json "peers", and in cluster mode every live host (a "peers" entry wins). */
  peers(): Record<string, string>;
  readonly qemu: QemuFacts;
  readonly accel: { accel: Accel };
  /** Where domains' run directories live (an incoming QEMU's command line names it). */
  readonly runDir: string;
  on(event: 'qemu.gone', fn: (ev: { domain: string; pid: number }) => void): unknown;
  on(event: 'domain.state', fn: (ev: { domain: string; from: string | null; to: string; state?: DomainState }) => void): unknown;
  emit(event: string, data: unknown): boolean;

  get(name: string): DomainHandle;
  find(name: string): DomainHandle | undefined;
  domainNames(): string[];
  domainUuids(): string[];
  memoryFacts(): { freeMiB: number; freeWhy: string };
  /** Bytes of the guest's RAM that hold data (non-zero pages, from a sample; at most what is resident), or null if unknown. */
  touchedBytes(d: DomainHandle): Promise<number | null>;
  /**
   * How well the guest's non-zero pages compress (compressed ÷ raw bytes of a sample of
   * its RAM), or null when there is too little to judge or its RAM cannot be read.
   */
  compressibility(d: DomainHandle): Promise<number | null>;
  /** Can an incoming QEMU here take a post-copy stream (userfaultfd), and if not, why. */
  postcopyIncoming(): { ok: boolean; why: string };
  /** Refuses paths outside the storage pools, symlinks and missing files. */
  checkPaths(c: DomainConfig): void;

  /** A state change of the domain's lifecycle (domain/state.ts), persisted. */
  apply(d: DomainHandle, e: DomainEvent): void;
  setBusy(d: DomainHandle, why: string | undefined): void;
  reserve(jobId: string, domain: string, memoryMiB: number): void;
  release(jobId: string): void;

  /** Defines `config` here as an incoming domain, starts its QEMU (stopped, -incoming defer) and attaches to it. */
  startIncoming(
    config: DomainConfig,
    jobId: string,
    opts: { preallocate: boolean; machine: string; cpuModel: string; bridges?: (string | undefined)[] },
    onDefined: (pid: number) => void,
  ): Promise<DomainHandle>;
  /** Defines a shut-off domain that moved here as its definition. */
  defineMoved(config: DomainConfig): void;
  /** Ends an incoming domain's QEMU (if any) and forgets it: an abandoned incoming migration. */
  discardIncoming(d: DomainHandle): Promise<void>;
  /** Ends the source's QEMU after the guest moved, sends console users to `to`, forgets the definition. */
  retireMigrated(d: DomainHandle, to: { name: string; address: string; port: number }): Promise<void>;
  /** Drops the runtime of a domain whose QEMU is gone (sockets, taps, console). */
  cleanupRuntime(d: DomainHandle): void;
  forget(name: string): void;
  removeTaps(uuid: string, nics: number): void;

  /** Maintenance: this host takes no incoming move. */
  maintenance(): { on: boolean; since: string | null };
  /** Where each NIC of a domain here lives (daemon/tunnels.ts): the home end of its segment. */
  tunnelHomes(c: DomainConfig): TunnelHome[];
  /** Opens away ends for an incoming domain's NICs listed in `homes`; the bridge for each NIC's tap. */
  openAway(c: DomainConfig, homes: Map<number, TunnelHome>): (string | undefined)[];
  /** Drops a domain's away ends here; says which homes listed this host. */
  closeAway(uuid: string): { nic: number; home: TunnelHome }[];
  /** This host is the NIC's home: its segment also floods to `remote`. The remotes now. */
  extendHome(c: DomainConfig, nic: number, remote: string): string[];
  retractHome(uuid: string, nic: number, remote: string): void;
  tunnelFromPeer(change: { op: 'extend' | 'retract'; uuid: string; nic: number; remote: string }, callerAddress: string): string[];

  /** Creates an empty disk image (qemu-img) for a --copy-storage move; refuses an existing file. */
  createDisk(path: string, format: 'raw' | 'qcow2', virtualSize: number, backing?: { path: string; format: string }): void;
  /** Bytes free for new disks in storage.localDir. */
  localFreeBytes(): number;

  /** The domain QEMU's private directory (its sockets). */
  qemuDirOf(d: DomainHandle): string;
  /** The domain QEMU's TLS directory (a fresh copy of this host's credentials). */
  qemuTlsDir(d: DomainHandle): string;
  withRam<T>(d: DomainHandle, write: boolean, f: (ram: GuestRam) => Promise<T>): Promise<T>;
  ramDigests(d: DomainHandle): Promise<RamDigests>;
  ramChunkDigests(d: DomainHandle, chunks: number[]): Promise<{ bytes: number; chunkBytes: number; digests: Buffer }>;
}
