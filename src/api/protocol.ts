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
export const MAX_REQUEST_BYTES = 1024 * 1024;

type Check = (v: unknown) => string | null;
/** Where ferryd reads its config, and the relocation port a peer listens on unless told otherwise (xend's 8002). */
export const DEFAULT_CONFIG_PATH = '/etc/ferry/ferryd.json';
export const DEFAULT_RELOCATION_PORT = 8002;

const str: Check = (v) => (typeof v === 'string' && v.length > 0 && v.length <= 4096 ? null : 'must be a non-empty string');
const oneOf = (...vs: string[]): Check => (v) => (typeof v === 'string' && vs.includes(v) ? null : `must be one of ${vs.join(', ')}`);
const optStr: Check = (v) => (v === undefined ? null : str(v));
const optBool: Check = (v) => (v === undefined || typeof v === 'boolean' ? null : 'must be true or false');
const optNum = (min: number, max: number): Check => (v) => (v === undefined || (typeof v === 'number' && Number.isFinite(v) && v >= min && v <= max) ? null : `must be a number from ${min} to ${max}`);
const num = (min: number, max: number): Check => (v) => (typeof v === 'number' && Number.isInteger(v) && v >= min && v <= max ? null : `must be an integer from ${min} to ${max}`);
const any: Check = () => null;
/** Absent, or a list of at most `max` integers in [min, maxV] (chunk indexes). */
const optIntList = (min: number, maxV: number, max: number): Check => (v) => (v === undefined || (Array.isArray(v) && v.length <= max && v.every((x) => Number.isInteger(x) && x >= min && x <= maxV)) ? null : `must be a list of at most ${max} integers from ${min} to ${maxV}`);
/** The most RAM one relocation.repair carries, as raw bytes after its line. */
export const MAX_REPAIR_BYTES = 1024 * 1024;
const saveFile: Check = (v) => (typeof v === 'string' && v.length > 0 && v.length < 4096 && !v.includes('\0') && (v.startsWith('/') || /^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$/.test(v)) ? null : 'must be a file name (in the save directory) or an absolute path');

/** Every action and the checks on its params. Unknown params are refused too. */
export const ACTIONS = {
  'api.hello': {},
  'host.info': {},
  'domain.list': {},
  'domain.info': { domain: str },
  'domain.create': { config: any, start: optBool },
  'domain.start': { domain: str },
  'domain.pause': { domain: str },
  'domain.unpause': { domain: str },
  'domain.shutdown': { domain: str, timeoutS: optNum(0, 3600) },
  'domain.destroy': { domain: str },
  'domain.delete': { domain: str },
  // FILE: a bare name in the host's save directory, or (local socket with anyPath) an absolute path
  'domain.save': { domain: str, file: saveFile, anyPath: optBool },
  'domain.restore': { file: saveFile, anyPath: optBool },
  'domain.sample-memory': { domain: str, startMiB: num(0, 1 << 20), endMiB: num(1, 1 << 20) },
  'console.attach': { domain: str, replay: optNum(0, 1 << 20) },
  'events.subscribe': { domain: optStr },
  // migration (source side, asked by the CLI)
  'migration.start': { domain: str, dest: str, live: optBool, bandwidthMiBs: optNum(1, 100000), maxDowntimeMs: optNum(1, 600000), timeoutS: optNum(1, 86400), insecure: optBool, parallel: optNum(1, 16), verifyMemory: optBool, probeGuest: optBool },
  'migration.cancel': { domain: str },
  'migration.jobs': {},
  'migration.job': { domain: str },
  // the operator's word on a job past the point of no return that the destination has not settled
  'migration.resolve': { domain: str, assume: oneOf('destination', 'source') },
  // relocation (destination side, asked by a peer ferryd over TLS)
  'relocation.begin': { version: num(0, 1000), peer: any, domain: any, mode: str, insecure: optBool, parallel: optNum(1, 16), jobId: str },
  'relocation.prepare': { jobId: str },
  'relocation.digest': { jobId: str, chunks: optIntList(0, 1 << 20, 8192) },
  'relocation.repair': { jobId: str, offset: num(0, 2 ** 50), length: num(1, MAX_REPAIR_BYTES) },
  'relocation.finish': { jobId: str, running: optBool },
  'relocation.abandon': { jobId: str, reason: optStr },
  'relocation.confirm': { jobId: str },
  'relocation.status': { jobId: str },
} as const satisfies Record<string, Record<string, Check>>;

export type Action = keyof typeof ACTIONS;

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
  'migration.cancel': MANAGE,
  'migration.jobs': MANAGE,
  'migration.job': MANAGE,
  'migration.resolve': MANAGE,
  'relocation.begin': PEER,
  'relocation.prepare': PEER,
  'relocation.digest': PEER,
  'relocation.repair': PEER,
  'relocation.finish': PEER,
  'relocation.abandon': PEER,
  'relocation.confirm': PEER,
  'relocation.status': PEER,
} as const satisfies Record<Action, readonly Role[]>;

export function mayCall(role: Role, action: Action): boolean {
  return (ROLES[action] as readonly Role[]).includes(role);
}

export interface Request { id: number | string; action: Action; params: Record<string, unknown>; attachment?: Buffer }

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
  const key = typeof r.action === 'string' && Object.prototype.hasOwnProperty.call(BINARY_ACTIONS, r.action) ? BINARY_ACTIONS[r.action as Action] : undefined;
  const n = key && typeof r.params === 'object' && r.params !== null ? (r.params as Record<string, unknown>)[key] : undefined;
  return typeof n === 'number' && Number.isInteger(n) && n > 0 && n <= MAX_REPAIR_BYTES ? n : 0;
}
export interface Reply { id: number | string; result?: unknown; error?: { code: string; message: string; details?: unknown } }
export interface EventMsg { event: string; data: unknown }

/** Validates one parsed request line. Throws API_BAD_REQUEST / API_UNKNOWN_ACTION. */
export function parseRequest(raw: unknown): Request {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new FerryError('API_BAD_REQUEST', 'API request must be a JSON object');
  const r = raw as Record<string, unknown>;
  for (const k of Object.keys(r)) if (!['id', 'action', 'params'].includes(k)) throw new FerryError('API_BAD_REQUEST', `API request has an unknown key "${k.slice(0, 40)}"`);
  if (!((typeof r.id === 'number' && Number.isFinite(r.id)) || (typeof r.id === 'string' && r.id.length <= 64))) throw new FerryError('API_BAD_REQUEST', 'API request needs an "id" (number or short string)');
  if (typeof r.action !== 'string') throw new FerryError('API_BAD_REQUEST', 'API request needs an "action" string');
  if (!Object.prototype.hasOwnProperty.call(ACTIONS, r.action)) throw new FerryError('API_UNKNOWN_ACTION', `Unknown API action "${r.action.slice(0, 60)}"`);
  const params = r.params ?? {};
  if (typeof params !== 'object' || params === null || Array.isArray(params)) throw new FerryError('API_BAD_REQUEST', `"params" of ${r.action} must be an object`);
  const spec = ACTIONS[r.action as Action] as Record<string, Check>;
  for (const k of Object.keys(params)) if (!(k in spec)) throw new FerryError('API_BAD_REQUEST', `${r.action}: unknown parameter "${k.slice(0, 40)}"`);
  for (const [k, check] of Object.entries(spec)) {
    const why = check((params as Record<string, unknown>)[k]);
    if (why) throw new FerryError('API_BAD_REQUEST', `${r.action}: parameter "${k}" ${why}`);
  }
  return { id: r.id as number | string, action: r.action as Action, params: params as Record<string, unknown> };
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
  constructor(private readonly onData: (b: Buffer) => void, private readonly onControl: (msg: unknown) => void) {}
  push(d: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
    while (this.buf.length >= 5) {
      const type = this.buf[0];
      const len = this.buf.readUInt32BE(1);
      if ((type !== CONSOLE_DATA && type !== CONSOLE_CONTROL) || len > CONSOLE_FRAME_MAX) throw new FerryError('API_BAD_REQUEST', `console stream: bad frame (type ${type}, ${len} bytes)`);
      if (this.buf.length < 5 + len) return;
      const payload = this.buf.subarray(5, 5 + len);
      this.buf = this.buf.subarray(5 + len);
      if (type === CONSOLE_DATA) this.onData(payload);
      else { let m: unknown = null; try { m = JSON.parse(payload.toString('utf8')); } catch { /* ignored */ } this.onControl(m); }
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
  /** Guest RAM compared after the copy (qemu/memory.ts); `repairedBytes` arrived different and were rewritten from the source. */
  memoryCheck: { bytes: number; ms: number; repairedBytes: number; repairedChunks: number } | null;
  phase: string;
  /** ms since the request at which each step ended (connected, begun, prepared, firstByte, …, sourceClean). */
  timeline?: Record<string, number>;
  error?: { code: string; message: string };
}
