/**
 * The API's actions, mapped onto the host (and, for migration.* and relocation.*, onto
 * the migration layer). One switch over the closed set in api/protocol.ts.
 */
import { FerryError, asFerryError } from '../errors.ts';
import type { Metrics } from './metrics.ts';
import type { Action, Request, Results } from '../api/protocol.ts';
import { API_VERSION } from '../api/protocol.ts';
import type { Host } from './host.ts';
import { FERRY_VERSION } from '../version.ts';
import type { ConnContext } from './server.ts';
import type { Migrations } from '../migration/manager.ts';
import type { ClusterAgent } from './cluster.ts';
import type { ClusterEventView } from '../api/protocol.ts';
import { Placement } from './placement.ts';
import { LocalRules } from './rules.ts';

/** Ties a handler's answer to its action's declared result (Results in api/protocol.ts): a mismatch does not compile. */
function answer<A extends Action>(_action: A, v: Results[A] | Promise<Results[A]>): Results[A] | Promise<Results[A]> {
  return v;
}

/** The exhaustive switches' default: compiles only if every action of the namespace has its case. */
function unknownAction(req: never): never {
  throw new FerryError('API_UNKNOWN_ACTION', `Unknown API action ${String((req as { action: unknown }).action)}`);
}

/** The relocation protocol's messages (peers) and the operator's migration actions go to the migration layer. */
type RelocationRequest = Extract<Request, { action: `relocation.${string}` }>;
type MigrationRequest = Extract<Request, { action: `migration.${string}` }>;
type ClusterRequest = Extract<Request, { action: `cluster.${string}` | `ha.${string}` | `rule.${string}` }>;
type HostRequest = Exclude<Request, RelocationRequest | MigrationRequest | ClusterRequest>;
const isRelocation = (r: Request): r is RelocationRequest => r.action.startsWith('relocation.');
const isMigration = (r: Request): r is MigrationRequest => r.action.startsWith('migration.');
const isCluster = (r: Request): r is ClusterRequest =>
  r.action.startsWith('cluster.') || r.action.startsWith('ha.') || r.action.startsWith('rule.');

/** What the handlers act on. */
interface Deps {
  host: Host;
  mig: () => Migrations;
  /** Cluster mode's agent, or CLUSTER_NOT_CONFIGURED. */
  cluster: () => ClusterAgent;
  /** Cluster mode's placement (rules, CPU baseline, balancer), or CLUSTER_NOT_CONFIGURED. */
  placement: () => Placement;
  /** Standalone: null. */
  placementIfAny: Placement | null;
  /** Standalone: the host's own placement rules. */
  localRules: LocalRules;
  /** A move refused before it had a job (source) or at Begin (destination): counted by code, then answered. */
  refused: <T>(side: 'source' | 'destination', p: Promise<T>) => Promise<T>;
}

export function makeHandler(host: Host, migration: Migrations | undefined, metrics?: Metrics, cluster?: ClusterAgent) {
  const placement = cluster ? new Placement(host, cluster) : null;
  const deps: Deps = {
    placementIfAny: placement,
    localRules: new LocalRules(host.cfg.stateDir, () => [host.cfg.name, ...Object.keys(host.peers())]),
    placement: () => {
      deps.cluster();
      return placement!;
    },
    host,
    cluster: () => {
      if (!cluster)
        throw new FerryError(
          'CLUSTER_NOT_CONFIGURED',
          `${host.cfg.name} runs standalone (no "cluster" section in its ferryd.json): there is no cluster to ask. See README "Cluster mode"`,
        );
      return cluster;
    },
    mig: () => {
      if (!migration) throw new FerryError('INTERNAL', 'migration is not available in this ferryd');
      return migration;
    },
    refused: (side, p) =>
      p.catch((e: unknown) => {
        metrics?.refusal(side, asFerryError(e).code);
        throw e;
      }),
  };
  // Each handler's switch sees its own actions' validated params (api/protocol.ts ACTIONS).
  return async (req: Request, ctx: ConnContext): Promise<unknown> => {
    if (isRelocation(req)) return relocationAction(req, ctx, deps);
    if (isMigration(req)) return migrationAction(req, deps);
    if (isCluster(req)) return clusterAction(req, ctx, deps);
    return hostAction(req, ctx, deps);
  };
}

function hostAction(req: HostRequest, ctx: ConnContext, { host }: Deps): unknown {
  switch (req.action) {
    case 'api.hello':
      return answer(req.action, { apiVersion: API_VERSION, version: FERRY_VERSION, host: host.cfg.name, caller: ctx.caller });
    case 'host.info':
      return answer(req.action, host.info());
    case 'host.maintenance':
      return answer(req.action, host.setMaintenance(req.params.on));
    case 'domain.list':
      return answer(
        req.action,
        host
          .all()
          .map((l) => host.summary(l))
          .sort((a, b) => String(a.name).localeCompare(String(b.name))),
      );
    case 'domain.info':
      return answer(req.action, host.domainInfo(req.params.domain));
    case 'domain.create':
      return answer(req.action, host.create(req.params.config, req.params.start !== false, req.params.paused === true));
    case 'domain.start':
      return answer(req.action, host.start(req.params.domain));
    case 'domain.pause':
      return answer(req.action, host.pause(req.params.domain));
    case 'domain.unpause':
      return answer(req.action, host.unpause(req.params.domain));
    case 'domain.shutdown':
      return answer(req.action, host.shutdown(req.params.domain, req.params.timeoutS ?? 60));
    case 'domain.destroy':
      return answer(req.action, host.destroy(req.params.domain));
    case 'domain.delete':
      return answer(req.action, host.delete(req.params.domain));
    case 'domain.save':
      return answer(
        req.action,
        host.save(req.params.domain, req.params.file, {
          anyPath: req.params.anyPath,
          local: ctx.caller.role === 'local',
          ...(req.params.stream ? { format: 'stream' as const } : {}),
        }),
      );
    case 'domain.restore':
      return answer(req.action, host.restore(req.params.file, { anyPath: req.params.anyPath, local: ctx.caller.role === 'local' }));
    case 'domain.sample-memory':
      return answer(req.action, host.sampleMemory(req.params.domain, req.params.startMiB, req.params.endMiB));
    case 'console.attach': {
      host.get(req.params.domain); // DOMAIN_NOT_FOUND before switching to raw
      ctx.send({ id: req.id, result: { attached: req.params.domain, host: host.cfg.name } });
      ctx.goRaw();
      host.attachConsole(req.params.domain, ctx.socket, req.params.replay ?? 0);
      return undefined;
    }
    case 'events.subscribe':
      return answer(req.action, { subscribed: subscribe(host, ctx, req.params.domain) });
    case 'net.tunnels':
      return answer(req.action, host.tunnelList());
    default:
      return unknownAction(req);
  }
}

function clusterAction(req: ClusterRequest, ctx: ConnContext, deps: Deps): unknown {
  // Standalone hosts keep their own rules (daemon/rules.ts); everything else here needs the cluster.
  if (!deps.placementIfAny && req.action.startsWith('rule.')) return localRuleAction(req, deps.localRules);
  const c = deps.cluster();
  switch (req.action) {
    case 'cluster.status':
      return answer(req.action, c.status());
    case 'cluster.domains':
      return answer(req.action, c.domains());
    case 'cluster.fleet':
      return answer(req.action, c.fleet());
    case 'cluster.events':
      return answer(req.action, clusterEvents(c, ctx, req.params));
    case 'cluster.leave':
      return answer(req.action, c.leave());
    case 'ha.set':
      return answer(req.action, c.haSet(req.params.domain, req.params.on ? { priority: Math.round(req.params.priority ?? 0) } : null));
    case 'ha.status':
      return answer(
        req.action,
        c.domains().filter((d) => d.ha),
      );
    case 'rule.add':
      return answer(req.action, deps.placement().addRule({ ...req.params, hosts: req.params.hosts ?? [] }));
    case 'rule.list':
      return answer(req.action, deps.placement().rules());
    case 'rule.remove':
      return answer(req.action, deps.placement().removeRule(req.params.name));
    case 'cluster.cpu':
      return answer(req.action, deps.placement().cpu());
    case 'cluster.place':
      return answer(req.action, deps.placement().place(req.params.domain, req.params.ignoreRules === true));
    case 'cluster.balance':
      return answer(req.action, deps.placement().balance(req.params.threshold === undefined ? undefined : req.params.threshold / 100));
    case 'cluster.autobalance':
      return answer(req.action, deps.placement().setAuto(req.params));
    default:
      return unknownAction(req);
  }
}

/** The last events; with follow, each new one goes down the connection (event cluster.event) until it closes. */
async function clusterEvents(c: ClusterAgent, ctx: ConnContext, p: { limit?: number; follow?: boolean }): Promise<ClusterEventView[]> {
  const list = await c.events.list(Math.round(p.limit ?? 50));
  if (p.follow) {
    const stop = await c.events.follow((e) => ctx.send({ event: 'cluster.event', data: e }));
    ctx.onClose(() => void stop());
  }
  return list;
}

/** events.subscribe: the host's events (of one domain, or all) go down the connection until it closes. */
function subscribe(host: Host, ctx: ConnContext, want: string | undefined): string[] {
  const names = [
    'domain.state',
    'migration.progress',
    'domain.progress',
    'migration.phase',
    'migration.waiting',
    'migration.settled',
    'migration.done',
    'migration.queue',
    'host.maintenance',
    'cluster.changed',
  ];
  const fns = names.map((n) => {
    const f = (data: { domain?: string }): void => {
      if (!want || data.domain === want) ctx.send({ event: n, data });
    };
    host.on(n, f);
    return [n, f] as const;
  });
  ctx.onClose(() => {
    for (const [n, f] of fns) host.off(n, f);
  });
  return names;
}

/** `ferry rule` on a standalone host: its own list (daemon/rules.ts). */
function localRuleAction(req: ClusterRequest, rules: LocalRules): unknown {
  switch (req.action) {
    case 'rule.add':
      return answer(req.action, rules.add({ ...req.params, hosts: req.params.hosts ?? [] }));
    case 'rule.list':
      return answer(req.action, rules.list());
    case 'rule.remove':
      return answer(req.action, rules.remove(req.params.name));
    default:
      throw new FerryError('INTERNAL', `${req.action} is no rule action`);
  }
}

/** The source side, for the operator. */
function migrationAction(req: MigrationRequest, { mig, refused, placementIfAny }: Deps): unknown {
  switch (req.action) {
    case 'migration.start': {
      // Cluster mode: the placement rules first (PLACEMENT_RULE), and a balancer's move is held (daemon/placement.ts).
      const { ignoreRules: _standaloneHasNoRules, ...params } = req.params;
      return answer(
        req.action,
        refused('source', placementIfAny ? placementIfAny.startMove(req.params, mig()) : mig().source.start(params)),
      );
    }
    case 'migration.plan':
      return answer(req.action, mig().source.planOnly(req.params));
    case 'migration.cancel':
      return answer(req.action, mig().source.cancel(req.params.domain));
    case 'migration.resolve':
      return answer(req.action, mig().source.resolveByOperator(req.params.domain, req.params.assume));
    case 'migration.jobs':
      return answer(req.action, mig().jobs());
    case 'migration.job':
      return answer(req.action, mig().job(req.params.domain));
    default:
      return unknownAction(req);
  }
}

/** The destination side (and a home end's tunnel), for peers. */
function relocationAction(req: RelocationRequest, ctx: ConnContext, { host, mig, refused }: Deps): unknown {
  switch (req.action) {
    case 'relocation.begin':
      return answer(req.action, refused('destination', mig().dest.begin(req.params, ctx)));
    case 'relocation.prepare':
      return answer(req.action, mig().dest.prepare(req.params, ctx));
    case 'relocation.digest':
      return answer(req.action, mig().dest.digest(req.params, ctx));
    case 'relocation.repair':
      return answer(req.action, mig().dest.repair(req.params, ctx, req.attachment));
    case 'relocation.finish':
      return answer(req.action, mig().dest.finish(req.params, ctx));
    case 'relocation.abandon':
      return answer(req.action, mig().dest.abandon(req.params, ctx));
    case 'relocation.confirm':
      return answer(req.action, mig().dest.confirm(req.params, ctx));
    case 'relocation.recover':
      return answer(req.action, mig().dest.recover(req.params, ctx));
    case 'relocation.lost':
      return answer(req.action, mig().dest.lost(req.params, ctx));
    case 'relocation.status':
      return answer(req.action, mig().dest.status(req.params, ctx));
    case 'relocation.tunnel':
      return answer(req.action, { remotes: host.tunnelFromPeer(req.params, (ctx.caller.peerAddress ?? '').replace(/^::ffff:/, '')) });
    default:
      return unknownAction(req);
  }
}
