/**
 * Placement rules: which domains stay apart or together, and which hosts they prefer or
 * avoid. Pure: the cluster stores them (cluster/rules.ts), every placement reads them
 * through `judge` (place.ts), and `checkRule` is the one gate a new rule passes.
 *
 * No zod here: the CLI imports this module, and its start-up stays without zod's
 * (about 0.1 s); the schema lives with the store (cluster/rules.ts).
 *
 * Hard rules (keep-apart, keep-together) are never broken by ferry; soft ones
 * (prefer-hosts, avoid-hosts) only by an HA restart that has no other place, which says
 * so in `ferry events`. An operator's explicit move that breaks any rule is refused
 * (PLACEMENT_RULE) unless --ignore-rules.
 */
import { FerryError } from '../errors.ts';

export const RULE_KINDS = ['keep-apart', 'keep-together', 'prefer-hosts', 'avoid-hosts'] as const;

/** A placement rule as etcd holds it (its shape is checked where it is read: cluster/rules.ts). */
export interface Rule {
  name: string;
  kind: (typeof RULE_KINDS)[number];
  domains: string[];
  /** prefer-hosts and avoid-hosts: the hosts; empty for the others. */
  hosts: string[];
  createdAt?: string;
}

export const isHard = (r: Rule): boolean => r.kind === 'keep-apart' || r.kind === 'keep-together';

/** What a rule may name: the domains (null: not known here, checked by the caller) and the hosts, and what those hosts are, in words. */
export interface Known {
  domains: Set<string> | null;
  hosts: Set<string>;
  /** How an unknown host is explained: "no cluster member; check …" unless told otherwise. */
  hostsAre?: string;
}

/**
 * A new rule against the rules already stored and what the cluster knows: RULE_INVALID,
 * RULE_EXISTS, RULE_UNKNOWN_DOMAIN, RULE_UNKNOWN_HOST or RULE_CONTRADICTS, else nothing.
 */
export function checkRule(r: Rule, existing: Rule[], known: Known): void {
  const what = `Rule "${r.name}"`;
  const dup = (xs: string[]) => xs.find((x, i) => xs.indexOf(x) !== i);
  if (dup(r.domains)) throw new FerryError('RULE_INVALID', `${what} names domain ${dup(r.domains)} twice`);
  if ((r.kind === 'keep-apart' || r.kind === 'keep-together') && r.domains.length < 2)
    throw new FerryError('RULE_INVALID', `${what}: --${r.kind} needs two or more domains`);
  if ((r.kind === 'keep-apart' || r.kind === 'keep-together') && r.hosts.length)
    throw new FerryError('RULE_INVALID', `${what}: --${r.kind} takes domains only, no hosts`);
  if ((r.kind === 'prefer-hosts' || r.kind === 'avoid-hosts') && !r.hosts.length)
    throw new FerryError('RULE_INVALID', `${what}: --${r.kind} needs one or more hosts, and --domains for the domains it is about`);
  if (dup(r.hosts)) throw new FerryError('RULE_INVALID', `${what} names host ${dup(r.hosts)} twice`);
  if (existing.some((e) => e.name === r.name))
    throw new FerryError('RULE_EXISTS', `${what} exists already; remove it first (\`ferry rule remove ${r.name}\`)`);
  const unknownD = known.domains ? r.domains.filter((d) => !known.domains!.has(d)) : [];
  if (unknownD.length)
    throw new FerryError(
      'RULE_UNKNOWN_DOMAIN',
      `${what} names ${unknownD.join(', ')}, which the cluster does not know; check \`ferry list --all\``,
      {
        domains: unknownD,
      },
    );
  const unknownH = r.hosts.filter((h) => !known.hosts.has(h));
  if (unknownH.length)
    throw new FerryError(
      'RULE_UNKNOWN_HOST',
      `${what} names host ${unknownH.join(', ')}, which is ${known.hostsAre ?? 'no cluster member; check `ferry cluster status`'}`,
      {
        hosts: unknownH,
      },
    );
  const c = contradiction([...existing, r]);
  if (c) throw new FerryError('RULE_CONTRADICTS', `${what} contradicts ${c}; remove one of them first`);
}

/**
 * The first contradiction in a set of rules, in words, or null: two domains kept apart
 * that keep-together rules (also through a chain of them) bind to one host; a domain
 * that both prefers and avoids a host; a together group whose members avoid every host
 * another member prefers is left to placement (it is reported there, not here).
 */
export function contradiction(rules: Rule[]): string | null {
  // Together groups: union-find over keep-together rules.
  const parent = new Map<string, string>();
  const find = (x: string): string => {
    const p = parent.get(x) ?? x;
    if (p === x) return x;
    const root = find(p);
    parent.set(x, root);
    return root;
  };
  const via = new Map<string, string>();
  for (const r of rules.filter((x) => x.kind === 'keep-together'))
    for (const d of r.domains.slice(1)) {
      parent.set(find(d), find(r.domains[0]));
      via.set(d, r.name);
      via.set(r.domains[0], r.name);
    }
  for (const r of rules.filter((x) => x.kind === 'keep-apart'))
    for (let i = 0; i < r.domains.length; i++)
      for (let j = i + 1; j < r.domains.length; j++)
        if (find(r.domains[i]) === find(r.domains[j]))
          return `keep-apart rule "${r.name}" (${r.domains[i]}, ${r.domains[j]}) against keep-together rule "${via.get(r.domains[i]) ?? via.get(r.domains[j])}", which binds them to one host`;
  const prefers = rules.filter((x) => x.kind === 'prefer-hosts');
  for (const a of rules.filter((x) => x.kind === 'avoid-hosts'))
    for (const p of prefers) {
      const d = a.domains.find((x) => p.domains.includes(x));
      const h = a.hosts.find((x) => p.hosts.includes(x));
      if (d && h) return `avoid-hosts rule "${a.name}" against prefer-hosts rule "${p.name}": both about ${d} on ${h}`;
    }
  return null;
}

/** The rules a domain is part of. */
export const rulesOf = (domain: string, rules: Rule[]): Rule[] => rules.filter((r) => r.domains.includes(domain));

/** A rule in words, with whether it is hard or soft. */
export function describeRule(r: Pick<Rule, 'kind' | 'domains' | 'hosts'>): string {
  switch (r.kind) {
    case 'keep-apart':
      return `keep ${r.domains.join(', ')} on different hosts (hard)`;
    case 'keep-together':
      return `keep ${r.domains.join(', ')} on one host (hard)`;
    case 'prefer-hosts':
      return `${r.domains.join(', ')} prefer ${r.hosts.join(', ')} (soft)`;
    case 'avoid-hosts':
      return `${r.domains.join(', ')} avoid ${r.hosts.join(', ')} (soft)`;
  }
}

/** The rules without NAME; RULE_NOT_FOUND if there is none by that name. */
export function withoutRule(rules: Rule[], name: string): Rule[] {
  if (!rules.some((r) => r.name === name)) throw new FerryError('RULE_NOT_FOUND', `No placement rule "${name}" (\`ferry rule list\`)`);
  return rules.filter((r) => r.name !== name);
}
