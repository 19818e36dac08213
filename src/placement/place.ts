/**
 * Where a domain goes: one set of checks for every placement ferry makes (`ferry migrate
 * DOMAIN` without a destination, `host evacuate`, the HA restart, the balancer), so they
 * never disagree. Pure: unit-tested, and `--plan` shows exactly what a real run does.
 *
 * A host can take a domain when it is up and not in maintenance, runs the accelerator
 * the domain runs under, can give the domain's CPU model (its models, within its
 * ceiling), has every network the domain's NICs name and the free memory (counting
 * what this round already placed there). Then the rules (rules.ts): a hard one never
 * broken; a soft one broken only where the caller allows it (the HA restart), and said.
 * Among the hosts left: the one with the most memory left, preferred hosts first.
 */
import { FerryError } from '../errors.ts';
import { isHard, rulesOf, type Rule } from './rules.ts';

export interface HostView {
  name: string;
  /** Memory it offers domains, and what is free of it now (MiB). */
  memoryMiB: number;
  freeMiB: number;
  /** The CPU models a domain can run with there; null: not known (a standalone peer of an older ferry): only its own model. */
  cpuModels: string[] | null;
  cpuModel: string;
  accel: string;
  networks: string[];
  maintenance: boolean;
  /** Cores for domains, and the CPU its domains used lately (cores, averaged): the balancer's measure. */
  cores?: number;
}

export interface DomainView {
  name: string;
  /** Where it is now (the host it leaves, for a move). */
  host: string;
  memoryMiB: number;
  cpuModel: string;
  accel?: string;
  networks: string[];
  /** Shut off: only its definition moves, so it needs no memory now. */
  stopped?: boolean;
  dirtyRateMBps?: number | null;
  /** Cores it used lately (averaged over the load window): the balancer's measure. */
  cpu?: number;
}

/** What a cluster host publishes (cluster/records.ts HostFacts, the API's ClusterHostFacts), as placement sees it. */
export function hostView(h: Omit<HostView, 'cpuModels'> & { cpuModels: string[] }): HostView {
  return {
    name: h.name,
    memoryMiB: h.memoryMiB,
    freeMiB: h.freeMiB,
    // An empty list: a host of an older ferry that publishes none; placement falls back to its own model.
    cpuModels: h.cpuModels.length ? h.cpuModels : null,
    cpuModel: h.cpuModel,
    accel: h.accel,
    networks: h.networks,
    maintenance: h.maintenance,
    cores: h.cores,
  };
}

/** Where every domain is, or is going (a move under way counts at its destination): what keep-apart and keep-together read. */
export function whereOf(domains: { name: string; owner: string; moving: { to: string } | null }[]): Map<string, string> {
  return new Map(domains.map((d) => [d.name, d.moving?.to ?? d.owner]));
}

/** A host's reason not to take a domain at all (rules aside), or null. */
export function unfit(d: DomainView, h: HostView, freeLeft: number): string | null {
  if (h.maintenance) return `${h.name} is in maintenance`;
  if (d.accel && h.accel !== d.accel) return `${h.name} runs domains under ${h.accel}, ${d.name} runs under ${d.accel}`;
  const models = h.cpuModels ?? [h.cpuModel];
  if (!d.stopped && !models.includes(d.cpuModel)) return `${h.name} cannot give CPU model ${d.cpuModel}`;
  const miss = d.networks.filter((n) => !h.networks.includes(n));
  if (miss.length) return `${h.name} lacks network ${miss.join(', ')}`;
  const need = d.stopped ? 0 : d.memoryMiB;
  if (freeLeft < need) return `${h.name} has ${freeLeft} MiB free, needs ${need}`;
  return null;
}

/** Where every other domain is (or goes, this round): what keep-apart and keep-together read. */
export type Where = Map<string, string>;

/**
 * The rules domain `d` would break on host `h`: keep-apart (another of the rule's domains
 * is there), keep-together (another is elsewhere; one whose place is unknown or still
 * to be decided binds nothing), prefer-hosts (h is not one), avoid-hosts (h is one).
 */
export function broken(d: string, h: string, where: Where, rules: Rule[]): { rule: Rule; why: string }[] {
  const out: { rule: Rule; why: string }[] = [];
  for (const r of rulesOf(d, rules)) {
    const others = r.domains.filter((x) => x !== d);
    if (r.kind === 'keep-apart') {
      const there = others.filter((x) => where.get(x) === h);
      if (there.length)
        out.push({ rule: r, why: `keep-apart rule "${r.name}": ${there.join(', ')} ${there.length > 1 ? 'run' : 'runs'} on ${h}` });
    } else if (r.kind === 'keep-together') {
      const away = others.filter((x) => where.has(x) && where.get(x) !== h);
      if (away.length)
        out.push({ rule: r, why: `keep-together rule "${r.name}": ${away.map((x) => `${x} is on ${where.get(x)}`).join(', ')}` });
    } else if (r.kind === 'prefer-hosts') {
      if (!r.hosts.includes(h)) out.push({ rule: r, why: `prefer-hosts rule "${r.name}": ${h} is not one of ${r.hosts.join(', ')}` });
    } else if (r.hosts.includes(h)) out.push({ rule: r, why: `avoid-hosts rule "${r.name}": ${d} avoids ${h}` });
  }
  return out;
}

/** How rule `r` is broken where its domains run now (a rule added after they were placed): a line per domain that breaks it. */
export function breaches(r: Rule, where: Where): string[] {
  return r.domains
    .filter((d) => where.has(d))
    .flatMap((d) => broken(d, where.get(d)!, where, [r]).map((b) => `${d} on ${where.get(d)}: ${b.why}`));
}

export interface Choice {
  domain: string;
  to: string | null;
  why: string;
  /** Soft rules broken to place it (the HA restart only), in words. */
  broke: string[];
}

export interface ChooseOpts {
  where: Where;
  rules: Rule[];
  /** Memory already promised this round, MiB by host. */
  placed?: Map<string, number>;
  /** The HA restart: a soft rule may give way when nothing else is left (never a hard one). */
  softMayBreak?: boolean;
}

/** The best host for one domain among `hosts` (its own host excluded), or why there is none. */
export function choose(d: DomainView, hosts: HostView[], o: ChooseOpts): Choice {
  const placed = o.placed ?? new Map<string, number>();
  const why: string[] = [];
  const ok: { h: HostView; left: number; soft: string[] }[] = [];
  for (const h of hosts) {
    if (h.name === d.host) continue;
    const left = h.freeMiB - (placed.get(h.name) ?? 0);
    const u = unfit(d, h, left);
    if (u) {
      why.push(u);
      continue;
    }
    const b = broken(d.name, h.name, o.where, o.rules);
    const hard = b.filter((x) => isHard(x.rule));
    if (hard.length) {
      why.push(`${h.name}: ${hard.map((x) => x.why).join('; ')}`);
      continue;
    }
    ok.push({ h, left, soft: b.map((x) => x.why) });
  }
  const most = (xs: typeof ok) => xs.reduce((a, b) => (b.left > a.left || (b.left === a.left && b.h.name < a.h.name) ? b : a));
  const clean = ok.filter((x) => !x.soft.length);
  if (clean.length) {
    const best = most(clean);
    const pref = rulesOf(d.name, o.rules).filter((r) => r.kind === 'prefer-hosts' && r.hosts.includes(best.h.name));
    return {
      domain: d.name,
      to: best.h.name,
      why: `${d.stopped ? 'shut off: its definition moves; ' : ''}${pref.length ? `preferred by rule "${pref[0].name}", ` : ''}most memory left (${best.left} MiB free before it)`,
      broke: [],
    };
  }
  if (ok.length && o.softMayBreak) {
    const fewest = Math.min(...ok.map((x) => x.soft.length));
    const best = most(ok.filter((x) => x.soft.length === fewest));
    return { domain: d.name, to: best.h.name, why: `no host meets every rule; breaks ${best.soft.join('; ')}`, broke: best.soft };
  }
  for (const x of ok) why.push(`${x.h.name}: ${x.soft.join('; ')}`);
  return { domain: d.name, to: null, why: why.length ? why.join('; ') : 'no other host to move to', broke: [] };
}

/**
 * Many domains leaving (an evacuation, a dead host's HA domains): small and quiet first
 * (least RAM, then least dirtied; shut-off ones last), each with `choose`, counting what
 * is already placed. Small first frees a slot fast and rarely fails, so the long moves
 * start with the most known. `order: false` keeps the caller's order (HA priorities).
 */
export function placeAll(domains: DomainView[], hosts: HostView[], o: ChooseOpts & { order?: boolean }): Choice[] {
  const placed = new Map(o.placed ?? []);
  const where = new Map(o.where);
  // A domain that leaves binds nobody to where it was: its new place is decided here.
  for (const d of domains) where.delete(d.name);
  const order =
    o.order === false
      ? domains
      : [...domains].sort(
          (a, b) =>
            Number(!!a.stopped) - Number(!!b.stopped) ||
            a.memoryMiB - b.memoryMiB ||
            (a.dirtyRateMBps ?? 0) - (b.dirtyRateMBps ?? 0) ||
            a.name.localeCompare(b.name),
        );
  return order.map((d) => {
    const c = choose(d, hosts, { ...o, where, placed });
    if (c.to) {
      placed.set(c.to, (placed.get(c.to) ?? 0) + (d.stopped ? 0 : d.memoryMiB));
      where.set(d.name, c.to);
    }
    return c;
  });
}

/**
 * The whole evacuation's time: moves to one destination run `parallel` at a time, each
 * destination in parallel with the others; each move takes its predicted time (the
 * autopilot's plan), in the order given. The makespan of that schedule, ms.
 */
export function makespanMs(moves: { to: string; ms: number }[], parallel: number): number {
  const lanes = new Map<string, number[]>();
  let end = 0;
  for (const m of moves) {
    const l = lanes.get(m.to) ?? Array.from({ length: Math.max(1, parallel) }, () => 0);
    lanes.set(m.to, l);
    const i = l.indexOf(Math.min(...l));
    l[i] += m.ms;
    end = Math.max(end, l[i]);
  }
  return end;
}

/**
 * An operator's move of DOMAIN to HOST: the rules it breaks (their descriptions), or
 * PLACEMENT_RULE naming them unless `ignore` (then the report names them). The cluster's
 * source ferryd and the standalone CLI both ask this.
 */
export function checkMove(domain: string, host: string, fleet: { where: Map<string, string>; rules: Rule[] }, ignore: boolean): string[] {
  const { where, rules } = fleet;
  const b = broken(domain, host, where, rules).map((x) => x.why);
  if (b.length && !ignore)
    throw new FerryError(
      'PLACEMENT_RULE',
      `Moving "${domain}" to ${host} would break ${b.join('; ')}. Pick another host (\`ferry migrate ${domain}\` picks one), remove the rule, or pass --ignore-rules`,
      { rules: b },
    );
  return b;
}

/** The host DEST names among (name, ADDRESS:PORT) pairs: by name, by address, or by address without its port; else DEST itself. */
export function hostNamed(dest: string, hosts: Iterable<[string, string]>): string {
  for (const [name, addr] of hosts) if (name === dest || addr === dest || addr.split(':')[0] === dest) return name;
  return dest;
}
