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
import { checkRule, withoutRule, type Rule } from '../placement/rules.ts';
import { parseRuleRequest, parseRules } from '../cluster/rules.ts';
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
    const rule = parseRuleRequest(raw);
    const rules = this.list();
    const hosts = this.hosts();
    // The domains: the CLI asked every host (see above).
    checkRule(rule, rules, {
      domains: null,
      hosts: new Set(hosts),
      hostsAre: `neither this host nor one of its peers (${hosts.join(', ')}); add it to "peers" in ferryd.json`,
    });
    writeJsonAtomic(this.file, [...rules, rule]);
    return rule;
  }

  remove(name: string): { removed: string } {
    writeJsonAtomic(this.file, withoutRule(this.list(), name));
    return { removed: name };
  }
}
