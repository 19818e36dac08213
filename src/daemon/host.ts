/**
 * The host: ferryd's domains as one facade over the concerns that keep them.
 *
 *   records.ts      the domain store: records in STATE/domains, the lifecycle's transitions
 *   runtime.ts      QEMU processes: spawn, attach, events, the end of a process, taps
 *   saverestore.ts  xm save / xm restore
 *   guestram.ts     reading and writing a paused guest's RAM
 *   console.ts      the serial console multiplexer
 *   capacity.ts     free memory against what the host really has
 *
 * Here: the checks a start makes, the lifecycle verbs of the API (create, start, pause,
 * shutdown, destroy, delete) and the intents migration/ calls (MigrationHost).
 */
import fs from 'node:fs';
import type net from 'node:net';
import path from 'node:path';
import { EventEmitter } from 'node:events';
import { FerryError } from '../errors.ts';
import { parseDomainConfig, domainConfigToJson, type DomainConfig } from '../domain/config.ts';
import { transition, hasProcess, describeKind, type DomainEvent } from '../domain/state.ts';
import { killAndWait, cpuSeconds, pidAlive } from '../qemu/process.ts';
import type { QemuFacts, AccelChoice } from '../qemu/probe.ts';
import { hostArch, cpuMissing, cpuModelsHere } from '../qemu/probe.ts';
import { dirtyTrackingUnreliable, guestResidentBytes, type GuestRam, type RamDigests } from '../qemu/memory.ts';
import { checkDomainFiles, createImage, freeBytes } from '../domain/storage.ts';
import { knownPeers, type MigrationHost, type MoveOwnership, type TunnelHome } from '../migration/host.ts';
import type { HostInfo, DomainSummary, DomainInfo, Results, TunnelView } from '../api/protocol.ts';
import { freeMiB, explainFree, memAvailableMiB, rssMiB, type Capacity } from './capacity.ts';
import type { DaemonConfig } from './config.ts';
import type { Logger } from './log.ts';
import { blockedAncestor, userfaultfdAvailable } from '../qemu/confine.ts';
import { UidPool, rangeClashes } from './uids.ts';
import { FERRY_VERSION } from '../version.ts';
import { writeJsonAtomic } from '../util/fsx.ts';
import { DomainStore, type HostedDomain } from './records.ts';
import { QemuRuntime } from './runtime.ts';
import { SaveRestore, type SaveOptions } from './saverestore.ts';
import { GuestRamAccess } from './guestram.ts';
import { Tunnels, vniFor } from './tunnels.ts';
import { peerAddresses } from '../migration/preflight.ts';

/**
 * Cluster mode's ownership check (daemon/cluster.ts): a domain's vCPUs start or resume
 * here only after `claim` made this host its owner in etcd. Standalone: no gate.
 */
export interface OwnershipGate extends MoveOwnership {
  claim(c: DomainConfig, why: string): Promise<void>;
  /** The CPU model every live host of the cluster can give a guest (placement/cpu.ts): what "cpu": "cluster" means now. */
  cpuBaseline(): string;
}

export class Host extends EventEmitter implements MigrationHost {
  private gate?: OwnershipGate;
  /** In-flight memory reservations (incoming migrations), MiB by job id. */
  private readonly reservations = new Map<string, { domain: string; memoryMiB: number }>();
  private readonly store: DomainStore;
  private readonly runtime: QemuRuntime;
  private readonly saves: SaveRestore;
  private readonly ram: GuestRamAccess;
  /** Whether an incoming move may switch to post-copy here (relocation.acceptPostcopy, userfaultfd). */
  private readonly postcopy: { ok: boolean; why: string };
  /** VXLAN tunnels that carry domains' home segments (tunnels.ts). */
  private readonly tunnels: Tunnels;
  /** Maintenance (ferry host maintenance / evacuate): no starts, no incoming moves. Persisted. */
  private maint: { on: boolean; since: string | null } = { on: false, since: null };

  constructor(
    readonly cfg: DaemonConfig,
    readonly log: Logger,
    readonly accel: AccelChoice,
    readonly qemu: QemuFacts,
  ) {
    super();
    const range = cfg.qemuUids;
    const clashes = range ? rangeClashes(range) : [];
    if (range && clashes.length)
      throw new FerryError(
        'CONFIG_INVALID',
        `Invalid ferryd config: qemu.uids ${range.first}-${range.first + range.count - 1} is not free on this host (${clashes.slice(0, 3).join('; ')}); choose another range`,
      );
    const blocked = range ? blockedAncestor(cfg.stateDir) : null;
    if (blocked)
      throw new FerryError(
        'CONFIG_INVALID',
        `Invalid ferryd config: domains' QEMUs (unprivileged uids) cannot pass through ${blocked} to reach their sockets under stateDir ${cfg.stateDir}; chmod o+x ${blocked}, or choose another stateDir`,
      );
    const emit = (event: string, data: unknown): void => {
      this.emit(event, data);
    };
    this.store = new DomainStore(cfg.stateDir, cfg.name, log, (c) => emit('domain.state', c));
    this.runtime = new QemuRuntime({ cfg, log, accel, qemu, uids: range ? new UidPool(range) : null, store: this.store, emit });
    this.saves = new SaveRestore({
      cfg,
      qemu,
      store: this.store,
      runtime: this.runtime,
      checkStart: (c, verb) => this.checkStart(c, verb),
      domainInfo: (n) => this.domainInfo(n),
      emit,
    });
    this.ram = new GuestRamAccess(cfg.name, this.runtime);
    this.postcopy = cfg.relocation.acceptPostcopy
      ? userfaultfdAvailable(this.runtime.confined)
      : { ok: false, why: `${cfg.name} refuses incoming post-copy (relocation.acceptPostcopy is false)` };
    if (cfg.relocation.acceptPostcopy) log.info('post-copy for incoming moves', this.postcopy);
    this.tunnels = new Tunnels(cfg.stateDir, cfg.relocation.address, log);
    try {
      const m = JSON.parse(fs.readFileSync(path.join(cfg.stateDir, 'maintenance.json'), 'utf8')) as { on?: unknown; since?: unknown };
      if (m.on === true) this.maint = { on: true, since: typeof m.since === 'string' ? m.since : null };
    } catch {
      /* never set */
    }
  }

  postcopyIncoming(): { ok: boolean; why: string } {
    return this.postcopy;
  }
  /**
   * RAM that holds data, for the plan: a sample of its pages (GuestRamAccess.nonZeroBytes),
   * at most QEMU's resident memory; resident memory alone where the RAM cannot be read
   * (no ptrace access); null where neither can be told.
   */
  async touchedBytes(dom: HostedDomain): Promise<number | null> {
    const s = dom.rec.state;
    if (!hasProcess(s) || !dom.qmp) return null;
    const [resident, sampled] = await Promise.all([
      guestResidentBytes(dom.qmp, s.pid),
      this.ram.nonZeroBytes(dom).catch((e: unknown) => {
        this.log.debug('RAM holding data not sampled: resident memory counts instead', { domain: dom.rec.config.name, error: String(e) });
        return null;
      }),
    ]);
    if (sampled === null) return resident;
    return resident === null ? sampled : Math.min(resident, sampled);
  }

  async compressibility(dom: HostedDomain): Promise<number | null> {
    return this.ram.compressibility(dom).catch(() => null);
  }

  get runDir(): string {
    return this.runtime.runDir;
  }

  // ---------- records (daemon/records.ts) ----------

  /** Loads records and re-attaches to QEMU processes that survived a ferryd restart. */
  async recover(): Promise<void> {
    for (const dom of this.store.load()) await this.runtime.reattach(dom);
    this.tunnels.adopt(new Set(this.domainUuids()));
  }

  get(name: string): HostedDomain {
    return this.store.get(name);
  }
  find(name: string): HostedDomain | undefined {
    return this.store.find(name);
  }
  all(): HostedDomain[] {
    return this.store.all();
  }
  domainNames(): string[] {
    return this.store.names();
  }
  domainUuids(): string[] {
    return this.store.all().map((l) => l.rec.config.uuid);
  }
  apply(dom: HostedDomain, e: DomainEvent): void {
    this.store.apply(dom, e);
  }
  forget(name: string): void {
    this.store.forget(name, this.runDir);
  }

  // ---------- queries ----------

  memoryUsedMiB(): number {
    let used = 0;
    // A domain whose QEMU is still being spawned counts too: two concurrent starts
    // must not both pass the memory check.
    for (const l of this.store.all())
      if (hasProcess(l.rec.state) || l.busy === 'starting' || l.busy === 'restoring') used += l.rec.config.memoryMiB;
    return used + this.reservedNotRunningMiB();
  }

  /**
   * Incoming moves' reservations whose QEMU does not run here yet. Once it does, that
   * QEMU counts as a domain with a process, and its reservation would count it twice.
   */
  private reservedNotRunningMiB(): number {
    let mib = 0;
    for (const r of this.reservations.values()) {
      const d = this.store.find(r.domain);
      if (!d || !hasProcess(d.rec.state)) mib += r.memoryMiB;
    }
    return mib;
  }

  /** The figures behind the free memory: the offer's remainder against what the host really has (daemon/capacity.ts). */
  capacity(): Capacity {
    let untouched = 0;
    for (const l of this.store.all()) {
      const s = l.rec.state;
      if (hasProcess(s)) untouched += Math.max(0, l.rec.config.memoryMiB - rssMiB(s.pid));
    }
    // A reservation without its QEMU yet will touch all of it, too.
    untouched += this.reservedNotRunningMiB();
    return {
      offerMiB: this.cfg.memoryMiB,
      usedMiB: this.memoryUsedMiB(),
      availableMiB: memAvailableMiB(),
      untouchedMiB: untouched,
      marginMiB: this.cfg.memoryMarginMiB,
    };
  }

  /** Free memory and which limit binds it, in words: what a peer's pre-flight is told. */
  memoryFacts(): { freeMiB: number; freeWhy: string } {
    const c = this.capacity();
    return { freeMiB: freeMiB(c), freeWhy: explainFree(c) };
  }

  info(): HostInfo {
    return {
      name: this.cfg.name,
      arch: hostArch(),
      version: FERRY_VERSION,
      qemuVersion: this.qemu.version,
      machine: this.qemu.machine,
      engine: {
        binary: this.cfg.qemu.binary,
        dataDirs: this.cfg.qemu.dataDirs,
        version: this.qemu.version,
        liveDirtyTrackingReliable: !dirtyTrackingUnreliable(this.accel.accel, this.qemu.version),
      },
      accel: this.accel.accel,
      accelReason: this.accel.reason,
      cpuModel: this.qemu.cpuModel,
      cpuFeatures: this.qemu.cpuFeatures,
      cpuUnavailable: this.qemu.cpuUnavailable,
      cpuCeiling: this.qemu.ceiling,
      cpuModels: cpuModelsHere(this.qemu),
      memory: (() => {
        const c = this.capacity();
        return {
          offeredMiB: c.offerMiB,
          usedMiB: c.usedMiB,
          freeMiB: freeMiB(c),
          reservedMiB: [...this.reservations.values()].reduce((a, r) => a + r.memoryMiB, 0),
          availableMiB: c.availableMiB,
          untouchedMiB: c.untouchedMiB,
          marginMiB: c.marginMiB,
          limitedBy: explainFree(c),
        };
      })(),
      networks: this.cfg.networks,
      relocation: {
        address: this.cfg.relocation.address,
        port: this.cfg.relocation.port,
        dataPorts: this.cfg.relocation.dataPorts,
        hostsAllow: this.cfg.relocation.hostsAllow,
      },
      domains: this.store.size,
      tunnels: this.tunnelList(),
      maintenance: { ...this.maint },
      // Cluster mode: every live host is a peer by name (its published relocation address).
      peers: this.peers(),
      mode: this.gate ? 'cluster' : 'standalone',
    };
  }

  summary(dom: HostedDomain): DomainSummary {
    const s = dom.rec.state;
    return {
      name: dom.rec.config.name,
      uuid: dom.rec.config.uuid,
      id: hasProcess(s) ? s.domid : null,
      memoryMiB: dom.rec.config.memoryMiB,
      vcpus: dom.rec.config.vcpus,
      state: s.kind,
      cpuTime: hasProcess(s) ? cpuSeconds(s.pid) : 0,
    };
  }

  domainInfo(name: string): DomainInfo {
    const dom = this.get(name);
    const s = dom.rec.state;
    return {
      ...this.summary(dom),
      host: this.cfg.name,
      config: domainConfigToJson(dom.rec.config),
      stateDetail: s,
      pid: hasProcess(s) ? s.pid : null,
      accel: dom.rec.runtime?.accel ?? this.accel.accel,
      cpuModel: hasProcess(s) && dom.rec.runtime ? dom.rec.runtime.cpuModel : this.cpuOrNull(dom.rec.config),
      nics: dom.rec.config.nics.map((n, i) => ({
        network: n.network,
        mac: n.mac,
        ip: n.ip ?? null,
        tap: dom.rec.runtime?.taps[i] ?? null,
      })),
      consoleLog: dom.rec.runtime?.consoleLog ?? path.join(this.runDir, name, 'console.log'),
    };
  }

  // ---------- checks shared with migration pre-flight ----------

  checkNetworks(c: DomainConfig): void {
    for (const n of c.nics)
      if (!this.cfg.networks[n.network])
        throw new FerryError(
          'NETWORK_NOT_FOUND',
          `Domain "${c.name}" needs network "${n.network}", which host ${this.cfg.name} does not have (it has: ${Object.keys(this.cfg.networks).join(', ') || 'none'})`,
        );
  }

  /**
   * Storage pools, safe paths (domain/storage.ts) and the per-domain disk cap. `backing:
   * false` when a spawn follows at once: it checks the backing chain it opens.
   */
  checkPaths(c: DomainConfig, opts: { backing?: boolean } = {}): void {
    if (c.disks.length > this.cfg.limits.disksPerDomain)
      throw new FerryError(
        'API_LIMIT',
        `Domain "${c.name}" has ${c.disks.length} disks; ${this.cfg.name} allows ${this.cfg.limits.disksPerDomain} (limits.disksPerDomain)`,
      );
    checkDomainFiles(c, this.cfg.storage, this.cfg.name, opts);
  }

  /**
   * The CPU model a start of `c` gives its guest: its own "cpu", the cluster's baseline
   * for "cluster" (cluster mode only), else this host's "cpuModel".
   */
  cpuFor(c: DomainConfig): string {
    if (c.cpu && c.cpu !== 'cluster') return c.cpu;
    // No "cpu": in cluster mode the cluster's baseline (as EVC gives new VMs), so the domain can go to any host; standalone, this host's cpuModel.
    if (!c.cpu) return this.gate ? this.gate.cpuBaseline() : this.cfg.cpuModel;
    if (!this.gate)
      throw new FerryError(
        'CLUSTER_NOT_CONFIGURED',
        `Domain "${c.name}" asks for the cluster's baseline CPU ("cpu": "cluster"), but ${this.cfg.name} runs standalone; name a CPU model instead`,
      );
    return this.gate.cpuBaseline();
  }

  private cpuOrNull(c: DomainConfig): string | null {
    try {
      return this.cpuFor(c);
    } catch {
      return null;
    }
  }

  checkMemory(c: DomainConfig, verb = 'start', model = this.cpuFor(c)): void {
    // Before memory: a CPU model this host cannot run would fail in QEMU (enforce) anyway.
    const miss = cpuMissing(this.qemu, model);
    if (!miss)
      throw new FerryError('QEMU_START_FAILED', `Cannot ${verb} domain "${c.name}": this host's QEMU knows no CPU model ${model}`, {
        model,
      });
    if (miss.length)
      throw new FerryError(
        'QEMU_START_FAILED',
        `Cannot ${verb} domain "${c.name}": CPU model ${model} needs ${miss.slice(0, 8).join(', ')}${miss.length > 8 ? ` and ${miss.length - 8} more` : ''}, which ${this.cfg.name} cannot provide (${this.accel.accel}${this.qemu.ceiling ? `, cpuCeiling ${this.qemu.ceiling}` : ''}); give the domain a CPU model this host can run (\`ferry cluster cpu\` shows the cluster's baseline)`,
        { unavailable: miss, model },
      );
    const cap = this.capacity();
    const free = freeMiB(cap);
    if (free < c.memoryMiB)
      throw new FerryError(
        'HOST_NO_MEMORY',
        `Cannot ${verb} domain "${c.name}": ${this.cfg.name} has ${free} MiB free, needs ${c.memoryMiB} MiB (it ${explainFree(cap)})`,
        { freeMiB: free, needMiB: c.memoryMiB },
      );
  }

  /** Everything a start needs of this host: not in maintenance, the networks, the files, the CPU model, the memory. */
  checkStart(c: DomainConfig, verb = 'start', model?: string): void {
    this.checkNotInMaintenance(c.name, verb);
    this.checkNetworks(c);
    this.checkPaths(c, { backing: false });
    this.checkMemory(c, verb, model);
  }

  checkNotInMaintenance(name: string, verb: string): void {
    if (this.maint.on)
      throw new FerryError(
        'HOST_MAINTENANCE',
        `Cannot ${verb} domain "${name}": ${this.cfg.name} is in maintenance since ${this.maint.since ?? 'earlier'}; start it on another host, or end maintenance (\`ferry -H ${this.cfg.name} host maintenance ${this.cfg.name} off\`)`,
      );
  }

  /** Maintenance on or off (persisted first: a restart keeps it). */
  setMaintenance(on: boolean): Results['host.maintenance'] {
    const next = on ? { on: true, since: this.maint.on ? this.maint.since : new Date().toISOString() } : { on: false, since: null };
    writeJsonAtomic(path.join(this.cfg.stateDir, 'maintenance.json'), next);
    this.maint = next;
    this.log.info(on ? 'maintenance on' : 'maintenance off', { since: next.since });
    this.emit('host.maintenance', { host: this.cfg.name, ...next });
    return { host: this.cfg.name, maintenance: { ...next } };
  }

  maintenance(): { on: boolean; since: string | null } {
    return { ...this.maint };
  }

  /** Cluster mode: every start, resume and handover goes through etcd from now on. */
  useOwnership(gate: OwnershipGate): void {
    this.gate = gate;
  }

  get ownership(): MoveOwnership | null {
    return this.gate ?? null;
  }

  peers(): Record<string, string> {
    return knownPeers(this.cfg.peers, this.ownership);
  }

  // ---------- lifecycle ----------

  /** `ferry create`: define, and start unless told not to. Nothing is stored if a check fails. */
  /** `paused`: started with its vCPUs stopped (xm create -p), `ferry unpause` runs it. */
  async create(rawConfig: unknown, start = true, paused = false): Promise<DomainInfo> {
    const c = parseDomainConfig(rawConfig);
    if (start) this.checkNotInMaintenance(c.name, 'create and start');
    this.store.checkUnique(c);
    this.checkNetworks(c);
    this.checkPaths(c, { backing: !start }); // a start's spawn checks the chain it opens
    if (start) this.checkMemory(c);
    this.store.define({ rec: { config: c, state: { kind: 'defined' } } });
    this.log.info('domain defined', { domain: c.name, uuid: c.uuid });
    if (start) {
      try {
        await this.start(c.name, { paused });
      } catch (e) {
        // A create that cannot start leaves nothing behind, as xm create does.
        this.store.unhold(c.name);
        throw e;
      }
    }
    return this.domainInfo(c.name);
  }

  /** `cpuModel`: an HA restart keeps the model the domain ran with elsewhere (placement checked this host gives it). */
  async start(name: string, o: { cpuModel?: string; paused?: boolean } = {}): Promise<DomainInfo> {
    const dom = this.get(name);
    const c = dom.rec.config;
    if (dom.busy) throw new FerryError('DOMAIN_BAD_STATE', `Domain "${name}" is busy (${dom.busy})`);
    // Check legality before doing anything irreversible.
    transition(dom.rec.state, { type: 'start', pid: 0, domid: 0, at: 0 }, name);
    const model = o.cpuModel ?? this.cpuFor(c);
    this.checkStart(c, 'start', model);
    dom.busy = 'starting';
    try {
      const { pid, qmp, runtime } = await this.runtime.spawn(c, { cpuModel: model });
      dom.rec.runtime = runtime;
      dom.expectStop = undefined;
      this.apply(dom, { type: 'start', pid, domid: this.store.allocDomid(), at: Date.now() });
      await this.runtime.attach(dom, pid, qmp);
      // QEMU waits with its vCPUs stopped (-S) until the cluster says this host owns the domain.
      await this.claimOrStop(dom, 'start');
      if (o.paused) this.apply(dom, { type: 'pause', at: Date.now() });
      else await qmp.execute('cont');
    } finally {
      dom.busy = undefined;
    }
    return this.domainInfo(name);
  }

  /** A QEMU started paused whose claim failed is stopped again: nothing runs that the cluster did not give this host. */
  private async claimOrStop(dom: HostedDomain, why: string): Promise<void> {
    if (!this.gate) return;
    try {
      await this.gate.claim(dom.rec.config, why);
    } catch (e) {
      const s = dom.rec.state;
      dom.expectStop = 'destroyed';
      if (hasProcess(s)) await killAndWait(s.pid, 0);
      await dom.exited;
      throw e;
    }
  }

  /**
   * Cluster fencing (daemon/cluster.ts): this host lost its lease, so another may run
   * the domain soon. Its vCPUs stop first (QMP stop, bounded), then QEMU is killed.
   * True if there was a QEMU to fence.
   */
  async fence(name: string): Promise<boolean> {
    const dom = this.find(name);
    const s = dom?.rec.state;
    if (!dom || !s || !hasProcess(s) || s.kind === 'incoming') return false;
    dom.expectStop = 'fenced';
    await Promise.race([dom.qmp?.execute('stop').catch(() => undefined), new Promise((r) => setTimeout(r, 300))]);
    await killAndWait(s.pid, 0);
    await Promise.race([dom.exited, new Promise((r) => setTimeout(r, 2000))]);
    if (hasProcess(dom.rec.state)) {
      this.runtime.cleanup(dom);
      this.apply(dom, { type: 'stopped', reason: 'fenced', at: Date.now() });
    }
    return true;
  }

  async pause(name: string): Promise<DomainSummary> {
    const dom = this.get(name);
    transition(dom.rec.state, { type: 'pause', at: 0 }, name);
    const { qmp } = this.runtime.needProcess(dom, 'pause');
    await qmp.execute('stop');
    if (dom.rec.state.kind === 'running') this.apply(dom, { type: 'pause', at: Date.now() });
    return this.summary(dom);
  }

  async unpause(name: string): Promise<DomainSummary> {
    const dom = this.get(name);
    transition(dom.rec.state, { type: 'resume', at: 0 }, name);
    const { qmp } = this.runtime.needProcess(dom, 'unpause');
    await this.gate?.claim(dom.rec.config, 'unpause');
    await qmp.execute('cont');
    if (dom.rec.state.kind === 'paused') this.apply(dom, { type: 'resume', at: Date.now() });
    return this.summary(dom);
  }

  /** ACPI shutdown; waits up to timeoutS for the guest to power off. */
  async shutdown(name: string, timeoutS = 60): Promise<DomainSummary & { shutdownMs: number }> {
    const dom = this.get(name);
    transition(dom.rec.state, { type: 'stopped', reason: 'shutdown', at: 0 }, name);
    const { qmp } = this.runtime.needProcess(dom, 'shut down');
    dom.expectStop = 'shutdown';
    const t0 = Date.now();
    if (dom.rec.state.kind === 'paused') await qmp.execute('cont');
    await qmp.execute('system_powerdown');
    const gone = await Promise.race([
      dom.exited!.then(() => true),
      new Promise<boolean>((r) => setTimeout(() => r(false), timeoutS * 1000)),
    ]);
    if (!gone) {
      dom.expectStop = undefined;
      throw new FerryError(
        'TIMEOUT',
        `Domain "${name}" did not shut down within ${timeoutS} s (ACPI power button sent; it may not handle it). It is still running; use \`ferry destroy ${name}\` to stop it at once`,
      );
    }
    return { ...this.summary(dom), shutdownMs: Date.now() - t0 };
  }

  /** Stops at once: QEMU is killed. Also clears a crashed domain to shut off. */
  async destroy(name: string): Promise<DomainSummary> {
    const dom = this.get(name);
    const s = dom.rec.state;
    if (s.kind === 'crashed') {
      this.apply(dom, { type: 'stopped', reason: 'destroyed', at: Date.now() });
      return this.summary(dom);
    }
    if (s.kind === 'migrating-out')
      throw new FerryError(
        'MIGRATION_IN_PROGRESS',
        `Domain "${name}" is migrating; cancel the migration first (\`ferry job abort ${name}\`)`,
      );
    if (!hasProcess(s)) throw new FerryError('DOMAIN_BAD_STATE', `Cannot destroy domain "${name}": it is ${describeKind(s.kind)}`);
    dom.expectStop = 'destroyed';
    await killAndWait(s.pid, 0);
    await dom.exited;
    if (hasProcess(dom.rec.state)) {
      // QMP never connected (or closed before): settle here.
      this.runtime.cleanup(dom);
      this.apply(dom, { type: 'stopped', reason: 'destroyed', at: Date.now() });
    }
    return this.summary(dom);
  }

  /** Removes a definition. Only when no QEMU runs for it. */
  delete(name: string): { name: string; deleted: true } {
    const dom = this.get(name);
    if (hasProcess(dom.rec.state))
      throw new FerryError(
        'DOMAIN_BAD_STATE',
        `Cannot delete domain "${name}": it is ${describeKind(dom.rec.state.kind)}; destroy or shut it down first`,
      );
    this.forget(name);
    return { name, deleted: true };
  }

  // ---- intents for migration/ (MigrationHost in migration/host.ts) ----

  setBusy(dom: HostedDomain, why: string | undefined): void {
    dom.busy = why;
  }
  reserve(jobId: string, domain: string, memoryMiB: number): void {
    this.reservations.set(jobId, { domain, memoryMiB });
  }
  release(jobId: string): void {
    this.reservations.delete(jobId);
  }

  /**
   * An incoming migration's domain: defined here (busy, not yet persisted as running),
   * its QEMU started stopped with `-incoming defer`, attached. `onDefined` hears the pid
   * before anything else happens, so a crash right after leaves a record to clean.
   */
  async startIncoming(
    config: DomainConfig,
    jobId: string,
    opts: { preallocate: boolean; machine: string; cpuModel: string; bridges?: (string | undefined)[] },
    onDefined: (pid: number) => void,
  ): Promise<HostedDomain> {
    const dom: HostedDomain = { rec: { config, state: { kind: 'defined' } }, busy: 'incoming migration' };
    this.store.hold(dom);
    const sp = await this.runtime.spawn(config, {
      incoming: true,
      preallocate: opts.preallocate,
      machine: opts.machine,
      cpuModel: opts.cpuModel,
      bridges: opts.bridges,
    });
    dom.rec.runtime = sp.runtime;
    onDefined(sp.pid);
    this.apply(dom, { type: 'incoming', pid: sp.pid, domid: this.store.allocDomid(), jobId, at: Date.now() });
    await this.runtime.attach(dom, sp.pid, sp.qmp);
    return dom;
  }

  defineMoved(config: DomainConfig): void {
    this.store.define({ rec: { config, state: { kind: 'defined' } } });
  }

  async discardIncoming(dom: HostedDomain): Promise<void> {
    const s = dom.rec.state;
    dom.expectStop = 'destroyed';
    if (s.kind === 'incoming' && pidAlive(s.pid)) await killAndWait(s.pid, 0);
    this.runtime.cleanup(dom);
    this.forget(dom.rec.config.name);
  }

  async retireMigrated(dom: HostedDomain, to: { name: string; address: string; port: number }): Promise<void> {
    const s = dom.rec.state;
    const pid = hasProcess(s) ? s.pid : undefined;
    dom.expectStop = 'migrated';
    dom.console?.detachAll({ event: 'moved', host: to.name, target: `${to.address}:${to.port}` });
    await dom.qmp?.execute('quit').catch(() => undefined);
    if (pid) await killAndWait(pid, 3000);
    this.runtime.cleanup(dom);
    if (dom.rec.state.kind === 'migrating-out') this.apply(dom, { type: 'stopped', reason: 'migrated', at: Date.now() });
    this.forget(dom.rec.config.name);
  }

  attachConsole(name: string, client: net.Socket, replay = 0): void {
    const dom = this.get(name);
    if (!dom.console)
      throw new FerryError('DOMAIN_BAD_STATE', `Domain "${name}" has no console: it is ${describeKind(dom.rec.state.kind)}`);
    dom.console.attach(client, replay);
  }

  // ---- tunnels (tunnels.ts): a domain's home segment carried to the host it runs on ----

  tunnelList(): TunnelView[] {
    return this.tunnels.list().map((t) => ({
      domain: t.domain,
      nic: t.nic,
      network: t.network,
      vni: t.vni,
      end: t.end,
      device: t.device,
      bridge: t.bridge,
      local: t.local,
      remotes: t.remotes,
      home: { host: t.home.host, address: t.home.address, subnet: t.home.subnet },
      since: t.since,
    }));
  }

  /** Where each NIC of the domain lives: its away end's home, or this host's own segment. */
  tunnelHomes(c: DomainConfig): TunnelHome[] {
    return c.nics.map((n, i) => {
      const net = this.cfg.networks[n.network];
      return (
        this.tunnels.away(c.uuid, i)?.home ?? {
          host: this.cfg.name,
          address: this.cfg.relocation.address,
          subnet: net?.subnet ?? '',
          vni: vniFor(c.uuid, i),
          ...(net?.address ? { ip: net.address.split('/')[0] } : {}),
        }
      );
    });
  }

  /** Away ends for an incoming domain's NICs that need one; the bridge per NIC (undefined: the network's own). */
  openAway(c: DomainConfig, homes: Map<number, TunnelHome>): (string | undefined)[] {
    try {
      return c.nics.map((n, i) => {
        const home = homes.get(i);
        return home ? this.tunnels.openAway({ domain: c.name, uuid: c.uuid, nic: i, network: n.network, home }) : undefined;
      });
    } catch (e) {
      this.tunnels.closeAway(c.uuid);
      throw e;
    }
  }

  closeAway(uuid: string): { nic: number; home: TunnelHome }[] {
    return this.tunnels.closeAway(uuid).map((t) => ({ nic: t.nic, home: t.home }));
  }

  /** This host is the NIC's home: flood its segment to `remote` too. */
  extendHome(c: DomainConfig, nic: number, remote: string): string[] {
    const n = c.nics[nic];
    const net = n && this.cfg.networks[n.network];
    if (!net) throw new FerryError('NETWORK_NOT_FOUND', `Domain "${c.name}" has no NIC ${nic} on a network of ${this.cfg.name}`);
    return this.tunnels.extendHome(
      { domain: c.name, uuid: c.uuid, nic, network: n.network, bridge: net.bridge, subnet: net.subnet, host: this.cfg.name },
      remote,
    ).remotes;
  }

  /** A peer asks (relocation.tunnel) for a NIC whose home is here: only a host the tunnel reaches may. */
  tunnelFromPeer(change: { op: 'extend' | 'retract'; uuid: string; nic: number; remote: string }, callerAddress: string): string[] {
    const { op, uuid, nic, remote } = change;
    const t = this.tunnels.home(uuid, nic);
    if (!t)
      throw new FerryError(
        'NETWORK_TUNNEL_FAILED',
        `${this.cfg.name} is not the home of a tunnel for domain ${uuid.slice(0, 64)} NIC ${nic}`,
      );
    if (!t.remotes.includes(callerAddress))
      throw new FerryError(
        'API_FORBIDDEN',
        `The tunnel of domain "${t.domain}" NIC ${nic} does not reach ${callerAddress}; only a host it reaches may change it`,
      );
    // Only to hosts of this cluster: a peer cannot make this segment flood anywhere else.
    if (op === 'extend' && !peerAddresses(this.peers()).includes(remote))
      throw new FerryError(
        'API_FORBIDDEN',
        `${remote.slice(0, 64)} is not the address of a peer of ${this.cfg.name} ("peers" in its ferryd.json, or a live host of its cluster); the tunnel of domain "${t.domain}" extends only to those`,
      );
    if (op === 'extend')
      return this.tunnels.extendHome(
        { domain: t.domain, uuid, nic, network: t.network, bridge: t.bridge, subnet: t.home.subnet, host: t.home.host },
        remote,
      ).remotes;
    return this.tunnels.retractHome(uuid, nic, remote)?.remotes ?? [];
  }

  retractHome(uuid: string, nic: number, remote: string): void {
    this.tunnels.retractHome(uuid, nic, remote);
  }

  createDisk(p: string, format: 'raw' | 'qcow2', virtualSize: number, backing?: { path: string; format: string }): void {
    createImage(p, format, virtualSize, backing);
  }
  localFreeBytes(): number {
    return freeBytes(this.cfg.storage.localDir);
  }

  /** Drops the runtime of a domain whose QEMU is gone (sockets, taps, console). */
  cleanupRuntime(dom: HostedDomain): void {
    this.runtime.cleanup(dom);
  }
  removeTaps(uuid: string, nics: number): void {
    this.runtime.removeTaps(uuid, nics);
  }
  qemuDirOf(dom: HostedDomain): string {
    return this.runtime.qemuDirOf(dom);
  }
  qemuTlsDir(dom: HostedDomain): string {
    return this.runtime.qemuTlsDir(dom);
  }

  // ---------- save / restore (saverestore.ts) and guest RAM (guestram.ts) ----------

  save(name: string, file: string, opts?: SaveOptions): Promise<Results['domain.save']> {
    return this.saves.save(name, file, opts);
  }
  restore(file: string, opts?: { anyPath?: boolean; local: boolean }): Promise<Results['domain.restore']> {
    return this.saves.restore(file, opts);
  }
  sampleMemory(name: string, startMiB: number, endMiB: number): Promise<{ bytes: string; pages: number }> {
    return this.ram.sample(this.get(name), startMiB, endMiB);
  }
  withRam<T>(dom: HostedDomain, write: boolean, f: (ram: GuestRam) => Promise<T>): Promise<T> {
    return this.ram.withRam(dom, write, f);
  }
  ramDigests(dom: HostedDomain): Promise<RamDigests> {
    return this.ram.digests(dom);
  }
  ramChunkDigests(dom: HostedDomain, chunks: number[]): Promise<{ bytes: number; chunkBytes: number; digests: Buffer }> {
    return this.ram.chunkDigests(dom, chunks);
  }

  /** Closes QMP and consoles without touching QEMU: domains outlive ferryd. */
  detachAll(): void {
    for (const l of this.store.all()) this.runtime.detach(l);
  }
}
