/**
 * `ferry cluster balance`: first a move for each domain that breaks a rule where it runs
 * (a rule added after it was placed, or a soft one an HA restart had to break), as DRS
 * corrects rule violations before it balances; then the fewest moves that bring every
 * host's memory and CPU load within `threshold` of the fleet's mean, none that breaks a
 * rule (soft ones included) or overloads its destination. Pure, so a second run right after an applied one sees
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
  /** Rules still broken after the recommended moves, by the domain that breaks them: no move could end the breach (held, no room, or every destination would break another rule or pass the threshold). */
  broken: string[];
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

/**
 * The fleet's loads as the balancer's moves change them: memory and CPU held per host,
 * where each domain is, and the move to make next. One per balance() call.
 */
class Loads {
  private readonly mem: Map<string, number>;
  private readonly cpu: Map<string, number>;
  readonly where: Map<string, string>;
  /** Running domains whose CPU load is not known yet; CPU is judged only when there are none. */
  readonly unmeasured: string[];
  readonly cpuJudged: boolean;
  readonly mean: { mem: number; cpu: number };
  readonly before: HostLoad[];

  constructor(
    private readonly live: HostView[],
    domains: DomainView[],
    private readonly t: number,
  ) {
    // Memory held: the running domains' own, from where the cluster's records put them
    // (current the moment a move hands over, unlike a host's free memory, published every few seconds).
    this.mem = new Map(live.map((h) => [h.name, 0]));
    this.cpu = new Map(live.map((h) => [h.name, 0]));
    this.where = new Map(domains.map((d) => [d.name, d.host]));
    for (const d of domains) if (this.mem.has(d.host) && !d.stopped) this.shift(d, null, d.host, 1);
    // CPU is judged only when every running domain has a window's measure: a domain that just
    // moved reads as idle on its new host, and judging on that would move others back.
    this.unmeasured = domains.filter((d) => !d.stopped && d.cpu === undefined).map((d) => d.name);
    this.cpuJudged = this.unmeasured.length === 0;
    this.before = this.loads();
    const n = Math.max(1, this.before.length);
    this.mean = { mem: this.before.reduce((a, l) => a + l.mem, 0) / n, cpu: this.before.reduce((a, l) => a + l.cpu, 0) / n };
  }

  /** Moves d's memory and CPU from one host's count (none: counting it in) to another's (sign -1: back). */
  private shift(d: DomainView, from: string | null, to: string, sign: 1 | -1): void {
    if (from !== null) {
      this.mem.set(from, (this.mem.get(from) ?? 0) - sign * d.memoryMiB);
      this.cpu.set(from, (this.cpu.get(from) ?? 0) - sign * (d.cpu ?? 0));
    }
    this.mem.set(to, (this.mem.get(to) ?? 0) + sign * d.memoryMiB);
    this.cpu.set(to, (this.cpu.get(to) ?? 0) + sign * (d.cpu ?? 0));
  }

  counts(host: string): boolean {
    return this.mem.has(host);
  }

  loads(): HostLoad[] {
    return this.live.map((h) => ({
      host: h.name,
      mem: h.memoryMiB > 0 ? (this.mem.get(h.name) ?? 0) / h.memoryMiB : 0,
      cpu: (this.cpu.get(h.name) ?? 0) / Math.max(1, h.cores ?? 1),
    }));
  }

  private score(ls: HostLoad[]): number {
    const m = this.mean;
    return ls.reduce((a, l) => a + (l.mem - m.mem) ** 2 + (this.cpuJudged ? (l.cpu - m.cpu) ** 2 : 0), 0);
  }

  over(l: HostLoad): boolean {
    return l.mem - this.mean.mem > this.t || (this.cpuJudged && l.cpu - this.mean.cpu > this.t);
  }

  /**
   * Of the candidates, the move that leaves the load most even (equal: the cheaper domain):
   * to a host it fits, breaking no rule, that stays within the threshold; `mustGain`: only
   * a move that lowers the imbalance.
   */
  best(candidates: DomainView[], rules: Rule[], mustGain: boolean): { d: DomainView; to: string } | null {
    const s0 = this.score(this.loads());
    let best: { d: DomainView; to: string; gain: number } | null = null;
    for (const d of candidates) {
      const from = this.where.get(d.name)!;
      for (const h of this.live) {
        if (h.name === from) continue;
        if (unfit({ ...d, host: from }, h, h.memoryMiB - (this.mem.get(h.name) ?? 0))) continue;
        if (broken(d.name, h.name, this.where, rules).length) continue;
        // Try it: the destination must not become a hot host itself.
        this.shift(d, from, h.name, 1);
        const ls = this.loads();
        const gain = s0 - this.score(ls);
        this.shift(d, from, h.name, -1);
        if (this.over(ls.find((l) => l.host === h.name)!) || (mustGain && gain <= 1e-6)) continue;
        if (!best || gain > best.gain + 1e-9 || (Math.abs(gain - best.gain) <= 1e-9 && cheaper(d, best.d))) best = { d, to: h.name, gain };
      }
    }
    return best;
  }

  /** Counts the move made: its record, the loads and where it is. */
  move(d: DomainView, to: string, why: string): BalanceMove {
    const from = this.where.get(d.name)!;
    this.shift(d, from, to, 1);
    this.where.set(d.name, to);
    return { domain: d.name, from, to, memoryMiB: d.memoryMiB, dirtyRateMBps: d.dirtyRateMBps ?? null, why };
  }
}

export function balance(
  hosts: HostView[],
  domains: DomainView[],
  o: { rules: Rule[]; threshold: number; held?: Set<string>; maxMoves?: number },
): Balance {
  const f = new Loads(
    hosts.filter((h) => !h.maintenance),
    domains,
    o.threshold,
  );
  const { mean, where } = f;
  const t = o.threshold;
  // Each domain moves at most once per round; held ones, and those on hosts in maintenance, not at all.
  const movable = new Set(domains.filter((d) => !d.stopped && !o.held?.has(d.name) && f.counts(d.host)));
  const moves: BalanceMove[] = [];
  const maxMoves = o.maxMoves ?? domains.length;
  /** The running domains that break a rule where they are, and how. */
  const breaking = (): { d: DomainView; why: string[] }[] =>
    domains
      .filter((d) => !d.stopped && f.counts(where.get(d.name) ?? ''))
      .map((d) => ({ d, why: broken(d.name, where.get(d.name)!, where, o.rules).map((b) => b.why) }))
      .filter((x) => x.why.length);
  // First the rules: a move that ends a breach, even one that leaves the load less even.
  while (moves.length < maxMoves) {
    const breaches = breaking().filter((x) => movable.has(x.d));
    const best = f.best(
      breaches.map((x) => x.d),
      o.rules,
      false,
    );
    if (!best) break;
    const why = breaches.find((x) => x.d === best.d)!.why;
    moves.push(f.move(best.d, best.to, `on ${where.get(best.d.name)} it breaks ${why.join('; ')}`));
    movable.delete(best.d);
  }
  // Then the load: from a host above the threshold only, and only a move that lowers the imbalance.
  let stuck: string | null = null;
  while (moves.length < maxMoves) {
    const now = f.loads();
    const hot = now.filter((l) => f.over(l));
    if (!hot.length) break;
    const best = f.best(
      [...movable].filter((x) => hot.some((l) => l.host === where.get(x.name))),
      o.rules,
      true,
    );
    if (!best) {
      stuck = `${hot.map((l) => l.host).join(', ')} above the threshold, but no move fits the rules and the other hosts' room`;
      break;
    }
    const l = now.find((x) => x.host === where.get(best.d.name))!;
    const dim = l.mem - mean.mem > t ? `memory ${pct(l.mem)}` : `CPU ${pct(l.cpu)}`;
    moves.push(
      f.move(
        best.d,
        best.to,
        `${l.host} ${dim} against a mean of ${pct(l.mem - mean.mem > t ? mean.mem : mean.cpu)} (threshold ${pct(t)})`,
      ),
    );
    movable.delete(best.d);
  }
  return {
    threshold: t,
    mean,
    before: f.before,
    after: f.loads(),
    moves,
    stuck,
    cpuJudged: f.cpuJudged,
    unmeasured: f.unmeasured,
    broken: breaking().map(({ d, why }) => `${d.name} on ${where.get(d.name)}: ${why.join('; ')}`),
  };
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
