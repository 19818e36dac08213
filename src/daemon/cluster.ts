/**
 * Cluster mode on this host: ferryd's side of src/cluster/. It
 *   - holds the host's lease and facts (Membership) and feeds the watchdog at every renewal;
 *   - is the host's OwnershipGate: no domain's vCPUs start or resume here without a
 *     compare-and-swap that made this host its owner (and no claim without a live lease);
 *   - fences: when the lease is overdue, the HA domains this host owns stop, then die;
 *   - follows the ownership records (one etcd watch): a domain the HA manager gave this
 *     host is started here, once per generation;
 *   - reconciles on (re)joining: a domain the cluster gave to another host meanwhile does
 *     not run here again, one fenced while the lease survived runs here again, and a
 *     domain the cluster has no record of is recorded as this host's;
 *   - campaigns for the HA manager (cluster/ha.ts) and writes the event log.
 * Standalone ferryd has none of this (config `cluster` absent).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { Etcd3, Watcher } from 'etcd3';
import { FerryError, asFerryError } from '../errors.ts';
import { domainConfigToJson, parseDomainConfig, type DomainConfig } from '../domain/config.ts';
import { hasProcess } from '../domain/state.ts';
import { connectEtcd, etcdCall, jsonOf, listJson, listJsonAt, type Versioned } from '../cluster/etcd.ts';
import { Membership, monoMs } from '../cluster/member.ts';
import { Ownership, type ClaimFacts } from '../cluster/ownership.ts';
import { EventLog } from '../cluster/events.ts';
import { HaManager } from '../cluster/ha.ts';
import { DOMAINS, HOSTS, nameOfKey, parseHostFacts, parseOwnerRecord, type HostFacts, type OwnerRecord } from '../cluster/records.ts';
import { startTicks } from '../cluster/watchdog.ts';
import type { ClusterConfig } from './config.ts';
import type { Host, OwnershipGate } from './host.ts';
import type { Logger } from './log.ts';
import { FERRY_VERSION } from '../version.ts';
import { REPO_ROOT } from '../util/paths.ts';
import { cpuModelsHere } from '../qemu/probe.ts';
import { RULES_KEY, parseRules, readRules } from '../cluster/rules.ts';
import { baseline, type Baseline, type CpuHost } from '../placement/cpu.ts';
import type { Rule } from '../placement/rules.ts';
import { LoadMeter } from './load.ts';
import type { QueueView } from '../api/protocol.ts';
import {
  BALANCE_DEFAULTS,
  BALANCE_KEY,
  HELD,
  parseBalanceSettings,
  parseHold,
  type BalanceSettings,
  type Hold,
} from '../cluster/balance.ts';

const WATCHDOG_JS = path.join(REPO_ROOT, 'dist', 'cluster', 'watchdog.js');
/** An HA domain that crashes restarts on its host at most this often in this window, then stays stopped. */
const CRASH_RESTARTS = 3;
const CRASH_WINDOW_MS = 10 * 60000;
/** How long `cluster status` waits for each etcd member's own status. */
const MEMBER_STATUS_MS = 1500;

export class ClusterAgent implements OwnershipGate {
  readonly etcd: Etcd3;
  /** One client per member (the lease's renewals go to whichever answers). */
  private readonly members: Etcd3[];
  readonly member: Membership;
  readonly owners: Ownership;
  readonly events: EventLog;
  readonly ha: HaManager;
  /** The ownership records as the watch last saw them, with their revisions. */
  private readonly seen = new Map<string, Versioned<OwnerRecord>>();
  private readonly records = {
    get: (n: string): OwnerRecord | undefined => this.seen.get(n)?.value,
    values: (): OwnerRecord[] => [...this.seen.values()].map((v) => v.value),
  };
  /** The live hosts' published facts, as the hosts watch last saw them (a key goes with its lease). */
  private readonly hostsSeen = new Map<string, HostFacts>();
  private readonly watchers: Watcher[] = [];
  private changedTimer?: NodeJS.Timeout;
  private dog?: net.Socket;
  /** HA domains this host fenced: they run here again if the lease survived and the record still names this host. */
  private readonly fenced = new Set<string>();
  /** Restarts assigned to this host, by name#generation: each is tried once. */
  private readonly assigned = new Set<string>();
  /** When each HA domain's QEMU died here lately (restartCrashed's budget). */
  private readonly crashes = new Map<string, number[]>();
  /** The placement rules as the watch last saw them (cluster/rules.ts). */
  private rulesSeen: Rule[] = [];
  /** The automatic balancer's setting and its holds (cluster/balance.ts), as the watches last saw them. */
  private balanceSeen: BalanceSettings = BALANCE_DEFAULTS;
  private readonly heldSeen = new Map<string, Hold>();
  /** Each running domain's CPU use over the load window: published with the facts, read by the balancer. */
  private readonly load: LoadMeter;
  /** Record changes the owner could not write yet (no quorum): written at the next renewal. */
  private readonly pendingState = new Map<string, { state: OwnerRecord['state']; note: string } | 'removed'>();

  constructor(
    private readonly host: Host,
    readonly cfg: ClusterConfig,
    private readonly log: Logger,
  ) {
    this.etcd = connectEtcd({ endpoints: cfg.endpoints, tlsDir: cfg.tlsDir });
    const me = host.cfg.name;
    this.owners = new Ownership(
      this.etcd,
      me,
      () => {
        const st = this.member.state;
        return st.kind === 'member' || st.kind === 'fenced' ? st.lease : '';
      },
      (name) => this.seen.get(name),
    );
    this.events = new EventLog(this.etcd, me);
    this.load = new LoadMeter(() =>
      host
        .all()
        .flatMap((d) =>
          hasProcess(d.rec.state)
            ? [{ name: d.rec.config.name, pid: d.rec.state.pid, qmp: d.busy ? undefined : (d.qmp ?? undefined) }]
            : [],
        ),
    );
    this.members = cfg.endpoints.map((url) => connectEtcd({ endpoints: [url], tlsDir: cfg.tlsDir }));
    this.member = new Membership({
      etcd: this.etcd,
      members: this.members,
      name: me,
      ttlS: cfg.leaseTtlS,
      marginS: cfg.fenceMarginS,
      leaseFile: path.join(host.cfg.stateDir, 'cluster-lease'),
      facts: () => this.facts(),
      log,
    });
    this.ha = new HaManager({
      etcd: this.etcd,
      me,
      ownership: this.owners,
      events: this.events,
      timings: { ttlS: cfg.leaseTtlS, marginS: cfg.fenceMarginS, restartDelayS: cfg.restartDelayS },
      log,
    });
  }

  /** This host's line of outgoing moves (migration/queue.ts), once the migration layer exists. */
  private queueViews: () => QueueView[] = () => [];
  useQueue(views: () => QueueView[]): void {
    this.queueViews = views;
  }

  get me(): string {
    return this.host.cfg.name;
  }

  start(): void {
    this.member.on('fence', (e: { why: string }) => void this.fence(e.why));
    this.member.on('joined', (e: { resumed: boolean }) => void this.rejoined(e.resumed));
    this.member.on('beat', (e: { revision: string; at: number }) => this.ha.beat(e.revision, e.at));
    this.member.on('renewed', (e: { renewedAt: number }) => {
      this.ha.renewed(e.renewedAt);
      this.feedWatchdog();
      void this.flushPending();
    });
    this.host.on('domain.state', (c: { domain: string; to: string; state?: { reason?: string } }) => {
      this.onLocalState(c);
      this.publishSoon();
    });
    this.host.on('host.maintenance', () => void this.member.publish());
    // A move joined or left this host's line: the dashboards and the other hosts' balancers hear of it.
    this.host.on('migration.queue', () => this.publishSoon());
    this.member.start();
    this.ha.start();
    this.load.start();
    void this.watchRecords();
    void this.watchHosts();
    void this.watchRules();
    void this.watchBalance();
    // Facts change with every domain started or stopped; published at most every few seconds.
    setInterval(() => void this.member.publish(), 5000).unref();
  }

  private publishTimer?: NodeJS.Timeout;
  /** A domain started, stopped or moved: the host's free memory is news for every placement (at most every 200 ms). */
  private publishSoon(): void {
    if (this.publishTimer) return;
    this.publishTimer = setTimeout(() => {
      this.publishTimer = undefined;
      void this.member.publish();
    }, 200);
  }

  async stop(): Promise<void> {
    clearTimeout(this.publishTimer);
    await this.ha.stop();
    this.load.stop();
    clearTimeout(this.changedTimer);
    for (const w of this.watchers) await w.cancel().catch(() => undefined);
    // The lease is not revoked: a ferryd restarted within the TTL goes on with it (its HA domains are not failed over).
    await this.member.stop(false);
    this.dog?.end();
    this.etcd.close();
    for (const m of this.members) m.close();
  }

  // ---------- OwnershipGate ----------

  async claim(c: DomainConfig, why: string): Promise<void> {
    this.needQuorum(why);
    await this.owners.claim(this.claimFacts(c), `${why} on ${this.me}`);
    this.feedWatchdog();
  }
  async markMoving(domain: string, job: string, to: string): Promise<void> {
    this.needQuorum('move');
    await this.owners.markMoving(domain, job, to);
  }
  takeOver(domain: string, job: string, from: string): Promise<'taken' | 'refused'> {
    return this.owners.takeOver(domain, job, from).then((v) => {
      if (v === 'taken')
        void this.events.add({ type: 'moved', domain, host: this.me, detail: `${domain} moved from ${from} to ${this.me} (job ${job})` });
      return v;
    });
  }
  giveBack(domain: string, job: string, to: string): Promise<void> {
    return this.owners.giveBack(domain, job, to);
  }
  reclaim(domain: string, job: string): Promise<'kept' | 'lost'> {
    return this.owners.reclaim(domain, job);
  }

  private needQuorum(what: string): void {
    if (this.member.quorate()) return;
    const s = this.member.state;
    throw new FerryError(
      'CLUSTER_NO_QUORUM',
      `Cannot ${what} on ${this.me}: ${s.kind === 'joining' ? 'this host has not reached etcd yet' : 'its cluster lease is not current (etcd unreachable or without quorum)'}. Running domains are left alone; check \`ferry cluster status\``,
    );
  }

  // ---------- what the cluster is told ----------

  private facts() {
    const cap = this.host.capacity();
    const m = this.host.maintenance();
    const free = this.host.memoryFacts().freeMiB;
    return {
      name: this.me,
      ferry: FERRY_VERSION,
      engine: this.host.qemu.version,
      accel: this.host.accel.accel,
      cpuModel: this.host.cfg.cpuModel,
      cpuModels: cpuModelsHere(this.host.qemu),
      cpuCeiling: this.host.qemu.ceiling,
      memoryMiB: cap.offerMiB,
      freeMiB: free,
      cores: os.cpus().length,
      load: this.load.averages(),
      dirty: this.load.dirtyRates(),
      maintenance: m.on,
      moves: this.queueViews().map((q) => ({
        domain: q.domain,
        dest: q.dest,
        priority: q.priority,
        state: q.state,
        position: q.position,
        etaMs: q.etaMs,
      })),
      networks: Object.keys(this.host.cfg.networks),
      relocation: `${this.host.cfg.relocation.address}:${this.host.cfg.relocation.port}`,
    };
  }

  private claimFacts(c: DomainConfig): ClaimFacts {
    const local = path.resolve(this.host.cfg.storage.localDir) + path.sep;
    const files = [...c.disks.map((d) => d.path), ...(c.boot.kind === 'kernel' ? [c.boot.kernel, c.boot.initrd ?? ''] : [])].filter(
      Boolean,
    );
    const own = files.find((f) => path.resolve(f).startsWith(local));
    return {
      name: c.name,
      uuid: c.uuid,
      config: domainConfigToJson(c) as Record<string, unknown>,
      // The model its QEMU runs with ("cpu": "cluster" was resolved at start): a restart elsewhere needs it.
      cpuModel: this.host.find(c.name)?.rec.runtime?.cpuModel ?? this.host.cfg.cpuModel,
      accel: this.host.accel.accel,
      memoryMiB: c.memoryMiB,
      restartable: own
        ? { ok: false, why: `${own} is on ${this.me}'s own storage (storage.localDir): only ${this.me} holds it` }
        : { ok: true, why: 'every disk and boot file is on shared storage' },
    };
  }

  private onLocalState(c: { domain: string; to: string; state?: { reason?: string } }): void {
    const reason = c.state?.reason;
    if (c.to === 'deleted') this.pendingState.set(c.domain, 'removed');
    else if (c.to === 'shutoff' && reason !== 'migrated' && reason !== 'fenced')
      this.pendingState.set(c.domain, { state: 'stopped', note: `${reason ?? 'stopped'} on ${this.me}` });
    else if (c.to === 'crashed') {
      if (this.restartCrashed(c.domain, reason ?? 'QEMU died')) return;
      this.pendingState.set(c.domain, { state: 'stopped', note: `crashed on ${this.me}` });
    } else return;
    void this.flushPending();
  }

  private async flushPending(): Promise<void> {
    for (const [name, p] of [...this.pendingState]) {
      try {
        if (p === 'removed') await this.owners.remove(name);
        else await this.owners.setState(name, p.state, p.note);
        this.pendingState.delete(name);
      } catch (e) {
        if (asFerryError(e).code !== 'CLUSTER_NO_QUORUM') this.pendingState.delete(name);
        return;
      }
    }
    await this.events.flush();
  }

  /**
   * An HA domain whose QEMU died on this live host restarts here (a second later, through
   * a claim), at most CRASH_RESTARTS times in CRASH_WINDOW_MS, as Proxmox's max_restart
   * does; after that it stays stopped and the event log says why. Not without quorum:
   * a QEMU the watchdog killed must not come back (the claim would refuse it anyway).
   */
  private restartCrashed(name: string, why: string): boolean {
    const rec = this.records.get(name);
    if (!rec?.ha || rec.owner !== this.me || !this.member.quorate()) return false;
    const now = Date.now();
    const recent = (this.crashes.get(name) ?? []).filter((t) => now - t < CRASH_WINDOW_MS);
    if (recent.length >= CRASH_RESTARTS) {
      this.log.error('HA domain crashed too often; left stopped', { domain: name, crashes: recent.length + 1 });
      void this.events.add({
        type: 'restart-failed',
        domain: name,
        host: this.me,
        detail: `${name} crashed on ${this.me} ${recent.length + 1} times in ${CRASH_WINDOW_MS / 60000} min (${why}): left stopped; \`ferry start ${name}\` when fixed`,
      });
      this.crashes.delete(name);
      return false;
    }
    recent.push(now);
    this.crashes.set(name, recent);
    setTimeout(() => {
      this.host.start(name, { cpuModel: rec.cpuModel }).then(
        () => {
          this.log.warn('HA domain restarted after a crash', { domain: name, why, restarts: recent.length });
          void this.events.add({
            type: 'restarted',
            domain: name,
            host: this.me,
            detail: `${name} restarted on ${this.me} after its QEMU died (${why}; restart ${recent.length} of ${CRASH_RESTARTS} in ${CRASH_WINDOW_MS / 60000} min)`,
          });
        },
        (e) => {
          const fe = asFerryError(e);
          this.log.error('HA domain not restarted after a crash', { domain: name, code: fe.code, error: fe.message });
          this.pendingState.set(name, { state: 'stopped', note: `crashed on ${this.me}; restart failed: ${fe.message}` });
          void this.flushPending();
          void this.events.add({
            type: 'restart-failed',
            domain: name,
            host: this.me,
            detail: `${name} crashed on ${this.me} and could not restart there: ${fe.message}`,
          });
        },
      );
    }, 1000).unref();
    return true;
  }

  // ---------- fencing ----------

  private haHere(): string[] {
    return this.host
      .all()
      .filter((d) => hasProcess(d.rec.state) && d.rec.state.kind !== 'incoming')
      .map((d) => d.rec.config.name)
      .filter((n) => this.records.get(n)?.ha && this.records.get(n)?.owner === this.me);
  }

  private async fence(why: string): Promise<void> {
    const names = this.haHere();
    const at = Date.now();
    for (const n of names) {
      if (await this.host.fence(n).catch(() => false)) {
        this.fenced.add(n);
        this.log.warn('domain fenced', { domain: n, why });
        void this.events.add({ type: 'fenced', domain: n, host: this.me, detail: `${n} fenced on ${this.me}: ${why}` }, at);
      }
    }
    if (!names.length) this.log.warn('cluster lease overdue; no HA domain to fence here', { why });
  }

  /** The watchdog's next deadline and the QEMUs it must kill then (its socket in the state dir; started if absent). */
  private feedWatchdog(): void {
    const deadline = this.member.watchdogAt();
    if (!Number.isFinite(deadline)) return;
    const targets = this.haHere().flatMap((n) => {
      const s = this.host.find(n)?.rec.state;
      const pid = s && hasProcess(s) ? s.pid : 0;
      const start = pid ? startTicks(pid) : null;
      return start ? [{ pid, start }] : [];
    });
    const line = JSON.stringify({ deadline, targets }) + '\n';
    if (this.dog && !this.dog.destroyed) {
      this.dog.write(line);
      return;
    }
    if (this.dogConnecting) return; // the next renewal feeds it
    this.dogConnecting = true;
    const sock = path.join(this.host.cfg.stateDir, 'watchdog.sock');
    const c = net.connect(sock);
    c.on('connect', () => {
      this.dogConnecting = false;
      this.dog = c;
      c.write(line);
    });
    c.on('error', () => {
      if (this.dog === c) this.dog = undefined;
      if (!this.dogConnecting) return;
      this.dogConnecting = false;
      // One start at a time (the watchdog also refuses to run twice: its pid file).
      if (Date.now() - this.dogSpawnedAt < 5000) return;
      this.dogSpawnedAt = Date.now();
      // None there: start one (detached, so that it outlives this ferryd); the next renewal connects.
      if (!fs.existsSync(WATCHDOG_JS))
        return this.log.warn('watchdog not built (dist/cluster/watchdog.js); fencing relies on ferryd alone');
      spawn(process.execPath, [WATCHDOG_JS, sock, path.join(this.host.cfg.stateDir, 'watchdog.log')], {
        detached: true,
        stdio: 'ignore',
      }).unref();
    });
  }

  private dogConnecting = false;
  private dogSpawnedAt = 0;

  // ---------- following the records ----------

  /**
   * One etcd watch on a prefix, then a full read (`load`): a change between the two is in
   * both, and applying it twice is harmless. Retried every second until etcd answers;
   * the watch then resumes by itself across reconnections (etcd3 keeps its revision).
   */
  private async follow(
    what: string,
    prefix: string,
    on: { put: (key: string, value: unknown, modRevision: string) => void; del: (key: string) => void; load: () => Promise<string> },
  ): Promise<void> {
    for (;;) {
      try {
        // The list first, then a watch from the revision after it: no change falls between
        // them, and none is handled before the list that predates it (which would undo it:
        // a host's facts lost until its next publish).
        const rev = await on.load();
        this.changed();
        const w = await etcdCall(`watching ${what}`, () =>
          this.etcd
            .watch()
            .prefix(prefix)
            .startRevision((BigInt(rev) + 1n).toString())
            .create(),
        );
        this.watchers.push(w);
        w.on('put', (kv) => {
          const key = kv.key.toString();
          try {
            on.put(key, jsonOf(kv.value, key), kv.mod_revision);
            this.changed();
          } catch (e) {
            this.log.warn(`ignoring a record of ${what}`, { key, error: String(e) });
          }
        });
        w.on('delete', (kv) => {
          on.del(kv.key.toString());
          this.changed();
        });
        return;
      } catch (e) {
        this.log.debug(`etcd not reachable to watch ${what} yet`, { error: String(e) });
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
  }

  private watchRecords(): Promise<void> {
    return this.follow('domains', DOMAINS, {
      put: (key, value, modRevision) => {
        const rec = parseOwnerRecord(value, key);
        const prev = this.seen.get(rec.name);
        // Events come in revision order, but a fresh list may have passed them.
        if (!prev || BigInt(prev.modRevision) < BigInt(modRevision)) this.seen.set(rec.name, { key, value: rec, modRevision });
        // A domain of this host marked (or unmarked) for HA: the watchdog hears of it now, not at the next renewal.
        if (rec.owner === this.me && !!prev?.value.ha !== !!rec.ha) this.feedWatchdog();
        if (rec.owner === this.me && rec.state === 'restarting') void this.startAssigned(rec);
      },
      del: (key) => this.seen.delete(nameOfKey(key)),
      load: () => this.loadRecords(),
    });
  }

  /** The hosts' facts, followed the same way: placement, `host.info`'s peers and the fleet view read these. */
  private watchHosts(): Promise<void> {
    return this.follow('hosts', HOSTS, {
      put: (key, value) => {
        const f = parseHostFacts(value, key);
        this.hostsSeen.set(f.name, f);
      },
      del: (key) => this.hostsSeen.delete(nameOfKey(key)),
      load: async () => {
        const { items, revision } = await listJsonAt(this.etcd, HOSTS, parseHostFacts, (key, e) =>
          this.log.warn('ignoring a host record', { key, error: e.message }),
        );
        this.hostsSeen.clear();
        for (const h of items) this.hostsSeen.set(h.value.name, h.value);
        return revision;
      },
    });
  }

  /** The balancer's setting and holds, followed the same way (a hold's key goes with its lease). */
  private async watchBalance(): Promise<void> {
    await this.follow('the balancer setting', BALANCE_KEY, {
      put: (key, value) => {
        if (key === BALANCE_KEY) this.balanceSeen = parseBalanceSettings(value, key);
      },
      del: (key) => {
        if (key === BALANCE_KEY) this.balanceSeen = BALANCE_DEFAULTS;
      },
      load: async () => {
        const r = await etcdCall('reading the balancer setting', () => this.etcd.get(BALANCE_KEY).exec());
        this.balanceSeen = r.kvs[0] ? parseBalanceSettings(jsonOf(r.kvs[0].value, BALANCE_KEY), BALANCE_KEY) : BALANCE_DEFAULTS;
        return r.header.revision;
      },
    });
    await this.follow('the balancer holds', HELD, {
      put: (key, value) => {
        const h = parseHold(value, key);
        this.heldSeen.set(h.domain, h);
      },
      del: (key) => this.heldSeen.delete(nameOfKey(key)),
      load: async () => {
        const { items, revision } = await listJsonAt(this.etcd, HELD, parseHold);
        this.heldSeen.clear();
        for (const h of items) this.heldSeen.set(h.value.domain, h.value);
        return revision;
      },
    });
  }

  /** The placement rules, followed the same way: every placement this host makes reads them from memory. */
  private watchRules(): Promise<void> {
    return this.follow('rules', RULES_KEY, {
      put: (key, value) => {
        if (key === RULES_KEY) this.rulesSeen = parseRules(value, key);
      },
      del: (key) => {
        if (key === RULES_KEY) this.rulesSeen = [];
      },
      load: async () => {
        const r = await etcdCall('reading the placement rules', () => this.etcd.get(RULES_KEY).exec());
        this.rulesSeen = r.kvs[0] ? parseRules(jsonOf(r.kvs[0].value, RULES_KEY), RULES_KEY) : [];
        return r.header.revision;
      },
    });
  }

  rules(): Rule[] {
    return this.rulesSeen;
  }

  /**
   * The rules as etcd holds them now (a linearizable read, one round trip): a rule an
   * operator added on any host binds the next decision an operator asks of this one,
   * even before the watch brings it here. The automatic balancer reads the watched copy;
   * its moves are checked against this one when they start.
   */
  async freshRules(): Promise<Rule[]> {
    return (await readRules(this.etcd)).value;
  }

  /** The automatic balancer's setting (off until an operator turns it on). */
  balanceSettings(): BalanceSettings {
    return this.balanceSeen;
  }

  /** The domains the balancer moved lately, each held where it went until its lease ends. */
  held(): Hold[] {
    return [...this.heldSeen.values()];
  }

  /** A domain's config as its ownership record holds it ({} if there is none). */
  recordConfig(name: string): Record<string, unknown> {
    return this.records.get(name)?.config ?? {};
  }

  /**
   * The cluster's baseline CPU now (placement/cpu.ts): the most capable model every live
   * host can give. Refused without quorum: a stale view could pick a model a host that
   * joined meanwhile cannot run.
   */
  baseline(): Baseline {
    this.needQuorum('compute the cluster CPU baseline');
    // This host counts even before the watch has shown its own facts (just joined, or a watch re-synchronising).
    const hosts: CpuHost[] = [...this.hostsSeen.values()];
    if (!this.hostsSeen.has(this.me))
      hosts.push({ name: this.me, cpuModel: this.host.cfg.cpuModel, cpuModels: cpuModelsHere(this.host.qemu) });
    const b = baseline(hosts, Object.fromEntries(Object.entries(this.host.qemu.models).map(([k, v]) => [k, v.features])));
    if (!b)
      throw new FerryError(
        'PLACEMENT_NONE',
        `No CPU model is common to every live host of the cluster (${[...this.hostsSeen.keys()].join(', ')}); check each host's cpuCeiling (\`ferry cluster cpu\`)`,
      );
    return b;
  }

  cpuBaseline(): string {
    return this.baseline().model;
  }

  /** Subscribers (`ferry ui`, `events.subscribe`) hear that the fleet changed, at most every 100 ms. */
  private changed(): void {
    if (this.changedTimer) return;
    this.changedTimer = setTimeout(() => {
      this.changedTimer = undefined;
      this.host.emit('cluster.changed', { host: this.me });
    }, 100);
  }

  /** Every record from etcd (replacing what the watch held); the revision it was read at. */
  private async loadRecords(): Promise<string> {
    const { items, revision } = await this.owners.listAt((key, e) => this.log.warn('ignoring a domain record', { key, error: e.message }));
    this.seen.clear();
    for (const r of items) this.seen.set(r.value.name, r);
    for (const r of items) if (r.value.owner === this.me && r.value.state === 'restarting') void this.startAssigned(r.value);
    return revision;
  }

  /** The HA manager named this host: the domain starts here, once for this generation. */
  private async startAssigned(rec: OwnerRecord): Promise<void> {
    const tag = `${rec.name}#${rec.generation}`;
    if (this.assigned.has(tag)) return;
    this.assigned.add(tag);
    const t0 = Date.now();
    try {
      const c = parseDomainConfig(rec.config);
      const local = this.host.find(rec.name);
      if (local && hasProcess(local.rec.state)) throw new FerryError('DOMAIN_BAD_STATE', `a copy of ${rec.name} already runs here`);
      if (!local) this.host.defineMoved(c);
      await this.host.start(rec.name, { cpuModel: rec.cpuModel });
      this.log.info('HA domain restarted here', { domain: rec.name, generation: rec.generation, ms: Date.now() - t0 });
      void this.events.add({
        type: 'restarted',
        domain: rec.name,
        host: this.me,
        detail: `${rec.name} restarted on ${this.me} (${rec.note})`,
      });
    } catch (e) {
      const fe = asFerryError(e);
      this.log.error('HA restart failed here', { domain: rec.name, code: fe.code, error: fe.message });
      const cur = await this.owners.get(rec.name).catch(() => null);
      if (cur && cur.value.owner === this.me && cur.value.state === 'restarting')
        await this.owners.fail(cur, `restart on ${this.me} failed: ${fe.message}`).catch(() => false);
      void this.events.add({
        type: 'restart-failed',
        domain: rec.name,
        host: this.me,
        detail: `${rec.name} could not restart on ${this.me}: ${fe.message}`,
      });
    }
  }

  // ---------- (re)joining ----------

  /** This host (again) has a lease: the cluster's records win over what this host remembers. */
  private async rejoined(resumed: boolean): Promise<void> {
    void this.events.add({
      type: 'host-up',
      host: this.me,
      detail: `${this.me} joined the cluster${resumed ? ' (its lease was still alive)' : ''}`,
    });
    // Until it succeeds: a host that rejoins must not act on what it remembers.
    for (let attempt = 1; this.member.state.kind === 'member'; attempt++) {
      try {
        await this.loadRecords();
        for (const dom of this.host.all()) await this.reconcile(dom.rec.config.name);
        break;
      } catch (e) {
        if (attempt === 1 || attempt % 10 === 0)
          this.log.warn('reconciling with the cluster failed; retrying', { attempt, error: String(e) });
        await new Promise((r) => setTimeout(r, 500));
      }
    }
    this.fenced.clear();
    this.feedWatchdog();
  }

  private async reconcile(name: string): Promise<void> {
    const dom = this.host.find(name);
    if (!dom || dom.busy || dom.rec.state.kind === 'incoming' || dom.rec.state.kind === 'migrating-out') return;
    const rec = this.records.get(name);
    const s = dom.rec.state;
    if (!rec) {
      const running = s.kind === 'running' || s.kind === 'paused';
      if ((await this.owners.adopt(this.claimFacts(dom.rec.config), running ? 'running' : 'stopped')) === 'adopted')
        this.log.info("domain recorded in the cluster as this host's", { domain: name });
      return;
    }
    if (rec.owner !== this.me) {
      // The cluster gave it to another host while this one was away: this copy must not run, and its definition goes.
      if (hasProcess(s)) await this.host.fence(name);
      this.host.forget(name);
      this.log.warn('a stale copy was removed: the cluster gave the domain to another host', { domain: name, owner: rec.owner });
      void this.events.add({
        type: 'stale-copy',
        domain: name,
        host: this.me,
        detail: `${this.me} dropped its copy of ${name}: the cluster gave it to ${rec.owner}`,
      });
      return;
    }
    if (this.fenced.has(name) && rec.state === 'running') {
      // Fenced, but the lease survived (or the manager had not acted): it runs here again, through a claim,
      // with the CPU model it ran with (not today's baseline: the same life, as an HA restart elsewhere).
      await this.host.start(name, { cpuModel: rec.cpuModel }).then(
        () =>
          void this.events.add({
            type: 'restarted',
            domain: name,
            host: this.me,
            detail: `${name} restarted on ${this.me} after its fence (the lease survived)`,
          }),
        (e) => this.log.warn('fenced domain not restarted here', { domain: name, error: String(e) }),
      );
    }
  }

  // ---------- the fleet, for the API ----------

  /** The ownership records as this host's watch holds them (metrics read these, not etcd). */
  recordsSeen(): OwnerRecord[] {
    return this.records.values();
  }

  async status() {
    const hosts = await listJson(this.etcd, HOSTS, parseHostFacts).catch(() => null);
    const s = this.member.state;
    const leader = await etcdCall('reading the HA manager', () => this.etcd.election('ha-manager').leader()).catch(() => null);
    return {
      mode: 'cluster' as const,
      host: this.me,
      lease: {
        state: s.kind,
        id: s.kind === 'member' || s.kind === 'fenced' ? s.lease : null,
        quorate: this.member.quorate(),
        fenceInMs: Number.isFinite(this.member.fenceAt()) ? Math.max(0, Math.round(this.member.fenceAt() - monoMs())) : null,
        ttlS: this.cfg.leaseTtlS,
        fenceMarginS: this.cfg.fenceMarginS,
      },
      haManager: leader ?? null,
      etcd: await this.etcdHealth(),
      hosts: hosts ? hosts.map((h) => h.value) : null,
      domains: this.records.values().map((r) => ({ name: r.name, owner: r.owner, state: r.state, ha: r.ha })),
    };
  }

  /** Each endpoint asked on its own: up, its version, and whom it follows. */
  private async etcdHealth() {
    const members = await etcdCall('listing members', () => this.etcd.cluster.memberList({ linearizable: false })).catch(() => null);
    const byId = new Map((members?.members ?? []).map((m) => [m.ID, m.name]));
    return Promise.all(
      // The per-member clients the lease uses: one connection per member, not a new one per call.
      this.cfg.endpoints.map(async (url, i) => {
        const one = this.members[i];
        try {
          // One try, briefly: a member that does not answer is what this table reports, and
          // etcdCall's retries (with the client's own) held `cluster status` ~14 s on one cut off.
          const st = await one.maintenance.status({ deadline: Date.now() + MEMBER_STATUS_MS });
          const leader = st.leader && st.leader !== '0' ? (byId.get(st.leader) ?? st.leader) : null;
          return {
            url,
            ok: true,
            name: byId.get(st.header.member_id) ?? null,
            leader,
            term: Number(st.raftTerm),
            version: st.version,
            error: null,
          };
        } catch (e) {
          // The gist (refused, unreachable, deadline), not the advice: the table has one line per member.
          const m = /(ECONNREFUSED|EHOSTUNREACH|ETIMEDOUT|DEADLINE_EXCEEDED|Deadline exceeded|certificate[^.,;]*)/.exec(
            String((e as Error).message),
          );
          return {
            url,
            ok: false,
            name: null,
            leader: null,
            term: null,
            version: null,
            error: m ? m[1] : asFerryError(e).message.slice(0, 80),
          };
        }
      }),
    );
  }

  /**
   * `ferry cluster leave`: only a host that owns no domain record may leave (move or
   * delete them first). Its lease is revoked, so it is gone for everyone at once; this
   * ferryd then starts nothing until it runs standalone (the CLI removes the section).
   */
  async leave(): Promise<{ host: string; left: true }> {
    const mine = (await this.owners.list()).filter((r) => r.value.owner === this.me);
    if (mine.length)
      throw new FerryError(
        'DOMAIN_BAD_STATE',
        `${this.me} owns ${mine.length} domain(s) in the cluster (${mine
          .slice(0, 5)
          .map((r) => r.value.name)
          .join(', ')}): move them to another host (\`ferry migrate\`) or delete them before it leaves`,
      );
    await this.ha.stop();
    await this.member.stop(true);
    void this.events.add({ type: 'host-down', host: this.me, detail: `${this.me} left the cluster` });
    return { host: this.me, left: true };
  }

  // ---------- HA (ferry ha) ----------

  async haSet(domain: string, ha: OwnerRecord['ha']) {
    const r = await this.owners.setHa(domain, ha);
    void this.events.add({
      type: ha ? 'ha-added' : 'ha-removed',
      domain,
      host: r.value.owner,
      detail: ha
        ? `${domain} restarts elsewhere if ${r.value.owner} fails (priority ${ha.priority})`
        : `${domain} no longer restarts elsewhere`,
    });
    return this.view(r.value, true);
  }

  private view(r: OwnerRecord, ownerUp: boolean) {
    return {
      name: r.name,
      owner: r.owner,
      ownerUp,
      state: r.state,
      ha: r.ha,
      generation: r.generation,
      restartable: r.restartable,
      moving: r.moving,
      memoryMiB: r.memoryMiB,
      cpuModel: r.cpuModel,
      note: r.note,
      at: r.at,
    };
  }

  /** Every domain of the cluster, from this host's watch (no etcd round trip); refused without quorum, when the watch may be stale. */
  domains() {
    this.needQuorum('list the cluster');
    return this.fleet().domains;
  }

  /**
   * The fleet as this host's watches see it: the live hosts' facts and every domain
   * record. `ferry ui`, `host evacuate` and `list --all` read this; it changes with
   * the watch (event cluster.changed), so nobody polls each host. `quorate` false:
   * this host cannot reach etcd and the view may be stale.
   */
  fleet() {
    const hosts = [...this.hostsSeen.values()].sort((a, b) => a.name.localeCompare(b.name));
    const live = new Set(hosts.map((h) => h.name));
    const domains = this.records
      .values()
      .map((r) => ({
        ...this.view(r, live.has(r.owner)),
        cpu: this.hostsSeen.get(r.owner)?.load[r.name] ?? null,
        dirtyMBps: this.hostsSeen.get(r.owner)?.dirty[r.name] ?? null,
      }))
      .sort((a, b) => a.name.localeCompare(b.name));
    return { host: this.me, quorate: this.member.quorate(), hosts, domains, rules: this.rulesSeen };
  }

  /** NAME → ADDRESS:PORT of each live host's relocation port: cluster hosts are peers by name. */
  liveHosts(): Record<string, string> {
    return Object.fromEntries([...this.hostsSeen.values()].map((h) => [h.name, h.relocation]));
  }
}
