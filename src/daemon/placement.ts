/**
 * Placement in cluster mode, on this host: the rules (stored in etcd, cluster/rules.ts;
 * followed by ClusterAgent), the CPU baseline, where one of this host's domains should
 * go (`ferry migrate DOMAIN` without a destination), whether an operator's move breaks
 * a rule (PLACEMENT_RULE), and the balancer's recommendation. The decisions themselves
 * are placement/'s pure functions; this module only gathers the fleet they read (this
 * host's watches: no host is polled).
 */
import { FerryError } from '../errors.ts';
import { hasProcess } from '../domain/state.ts';
import { checkRule, describeRule, withoutRule, type Rule } from '../placement/rules.ts';
import { breaches, checkMove, choose, hostNamed, hostView, whereOf, type Choice, type DomainView } from '../placement/place.ts';
import { balance, describeAuto, type Balance } from '../placement/balance.ts';
import { parseRuleRequest, updateRules } from '../cluster/rules.ts';
import { BalanceSettingsSchema, hold, writeBalanceSettings, type BalanceSettings, type Hold } from '../cluster/balance.ts';
import type { Migrations } from '../migration/manager.ts';
import type { StartRequest } from '../migration/source.ts';
import type { Report } from '../api/protocol.ts';
import { networksOf } from '../cluster/ha.ts';
import type { ClusterAgent } from './cluster.ts';
import type { Host } from './host.ts';
import type { ClusterCpu } from '../api/protocol.ts';

export class Placement {
  constructor(
    private readonly host: Host,
    private readonly cluster: ClusterAgent,
  ) {}

  /** What the cluster knows: every domain with a record, every host with a lease or a domain. */
  private known(): { domains: Set<string>; hosts: Set<string> } {
    const f = this.cluster.fleet();
    return {
      domains: new Set(f.domains.map((d) => d.name)),
      hosts: new Set([...f.hosts.map((h) => h.name), ...f.domains.map((d) => d.owner)]),
    };
  }

  private quorate(what: string): void {
    if (!this.cluster.fleet().quorate)
      throw new FerryError(
        'CLUSTER_NO_QUORUM',
        `Cannot ${what}: ${this.host.cfg.name} cannot reach etcd now, so its view of the fleet may be stale; check \`ferry cluster status\``,
      );
  }

  async addRule(raw: unknown): Promise<Rule & { brokenNow: string[] }> {
    const rule = parseRuleRequest(raw);
    this.quorate('add a rule');
    const known = this.known();
    await updateRules(this.cluster.etcd, (rules) => {
      checkRule(rule, rules, known);
      return [...rules, rule];
    });
    void this.cluster.events.add({ type: 'rule-added', detail: `rule "${rule.name}" added: ${describeRule(rule)}` });
    return { ...rule, brokenNow: breaches(rule, this.where()) };
  }

  async removeRule(name: string): Promise<{ removed: string }> {
    this.quorate('remove a rule');
    await updateRules(this.cluster.etcd, (rules) => withoutRule(rules, name));
    void this.cluster.events.add({ type: 'rule-removed', detail: `rule "${name}" removed` });
    return { removed: name };
  }

  /** `ferry rule list`: what etcd holds now. */
  rules(): Promise<Rule[]> {
    return this.cluster.freshRules();
  }

  cpu(): ClusterCpu {
    const f = this.cluster.fleet();
    const b = this.cluster.baseline();
    return {
      baseline: b.model,
      features: b.features,
      common: b.common,
      hosts: f.hosts.map((h) => ({
        name: h.name,
        ceiling: h.cpuCeiling,
        defaultModel: h.cpuModel,
        models: h.cpuModels.length,
        accel: h.accel,
      })),
    };
  }

  /** One of this host's domains as placement sees it. */
  private domainView(name: string): DomainView {
    const d = this.host.get(name);
    const c = d.rec.config;
    return {
      name,
      host: this.host.cfg.name,
      memoryMiB: c.memoryMiB,
      cpuModel: d.rec.runtime?.cpuModel ?? this.host.cpuFor(c),
      accel: this.host.accel.accel,
      networks: [...new Set(c.nics.map((n) => n.network))],
      stopped: !hasProcess(d.rec.state),
    };
  }

  private where(): Map<string, string> {
    return whereOf(this.cluster.fleet().domains);
  }

  /** `ferry migrate DOMAIN` without a destination: the host placement picks, and why; PLACEMENT_NONE if none. */
  async place(domain: string, ignoreRules = false): Promise<Choice> {
    this.quorate('place a domain');
    const rules = ignoreRules ? [] : await this.cluster.freshRules();
    const f = this.cluster.fleet();
    const c = choose(this.domainView(domain), f.hosts.map(hostView), { where: this.where(), rules });
    if (!c.to) throw new FerryError('PLACEMENT_NONE', `No host can take "${domain}": ${c.why}`, { why: c.why });
    return c;
  }

  /**
   * An operator's move to DEST: the rules it would break. Refused (PLACEMENT_RULE) unless
   * ignoreRules; then the broken rules are returned, for the report to name.
   */
  async checkMove(domain: string, dest: string, ignoreRules: boolean): Promise<string[]> {
    this.host.get(domain);
    // etcd not answering: the watched rules (the move's ownership handover needs etcd anyway, and says so).
    const rules = await this.cluster.freshRules().catch(() => this.cluster.rules());
    if (!rules.length) return [];
    return checkMove(domain, this.hostNamed(dest), { where: this.where(), rules }, ignoreRules);
  }

  /** DEST (a name or a relocation address) as a cluster host's name. */
  private hostNamed(dest: string): string {
    return hostNamed(
      dest,
      this.cluster.fleet().hosts.map((h): [string, string] => [h.name, h.relocation]),
    );
  }

  /**
   * An operator's or the balancer's move from this host: first the rules (PLACEMENT_RULE,
   * or with --ignore-rules the report names each rule broken); a balancer's move (priority
   * "balance", from `cluster balance --apply` or the automatic mode) holds its domain
   * where it goes for the setting's holdSeconds, written before the move starts.
   */
  async startMove(p: StartRequest & { ignoreRules?: boolean }, mig: Migrations): Promise<Report> {
    const { ignoreRules, ...params } = p;
    const broke = await this.checkMove(p.domain, p.dest, ignoreRules === true);
    if (params.priority === 'balance') await this.hold(p.domain, p.dest);
    const r = await mig.source.start(params);
    if (!broke.length) return r;
    // The job keeps the same report (`ferry job DOMAIN` shows it too).
    r.policy.push(`placement rules ignored (--ignore-rules): ${broke.join('; ')}`);
    r.rulesIgnored = broke;
    return r;
  }

  private async hold(domain: string, dest: string): Promise<void> {
    const s = this.cluster.balanceSettings();
    if (s.holdSeconds <= 0) return;
    this.quorate('hold a balanced domain');
    await hold(this.cluster.etcd, {
      domain,
      from: this.host.cfg.name,
      to: this.hostNamed(dest),
      at: new Date().toISOString(),
      holdSeconds: s.holdSeconds,
    });
  }

  /** `ferry cluster balance --auto on|off …`: the cluster-wide setting, changed in part (what is not given stays). */
  async setAuto(raw: Partial<BalanceSettings>): Promise<BalanceSettings> {
    this.quorate('change the balancer setting');
    const p = BalanceSettingsSchema.safeParse({ ...this.cluster.balanceSettings(), ...raw });
    if (!p.success) {
      const i = p.error.issues[0];
      throw new FerryError('API_BAD_REQUEST', `Invalid balancer setting: ${i?.path.join('.')} ${i?.message ?? ''}`.trim());
    }
    await writeBalanceSettings(this.cluster.etcd, p.data);
    void this.cluster.events.add({ type: 'balance-set', detail: `automatic balancer ${describeAuto(p.data)}` });
    return p.data;
  }

  /** `ferry cluster balance`: the moves that would even out memory and CPU (placement/balance.ts), with the automatic mode's setting and holds. */
  async balance(threshold?: number): Promise<Balance & { auto: BalanceSettings; held: Hold[] }> {
    this.quorate('balance the cluster');
    const rules = await this.cluster.freshRules();
    const auto = this.cluster.balanceSettings();
    const held = this.cluster.held();
    return { ...this.recommend(threshold ?? auto.threshold / 100, new Set(held.map((h) => h.domain)), rules), auto, held };
  }

  /**
   * The balancer's recommendation; held domains stay where the balancer put them. `rules`:
   * an operator's request passes what etcd holds now; the automatic balancer the watched copy.
   */
  recommend(threshold: number, held: Set<string> = new Set(), rules?: Rule[]): Balance {
    this.quorate('balance the cluster');
    const f = this.cluster.fleet();
    const live = new Set(f.hosts.map((h) => h.name));
    const domains: DomainView[] = f.domains
      .filter((d) => live.has(d.owner) && d.state === 'running' && !d.moving)
      .map((d) => {
        const h = f.hosts.find((x) => x.name === d.owner);
        return {
          name: d.name,
          host: d.owner,
          memoryMiB: d.memoryMiB,
          cpuModel: d.cpuModel,
          accel: h?.accel,
          networks: networksOf(this.cluster.recordConfig(d.name)),
          ...(d.cpu !== null ? { cpu: d.cpu } : {}),
          dirtyRateMBps: d.dirtyMBps,
        };
      });
    return balance(f.hosts.map(hostView), domains, { rules: rules ?? f.rules, threshold, held });
  }
}
