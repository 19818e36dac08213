/**
 * The API's actions and the schema of each one's params (zod): the one list that
 * validation, the handlers' parameter types (`Params<A>`), the roles (protocol.ts
 * ROLES, exhaustive over it) and the CLI share. Loaded at run time by ferryd only.
 */
import { z } from 'zod';
import { FerryError } from '../errors.ts';
import { RELOCATION_ACTIONS } from './relocation.ts';

import { str, optStr, optBool, int, optNum, optCompressChoice, params } from './shapes.ts';

const saveFile = z
  .string()
  .refine(
    (v) => v.length > 0 && v.length < 4096 && !v.includes('\0') && (v.startsWith('/') || /^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$/.test(v)),
    { error: 'must be a file name (in the save directory) or an absolute path' },
  );
/** Checked in depth by the handler (a domain config: domain/config.ts). */
const opaque = z.unknown();
const optStrategy = z.enum(['auto', 'precopy', 'postcopy'], { error: 'must be one of auto, precopy, postcopy' }).optional();
const optOnTimeout = z.enum(['cancel', 'suspend', 'postcopy'], { error: 'must be one of cancel, suspend, postcopy' }).optional();

/**
 * Every action and the schema of its params: the one list that validation, the
 * handlers' parameter types (`Params<A>`), the roles below and the CLI share.
 * Unknown params are refused too.
 */
export const ACTIONS = {
  'api.hello': params({}),
  'host.info': params({}),
  'host.maintenance': params({ on: z.boolean({ error: 'must be true or false' }) }),
  'net.tunnels': params({}),
  'domain.list': params({}),
  'domain.info': params({ domain: str }),
  'domain.create': params({ config: opaque, start: optBool, paused: optBool }),
  'domain.start': params({ domain: str }),
  'domain.pause': params({ domain: str }),
  'domain.unpause': params({ domain: str }),
  'domain.shutdown': params({ domain: str, timeoutS: optNum(0, 3600) }),
  'domain.destroy': params({ domain: str }),
  'domain.delete': params({ domain: str }),
  // FILE: a bare name in the host's save directory, or (local socket with anyPath) an absolute path
  'domain.save': params({ domain: str, file: saveFile, anyPath: optBool, stream: optBool }),
  'domain.restore': params({ file: saveFile, anyPath: optBool }),
  'domain.sample-memory': params({ domain: str, startMiB: int(0, 1 << 20), endMiB: int(1, 1 << 20) }),
  'console.attach': params({ domain: str, replay: optNum(0, 1 << 20) }),
  'events.subscribe': params({ domain: optStr }),
  // migration (source side, asked by the CLI)
  'migration.start': params({
    domain: str,
    dest: str,
    live: optBool,
    bandwidthMiBs: optNum(1, 100000),
    maxDowntimeMs: optNum(1, 600000),
    timeoutS: optNum(1, 86400),
    insecure: optBool,
    parallel: optNum(1, 16),
    compress: optCompressChoice,
    verifyMemory: optBool,
    probeGuest: optBool,
    strategy: optStrategy,
    onTimeout: optOnTimeout,
    copyStorage: optBool,
    deleteSourceStorage: optBool,
    priority: z.enum(['evacuation', 'operator', 'balance'], { error: 'must be one of evacuation, operator, balance' }).optional(),
    /** Cluster mode: move even if a placement rule forbids it (the report names each rule broken). */
    ignoreRules: optBool,
  }),
  // the autopilot's plan for a live move, moving nothing (`ferry migrate --plan`)
  'migration.plan': params({
    domain: str,
    dest: str,
    bandwidthMiBs: optNum(1, 100000),
    maxDowntimeMs: optNum(1, 600000),
    timeoutS: optNum(1, 86400),
    insecure: optBool,
    parallel: optNum(1, 16),
    compress: optCompressChoice,
    verifyMemory: optBool,
    strategy: optStrategy,
    onTimeout: optOnTimeout,
  }),
  'migration.cancel': params({ domain: str }),
  'migration.jobs': params({}),
  'migration.job': params({ domain: str }),
  // the operator's word on a job past the point of no return that the destination has not settled
  'migration.resolve': params({ domain: str, assume: z.enum(['destination', 'source'], { error: 'must be one of destination, source' }) }),
  // cluster mode (etcd): any host answers for the whole cluster
  'cluster.status': params({}),
  'cluster.domains': params({}),
  'cluster.fleet': params({}),
  // the last `limit` events; with follow, new ones go down the connection as they come
  'cluster.events': params({ limit: optNum(1, 5000), follow: optBool }),
  'cluster.leave': params({}),
  'ha.set': params({ domain: str, on: z.boolean({ error: 'must be true or false' }), priority: optNum(-1000, 1000) }),
  'ha.status': params({}),
  // placement (cluster mode): the rules (checked in depth by placement/rules.ts), the CPU baseline, a host for a domain, the balancer
  'rule.add': params({
    name: str,
    kind: z.enum(['keep-apart', 'keep-together', 'prefer-hosts', 'avoid-hosts'], {
      error: 'must be one of keep-apart, keep-together, prefer-hosts, avoid-hosts',
    }),
    domains: z.array(str, { error: 'must be a list of domain names' }).max(64, { error: 'at most 64 domains' }),
    hosts: z.array(str, { error: 'must be a list of host names' }).max(64, { error: 'at most 64 hosts' }).optional(),
  }),
  'rule.list': params({}),
  'rule.remove': params({ name: str }),
  'cluster.cpu': params({}),
  'cluster.place': params({ domain: str, ignoreRules: optBool }),
  // threshold: percentage points from the fleet's mean (default 20)
  'cluster.balance': params({ threshold: optNum(1, 100) }),
  // the automatic balancer, cluster-wide (cluster/balance.ts); what is not given stays as it is
  'cluster.autobalance': params({
    mode: z.enum(['off', 'auto'], { error: 'must be off or auto' }).optional(),
    threshold: z.number().int().min(1).max(100).optional(),
    holdSeconds: z.number().int().min(0).max(86400).optional(),
    intervalSeconds: z.number().int().min(5).max(3600).optional(),
  }),
  // relocation (destination side, asked by a peer ferryd over TLS): the protocol's own module
  ...RELOCATION_ACTIONS,
} as const;

export type Action = keyof typeof ACTIONS;
/** The validated params of action A. */
export type Params<A extends Action> = z.infer<(typeof ACTIONS)[A]>;
/** A validated request: `params` is typed by `action` (switch on it to narrow). */
export type Request = { [A in Action]: { id: number | string; action: A; params: Params<A>; attachment?: Buffer } }[Action];

/** Validates one parsed request line. Throws API_BAD_REQUEST / API_UNKNOWN_ACTION. */
export function parseRequest(raw: unknown): Request {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw))
    throw new FerryError('API_BAD_REQUEST', 'API request must be a JSON object');
  const r = raw as Record<string, unknown>;
  for (const k of Object.keys(r))
    if (!['id', 'action', 'params'].includes(k))
      throw new FerryError('API_BAD_REQUEST', `API request has an unknown key "${k.slice(0, 40)}"`);
  if (!((typeof r.id === 'number' && Number.isFinite(r.id)) || (typeof r.id === 'string' && r.id.length <= 64)))
    throw new FerryError('API_BAD_REQUEST', 'API request needs an "id" (number or short string)');
  if (typeof r.action !== 'string') throw new FerryError('API_BAD_REQUEST', 'API request needs an "action" string');
  if (!Object.prototype.hasOwnProperty.call(ACTIONS, r.action))
    throw new FerryError('API_UNKNOWN_ACTION', `Unknown API action "${r.action.slice(0, 60)}"`);
  const params = r.params ?? {};
  if (typeof params !== 'object' || params === null || Array.isArray(params))
    throw new FerryError('API_BAD_REQUEST', `"params" of ${r.action} must be an object`);
  // zod can throw on hostile values as it builds an issue's message (api/relocation.ts): malformed all the same.
  const malformed = new FerryError('API_BAD_REQUEST', `${r.action}: the parameters are malformed`);
  let parsed: ReturnType<(typeof ACTIONS)[Action]['safeParse']>;
  let refusal: FerryError | undefined;
  try {
    parsed = ACTIONS[r.action as Action].safeParse(params);
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      refusal =
        issue.code === 'unrecognized_keys'
          ? new FerryError('API_BAD_REQUEST', `${r.action}: unknown parameter "${String(issue.keys[0]).slice(0, 40)}"`)
          : new FerryError('API_BAD_REQUEST', `${r.action}: parameter "${String(issue.path[0] ?? '')}" ${issue.message}`);
    }
  } catch {
    throw malformed;
  }
  if (refusal) throw refusal;
  if (!parsed.success) throw malformed;
  return { id: r.id as number | string, action: r.action, params: parsed.data } as Request;
}
