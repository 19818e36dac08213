/**
 * The one registry of ferry's error codes.
 *
 * Every failure that crosses a boundary (CLI, API, relocation protocol) carries a
 * stable code from this table. Codes never change meaning once shipped; add new
 * ones instead. `exit` is the CLI's exit status for the code (see README "Exit codes").
 */
export const ERRORS = {
  // usage and input: exit 2
  CLI_USAGE: { exit: 2, doc: 'bad command-line arguments' },
  CONFIG_INVALID: { exit: 2, doc: 'a domain or daemon config failed validation' },
  CONFIG_UNREADABLE: { exit: 2, doc: 'a config file could not be read or parsed' },
  API_BAD_REQUEST: { exit: 2, doc: 'a malformed API request' },
  API_UNKNOWN_ACTION: { exit: 2, doc: 'the API has no such action' },
  // not found / conflicts: exit 3
  DOMAIN_NOT_FOUND: { exit: 3, doc: 'no domain by that name on this host' },
  DOMAIN_EXISTS: { exit: 3, doc: 'a domain with that name or uuid already exists' },
  DOMAIN_BAD_STATE: { exit: 3, doc: "the action is not legal in the domain's current state" },
  HOST_UNKNOWN: { exit: 3, doc: 'the host name or address cannot be resolved' },
  JOB_NOT_FOUND: { exit: 3, doc: 'no migration job for that domain' },
  // resources: exit 4
  HOST_NO_MEMORY: { exit: 4, doc: 'the host does not have enough free memory for the domain' },
  HOST_MAINTENANCE: {
    exit: 4,
    doc: 'the host is in maintenance: it starts no domain and takes no incoming move (`ferry host maintenance HOST off`)',
  },
  EVACUATION_INCOMPLETE: { exit: 8, doc: 'some domains could not leave the host being evacuated; the report says why for each' },
  NETWORK_NOT_FOUND: { exit: 4, doc: 'the domain names a network this host does not have' },
  NETWORK_TUNNEL_FAILED: { exit: 4, doc: "a VXLAN tunnel extending a domain's segment could not be set up" },
  DISK_NOT_FOUND: { exit: 4, doc: 'a disk or boot file does not exist' },
  API_LIMIT: { exit: 4, doc: 'a connection, reservation or size limit was reached; retry later or raise the limit' },
  HOST_UIDS_EXHAUSTED: { exit: 4, doc: "every uid of the host's QEMU uid range (qemu.uids) is in use; raise qemu.uids.count" },
  // runtime failures: exit 5
  DAEMON_UNREACHABLE: { exit: 5, doc: 'the ferryd API socket or port did not answer' },
  QEMU_START_FAILED: { exit: 5, doc: 'QEMU refused to start the domain' },
  QMP_ERROR: { exit: 5, doc: 'QEMU answered a QMP command with an error' },
  QMP_DISCONNECTED: { exit: 5, doc: 'the QMP connection closed' },
  TIMEOUT: { exit: 5, doc: 'an operation did not finish in time' },
  SAVE_FAILED: { exit: 5, doc: 'saving or restoring a domain failed' },
  STATE_WRITE_FAILED: {
    exit: 5,
    doc: 'ferryd could not write its state directory (disk full or read-only); nothing irreversible was done',
  },
  MEMORY_UNREADABLE: {
    exit: 5,
    doc: "ferryd could not read or write a domain's RAM through /proc/PID/mem (it needs ptrace access to its QEMUs)",
  },
  LAB_FAILED: { exit: 5, doc: 'building or tearing down the lab failed' },
  LAB_NOT_UP: { exit: 5, doc: 'the lab is not up' },
  IMAGES_MISSING: { exit: 5, doc: 'the test guest images are not built (run `ferry lab images`)' },
  VERIFY_FAILED: { exit: 6, doc: 'the memory-pattern checker found inconsistent memory' },
  INTERNAL: { exit: 70, doc: 'a bug in ferry' },
  // trust: exit 7
  TLS_MISSING: { exit: 7, doc: 'certificates are missing' },
  TLS_REFUSED: { exit: 7, doc: 'the peer refused our certificate or presented none we trust' },
  PEER_NOT_ALLOWED: { exit: 7, doc: 'the peer is not matched by relocation.hostsAllow' },
  API_FORBIDDEN: { exit: 7, doc: "the caller's role (host peer, admin, local) may not call this action" },
  PATH_NOT_ALLOWED: {
    exit: 7,
    doc: 'a file path is outside the storage pools or the save directory, is a symlink, or is not a regular file',
  },
  // cluster mode (src/cluster/): exit 10
  CLUSTER_NOT_CONFIGURED: {
    exit: 10,
    doc: 'this ferryd runs standalone: the action needs cluster mode (a `cluster` section in ferryd.json)',
  },
  CLUSTER_NO_QUORUM: {
    exit: 10,
    doc: 'etcd did not answer with a quorum (members down or unreachable): nothing new starts or moves until it does; running domains are not touched (HA ones are fenced after the lease TTL)',
  },
  CLUSTER_OWNED_ELSEWHERE: { exit: 10, doc: "the cluster's ownership record names another host for the domain: only its owner may run it" },
  CLUSTER_RECORD_CHANGED: {
    exit: 10,
    doc: "the domain's ownership record changed while ferryd acted on it (another host or manager won the race); nothing was done, retry",
  },
  CLUSTER_BAD_RECORD: { exit: 10, doc: 'a record in etcd is not in the shape ferry writes (changed by hand?); it is not acted on' },
  // placement (src/placement/): rules, and where a domain may go
  RULE_INVALID: { exit: 2, doc: 'a placement rule is malformed (too few domains, hosts where none belong, a name twice)' },
  RULE_EXISTS: { exit: 3, doc: 'a placement rule by that name exists already' },
  RULE_NOT_FOUND: { exit: 3, doc: 'no placement rule by that name' },
  RULE_UNKNOWN_DOMAIN: { exit: 3, doc: 'a placement rule names a domain the cluster does not know' },
  RULE_UNKNOWN_HOST: { exit: 3, doc: 'a placement rule names a host that is no cluster member' },
  RULE_CONTRADICTS: {
    exit: 3,
    doc: 'a placement rule contradicts one already stored (keep-apart against keep-together, prefer against avoid)',
  },
  PLACEMENT_RULE: {
    exit: 8,
    doc: 'the move would break a placement rule (`ferry rule list`); --ignore-rules overrides, and the report says so',
  },
  PLACEMENT_NONE: {
    exit: 4,
    doc: 'no host can take the domain: each was ruled out (CPU, networks, memory, maintenance or a rule), and the message says why',
  },
  // migration: exit 8 (pre-flight refusals) and 9 (failures during the move)
  MIGRATION_DEST_NO_MEMORY: { exit: 8, doc: 'the destination has too little free memory' },
  MIGRATION_DEST_MAINTENANCE: { exit: 8, doc: 'the destination is in maintenance and takes no incoming move' },
  MIGRATION_DEST_ARCH: { exit: 8, doc: 'the destination has another architecture or accelerator' },
  MIGRATION_DEST_CPU: { exit: 8, doc: 'the destination lacks CPU features or the CPU model' },
  MIGRATION_DEST_BUSY: {
    exit: 8,
    doc: 'the destination already takes as many incoming moves as its limits allow (incomingPerPeer, incomingTotal); a ferry source waits in line and asks again, for up to 10 minutes',
  },
  MIGRATION_DEST_NETWORK: { exit: 8, doc: "the domain's network is missing on the destination" },
  MIGRATION_DEST_L2: { exit: 8, doc: "the destination's network is not the same L2 segment" },
  MIGRATION_DEST_DISK: { exit: 8, doc: 'a disk is not reachable at the same path on the destination' },
  MIGRATION_DEST_STORAGE: {
    exit: 8,
    doc: 'a writable disk is not on storage both hosts share and --copy-storage was not given, or its copy has no room or place on the destination',
  },
  MIGRATION_DEST_EXISTS: { exit: 8, doc: 'a domain with that name or uuid already exists on the destination' },
  MIGRATION_DEST_VERSION: { exit: 8, doc: 'the destination speaks an incompatible protocol version' },
  MIGRATION_DEST_ENGINE: {
    exit: 8,
    doc: "the destination's QEMU is older than the source's, or lacks the domain's machine type (QEMU migrates only to the same or a newer version)",
  },
  MIGRATION_DEST_INSECURE: {
    exit: 8,
    doc: 'the destination does not accept a plain-TCP (--insecure) migration stream (relocation.allowInsecure)',
  },
  MIGRATION_DEST_PORT: { exit: 8, doc: "the destination's migration data port is not reachable" },
  MIGRATION_SAME_HOST: { exit: 8, doc: 'the destination is the source host' },
  MIGRATION_PROTOCOL: { exit: 9, doc: 'the peer sent a relocation message that breaks the protocol' },
  MIGRATION_ILLEGAL_PHASE: { exit: 9, doc: 'a migration phase transition that is not allowed' },
  MIGRATION_IN_PROGRESS: { exit: 9, doc: 'the domain already has a migration job' },
  MIGRATION_FAILED: { exit: 9, doc: 'the migration failed; the source domain keeps running' },
  MIGRATION_CANCELLED: { exit: 9, doc: 'the migration was cancelled; the source domain keeps running' },
  MIGRATION_NOT_CONVERGING: { exit: 9, doc: 'the pre-copy did not converge before its deadline' },
  MIGRATION_POSTCOPY_LOST: {
    exit: 9,
    doc: "the source's QEMU failed the post-copy stream for good before the destination had every page: the guest cannot go on, and is stopped and marked crashed on the destination; `ferry start` boots it again there",
  },
  MIGRATION_UNRESOLVED: {
    exit: 9,
    doc: 'past the point of no return the destination has not said whether it runs the guest: the source copy stays paused, ferryd keeps asking (`ferry job DOMAIN`; `ferry job resolve` if you know)',
  },
  MIGRATION_MEMORY_MISMATCH: {
    exit: 9,
    doc: "the destination's copy of guest RAM still differs from the source's after it was rewritten; the source domain keeps running",
  },
} as const;

export type ErrorCode = keyof typeof ERRORS;

export class FerryError extends Error {
  readonly code: ErrorCode;
  readonly details?: Record<string, unknown>;
  constructor(code: ErrorCode, message: string, details?: Record<string, unknown>) {
    super(message);
    this.name = 'FerryError';
    this.code = code;
    this.details = details;
  }
  get exitCode(): number {
    return ERRORS[this.code].exit;
  }
  toJSON(): { code: ErrorCode; message: string; details?: Record<string, unknown> } {
    return this.details ? { code: this.code, message: this.message, details: this.details } : { code: this.code, message: this.message };
  }
}

export function isErrorCode(s: unknown): s is ErrorCode {
  return typeof s === 'string' && Object.prototype.hasOwnProperty.call(ERRORS, s);
}

/** Turns anything thrown into a FerryError; unknown throwables become INTERNAL. */
export function asFerryError(e: unknown): FerryError {
  if (e instanceof FerryError) return e;
  if (e && typeof e === 'object' && 'code' in e && isErrorCode((e as { code: unknown }).code)) {
    const o = e as { code: ErrorCode; message?: string; details?: Record<string, unknown> };
    return new FerryError(o.code, String(o.message ?? o.code), o.details);
  }
  const msg = e instanceof Error ? e.message : String(e);
  // QMP failures keep their own codes (matched by name: errors.ts imports nothing).
  if (e instanceof Error && e.name === 'QmpError') return new FerryError('QMP_ERROR', msg);
  if (e instanceof Error && e.name === 'QmpClosedError') return new FerryError('QMP_DISCONNECTED', msg);
  return new FerryError('INTERNAL', msg);
}
