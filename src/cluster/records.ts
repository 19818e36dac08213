/**
 * What ferry keeps in etcd, under /ferry/, and the shape of each record (zod: a record
 * changed by hand or by another version is CLUSTER_BAD_RECORD, never acted on).
 *
 *   /ferry/hosts/NAME       HostFacts, attached to the host's lease: gone when the host is
 *   /ferry/alive/NAME       the host's heartbeat, rewritten at every lease renewal (its revision is
 *                           what the HA manager watches: cluster/member.ts, cluster/ha.ts)
 *   /ferry/domains/NAME     OwnerRecord: who may run the domain; its mod revision is the fencing token
 *   /ferry/events/TIME-SEQ  ClusterEvent: the cluster's event log (`ferry events`)
 *   /ferry/rules            every placement rule, one JSON list (cluster/rules.ts; `ferry rule`)
 *   /ferry/balance          the automatic balancer's setting (cluster/balance.ts; `ferry cluster balance --auto`)
 *   /ferry/held/DOMAIN      a domain the balancer moved, under a lease of the hold time
 *   /ferry/election/ha/...  the HA manager's election (etcd3's Election)
 */
import { z } from 'zod';
import { FerryError } from '../errors.ts';

export const ROOT = '/ferry/';
export const HOSTS = `${ROOT}hosts/`;
export const DOMAINS = `${ROOT}domains/`;
export const EVENTS = `${ROOT}events/`;
export const ALIVE = `${ROOT}alive/`;
export const HA_ELECTION = 'ha-manager';
export const hostKey = (name: string): string => `${HOSTS}${name}`;
export const domainKey = (name: string): string => `${DOMAINS}${name}`;
export const aliveKey = (name: string): string => `${ALIVE}${name}`;
export const nameOfKey = (key: string): string => key.slice(key.lastIndexOf('/') + 1);

const name = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/);

/** What a host publishes under its lease: what placement needs to know of it. */
export const HostFactsSchema = z.object({
  name,
  ferry: z.string(),
  /** QEMU's version and the accelerator: a domain restarts only where both fit. */
  engine: z.string(),
  accel: z.string(),
  cpuModel: z.string(),
  /** The CPU models a domain can run with there (its QEMU, accelerator and cpuCeiling allow), and the ceiling. */
  cpuModels: z.array(z.string()).default([]),
  cpuCeiling: z.string().nullable().default(null),
  memoryMiB: z.number().int().nonnegative(),
  freeMiB: z.number().int(),
  /** Cores for domains, and each running domain's CPU use (cores, averaged over the load window): the balancer's measure. */
  cores: z.number().int().positive().default(1),
  load: z.record(z.string(), z.number().nonnegative()).default({}),
  /** Each running domain's dirty rate, MB/s, measured about once a minute: among equally good moves the balancer takes the one that dirties least. */
  dirty: z.record(z.string(), z.number().nonnegative()).default({}),
  maintenance: z.boolean(),
  /** Its line of outgoing moves (migration/queue.ts), running and waiting: the dashboard shows it, the automatic balancer waits for it. */
  moves: z
    .array(
      z.object({
        domain: z.string(),
        dest: z.string(),
        priority: z.string(),
        state: z.enum(['running', 'queued']),
        position: z.number().int().nullable(),
        etaMs: z.number().nullable(),
      }),
    )
    .default([]),
  /** The networks (ferryd.json "networks") its domains' NICs may name: placement needs each NIC's. */
  networks: z.array(z.string()).default([]),
  /** ADDRESS:PORT of its relocation (TLS API) port. */
  relocation: z.string(),
  /** When this lease began (ISO). */
  since: z.string(),
});
export type HostFacts = z.infer<typeof HostFactsSchema>;

/**
 * A domain's lifecycle as the cluster sees it:
 *   running     its owner runs it (or has the right to)
 *   stopped     shut off on its owner
 *   restarting  the HA manager gave it to `owner`, which has not started it yet
 *   failed      the HA restart could not run it (note says why)
 */
export const OWNER_STATES = ['running', 'stopped', 'restarting', 'failed'] as const;
export type OwnerState = (typeof OWNER_STATES)[number];

export const OwnerRecordSchema = z.object({
  name,
  uuid: z.string(),
  owner: name,
  /** Bumped by every change of owner or run: with the revision, it orders what happened. */
  generation: z.number().int().positive(),
  state: z.enum(OWNER_STATES),
  /** HA restart (`ferry ha add`), with its priority (higher first); null: not restarted elsewhere. */
  ha: z.object({ priority: z.number().int() }).nullable(),
  /** The domain's config, as the owner runs it: what another host starts it from. */
  config: z.record(z.string(), z.unknown()),
  /** The CPU model and accelerator it runs with: a restart goes only where they are the same. */
  cpuModel: z.string(),
  accel: z.string(),
  memoryMiB: z.number().int().positive(),
  /** Whether another host can run it (no disk on the owner's own storage), and why not. */
  restartable: z.object({ ok: z.boolean(), why: z.string() }),
  /** A live move in progress: the destination takes ownership only for this job (migration's point of no return). */
  moving: z.object({ job: z.string(), to: name }).nullable(),
  /**
   * The owner's lease when it took the record ('' when the HA manager assigned it and the
   * new owner has not claimed it yet). The HA manager restarts a domain only when its
   * owner has no host key *and* this lease is gone: a key deleted by hand does not make a
   * living host look dead.
   */
  lease: z.string(),
  /** How the owner came to own it: "start", "job ID" (a move's handover), "ha" (a restart). */
  via: z.string(),
  note: z.string(),
  at: z.string(),
});
export type OwnerRecord = z.infer<typeof OwnerRecordSchema>;

export const EVENT_TYPES = [
  'host-up',
  'host-down',
  'fenced',
  'restarted',
  'restart-failed',
  'not-restartable',
  'moved',
  'ha-manager',
  'ha-added',
  'ha-removed',
  'stale-copy',
  'rule-broken',
  'rule-added',
  'rule-removed',
  'balance-set',
  'balance-move',
  'balance-failed',
] as const;
export const ClusterEventSchema = z.object({
  at: z.string(),
  type: z.enum(EVENT_TYPES),
  /** The host that wrote it. */
  by: z.string(),
  host: z.string().optional(),
  domain: z.string().optional(),
  detail: z.string(),
});
export type ClusterEvent = z.infer<typeof ClusterEventSchema>;

export function parser<T>(schema: z.ZodType<T>, what: string): (v: unknown, key: string) => T {
  return (v, key) => {
    const r = schema.safeParse(v);
    if (!r.success)
      throw new FerryError(
        'CLUSTER_BAD_RECORD',
        `etcd key ${key} is not a ${what} ferry wrote (${r.error.issues[0]?.path.join('.') || 'value'}: ${r.error.issues[0]?.message}); not acted on`,
      );
    return r.data;
  };
}
export const parseHostFacts = parser(HostFactsSchema, 'host record');
export const parseOwnerRecord = parser(OwnerRecordSchema, 'domain ownership record');
export const parseClusterEvent = parser(ClusterEventSchema, 'cluster event');

/** Event keys sort by time: 13-digit milliseconds, then a per-writer sequence. */
let seq = 0;
export function eventKey(atMs: number, by: string): string {
  seq = (seq + 1) % 1_000_000;
  return `${EVENTS}${String(atMs).padStart(13, '0')}-${by}-${String(seq).padStart(6, '0')}`;
}
