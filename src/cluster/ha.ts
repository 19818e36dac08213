/**
 * The HA manager: one ferryd at a time (an etcd election) restarts the HA domains of
 * a host whose lease expired, on other hosts, each exactly once.
 *
 *   host1's lease expires ──► etcd deletes /ferry/hosts/host1 ──► watch (manager)
 *   manager: waits restartDelayS (cluster/member.ts: host1 fenced ≥ M/2 before expiry)
 *   manager: for each HA record owned by host1, by priority:
 *              placement (placeRestart) ──► CAS owner = hostN, state = restarting
 *   hostN (its own watch on /ferry/domains/): sees itself named ──► starts the domain
 *              (its claim is one more CAS on the same record) ──► event "restarted"
 *
 * A host counts as gone when its key is gone *and* the lease its records name is gone
 * (a key deleted by hand does not make a living host look dead), or sooner when it is
 * *silent*: its heartbeat (/ferry/alive/NAME, rewritten at every renewal) has not changed
 * for TTL + restartDelayS since this ferryd first knew of its last revision. That covers
 * a host that died with etcd's leader, whose lease etcd's next leader renews for a whole
 * TTL. Every ferryd follows the heartbeats (a newly elected manager already knows how
 * old each is); the manager confirms with a read before it acts, and the restart's CAS
 * also compares the heartbeat's revision, so a host that beats again in between keeps
 * its domains. Two managers for a moment (an election in flux) cannot both restart a
 * domain: both compare the revision they read, and the second write fails.
 */
import type { Campaign, Etcd3, Watcher } from 'etcd3';
import { etcdCall, listJson, type Versioned } from './etcd.ts';
import type { EventLog } from './events.ts';
import type { Ownership } from './ownership.ts';
import { ALIVE, HA_ELECTION, HOSTS, aliveKey, nameOfKey, parseHostFacts, type HostFacts, type OwnerRecord } from './records.ts';
import { monoMs } from './member.ts';
import { readRules } from './rules.ts';
import { choose, hostView } from '../placement/place.ts';
import type { Rule } from '../placement/rules.ts';

export interface HaTimings {
  ttlS: number;
  marginS: number;
  restartDelayS: number;
}

/** The networks a domain's NICs name, from its config as a record holds it. */
export function networksOf(config: Record<string, unknown>): string[] {
  const nics = (config.nics as { network?: unknown }[] | undefined) ?? [];
  return [...new Set(nics.map((n) => n.network).filter((n): n is string => typeof n === 'string'))];
}

/**
 * Where a dead host's domain restarts: placement's one choice (placement/place.ts: a
 * live host that can run it, with room, counting restarts already placed this round,
 * within the rules), where a soft rule (prefer/avoid) may give way when nothing else
 * is left, and says so; a hard one never. A reason if there is no host.
 */
export function placeRestart(
  rec: OwnerRecord,
  hosts: HostFacts[],
  o: { placed: Map<string, number>; where: Map<string, string>; rules: Rule[] },
): { host: string; broke: string[] } | { why: string } {
  if (!rec.restartable.ok) return { why: rec.restartable.why };
  const c = choose(
    {
      name: rec.name,
      host: rec.owner,
      memoryMiB: rec.memoryMiB,
      cpuModel: rec.cpuModel,
      accel: rec.accel,
      networks: networksOf(rec.config),
    },
    hosts.map(hostView),
    { placed: o.placed, where: o.where, rules: o.rules, softMayBreak: true },
  );
  if (c.to) return { host: c.to, broke: c.broke };
  return { why: hosts.some((h) => h.name !== rec.owner) ? c.why : 'no other live host in the cluster' };
}

interface Deps {
  etcd: Etcd3;
  me: string;
  ownership: Ownership;
  events: EventLog;
  timings: HaTimings;
  log: { info: (m: string, d?: Record<string, unknown>) => void; warn: (m: string, d?: Record<string, unknown>) => void };
}

export class HaManager {
  private campaign?: Campaign;
  private leading = false;
  private watcher?: Watcher;
  private timer?: NodeJS.Timeout;
  private stopped = false;
  /** When this manager learned that each host is gone (its key deleted, or found missing), on the monotonic clock. */
  private readonly goneAt = new Map<string, number>();
  /** Reported once per record generation: domains that could not be placed. */
  private readonly reported = new Set<string>();
  /** Each host's last heartbeat revision, and when this ferryd first knew of it (monotonic clock). */
  private readonly heard = new Map<string, { rev: bigint; at: number; final?: boolean }>();
  private beatWatcher?: Watcher;
  private following = false;

  constructor(private readonly d: Deps) {}

  /** When this host last renewed its lease (cluster/member.ts), on the monotonic clock. */
  private lastRenewal = 0;
  /** When silences last started over (renewed): no silence is counted from before. */
  private resetAt = 0;

  /** This host's own last heartbeats: their revisions, and a time after each one's commit. */
  private readonly own: { rev: bigint; at: number }[] = [];

  /** This host wrote its heartbeat (cluster/member.ts 'beat'). */
  beat(revision: string, at: number): void {
    this.own.push({ rev: BigInt(revision), at });
    if (this.own.length > 16) this.own.shift();
  }

  /**
   * A heartbeat revision seen (by the watch, or a read): only a newer one restarts the
   * host's silence, from when this ferryd knew of it. That is now, or sooner: the time
   * after one of this host's own heartbeats with a higher revision, since etcd committed
   * the other one before it. A watch that stalled on a member cut off (and delivers the
   * last heartbeats late) then costs nothing.
   */
  private hear(host: string, rev: string): void {
    const r = BigInt(rev);
    const h = this.heard.get(host);
    if (h && r <= h.rev) return;
    const after = this.own.find((o) => o.rev > r);
    this.heard.set(host, { rev: r, at: Math.max(this.resetAt, Math.min(monoMs(), after?.at ?? Infinity)) });
  }

  /**
   * This host renewed its lease (sent at `at`). A gap since the renewal before longer than
   * TTL/2 + delay means etcd was out of reach (no quorum, or this host cut off): nobody
   * else could write a heartbeat meanwhile either, so every silence starts over, or every
   * HA domain of the cluster would move once etcd is back (their hosts renew again within
   * TTL/4). A shorter gap (an etcd leader election) is no reset, so a host that dies with
   * etcd's leader is restarted in time. A reset only delays a restart: never unsafe.
   */
  renewed(at: number): void {
    if (this.lastRenewal && at - this.lastRenewal > this.gapMs()) {
      this.resetAt = monoMs();
      for (const h of this.heard.values()) h.at = Math.max(h.at, this.resetAt);
    }
    this.lastRenewal = at;
  }

  /** A gap between this host's renewals that means etcd was out of its reach. */
  private gapMs(): number {
    return (this.d.timings.ttlS / 2 + this.d.timings.restartDelayS) * 1000;
  }

  /**
   * This host's own renewals are current, so its view of the others' heartbeats is too.
   * When etcd comes back after an outage, the manager can read etcd (and sweep) before
   * its own first renewal: then the others' last heartbeats are from before the outage,
   * and the reset above has not happened yet. Until that renewal no host counts as silent
   * (a lease etcd expired still counts: that is etcd's word, not this host's view).
   */
  private inTouch(): boolean {
    return this.lastRenewal > 0 && monoMs() - this.lastRenewal <= this.gapMs();
  }

  /** Every ferryd follows the heartbeats, manager or not: a new manager knows how long each host has been silent. */
  private async followBeats(): Promise<void> {
    if (this.following) return;
    this.following = true;
    while (!this.stopped) {
      try {
        const w = await etcdCall('watching heartbeats', () => this.d.etcd.watch().prefix(ALIVE).withPreviousKV().create());
        this.beatWatcher = w;
        w.on('put', (kv) => this.hear(nameOfKey(kv.key.toString()), kv.mod_revision));
        // A heartbeat deleted with its lease: kept if it was the last one this ferryd knew of
        // (then how long the host has been silent still counts, in due()), else forgotten.
        w.on('delete', (kv, prev) => {
          const host = nameOfKey(kv.key.toString());
          const h = this.heard.get(host);
          if (h && prev && BigInt(prev.mod_revision) === h.rev) h.final = true;
          else this.heard.delete(host);
        });
        return;
      } catch {
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
  }

  get isLeader(): boolean {
    return this.leading;
  }

  start(): void {
    if (this.stopped) return;
    void this.followBeats();
    // The campaign's lease is half the hosts' TTL: a manager that dies with etcd's leader
    // (whose successor renews every lease for a whole TTL) is replaced sooner. Losing the
    // role for a moment costs nothing: every restart is a compare-and-swap.
    const c = this.d.etcd.election(HA_ELECTION, Math.max(3, Math.round(this.d.timings.ttlS / 2))).campaign(this.d.me);
    this.campaign = c;
    c.on('elected', () => {
      if (this.campaign === c) void this.lead();
    });
    c.on('error', (e: Error) => {
      if (this.campaign !== c) return;
      this.d.log.warn('HA manager election lost or failed; campaigning again', { error: String(e) });
      void this.unlead();
      this.campaign = undefined;
      void c.resign().catch(() => undefined);
      setTimeout(() => this.start(), 1000).unref();
    });
    // etcd3 learns it won from a watch on the key before its own; a watch on a member that
    // was cut off hears nothing until it moves. So a candidate also asks every 2 s.
    if (!this.askTimer) this.askTimer = setInterval(() => void this.askElected(), 2000).unref();
  }

  private askTimer?: NodeJS.Timeout;

  /** A candidate whose campaign key is now the oldest is the manager, whether or not its watch said so. */
  private async askElected(): Promise<void> {
    if (this.leading || this.stopped || !this.campaign) return;
    const c = this.campaign;
    const leader = await etcdCall('reading the HA manager', () => this.d.etcd.election(HA_ELECTION).leader()).catch(() => null);
    if (leader === this.d.me && this.campaign === c && !this.leading) {
      this.d.log.info('elected HA manager (found by asking etcd)');
      void this.lead();
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.askTimer);
    await this.beatWatcher?.cancel().catch(() => undefined);
    await this.unlead();
    await this.campaign?.resign().catch(() => undefined);
  }

  private async lead(): Promise<void> {
    if (this.leading || this.stopped) return;
    this.leading = true;
    this.d.log.info('this host is the HA manager');
    void this.d.events.add({ type: 'ha-manager', host: this.d.me, detail: `${this.d.me} is the HA manager` });
    try {
      const w = await etcdCall('watching hosts', () => this.d.etcd.watch().prefix(HOSTS).create());
      this.watcher = w;
      w.on('delete', (kv) => {
        const host = nameOfKey(kv.key.toString());
        this.goneAt.set(host, monoMs());
        this.d.log.warn('host lease expired', { host });
        void this.d.events.add({ type: 'host-down', host, detail: `the lease of ${host} expired` });
        setTimeout(() => void this.sweep(), this.d.timings.restartDelayS * 1000 + 50).unref();
      });
      w.on('put', (kv) => this.goneAt.delete(nameOfKey(kv.key.toString())));
    } catch (e) {
      this.d.log.warn('HA manager cannot watch hosts', { error: String(e) });
    }
    // Events drive it; a sweep every second catches what a watch cannot (an owner gone before this manager was elected).
    this.timer = setInterval(() => void this.sweep(), 1000);
    void this.sweep();
  }

  private async unlead(): Promise<void> {
    this.leading = false;
    clearInterval(this.timer);
    const w = this.watcher;
    this.watcher = undefined;
    await w?.cancel().catch(() => undefined);
  }

  private sweeping = false;

  /** One pass: every HA domain whose owner is gone and whose wait is over gets a new owner. */
  async sweep(): Promise<void> {
    if (!this.leading || this.sweeping) return;
    this.sweeping = true;
    try {
      // The election's leader is the campaign key with the lowest revision: a campaign that
      // believes it won while another key is older (etcd3's view after a partition) stands down.
      const leader = await etcdCall('reading the HA manager', () => this.d.etcd.election(HA_ELECTION).leader());
      if (leader !== this.d.me) {
        this.d.log.warn('not the HA manager after all; standing down and campaigning anew', { leader });
        await this.unlead();
        const c = this.campaign;
        this.campaign = undefined;
        await c?.resign().catch(() => undefined);
        this.start();
        return;
      }
      const keyed = (await listJson(this.d.etcd, HOSTS, parseHostFacts)).map((v) => v.value);
      // The heartbeats as etcd has them now (linearizable): the watch's news, confirmed.
      const beats = new Map<string, string>();
      const read = await etcdCall('reading heartbeats', () => this.d.etcd.getAll().prefix(ALIVE).exec());
      for (const kv of read.kvs) {
        const host = nameOfKey(kv.key.toString());
        beats.set(host, kv.mod_revision);
        this.hear(host, kv.mod_revision);
      }
      const silent = (host: string): boolean => this.silent(host, beats.get(host));
      // Live: a key, and a heartbeat newer than TTL + delay. Only those take restarts.
      const hosts = keyed.filter((h) => !silent(h.name));
      const live = new Set(hosts.map((h) => h.name));
      const withKey = new Set(keyed.map((h) => h.name));
      const all = await this.d.ownership.list();
      const recs = all.filter(
        (r) => r.value.ha && !live.has(r.value.owner) && (r.value.state === 'running' || r.value.state === 'restarting'),
      );
      recs.sort((a, b) => (b.value.ha?.priority ?? 0) - (a.value.ha?.priority ?? 0) || a.value.name.localeCompare(b.value.name));
      // Where every domain is: keep-apart and keep-together read it (a restart updates it).
      const round = {
        placed: new Map<string, number>(),
        where: new Map(all.map((r) => [r.value.name, r.value.owner])),
        rules: recs.length ? (await readRules(this.d.etcd)).value : [],
      };
      for (const r of recs) {
        const owner = r.value.owner;
        if (withKey.has(owner)) {
          // Silent with a lease etcd still keeps: restart, if the heartbeat is still the one read.
          this.reportSilent(owner);
          await this.restart(r, hosts, round, { key: aliveKey(owner), modRevision: beats.get(owner)! });
        } else if (this.due(owner) && (await this.d.ownership.leaseGone(r.value.lease))) await this.restart(r, hosts, round);
      }
    } catch (e) {
      this.d.log.warn('HA sweep failed', { error: String(e) });
    } finally {
      this.sweeping = false;
    }
  }

  /**
   * Whether the owner has been gone long enough: restartDelayS after this manager
   * learned that its lease is gone. An expired lease proves its holder's fence deadline
   * passed (cluster/member.ts), however late the news comes: a manager elected after
   * the fact waits no longer than one that saw it happen.
   */
  private due(owner: string): boolean {
    let at = this.goneAt.get(owner);
    if (at === undefined) {
      // Gone before this manager watched (it may have been the manager itself).
      at = monoMs();
      this.goneAt.set(owner, at);
      this.d.log.warn('host found without a lease', { host: owner });
      void this.d.events.add({ type: 'host-down', host: owner, detail: `${owner} has no lease (found by the HA manager ${this.d.me})` });
    }
    if (monoMs() - at >= this.d.timings.restartDelayS * 1000) return true;
    // Silent for TTL + delay already, by its very last heartbeat (its lease outlived it, then expired): no further wait.
    const h = this.heard.get(owner);
    return !!h?.final && this.quietLongEnough(h);
  }

  /**
   * No new heartbeat for TTL + restartDelayS since this ferryd first knew of the last one
   * (revision `rev`, just read): the host passed its fence deadline (cluster/member.ts),
   * whatever its lease says.
   */
  private silent(host: string, rev: string | undefined): boolean {
    if (!this.inTouch()) return false;
    const h = this.heard.get(host);
    if (!h || rev === undefined || BigInt(rev) !== h.rev) return false;
    return this.quietLongEnough(h);
  }

  /** TTL + restartDelayS since this ferryd knew of that heartbeat: past the host's fence deadline. */
  private quietLongEnough(h: { at: number }): boolean {
    return monoMs() - h.at >= (this.d.timings.ttlS + this.d.timings.restartDelayS) * 1000;
  }

  private readonly silentReported = new Set<string>();

  private reportSilent(host: string): void {
    const tag = `${host}#${this.heard.get(host)?.rev}`;
    if (this.silentReported.has(tag)) return;
    this.silentReported.add(tag);
    this.d.log.warn('host silent: no lease renewal for longer than its TTL', { host });
    void this.d.events.add({
      type: 'host-down',
      host,
      detail: `${host} renewed nothing for over ${this.d.timings.ttlS + this.d.timings.restartDelayS} s (its lease may outlive it after an etcd leader change)`,
    });
  }

  private async restart(
    r: Versioned<OwnerRecord>,
    hosts: HostFacts[],
    round: { placed: Map<string, number>; where: Map<string, string>; rules: Rule[] },
    guard?: { key: string; modRevision: string },
  ): Promise<void> {
    const rec = r.value;
    const where = placeRestart(rec, hosts, round);
    const tag = `${rec.name}#${rec.generation}`;
    if ('why' in where) {
      if (!this.reported.has(tag)) {
        this.reported.add(tag);
        this.d.log.warn('HA domain cannot restart', { domain: rec.name, owner: rec.owner, why: where.why });
        void this.d.events.add({
          type: rec.restartable.ok ? 'restart-failed' : 'not-restartable',
          domain: rec.name,
          host: rec.owner,
          detail: `${rec.name} (owned by ${rec.owner}, which is down) cannot restart: ${where.why}`,
        });
      }
      return;
    }
    const note = `restarted by the HA manager (${this.d.me}): ${rec.owner} ${guard ? 'went silent' : 'lost its lease'}`;
    if (await this.d.ownership.assign(r, where.host, note, guard)) {
      round.placed.set(where.host, (round.placed.get(where.host) ?? 0) + rec.memoryMiB);
      round.where.set(rec.name, where.host);
      this.d.log.info('HA restart assigned', { domain: rec.name, from: rec.owner, to: where.host, broke: where.broke });
      // A soft rule given way to is never silent: the event log says which and why.
      if (where.broke.length)
        void this.d.events.add({
          type: 'rule-broken',
          domain: rec.name,
          host: where.host,
          detail: `${rec.name} restarted on ${where.host} against a soft rule, no other host being left: ${where.broke.join('; ')}`,
        });
    }
  }
}
