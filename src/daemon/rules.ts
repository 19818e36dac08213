/**
 * Placement rules on a standalone host (no etcd): kept in STATEDIR/rules.json, one list,
 * as the host keeps its domain records. `ferry rule add|remove` gives every host the
 * same list (the CLI sends it to the host and each of its peers, and takes it back from
 * all if one refuses); the placements a standalone host's CLI makes (`migrate` without
 * a destination, an explicit move, `host evacuate`) read the list of the host a domain
 * leaves. In cluster mode the rules live in etcd instead (cluster/rules.ts).
 *
 * What this host can check it checks: the shape, duplicates, contradictions, and that a
 * host named is this one or a peer. A domain named may run on any host, which only the
 * CLI can ask (with the operator's credentials): it refuses unknown ones before sending.
 */
import fs from 'node:fs';
import path from 'node:path';
import { FerryError } from '../errors.ts';
import { checkRule, type Rule } from '../placement/rules.ts';
import { RuleSchema, parseRules } from '../cluster/rules.ts';
import { writeJsonAtomic } from '../util/fsx.ts';

export class LocalRules {
  private readonly file: string;

  constructor(
    stateDir: string,
    /** This host and the peers it knows by name: the hosts a rule may name. */
    private readonly hosts: () => string[],
  ) {
    this.file = path.join(stateDir, 'rules.json');
  }

  list(): Rule[] {
    let raw: string;
    try {
      raw = fs.readFileSync(this.file, 'utf8');
    } catch {
      return [];
    }
    try {
      return parseRules(JSON.parse(raw), this.file);
    } catch (e) {
      throw new FerryError('CLUSTER_BAD_RECORD', `${this.file} does not hold placement rules (${String(e)}); fix or remove it`);
    }
  }

  add(raw: unknown): Rule {
    const p = RuleSchema.safeParse(raw);
    if (!p.success) {
      const i = p.error.issues[0];
      throw new FerryError('RULE_INVALID', `Invalid rule: ${i?.path.join('.') || 'rule'} ${i?.message ?? ''}`.trim());
    }
    const rule = { ...p.data, createdAt: new Date().toISOString() };
    const rules = this.list();
    const hosts = this.hosts();
    try {
      // The domains: the CLI asked every host (see above).
      checkRule(rule, rules, { domains: new Set(rule.domains), hosts: new Set(hosts) });
    } catch (e) {
      if (!(e instanceof FerryError) || e.code !== 'RULE_UNKNOWN_HOST') throw e;
      throw new FerryError(
        'RULE_UNKNOWN_HOST',
        `Rule "${rule.name}" names host ${rule.hosts.filter((h) => !hosts.includes(h)).join(', ')}, which is neither this host nor one of its peers (${hosts.join(', ')}); add it to "peers" in ferryd.json`,
        e.details,
      );
    }
    writeJsonAtomic(this.file, [...rules, rule]);
    return rule;
  }

  remove(name: string): { removed: string } {
    const rules = this.list();
    if (!rules.some((r) => r.name === name)) throw new FerryError('RULE_NOT_FOUND', `No placement rule "${name}" (\`ferry rule list\`)`);
    writeJsonAtomic(
      this.file,
      rules.filter((r) => r.name !== name),
    );
    return { removed: name };
  }
}
