/**
 * `ferry cluster balance`: the fewest moves that bring every host's memory and CPU load
 * within `threshold` of the fleet's mean, none that breaks a rule (soft ones included)
 * or overloads its destination. Pure, so a second run right after an applied one sees
 * the fleet balanced and recommends nothing (no ping-pong): a move is only made from a
 * host above mean + threshold, only to a host that stays at or below it, and only when
 * it lowers the imbalance.
 *
 * Load: memory is what the host's running domains hold of what it offers (what admission
 * counts: ferry does not overcommit); CPU is the cores its domains used, each averaged
 * over ferryd's load window (daemon/load.ts), over its cores. The dirty rate is a move's
 * cost, not load: among moves that even the load out equally, the one that dirties least. Hosts in maintenance and their domains are left to the evacuation; domains
 * that are moving, shut off or held (moved by the balancer within its hold time) stay.
 */
import { broken, unfit, type DomainView, type HostView } from './place.ts';
import type { Rule } from './rules.ts';

export interface HostLoad {
  host: string;
  /** Fractions of what the host offers: memory held by domains, CPU used by them. */
  mem: number;
  cpu: number;
}
export interface BalanceMove {
  domain: string;
  from: string;
  to: string;
  memoryMiB: number;
  /** Its dirty rate when last measured (MB/s), or null: what the move must outrun. */
  dirtyRateMBps: number | null;
  why: string;
}
export interface Balance {
  threshold: number;
  mean: { mem: number; cpu: number };
  before: HostLoad[];
  after: HostLoad[];
  moves: BalanceMove[];
  /** Why nothing (more) was recommended, when a host is still above the threshold. */
  stuck: string | null;
  /** Whether CPU was judged: not while a running domain has no load measured over the window yet (just started or moved). */
  cpuJudged: boolean;
  /** Domains whose CPU load is not known yet. */
  unmeasured: string[];
}

/** The automatic balancer's cluster-wide setting (stored in etcd: cluster/balance.ts). */
export interface BalanceSettings {
  mode: 'off' | 'auto';
  /** Percentage points from the fleet's mean a host may be before the balancer moves a domain off it. */
  threshold: number;
  /** A domain the balancer moved stays where it went this long. */
  holdSeconds: number;
  /** How often each ferryd looks. */
  intervalSeconds: number;
}

/** A domain the balancer moved, held where it went until the hold's lease ends. */
export interface Hold {
  domain: string;
  from: string;
  to: string;
  /** When (ISO). */
  at: string;
  holdSeconds: number;
}

/** The setting in words (`ferry cluster balance`, the event log). */
export function describeAuto(s: BalanceSettings): string {
  return s.mode === 'auto'
    ? `on: every ${s.intervalSeconds} s, threshold ${s.threshold} percentage points, a moved domain held ${s.holdSeconds} s`
    : 'off';
}

const pct = (x: number): string => `${Math.round(x * 100)}%`;

/**
 * Between two moves that even the load out as well: the one that dirties less (cheaper to
 * move live), then the smaller. Not measured yet ranks after any measured rate: it may
 * be a busy writer.
 */
function cheaper(a: DomainView, b: DomainView): boolean {
  const da = a.dirtyRateMBps ?? Infinity,
    db = b.dirtyRateMBps ?? Infinity;
  return da !== db ? da < db : a.memoryMiB < b.memoryMiB;
}

export function balance(
  hosts: HostView[],
  domains: DomainView[],
  o: { rules: Rule[]; threshold: number; held?: Set<string>; maxMoves?: number },
): Balance {
  const live = hosts.filter((h) => !h.maintenance);
  // CPU is judged only when every running domain has a window's measure: a domain that just
  // moved reads as idle on its new host, and judging on that would move others back.
  const unmeasured = domains.filter((d) => !d.stopped && d.cpu === undefined).map((d) => d.name);
  const cpuJudged = unmeasured.length === 0;
  // Memory held: the running domains' own, from where the cluster's records put them
  // (current the moment a move hands over, unlike a host's free memory, published every few seconds).
  const memUsed = new Map(live.map((h) => [h.name, 0]));
  for (const d of domains) if (memUsed.has(d.host) && !d.stopped) memUsed.set(d.host, (memUsed.get(d.host) ?? 0) + d.memoryMiB);
  const cpuUsed = new Map(live.map((h) => [h.name, 0]));
  const where = new Map(domains.map((d) => [d.name, d.host]));
  for (const d of domains) if (cpuUsed.has(d.host) && !d.stopped) cpuUsed.set(d.host, (cpuUsed.get(d.host) ?? 0) + (d.cpu ?? 0));
  /** Moves d's memory and CPU from one host's count to another's (sign -1: back). */
  const shift = (d: DomainView, from: string, to: string, sign: 1 | -1): void => {
    memUsed.set(from, (memUsed.get(from) ?? 0) - sign * d.memoryMiB);
    memUsed.set(to, (memUsed.get(to) ?? 0) + sign * d.memoryMiB);
    cpuUsed.set(from, (cpuUsed.get(from) ?? 0) - sign * (d.cpu ?? 0));
    cpuUsed.set(to, (cpuUsed.get(to) ?? 0) + sign * (d.cpu ?? 0));
  };
  const loads = (): HostLoad[] =>
    live.map((h) => ({
      host: h.name,
      mem: h.memoryMiB > 0 ? (memUsed.get(h.name) ?? 0) / h.memoryMiB : 0,
      cpu: (cpuUsed.get(h.name) ?? 0) / Math.max(1, h.cores ?? 1),
    }));
  const before = loads();
  const n = Math.max(1, before.length);
  const mean = { mem: before.reduce((a, l) => a + l.mem, 0) / n, cpu: before.reduce((a, l) => a + l.cpu, 0) / n };
  const t = o.threshold;
  const score = (ls: HostLoad[]): number => ls.reduce((a, l) => a + (l.mem - mean.mem) ** 2 + (cpuJudged ? (l.cpu - mean.cpu) ** 2 : 0), 0);
  const over = (l: HostLoad): boolean => l.mem - mean.mem > t || (cpuJudged && l.cpu - mean.cpu > t);
  const movable = domains.filter((d) => !d.stopped && !o.held?.has(d.name) && memUsed.has(d.host));
  const moves: BalanceMove[] = [];
  let stuck: string | null = null;
  for (let i = 0; i < (o.maxMoves ?? domains.length); i++) {
    const now = loads();
    const hot = now.filter(over);
    if (!hot.length) {
      stuck = null;
      break;
    }
    const s0 = score(now);
    let best: { d: DomainView; to: string; gain: number } | null = null;
    for (const d of movable.filter((x) => hot.some((l) => l.host === where.get(x.name)))) {
      const from = where.get(d.name)!;
      for (const h of live) {
        if (h.name === from) continue;
        if (unfit({ ...d, host: from }, h, h.memoryMiB - (memUsed.get(h.name) ?? 0))) continue;
        if (broken(d.name, h.name, where, o.rules).length) continue;
        // Try it: the destination must not become a hot host itself.
        shift(d, from, h.name, 1);
        const ls = loads();
        const dest = ls.find((l) => l.host === h.name)!;
        const gain = s0 - score(ls);
        shift(d, from, h.name, -1);
        if (over(dest) || gain <= 1e-6) continue;
        if (!best || gain > best.gain + 1e-9 || (Math.abs(gain - best.gain) <= 1e-9 && cheaper(d, best.d))) best = { d, to: h.name, gain };
      }
    }
    if (!best) {
      stuck = `${hot.map((l) => l.host).join(', ')} above the threshold, but no move fits the rules and the other hosts' room`;
      break;
    }
    const from = where.get(best.d.name)!;
    const l = now.find((x) => x.host === from)!;
    const dim = l.mem - mean.mem > t ? `memory ${pct(l.mem)}` : `CPU ${pct(l.cpu)}`;
    moves.push({
      domain: best.d.name,
      from,
      to: best.to,
      memoryMiB: best.d.memoryMiB,
      dirtyRateMBps: best.d.dirtyRateMBps ?? null,
      why: `${from} ${dim} against a mean of ${pct(l.mem - mean.mem > t ? mean.mem : mean.cpu)} (threshold ${pct(t)})`,
    });
    shift(best.d, from, best.to, 1);
    where.set(best.d.name, best.to);
    movable.splice(movable.indexOf(best.d), 1); // each domain moves at most once per round
  }
  return { threshold: t, mean, before, after: loads(), moves, stuck, cpuJudged, unmeasured };
}

/** What the automatic balancer looks at before a round: the fleet as placement sees it, and the moves in line anywhere. */
export interface AutoFleet {
  quorate: boolean;
  hosts: HostView[];
  /** Domains moving now (a record marked moving), anywhere. */
  moving: string[];
  /** Moves waiting in some host's line (published with the host's facts). */
  queued: number;
}

/**
 * Why the automatic balancer sits a round out, or null when it may balance. It never
 * fights an evacuation or maintenance (a host in maintenance is being emptied: every
 * move it makes changes the loads) nor a move in flight or in line (the loads it
 * would read are about to change), and never acts on a view that may be stale.
 */
export function autoSkip(f: AutoFleet, me: string): string | null {
  if (!f.quorate) return 'this host cannot reach etcd: its view of the fleet may be stale';
  const maint = f.hosts.filter((h) => h.maintenance).map((h) => h.name);
  if (maint.length) return `${maint.join(', ')} in maintenance: the evacuation goes first`;
  if (!f.hosts.some((h) => h.name === me)) return `${me} has no live lease`;
  if (f.moving.length) return `${f.moving.join(', ')} moving: the loads are about to change`;
  if (f.queued) return `${f.queued} move(s) waiting in line: the loads are about to change`;
  if (f.hosts.length < 2) return 'one host: nowhere to move to';
  return null;
}
