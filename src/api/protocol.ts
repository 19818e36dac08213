/**
 * The management API: one closed set of actions, JSON lines over a unix socket
 * (local, root only) or mutually authenticated TLS (remote).
 *
 *   client                                   ferryd
 *     | --- {"id":1,"action":"domain.list","params":{}} ---> |
 *     | <-- {"id":1,"result":[...]} ------------------------ |   or {"id":1,"error":{code,message}}
 *     | --- {"id":2,"action":"events.subscribe"} ----------> |
 *     | <-- {"id":2,"result":{}} --------------------------- |
 *     | <-- {"event":"domain.state","data":{...}} ---------- |   until the client closes
 *
 * `console.attach` answers once and then turns the connection into a console stream
 * (like an HTTP upgrade): the client's keystrokes go to the guest as raw bytes; the
 * daemon sends frames, so that nothing a guest prints can pass for a control message:
 *     [0x00][u32 length][guest bytes]      [0x01][u32 length][JSON: moved/stopped]
 */
import { FerryError } from '../errors.ts';

export const API_VERSION = 1;
export { MAX_REQUEST_BYTES, MAX_REPAIR_BYTES } from './limits.ts';

/** Where ferryd reads its config, and the relocation port a peer listens on unless told otherwise (xend's 8002). */
export const DEFAULT_CONFIG_PATH = '/etc/ferry/ferryd.json';
export const DEFAULT_RELOCATION_PORT = 8002;

// The actions and their params' schemas live in schema.ts (zod), which only ferryd
// loads at run time: the CLI imports their types, and starts without zod.
export type { Action, Request } from './schema.ts';
import type { Action } from './schema.ts';
import type { RelocationAnswers } from './relocation.ts';
import { MAX_REPAIR_BYTES } from './limits.ts';
import type { Compression } from './shapes.ts';
import type { Rule } from '../placement/rules.ts';
import type { Balance, BalanceSettings, Hold } from '../placement/balance.ts';

/**
 * Who may call what. `local`: the root-only unix socket. `admin`: a TLS client whose
 * certificate says OU=admin. `peer`: a TLS client with a host certificate (another
 * ferryd): it may greet and drive relocation of jobs it began, nothing else, so one
 * stolen host key is not root on every other host.
 */
export type Role = 'local' | 'admin' | 'peer';
const MANAGE = ['local', 'admin'] as const;
const PEER = ['peer'] as const;
export const ROLES = {
  'api.hello': ['local', 'admin', 'peer'],
  'host.info': MANAGE,
  'host.maintenance': MANAGE,
  'net.tunnels': MANAGE,
  'domain.list': MANAGE,
  'domain.info': MANAGE,
  'domain.create': MANAGE,
  'domain.start': MANAGE,
  'domain.pause': MANAGE,
  'domain.unpause': MANAGE,
  'domain.shutdown': MANAGE,
  'domain.destroy': MANAGE,
  'domain.delete': MANAGE,
  'domain.save': MANAGE,
  'domain.restore': MANAGE,
  'domain.sample-memory': MANAGE,
  'console.attach': MANAGE,
  'events.subscribe': MANAGE,
  'migration.start': MANAGE,
  'migration.plan': MANAGE,
  'migration.cancel': MANAGE,
  'migration.jobs': MANAGE,
  'migration.job': MANAGE,
  'migration.resolve': MANAGE,
  'cluster.status': MANAGE,
  'cluster.domains': MANAGE,
  'cluster.fleet': MANAGE,
  'cluster.events': MANAGE,
  'cluster.leave': MANAGE,
  'ha.set': MANAGE,
  'ha.status': MANAGE,
  'rule.add': MANAGE,
  'rule.list': MANAGE,
  'rule.remove': MANAGE,
  'cluster.cpu': MANAGE,
  'cluster.place': MANAGE,
  'cluster.balance': MANAGE,
  'cluster.autobalance': MANAGE,
  'relocation.begin': PEER,
  'relocation.prepare': PEER,
  'relocation.digest': PEER,
  'relocation.repair': PEER,
  'relocation.finish': PEER,
  'relocation.abandon': PEER,
  'relocation.confirm': PEER,
  'relocation.recover': PEER,
  'relocation.lost': PEER,
  'relocation.status': PEER,
  'relocation.tunnel': PEER,
} as const satisfies Record<Action, readonly Role[]>;

export function mayCall(role: Role, action: Action): boolean {
  return (ROLES[action] as readonly Role[]).includes(role);
}

/**
 * Actions whose request line is followed by raw bytes: the param that says how many.
 *   --- {"id":7,"action":"relocation.repair","params":{"jobId":…,"offset":…,"length":N}}\n
 *   --- N raw bytes (guest RAM) ----------------------------------------------------->
 */
export const BINARY_ACTIONS: Partial<Record<Action, string>> = { 'relocation.repair': 'length' };

/**
 * How many raw bytes follow a parsed line: read before the line is validated, so that a
 * refused request's payload is skipped instead of being read as lines. 0 for none.
 */
export function attachmentLength(raw: unknown): number {
  if (typeof raw !== 'object' || raw === null) return 0;
  const r = raw as { action?: unknown; params?: unknown };
  const key =
    typeof r.action === 'string' && Object.prototype.hasOwnProperty.call(BINARY_ACTIONS, r.action)
      ? BINARY_ACTIONS[r.action as Action]
      : undefined;
  const n = key && typeof r.params === 'object' && r.params !== null ? (r.params as Record<string, unknown>)[key] : undefined;
  return typeof n === 'number' && Number.isInteger(n) && n > 0 && n <= MAX_REPAIR_BYTES ? n : 0;
}
export interface Reply {
  id: number | string;
  result?: unknown;
  error?: { code: string; message: string; details?: unknown };
}
export interface EventMsg {
  event: string;
  data: unknown;
}

export const CONSOLE_DATA = 0;
export const CONSOLE_CONTROL = 1;
/** The most one console frame carries; longer output is split. */
export const CONSOLE_FRAME_MAX = 64 * 1024;

export function consoleFrame(type: typeof CONSOLE_DATA | typeof CONSOLE_CONTROL, payload: Buffer): Buffer {
  const h = Buffer.alloc(5);
  h[0] = type;
  h.writeUInt32BE(payload.length, 1);
  return Buffer.concat([h, payload]);
}

/** Guest bytes as frames of at most CONSOLE_FRAME_MAX. */
export function consoleDataFrames(d: Buffer): Buffer {
  if (d.length <= CONSOLE_FRAME_MAX) return consoleFrame(CONSOLE_DATA, d);
  const parts: Buffer[] = [];
  for (let i = 0; i < d.length; i += CONSOLE_FRAME_MAX) parts.push(consoleFrame(CONSOLE_DATA, d.subarray(i, i + CONSOLE_FRAME_MAX)));
  return Buffer.concat(parts);
}

/** Reassembles console frames from a byte stream; refuses a frame type or length it does not know. */
export class ConsoleDeframer {
  private buf: Buffer = Buffer.alloc(0);
  constructor(
    private readonly onData: (b: Buffer) => void,
    private readonly onControl: (msg: unknown) => void,
  ) {}
  push(d: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
    while (this.buf.length >= 5) {
      const type = this.buf[0];
      const len = this.buf.readUInt32BE(1);
      if ((type !== CONSOLE_DATA && type !== CONSOLE_CONTROL) || len > CONSOLE_FRAME_MAX)
        throw new FerryError('API_BAD_REQUEST', `console stream: bad frame (type ${type}, ${len} bytes)`);
      if (this.buf.length < 5 + len) return;
      const payload = this.buf.subarray(5, 5 + len);
      this.buf = this.buf.subarray(5 + len);
      if (type === CONSOLE_DATA) this.onData(payload);
      else {
        let m: unknown = null;
        try {
          m = JSON.parse(payload.toString('utf8'));
        } catch {
          /* ignored */
        }
        this.onControl(m);
      }
    }
  }
}

/** How a domain moves: running (live or offline) or, shut off, as its definition. */
export type Mode = 'live' | 'offline' | 'definition';

/** What `migration.start` answers (and `migration.job` keeps): the move's outcome and figures. */
export interface Report {
  /** unresolved: past the point of no return, the destination has not said whether it runs the guest; ferryd keeps asking. */
  outcome: 'succeeded' | 'failed' | 'cancelled' | 'unresolved';
  mode: Mode;
  jobId: string;
  domain: string;
  source: string;
  destination: string;
  totalMs: number;
  setupMs: number | null;
  downtimeMs: number | null;
  /** Source STOP event → the destination's answer that its guest resumed, both on the source's monotonic clock (an upper bound; QEMU's downtime understates the pause). */
  pauseMs: number | null;
  /** Longest gap in the guest's replies to an outside probe (see guestprobe.ts); null without a guest IP. */
  guestDowntimeMs: number | null;
  guestProbe: string | null;
  bytes: number;
  passes: number;
  throughputMBps: number;
  encrypted: boolean;
  bandwidthMiBs: number | null;
  maxDowntimeMs: number;
  policy: string[];
  /** --ignore-rules: the placement rules this move broke, in words (cluster mode). */
  rulesIgnored?: string[];
  /** Guest RAM compared after the copy (qemu/memory.ts); `repairedBytes` arrived different and were rewritten from the source. */
  memoryCheck: { bytes: number; ms: number; repairedBytes: number; repairedChunks: number } | null;
  phase: string;
  /** ms since the request at which each step ended (connected, begun, prepared, firstByte, …, sourceClean). */
  timeline?: Record<string, number>;
  /** From the destination's word that the guest resumed to the guest's first answer on its address from the source's side of its segment; null where it has no known address or did not answer. */
  networkHandoverMs?: number | null;
  /** What succeeded but needs a look (a guest that did not answer on its address after the move). */
  warnings?: string[];
  /** The autopilot's plan for a live move (migration/plan.ts): what it measured, picked and predicted. */
  plan?: PlanView | null;
  /** How the move went in the end: precopy, auto-converge, multifd, postcopy or offline. */
  strategy?: string;
  /** Post-copy: when it began (ms since the request) and how long the guest's memory lived on both hosts. */
  postcopy?: { startedAtMs: number; windowMs: number | null; recoveries?: number } | null;
  /** --copy-storage: each disk copied (from the source's path to the destination's), the bytes the mirror moved, and whether the source's copy was kept. */
  storage?: {
    disks: { index: number; from: string; to: string | null }[];
    copiedBytes: number;
    copyMs: number;
    sourceKept: boolean;
  } | null;
  error?: { code: string; message: string };
}

/** One strategy's predicted cost (migration/plan.ts); null where it never finishes. */
export interface PredictionView {
  strategy: string;
  totalMs: number | null;
  pauseMs: number | null;
  bytes: number | null;
  passes: number;
  converges: boolean;
  fitsBudget: boolean;
  note: string;
}

/** What `ferry migrate --plan` prints, and a live move's report keeps. */
export interface PlanView {
  domain: string;
  destination: string;
  ramBytes: number;
  touchedBytes: number | null;
  dirtyRateMBps: number | null;
  dirtyRateFrom: string;
  linkMBps: number;
  linkFrom: string;
  maxDowntimeMs: number;
  timeoutS: number;
  spareCores: number;
  postcopyAllowed: boolean;
  /** --compress: pages compressed by multifd. */
  compress: Compression;
  /** The share of the pages' bytes compression leaves, as a sample measured it: the predictions count that; null: pages counted whole. */
  compressRatio: number | null;
  strategy: string;
  onTimeout: string;
  pick: string;
  reason: string;
  predictions: PredictionView[];
}

// ---- results the CLI reads (the daemon's handlers return these) ----

export type DomainSummary = {
  name: string;
  uuid: string;
  id: number | null;
  memoryMiB: number;
  vcpus: number;
  state: string;
  cpuTime: number;
};

export type DomainInfo = DomainSummary & {
  host: string;
  /** The domain config as JSON (domain/config.ts). */
  config: Record<string, unknown>;
  stateDetail: unknown;
  pid: number | null;
  accel: string;
  /** The CPU model it runs with (its own "cpu", the cluster's baseline, or the host's), or would start with; null when "cluster" cannot be resolved now. */
  cpuModel: string | null;
  nics: { network: string; mac: string; ip: string | null; tap: string | null }[];
  consoleLog: string;
};

export type HostInfo = {
  name: string;
  arch: string;
  version: string;
  qemuVersion: string;
  machine: string;
  engine: { binary: string; dataDirs: string[]; version: string; liveDirtyTrackingReliable: boolean };
  accel: string;
  accelReason: string;
  cpuModel: string;
  cpuFeatures: string[];
  /** ferryd.json "cpuCeiling", or null. */
  cpuCeiling: string | null;
  /** The CPU models a domain can run with here (within the ceiling, every feature available). */
  cpuModels: string[];
  cpuUnavailable: string[];
  memory: {
    offeredMiB: number;
    usedMiB: number;
    freeMiB: number;
    reservedMiB: number;
    availableMiB: number;
    untouchedMiB: number;
    marginMiB: number;
    limitedBy: string;
  };
  networks: Record<string, { bridge: string; subnet: string; address?: string }>;
  relocation: { address: string; port: number; dataPorts: [number, number]; hostsAllow: string[] };
  domains: number;
  /** VXLAN tunnels extending domains' segments through this host (daemon/tunnels.ts). */
  tunnels: TunnelView[];
  /** In maintenance: no domain starts here and no move comes in (ferry host maintenance, evacuate). */
  maintenance: { on: boolean; since: string | null };
  /** The peers this host knows by name (ferryd.json "peers", and in cluster mode every live host): where an evacuation may send its domains. */
  peers: Record<string, string>;
  /** standalone, or cluster (etcd): then `cluster.fleet` has the whole fleet. */
  mode: 'standalone' | 'cluster';
};

/** One end of a tunnel that carries a domain's home segment to the host it runs on. */
export type TunnelView = {
  domain: string;
  nic: number;
  network: string;
  vni: number;
  end: 'home' | 'away';
  device: string;
  bridge: string;
  local: string;
  remotes: string[];
  home: { host: string; address: string; subnet: string };
  since: string;
};

/** A live migration's progress (the CLI's bar). */
/** A save file's layout (daemon/saverestore.ts): QEMU's mapped-ram file, or its migration stream. */
export type SaveFormat = 'mapped-ram' | 'stream';

/** A save's progress ('domain.progress' events): the guest's RAM written so far. */
export interface SaveProgress {
  domain: string;
  verb: 'save';
  percent: number;
  written: number;
  total: number;
  rateMBps: number;
  etaS: number | null;
  elapsedMs: number;
}

export type Progress = {
  domain: string;
  jobId: string;
  status?: string;
  phase: string;
  percent: number;
  transferred: number;
  remaining: number;
  total: number;
  rateMBps: number;
  pass: number;
  etaS: number | null;
  elapsedMs: number;
  dirtyRate: number;
  throttlePct: number;
  /** Where the move stands, in words: copying disks, pre-copy pass N, post-copy, switchover. */
  stage?: string;
  /** --copy-storage: the disks' bytes copied and to copy (percent and ETA count them with the RAM). */
  disk?: { copied: number; total: number };
};

/** A move's place in its source's line (migration/queue.ts): an evacuation goes first, the balancer's moves last. */
export const PRIORITIES = ['evacuation', 'operator', 'balance'] as const;
export type MovePriority = (typeof PRIORITIES)[number];

/** A move in its source host's line, or holding one of its slots. */
export interface QueueView {
  domain: string;
  dest: string;
  priority: MovePriority;
  memoryMiB: number;
  live: boolean;
  /** running: holds a slot (its job shows the phase); queued: waits for one. */
  state: 'queued' | 'running';
  position: number | null;
  since: string;
  /** Waiting: why, in words. */
  waitingFor: string | null;
  /** When it is expected to be done, ms from now (its wait plus its own move), or null when unknown. */
  etaMs: number | null;
}

/** A migration job as `ferry jobs` / `ferry job` show it. */
export interface JobView {
  jobId: string;
  role: 'source' | 'destination';
  domain: string;
  mode: Mode;
  phase: string;
  peer: string;
  encrypted: boolean;
  startedAt: string;
  updatedAt: string;
  progress: Progress | null;
  waiting: { since: number; attempts: number; lastError: string; nextTryAt: number } | null;
  report: Report | null;
  error: { code: string; message: string } | null;
  history: { phase: string; at: number }[];
  /** A move still in this host's line (phase "queued", no job yet): its place, priority, ETA (migration/queue.ts). */
  queue?: QueueView;
}

/** What `ferry cancel` is told: the job is being cancelled (its report follows on the event stream). */
export type CancelResult = { jobId: string; domain: string; cancelling: true };
/** What `ferry job resolve` is told: who settled it and where the domain runs now. */
export type ResolveResult = { jobId: string; domain: string; phase: string; settledBy: 'destination' | 'operator'; runsOn: string };

/** A domain as the cluster sees it (`ferry list --all`, `ferry ha status`): its ownership record. */
export interface ClusterDomainView {
  name: string;
  owner: string;
  /** Whether the owner holds a lease now. */
  ownerUp: boolean;
  state: 'running' | 'stopped' | 'restarting' | 'failed';
  ha: { priority: number } | null;
  generation: number;
  restartable: { ok: boolean; why: string };
  /** A live move under way: its job and destination. */
  moving: { job: string; to: string } | null;
  memoryMiB: number;
  cpuModel: string;
  note: string;
  at: string;
}

/** What a live host publishes under its lease (cluster/records.ts HostFacts). */
export interface ClusterHostFacts {
  name: string;
  ferry: string;
  engine: string;
  accel: string;
  cpuModel: string;
  cpuModels: string[];
  cpuCeiling: string | null;
  memoryMiB: number;
  freeMiB: number;
  cores: number;
  /** Each running domain's CPU use, cores, averaged over the load window. */
  load: Record<string, number>;
  /** Each running domain's dirty rate, MB/s (about once a minute). */
  dirty: Record<string, number>;
  maintenance: boolean;
  /** Its line of outgoing moves (migration/queue.ts): running ones hold a slot, queued ones wait. */
  moves: { domain: string; dest: string; priority: string; state: 'running' | 'queued'; position: number | null; etaMs: number | null }[];
  networks: string[];
  relocation: string;
  since: string;
}

/** The fleet from one host's etcd watches (`cluster.fleet`): what `ferry ui` and `host evacuate` read in cluster mode. */
export interface ClusterFleet {
  /** The host that answered. */
  host: string;
  /** false: that host cannot reach etcd now, so the view may be stale. */
  quorate: boolean;
  hosts: ClusterHostFacts[];
  domains: (ClusterDomainView & { cpu: number | null; dirtyMBps: number | null })[];
  /** The placement rules (`ferry rule list`). */
  rules: Rule[];
}

/** `ferry cluster cpu`: the cluster's baseline CPU model and what each host can give. */
export interface ClusterCpu {
  baseline: string;
  features: string[];
  /** Every model all live hosts can give, most capable first. */
  common: string[];
  hosts: { name: string; ceiling: string | null; defaultModel: string; models: number; accel: string }[];
}

/** `ferry cluster status`. */
export interface ClusterStatus {
  mode: 'cluster';
  host: string;
  lease: { state: string; id: string | null; quorate: boolean; fenceInMs: number | null; ttlS: number; fenceMarginS: number };
  haManager: string | null;
  etcd: {
    url: string;
    ok: boolean;
    name: string | null;
    leader: string | null;
    /** The member's raft term: it rises with each election, so a term that holds means no leader was deposed. */
    term: number | null;
    version: string | null;
    error: string | null;
  }[];
  /** Hosts with a live lease and what they publish; null if etcd did not answer. */
  hosts: ClusterHostFacts[] | null;
  domains: { name: string; owner: string; state: string; ha: { priority: number } | null }[];
}

/** One entry of the cluster's event log (`ferry events`). */
export interface ClusterEventView {
  at: string;
  type: string;
  by: string;
  host?: string;
  domain?: string;
  detail: string;
}

/**
 * The result of each action: the one map the CLI's calls (api/client.ts) and the daemon's
 * handlers (daemon/actions.ts) are both checked against. Relocation actions are the
 * peer protocol (migration/dest.ts documents their answers); ferryd alone reads them.
 */
export interface Results {
  'api.hello': { apiVersion: number; version: string; host: string; caller: unknown };
  'host.info': HostInfo;
  'host.maintenance': { host: string; maintenance: { on: boolean; since: string | null } };
  'net.tunnels': TunnelView[];
  'domain.list': DomainSummary[];
  'domain.info': DomainInfo;
  'domain.create': DomainInfo;
  'domain.start': DomainInfo;
  'domain.pause': DomainSummary;
  'domain.unpause': DomainSummary;
  'domain.shutdown': DomainSummary & { shutdownMs: number };
  'domain.destroy': DomainSummary;
  'domain.delete': { name: string; deleted: true };
  /** bytes: the file's size on disk (a mapped-ram file is sparse: pages never written take none). why: the reason it is a stream. */
  'domain.save': { name: string; file: string; bytes: number; ms: number; format: SaveFormat; directIo?: boolean; why?: string };
  'domain.restore': DomainInfo & { restoreMs: number; format: SaveFormat };
  'domain.sample-memory': { bytes: string; pages: number };
  'console.attach': undefined;
  'events.subscribe': { subscribed: string[] };
  'migration.start': Report;
  'migration.plan': PlanView;
  'migration.cancel': CancelResult;
  'migration.jobs': JobView[];
  'migration.job': JobView;
  'migration.resolve': ResolveResult;
  'cluster.status': ClusterStatus;
  'cluster.domains': ClusterDomainView[];
  'cluster.fleet': ClusterFleet;
  'cluster.events': ClusterEventView[];
  'cluster.leave': { host: string; left: true };
  'ha.set': ClusterDomainView;
  'ha.status': ClusterDomainView[];
  /** brokenNow: how the new rule is broken where its domains run (breaches): what the balancer, or a move, is to end. */
  'rule.add': Rule & { brokenNow?: string[] };
  'rule.list': Rule[];
  'rule.remove': { removed: string };
  'cluster.cpu': ClusterCpu;
  'cluster.place': { domain: string; to: string | null; why: string; broke: string[] };
  /** The recommendation, and the automatic mode's setting and its holds. */
  'cluster.balance': Balance & { auto: BalanceSettings; held: Hold[] };
  'cluster.autobalance': BalanceSettings;
  // A peer's answers are what the protocol promises, not proven: the source checks
  // what it acts on (a data port in the peer's range, digests of the right length).
  // The relocation answers' types come from their schemas (api/relocation.ts), which the source checks them with.
  'relocation.begin': RelocationAnswers['relocation.begin'];
  'relocation.prepare': RelocationAnswers['relocation.prepare'];
  'relocation.digest': RelocationAnswers['relocation.digest'];
  'relocation.repair': RelocationAnswers['relocation.repair'];
  'relocation.finish': RelocationAnswers['relocation.finish'];
  'relocation.abandon': RelocationAnswers['relocation.abandon'];
  'relocation.confirm': RelocationAnswers['relocation.confirm'];
  'relocation.status': RelocationAnswers['relocation.status'];
  'relocation.recover': RelocationAnswers['relocation.recover'];
  'relocation.lost': RelocationAnswers['relocation.lost'];
  'relocation.tunnel': RelocationAnswers['relocation.tunnel'];
}
