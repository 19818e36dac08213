/**
 * The host: ferryd's domains, their QEMU processes and their persisted records.
 *
 * Records live in STATE/domains/NAME.json and are rewritten atomically on every state
 * change, so a restarted ferryd finds each domain as it was and re-attaches to its
 * QEMU by pid + QMP socket. Per-domain runtime files (QMP, console, logs) live in
 * STATE/run/NAME/.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { EventEmitter } from 'node:events';
import { FerryError } from '../errors.ts';
import { parseDomainConfig, domainConfigToJson, domainPaths, type DomainConfig } from '../domain/config.ts';
import { transition, hasProcess, describeKind, type DomainState, type DomainEvent, type StopReason } from '../domain/state.ts';
import { domainArgv, tapName, type Accel } from '../qemu/argv.ts';
import { startQemu, isOurQemu, killAndWait, cpuSeconds, pidAlive, processStartTicks, processUid, unixPeerIs } from '../qemu/process.ts';
import { QmpClient, type QmpEvent } from '../qmp/client.ts';
import { MigrationWatcher, FINAL_STATUSES } from '../qemu/migstatus.ts';
import type { QemuFacts, AccelChoice } from '../qemu/probe.ts';
import { hostArch } from '../qemu/probe.ts';
import { openGuestRam, digestRam, digestChunks, chunkBytesFor, dirtyTrackingUnreliable, type GuestRam, type RamDigests } from '../qemu/memory.ts';
import { StateWriter, readJson } from '../util/fsx.ts';
import { checkDomainFiles, resolveSaveFile } from '../domain/storage.ts';
import type { MigrationHost } from '../migration/ports.ts';
import type { HostInfo, DomainSummary, DomainInfo } from '../api/protocol.ts';
import { freeMiB, explainFree, memAvailableMiB, rssMiB, type Capacity } from './capacity.ts';
import type { DaemonConfig } from './config.ts';
import type { Logger } from './log.ts';
import { createTap, deleteTap } from './net.ts';
import { resolveQemuUser, prepareQemuDir, copyTlsForQemu, blockedAncestor, type QemuUser } from '../qemu/confine.ts';
import { ConsoleMux } from './console.ts';
import { FERRY_VERSION } from '../version.ts';


export interface Runtime {
  /** QEMU's own directory (confine.ts): its sockets and TLS copy. Absent in records of ferry < 0.3. */
  qemuDir?: string;
  /** The QEMU process's start time (processStartTicks), taken at spawn: its identity beside the pid. */
  startTicks?: number;
  qmpPath: string;
  consolePath: string;
  logPath: string;
  consoleLog: string;
  taps: string[];
  accel: Accel;
  machine: string;
  cpuModel: string;
}

export interface DomainRecord {
  config: DomainConfig;
  state: DomainState;
  runtime?: Runtime;
}

export interface Live {
  rec: DomainRecord;
  qmp?: QmpClient;
  console?: ConsoleMux;
  /** Set when ferryd itself asked QEMU to end, so its exit is a stop, not a crash. */
  expectStop?: StopReason;
  /** Set while an operation owns the domain's process (save, sample, migration). */
  busy?: string;
  exited?: Promise<void>;
}

const SAVE_MAGIC = 'FERRY-SAVE-1\n';

export class Host extends EventEmitter implements MigrationHost {
  readonly domains = new Map<string, Live>();
  private nextDomid = 1;
  /** In-flight memory reservations (incoming migrations), MiB by job id. */
  readonly reservations = new Map<string, { domain: string; memoryMiB: number }>();

  /** Who domains' QEMUs run as (null: root, unconfined). */
  readonly qemuUser: QemuUser | null;

  constructor(readonly cfg: DaemonConfig, readonly log: Logger, readonly accel: AccelChoice, readonly qemu: QemuFacts) {
    super();
    this.qemuUser = resolveQemuUser(cfg.qemuUser);
    const blocked = this.qemuUser ? blockedAncestor(cfg.stateDir) : null;
    if (blocked) throw new FerryError('CONFIG_INVALID', `Invalid ferryd config: the QEMU user ${cfg.qemuUser} cannot pass through ${blocked} to reach its sockets under stateDir ${cfg.stateDir}; chmod o+x ${blocked}, or choose another stateDir`);
    fs.mkdirSync(this.domainsDir, { recursive: true, mode: 0o700 });
    fs.mkdirSync(this.runDir, { recursive: true, mode: 0o700 });
    try { this.nextDomid = readJson<{ nextDomid: number }>(this.hostFile).nextDomid; } catch { /* first start */ }
  }

  get domainsDir(): string { return path.join(this.cfg.stateDir, 'domains'); }
  get runDir(): string { return path.join(this.cfg.stateDir, 'run'); }
  get hostFile(): string { return path.join(this.cfg.stateDir, 'host.json'); }

  // ---------- persistence ----------

  private readonly writer = new StateWriter((file, error) => this.log.warn('state write still failing; retrying', { file, error }));

  private recordFile(name: string): string { return path.join(this.domainsDir, `${name}.json`); }

  /** Writes the domain's record now; throws STATE_WRITE_FAILED if the disk refuses. */
  persist(live: Live): void {
    this.writer.write(this.recordFile(live.rec.config.name), () => this.recordOf(live));
  }

  private recordOf(live: Live): Record<string, unknown> {
    return { config: domainConfigToJson(live.rec.config), state: live.rec.state, runtime: live.rec.runtime };
  }

  allocDomid(): number {
    const id = this.nextDomid++;
    // Domain ids are for display; a lost write only risks reusing one after a restart.
    this.writer.writeLater(this.hostFile, () => ({ nextDomid: this.nextDomid }));
    return id;
  }

  /**
   * Applies a lifecycle event, persists, and tells subscribers. The event has already
   * happened (QEMU started, stopped, resumed), so a full disk must not undo it in
   * memory: the record is retried until it lands, and a restarted ferryd re-derives
   * the state from the QEMU it finds anyway.
   */
  apply(live: Live, e: DomainEvent): void {
    const from = live.rec.state.kind;
    live.rec.state = transition(live.rec.state, e, live.rec.config.name);
    if (!this.writer.writeLater(this.recordFile(live.rec.config.name), () => this.recordOf(live))) {
      this.log.warn('domain state not persisted yet (retrying)', { domain: live.rec.config.name, to: live.rec.state.kind });
    }
    this.log.info('domain state', { domain: live.rec.config.name, from, to: live.rec.state.kind, event: e.type });
    this.emit('domain.state', { domain: live.rec.config.name, from, to: live.rec.state.kind, state: live.rec.state });
  }

  /** Loads records and re-attaches to QEMU processes that survived a ferryd restart. */
  async recover(): Promise<void> {
    for (const f of fs.readdirSync(this.domainsDir)) {
      if (!f.endsWith('.json')) continue;
      let raw: { config: unknown; state: DomainState; runtime?: Runtime };
      try {
        raw = readJson(path.join(this.domainsDir, f));
      } catch (e) {
        this.log.error('unreadable domain record, skipped', { file: f, error: String(e) });
        continue;
      }
      const config = parseDomainConfig(raw.config);
      const live: Live = { rec: { config, state: raw.state, runtime: raw.runtime } };
      this.domains.set(config.name, live);
      const s = live.rec.state;
      if (!hasProcess(s)) continue;
      if (isOurQemu(s.pid, config.uuid) && live.rec.runtime) {
        try {
          await this.attach(live, s.pid);
          // QEMU may have paused or resumed while we were away.
          const st = await live.qmp!.execute<{ running: boolean; status: string }>('query-status');
          if (s.kind === 'running' && !st.running) this.apply(live, { type: 'pause', at: Date.now() });
          else if (s.kind === 'paused' && st.running) this.apply(live, { type: 'resume', at: Date.now() });
          this.log.info('re-attached to domain', { domain: config.name, pid: s.pid, status: st.status });
          continue;
        } catch (e) {
          this.log.error('cannot re-attach to QEMU; killing it', { domain: config.name, pid: s.pid, error: String(e) });
          await killAndWait(s.pid, 1000);
        }
      }
      // The migration layer settles its own states (see migration/recovery); plain
      // domains whose QEMU vanished while ferryd was down crashed.
      if (s.kind === 'running' || s.kind === 'paused') {
        this.cleanupRuntime(live);
        this.apply(live, { type: 'crash', reason: 'QEMU exited while ferryd was not running', at: Date.now() });
      }
    }
  }

  // ---------- queries ----------

  get(name: string): Live {
    const l = this.domains.get(name);
    if (!l) throw new FerryError('DOMAIN_NOT_FOUND', `No domain "${name}" on host ${this.cfg.name}`);
    return l;
  }

  memoryUsedMiB(): number {
    let used = 0;
    // A domain whose QEMU is still being spawned counts too: two concurrent starts
    // must not both pass the memory check.
    for (const l of this.domains.values()) if (hasProcess(l.rec.state) || l.busy === 'starting' || l.busy === 'restoring') used += l.rec.config.memoryMiB;
    for (const r of this.reservations.values()) used += r.memoryMiB;
    return used;
  }

  /** The figures behind the free memory: the offer's remainder against what the host really has (daemon/capacity.ts). */
  capacity(): Capacity {
    let untouched = 0;
    for (const l of this.domains.values()) {
      const s = l.rec.state;
      if (hasProcess(s)) untouched += Math.max(0, l.rec.config.memoryMiB - rssMiB(s.pid));
    }
    // A reservation without its QEMU yet will touch all of it, too.
    for (const r of this.reservations.values()) {
      const d = this.domains.get(r.domain);
      if (!d || !hasProcess(d.rec.state)) untouched += r.memoryMiB;
    }
    return { offerMiB: this.cfg.memoryMiB, usedMiB: this.memoryUsedMiB(), availableMiB: memAvailableMiB(), untouchedMiB: untouched, marginMiB: this.cfg.memoryMarginMiB };
  }

  /** Free memory and which limit binds it, in words: what a peer's pre-flight is told. */
  memoryFacts(): { freeMiB: number; freeWhy: string } {
    const c = this.capacity();
    return { freeMiB: freeMiB(c), freeWhy: explainFree(c) };
  }


  info(): HostInfo {
    return {
      name: this.cfg.name, arch: hostArch(), version: FERRY_VERSION, qemuVersion: this.qemu.version, machine: this.qemu.machine,
      engine: { binary: this.cfg.qemu.binary, dataDirs: this.cfg.qemu.dataDirs, version: this.qemu.version, liveDirtyTrackingReliable: !dirtyTrackingUnreliable(this.accel.accel, this.qemu.version) },
      accel: this.accel.accel, accelReason: this.accel.reason, cpuModel: this.qemu.cpuModel, cpuFeatures: this.qemu.cpuFeatures, cpuUnavailable: this.qemu.cpuUnavailable,
      memory: (() => { const c = this.capacity(); return { offeredMiB: c.offerMiB, usedMiB: c.usedMiB, freeMiB: freeMiB(c), reservedMiB: [...this.reservations.values()].reduce((a, r) => a + r.memoryMiB, 0), availableMiB: c.availableMiB, untouchedMiB: c.untouchedMiB, marginMiB: c.marginMiB, limitedBy: explainFree(c) }; })(),
      networks: this.cfg.networks,
      relocation: { address: this.cfg.relocation.address, port: this.cfg.relocation.port, dataPorts: this.cfg.relocation.dataPorts, hostsAllow: this.cfg.relocation.hostsAllow },
      domains: this.domains.size,
    };
  }

  summary(live: Live): DomainSummary {
    const s = live.rec.state;
    return {
      name: live.rec.config.name, uuid: live.rec.config.uuid, id: hasProcess(s) ? s.domid : null,
      memoryMiB: live.rec.config.memoryMiB, vcpus: live.rec.config.vcpus, state: s.kind,
      cpuTime: hasProcess(s) ? cpuSeconds(s.pid) : 0,
    };
  }

  domainInfo(name: string): DomainInfo {
    const live = this.get(name);
    const s = live.rec.state;
    return {
      ...this.summary(live), host: this.cfg.name, config: domainConfigToJson(live.rec.config), stateDetail: s,
      pid: hasProcess(s) ? s.pid : null, accel: live.rec.runtime?.accel ?? this.accel.accel,
      nics: live.rec.config.nics.map((n, i) => ({ network: n.network, mac: n.mac, ip: n.ip ?? null, tap: live.rec.runtime?.taps[i] ?? null })),
      consoleLog: live.rec.runtime?.consoleLog ?? path.join(this.runDir, name, 'console.log'),
    };
  }

  // ---------- checks shared with migration pre-flight ----------

  checkNetworks(c: DomainConfig): void {
    for (const n of c.nics) if (!this.cfg.networks[n.network]) throw new FerryError('NETWORK_NOT_FOUND', `Domain "${c.name}" needs network "${n.network}", which host ${this.cfg.name} does not have (it has: ${Object.keys(this.cfg.networks).join(', ') || 'none'})`);
  }

  /** Storage pools, safe paths (domain/storage.ts) and the per-domain disk cap. */
  checkPaths(c: DomainConfig): void {
    if (c.disks.length > this.cfg.limits.disksPerDomain) throw new FerryError('API_LIMIT', `Domain "${c.name}" has ${c.disks.length} disks; ${this.cfg.name} allows ${this.cfg.limits.disksPerDomain} (limits.disksPerDomain)`);
    checkDomainFiles(c, this.cfg.storage, this.cfg.name);
  }

  checkMemory(c: DomainConfig, verb = 'start'): void {
    // Before memory: a CPU model this host cannot run would fail in QEMU (enforce) anyway.
    const miss = this.qemu.cpuUnavailable;
    if (miss.length) throw new FerryError('QEMU_START_FAILED', `Cannot ${verb} domain "${c.name}": ${this.cfg.name}'s CPU model ${this.qemu.cpuModel} needs ${miss.join(', ')}, which ${this.accel.accel} cannot provide here; set a CPU model this host can run ("cpuModel" in ferryd.json, the same on every host a domain moves between)`, { unavailable: miss });
    const cap = this.capacity();
    const free = freeMiB(cap);
    if (free < c.memoryMiB) throw new FerryError('HOST_NO_MEMORY', `Cannot ${verb} domain "${c.name}": ${this.cfg.name} has ${free} MiB free, needs ${c.memoryMiB} MiB (it ${explainFree(cap)})`, { freeMiB: free, needMiB: c.memoryMiB });
  }

  checkUnique(c: DomainConfig): void {
    const byName = this.domains.get(c.name);
    if (byName) throw new FerryError('DOMAIN_EXISTS', `A domain named "${c.name}" already exists on ${this.cfg.name} (${describeKind(byName.rec.state.kind)}); use \`ferry start ${c.name}\` or \`ferry delete ${c.name}\``);
    for (const l of this.domains.values()) if (l.rec.config.uuid === c.uuid) throw new FerryError('DOMAIN_EXISTS', `Domain "${l.rec.config.name}" on ${this.cfg.name} already has uuid ${c.uuid}`);
  }

  // ---------- lifecycle ----------

  /** `ferry create`: define, and start unless told not to. Nothing is stored if a check fails. */
  async create(rawConfig: unknown, start = true): Promise<Record<string, unknown>> {
    const c = parseDomainConfig(rawConfig);
    this.checkUnique(c);
    this.checkNetworks(c);
    this.checkPaths(c);
    if (start) this.checkMemory(c);
    const live: Live = { rec: { config: c, state: { kind: 'defined' } } };
    try {
      this.persist(live);
    } catch (e) {
      this.writer.drop(this.recordFile(c.name)); // a refused create must not appear later
      throw e;
    }
    this.domains.set(c.name, live);
    this.log.info('domain defined', { domain: c.name, uuid: c.uuid });
    if (start) {
      try {
        await this.start(c.name);
      } catch (e) {
        // A create that cannot start leaves nothing behind, as xm create does.
        this.domains.delete(c.name);
        fs.rmSync(path.join(this.domainsDir, `${c.name}.json`), { force: true });
        throw e;
      }
    }
    return this.domainInfo(c.name);
  }

  runtimeFor(c: DomainConfig): Runtime {
    const dir = path.join(this.runDir, c.name);
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const qdir = path.join(dir, 'q');
    prepareQemuDir(qdir, this.cfg.stateDir, this.qemuUser);
    return {
      qemuDir: qdir, qmpPath: path.join(qdir, 'qmp.sock'), consolePath: path.join(qdir, 'console.sock'), logPath: path.join(dir, 'qemu.log'),
      consoleLog: path.join(dir, 'console.log'), taps: c.nics.map((_, i) => tapName(c.uuid, i)),
      accel: this.accel.accel, machine: this.qemu.machine, cpuModel: this.qemu.cpuModel,
    };
  }

  /** The directory a domain's QEMU may write in (sockets for save, restore, the data gate). */
  qemuDirOf(live: Live): string {
    return live.rec.runtime?.qemuDir ?? path.join(this.runDir, live.rec.config.name);
  }

  /** A copy of this host's TLS files that the domain's QEMU can read (tls-creds-x509 dir). */
  qemuTlsDir(live: Live): string {
    return copyTlsForQemu(this.cfg.tlsDir, this.qemuDirOf(live), this.qemuUser);
  }

  /**
   * Starts QEMU for a domain, stopped (-S), with taps created and the console attached.
   * Returns its pid. The caller decides whether to `cont` and which event to apply.
   * The domain's files are opened here, without following symlinks, and passed to QEMU
   * as descriptors; QEMU runs as the QEMU user under seccomp (qemu/confine.ts).
   */
  async spawn(c: DomainConfig, opts: { incoming?: boolean; preallocate?: boolean; machine?: string; cpuModel?: string } = {}): Promise<{ pid: number; qmp: QmpClient; runtime: Runtime }> {
    const runtime = this.runtimeFor(c);
    if (opts.machine) runtime.machine = opts.machine;
    if (opts.cpuModel) runtime.cpuModel = opts.cpuModel;
    const opened: number[] = [];
    const open = (p: string, write: boolean): number => {
      try {
        opened.push(fs.openSync(p, (write ? fs.constants.O_RDWR : fs.constants.O_RDONLY) | fs.constants.O_NOFOLLOW));
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        throw new FerryError(code === 'ELOOP' ? 'PATH_NOT_ALLOWED' : 'DISK_NOT_FOUND', `Domain "${c.name}": cannot open ${p} (${code === 'ELOOP' ? 'it became a symlink' : code})`);
      }
      return 3 + opened.length - 1; // the descriptor's number inside QEMU
    };
    try {
      const fds = {
        kernel: c.boot.kind === 'kernel' ? open(c.boot.kernel, false) : undefined,
        initrd: c.boot.kind === 'kernel' && c.boot.initrd ? open(c.boot.initrd, false) : undefined,
        disks: c.disks.map((d) => open(d.path, !d.readOnly)),
      };
      c.nics.forEach((n, i) => createTap(runtime.taps[i], this.cfg.networks[n.network].bridge, n.network, this.qemuUser?.uid));
      try {
        const argv = domainArgv(c, { ...runtime, incoming: opts.incoming, preallocate: opts.preallocate, fds });
        const q = await startQemu(argv, {
          qmpPath: runtime.qmpPath, logPath: runtime.logPath, what: `domain "${c.name}"`, engine: this.cfg.qemu,
          passFds: opened, ...(this.qemuUser ? { uid: this.qemuUser.uid, gid: this.qemuUser.gid } : {}),
        });
        await this.proveQmp(q.qmp, q.pid, runtime.qmpPath).catch(async (e) => { q.qmp.close(); await killAndWait(q.pid, 0); throw e; });
        return { pid: q.pid, qmp: q.qmp, runtime: { ...runtime, startTicks: processStartTicks(q.pid) } };
      } catch (e) {
        for (const t of runtime.taps) deleteTap(t);
        throw e;
      }
    } finally {
      for (const fd of opened) fs.closeSync(fd);
    }
  }

  /**
   * QEMUs share one unprivileged user, so a socket at the right path proves nothing by
   * itself: its other end must be held by the very process ferryd spawned.
   */
  private async proveQmp(q: QmpClient, pid: number, where: string): Promise<void> {
    if (this.qemuUser && !(await unixPeerIs(q.socket, pid))) throw new FerryError('QMP_ERROR', `The QMP socket ${where} is not held by QEMU pid ${pid}; not trusting it`);
  }

  async start(name: string): Promise<Record<string, unknown>> {
    const live = this.get(name);
    const c = live.rec.config;
    if (live.busy) throw new FerryError('DOMAIN_BAD_STATE', `Domain "${name}" is busy (${live.busy})`);
    // Check legality before doing anything irreversible.
    transition(live.rec.state, { type: 'start', pid: 0, domid: 0, at: 0 }, name);
    this.checkNetworks(c);
    this.checkPaths(c);
    this.checkMemory(c);
    live.busy = 'starting';
    try {
      const { pid, qmp, runtime } = await this.spawn(c);
      live.rec.runtime = runtime;
      live.expectStop = undefined;
      this.apply(live, { type: 'start', pid, domid: this.allocDomid(), at: Date.now() });
      await this.attach(live, pid, qmp);
      await qmp.execute('cont');
    } finally {
      live.busy = undefined;
    }
    return this.domainInfo(name);
  }

  /** Wires QMP events and the console for a domain whose QEMU runs with `pid`. */
  async attach(live: Live, pid: number, qmp?: QmpClient): Promise<void> {
    const rt = live.rec.runtime!;
    if (qmp) live.qmp = qmp;
    else {
      // Re-attaching (ferryd restarted): the socket at this path must still be our QEMU's.
      const q = await QmpClient.connect(rt.qmpPath, 5000);
      await this.proveQmp(q, pid, rt.qmpPath).catch((e) => { q.close(); throw e; });
      live.qmp = q;
    }
    const name = live.rec.config.name;
    live.qmp.on('event', (e: QmpEvent) => this.onQmpEvent(live, e));
    live.exited = new Promise<void>((resolve) => live.qmp!.once('close', () => { void this.onQemuGone(live, pid).finally(resolve); }));
    if (!live.console) {
      live.console = new ConsoleMux(rt.consolePath, rt.consoleLog);
      try {
        await live.console.connect();
      } catch (e) {
        this.log.warn('console not connected', { domain: name, error: String(e) });
      }
    }
  }

  private onQmpEvent(live: Live, e: QmpEvent): void {
    const s = live.rec.state.kind;
    this.log.debug('qmp event', { domain: live.rec.config.name, event: e.event, data: e.data });
    this.emit('qmp.event', { domain: live.rec.config.name, event: e });
    // Guest- or QEMU-initiated pauses and resumes; ferryd's own pause/unpause apply
    // the same events, and whichever comes second finds nothing to do.
    if (live.busy) return;
    if (e.event === 'STOP' && s === 'running') this.apply(live, { type: 'pause', at: Date.now() });
    else if (e.event === 'RESUME' && s === 'paused') this.apply(live, { type: 'resume', at: Date.now() });
    else if (e.event === 'SHUTDOWN' && !live.expectStop) live.expectStop = 'poweroff';
  }

  /** QEMU's QMP socket closed: the process is ending. A stop we asked for, or a crash. */
  private async onQemuGone(live: Live, pid: number): Promise<void> {
    const deadline = Date.now() + 5000;
    while (pidAlive(pid) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    const s = live.rec.state;
    if (!hasProcess(s) || s.pid !== pid) return; // already settled by whoever stopped it
    const reason = live.expectStop;
    this.cleanupRuntime(live, reason ? { event: 'stopped', reason } : undefined);
    this.emit('qemu.gone', { domain: live.rec.config.name, pid, expected: reason ?? null });
    if (s.kind === 'migrating-out' || s.kind === 'incoming') return; // the migration job settles these
    if (reason) this.apply(live, { type: 'stopped', reason, at: Date.now() });
    else this.apply(live, { type: 'crash', reason: 'QEMU exited unexpectedly', at: Date.now() });
  }

  /** Removes taps and runtime sockets; closes QMP and console. Keeps logs. */
  cleanupRuntime(live: Live, consoleFinal?: Record<string, unknown>): void {
    live.qmp?.close();
    live.qmp = undefined;
    live.console?.close(consoleFinal);
    live.console = undefined;
    const rt = live.rec.runtime;
    if (rt) {
      for (const t of rt.taps) deleteTap(t);
      fs.rmSync(rt.qmpPath, { force: true });
      fs.rmSync(rt.consolePath, { force: true });
    }
  }

  /** Deletes a domain's taps by their uuid-derived names (when no record lists them). */
  removeTaps(uuid: string, nics: number): void {
    for (let i = 0; i < nics; i++) deleteTap(tapName(uuid, i));
  }

  private needProcess(live: Live, verb: string): { pid: number; qmp: QmpClient } {
    const s = live.rec.state;
    if (!hasProcess(s) || !live.qmp) throw new FerryError('DOMAIN_BAD_STATE', `Cannot ${verb} domain "${live.rec.config.name}": it is ${describeKind(s.kind)}`);
    if (live.busy) throw new FerryError('DOMAIN_BAD_STATE', `Cannot ${verb} domain "${live.rec.config.name}": it is busy (${live.busy})`);
    return { pid: s.pid, qmp: live.qmp };
  }

  async pause(name: string): Promise<Record<string, unknown>> {
    const live = this.get(name);
    transition(live.rec.state, { type: 'pause', at: 0 }, name);
    const { qmp } = this.needProcess(live, 'pause');
    await qmp.execute('stop');
    if (live.rec.state.kind === 'running') this.apply(live, { type: 'pause', at: Date.now() });
    return this.summary(live);
  }

  async unpause(name: string): Promise<Record<string, unknown>> {
    const live = this.get(name);
    transition(live.rec.state, { type: 'resume', at: 0 }, name);
    const { qmp } = this.needProcess(live, 'unpause');
    await qmp.execute('cont');
    if (live.rec.state.kind === 'paused') this.apply(live, { type: 'resume', at: Date.now() });
    return this.summary(live);
  }

  /** ACPI shutdown; waits up to timeoutS for the guest to power off. */
  async shutdown(name: string, timeoutS = 60): Promise<Record<string, unknown>> {
    const live = this.get(name);
    transition(live.rec.state, { type: 'stopped', reason: 'shutdown', at: 0 }, name);
    const { qmp } = this.needProcess(live, 'shut down');
    live.expectStop = 'shutdown';
    const t0 = Date.now();
    if (live.rec.state.kind === 'paused') await qmp.execute('cont');
    await qmp.execute('system_powerdown');
    const gone = await Promise.race([live.exited!.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), timeoutS * 1000))]);
    if (!gone) {
      live.expectStop = undefined;
      throw new FerryError('TIMEOUT', `Domain "${name}" did not shut down within ${timeoutS} s (ACPI power button sent; it may not handle it). It is still running; use \`ferry destroy ${name}\` to stop it at once`);
    }
    return { ...this.summary(live), shutdownMs: Date.now() - t0 };
  }

  /** Stops at once: QEMU is killed. Also clears a crashed domain to shut off. */
  async destroy(name: string): Promise<Record<string, unknown>> {
    const live = this.get(name);
    const s = live.rec.state;
    if (s.kind === 'crashed') { this.apply(live, { type: 'stopped', reason: 'destroyed', at: Date.now() }); return this.summary(live); }
    if (s.kind === 'migrating-out') throw new FerryError('MIGRATION_IN_PROGRESS', `Domain "${name}" is migrating; cancel the migration first (\`ferry job abort ${name}\`)`);
    if (!hasProcess(s)) throw new FerryError('DOMAIN_BAD_STATE', `Cannot destroy domain "${name}": it is ${describeKind(s.kind)}`);
    live.expectStop = 'destroyed';
    await killAndWait(s.pid, 0);
    await live.exited;
    if (hasProcess(live.rec.state)) {
      // QMP never connected (or closed before): settle here.
      this.cleanupRuntime(live);
      this.apply(live, { type: 'stopped', reason: 'destroyed', at: Date.now() });
    }
    return this.summary(live);
  }

  /** Removes a definition. Only when no QEMU runs for it. */
  delete(name: string): Record<string, unknown> {
    const live = this.get(name);
    if (hasProcess(live.rec.state)) throw new FerryError('DOMAIN_BAD_STATE', `Cannot delete domain "${name}": it is ${describeKind(live.rec.state.kind)}; destroy or shut it down first`);
    this.forget(name);
    return { name, deleted: true };
  }

  // ---- intents for migration/ (MigrationHost in migration/ports.ts) ----

  find(name: string): Live | undefined { return this.domains.get(name); }
  domainNames(): string[] { return [...this.domains.keys()]; }
  domainUuids(): string[] { return [...this.domains.values()].map((l) => l.rec.config.uuid); }
  setBusy(live: Live, why: string | undefined): void { live.busy = why; }
  reserve(jobId: string, domain: string, memoryMiB: number): void { this.reservations.set(jobId, { domain, memoryMiB }); }
  release(jobId: string): void { this.reservations.delete(jobId); }

  /**
   * An incoming migration's domain: defined here (busy, not yet persisted as running),
   * its QEMU started stopped with `-incoming defer`, attached. `onDefined` hears the pid
   * before anything else happens, so a crash right after leaves a record to clean.
   */
  async startIncoming(config: DomainConfig, jobId: string, opts: { preallocate: boolean; machine: string; cpuModel: string }, onDefined: (pid: number) => void): Promise<Live> {
    const live: Live = { rec: { config, state: { kind: 'defined' } }, busy: 'incoming migration' };
    this.domains.set(config.name, live);
    const sp = await this.spawn(config, { incoming: true, preallocate: opts.preallocate, machine: opts.machine, cpuModel: opts.cpuModel });
    live.rec.runtime = sp.runtime;
    onDefined(sp.pid);
    this.apply(live, { type: 'incoming', pid: sp.pid, domid: this.allocDomid(), jobId, at: Date.now() });
    await this.attach(live, sp.pid, sp.qmp);
    return live;
  }

  defineMoved(config: DomainConfig): void {
    const live: Live = { rec: { config, state: { kind: 'defined' } } };
    this.domains.set(config.name, live);
    this.persist(live);
  }

  async discardIncoming(live: Live): Promise<void> {
    const s = live.rec.state;
    live.expectStop = 'destroyed';
    if (s.kind === 'incoming' && pidAlive(s.pid)) await killAndWait(s.pid, 0);
    this.cleanupRuntime(live);
    this.forget(live.rec.config.name);
  }

  async retireMigrated(live: Live, to: { name: string; address: string; port: number }): Promise<void> {
    const s = live.rec.state;
    const pid = hasProcess(s) ? s.pid : undefined;
    live.expectStop = 'migrated';
    live.console?.detachAll({ event: 'moved', host: to.name, target: `${to.address}:${to.port}` });
    await live.qmp?.execute('quit').catch(() => undefined);
    if (pid) await killAndWait(pid, 3000);
    this.cleanupRuntime(live);
    if (live.rec.state.kind === 'migrating-out') this.apply(live, { type: 'stopped', reason: 'migrated', at: Date.now() });
    this.forget(live.rec.config.name);
  }

  /** Drops a record and its runtime directory (the definition is gone from this host). */
  forget(name: string): void {
    this.domains.delete(name);
    this.writer.drop(this.recordFile(name));
    fs.rmSync(this.recordFile(name), { force: true });
    fs.rmSync(path.join(this.runDir, name), { recursive: true, force: true });
    this.emit('domain.state', { domain: name, from: null, to: 'deleted' });
  }

  attachConsole(name: string, client: net.Socket, replay = 0): void {
    const live = this.get(name);
    if (!live.console) throw new FerryError('DOMAIN_BAD_STATE', `Domain "${name}" has no console: it is ${describeKind(live.rec.state.kind)}`);
    live.console.attach(client, replay);
  }

  // ---------- save / restore (xm save / xm restore) ----------

  /**
   * Streams QEMU's migration output through a unix socket that ferryd owns into FILE.
   * No user string reaches QEMU: the file is opened by ferryd, QEMU only sees our socket.
   * Layout: SAVE_MAGIC, one JSON line {config, wasRunning, machine, cpuModel}, then the stream.
   */
  async save(name: string, fileArg: string, opts: { anyPath?: boolean; local: boolean } = { local: true }): Promise<Record<string, unknown>> {
    const file = resolveSaveFile(fileArg, this.cfg.storage, opts);
    const live = this.get(name);
    transition(live.rec.state, { type: 'stopped', reason: 'saved', at: 0 }, name);
    const { qmp } = this.needProcess(live, 'save');
    const wasRunning = live.rec.state.kind === 'running';
    const rt = live.rec.runtime!;
    const sockPath = path.join(this.qemuDirOf(live), 'save.sock');
    fs.rmSync(sockPath, { force: true });
    const tmp = `${file}.partial`;
    const t0 = Date.now();
    live.busy = 'saving';
    let out: fs.WriteStream | undefined;
    const server = net.createServer();
    try {
      // O_CREAT|O_EXCL: never follows a symlink planted at FILE.partial, never truncates another file.
      try { out = fs.createWriteStream(tmp, { mode: 0o600, flags: 'wx' }); await new Promise<void>((r, j) => { out!.once('open', () => r()); out!.once('error', j); }); } catch (e) { out = undefined; throw new FerryError('SAVE_FAILED', `Cannot create ${tmp}: ${(e as Error).message} (a leftover from an earlier save? remove it)`); }
      out.write(SAVE_MAGIC + JSON.stringify({ config: domainConfigToJson(live.rec.config), wasRunning, machine: rt.machine, cpuModel: rt.cpuModel, savedAt: new Date().toISOString(), host: this.cfg.name }) + '\n');
      const received = new Promise<number>((resolve, reject) => {
        server.once('connection', (s) => {
          let bytes = 0;
          s.on('data', (d: Buffer) => { bytes += d.length; });
          s.pipe(out!, { end: false });
          s.on('end', () => resolve(bytes));
          s.on('error', reject);
        });
      });
      await new Promise<void>((r, j) => { server.once('error', j); server.listen(sockPath, r); });
      // QEMU (the QEMU user) connects to it; the directory is QEMU's own and nobody else's.
      if (this.qemuUser) fs.chownSync(sockPath, this.qemuUser.uid, this.qemuUser.gid);
      if (wasRunning) await qmp.execute('stop');
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
      await qmp.execute('migrate-set-parameters', { 'max-bandwidth': 0x7fffffffffff });
      const watch = new MigrationWatcher(qmp);
      try {
        await qmp.execute('migrate', { uri: `unix:${sockPath}` });
        await this.migrationDone(qmp, watch, 600_000);
      } finally {
        watch.dispose();
      }
      const bytes = await received;
      await new Promise<void>((r, j) => out!.end((e?: Error | null) => (e ? j(e) : r())));
      fs.renameSync(tmp, file);
      live.expectStop = 'saved';
      live.busy = undefined;
      await qmp.execute('quit').catch(() => undefined);
      await live.exited;
      return { name, file, bytes, ms: Date.now() - t0 };
    } catch (e) {
      live.busy = undefined;
      out?.destroy();
      fs.rmSync(tmp, { force: true });
      if (wasRunning && live.qmp) await live.qmp.execute('cont').catch(() => undefined);
      throw e instanceof FerryError ? e : new FerryError('SAVE_FAILED', `Cannot save domain "${name}" to ${file}: ${(e as Error).message}`);
    } finally {
      server.close();
      fs.rmSync(sockPath, { force: true });
    }
  }

  /** Waits (by MIGRATION events) until completed (resolves) or failed/cancelled (SAVE_FAILED). */
  private async migrationDone(qmp: QmpClient, watch: MigrationWatcher, timeoutMs: number): Promise<void> {
    let status: string;
    try {
      status = await watch.until(FINAL_STATUSES, timeoutMs);
    } catch (e) {
      throw new FerryError(qmp.closed ? 'SAVE_FAILED' : 'TIMEOUT', `QEMU's migration stream did not finish: ${(e as Error).message}`);
    }
    if (status === 'completed') return;
    const m = await qmp.execute<Record<string, unknown>>('query-migrate').catch(() => ({} as Record<string, unknown>));
    throw new FerryError('SAVE_FAILED', `QEMU migration ${status}: ${m['error-desc'] ?? 'no reason given'}`);
  }

  /** The save file is opened once (no symlink followed): its header and its stream are read from that one descriptor. */
  async restore(fileArg: string, opts: { anyPath?: boolean; local: boolean } = { local: true }): Promise<Record<string, unknown>> {
    const t0 = Date.now();
    const file = resolveSaveFile(fileArg, this.cfg.storage, opts);
    let fd: number;
    try { fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW); } catch (e) { throw new FerryError((e as NodeJS.ErrnoException).code === 'ELOOP' ? 'PATH_NOT_ALLOWED' : 'SAVE_FAILED', `Cannot read ${file}: ${(e as Error).message}`); }
    try {
      return await this.restoreFrom(file, fd, t0);
    } finally {
      fs.closeSync(fd);
    }
  }

  private async restoreFrom(file: string, fd: number, t0: number): Promise<Record<string, unknown>> {
    if (!fs.fstatSync(fd).isFile()) throw new FerryError('PATH_NOT_ALLOWED', `${file} is not a regular file`);
    const head = Buffer.alloc(64 * 1024);
    const n = fs.readSync(fd, head, 0, head.length, 0);
    const text = head.subarray(0, n).toString('latin1');
    if (!text.startsWith(SAVE_MAGIC)) throw new FerryError('SAVE_FAILED', `${file} is not a ferry save file`);
    const nl = text.indexOf('\n', SAVE_MAGIC.length);
    if (nl < 0) throw new FerryError('SAVE_FAILED', `${file}: header is truncated`);
    let header: { config: unknown; wasRunning: boolean; machine: string; cpuModel: string };
    try { header = JSON.parse(Buffer.from(text.slice(SAVE_MAGIC.length, nl), 'latin1').toString('utf8')); } catch { throw new FerryError('SAVE_FAILED', `${file}: header is not JSON`); }
    const offset = Buffer.byteLength(text.slice(0, nl + 1), 'latin1');
    // The header reaches QEMU's command line: only values this host's QEMU offers.
    if (typeof header !== 'object' || header === null) throw new FerryError('SAVE_FAILED', `${file}: header is not an object`);
    if (typeof header.machine !== 'string' || !this.qemu.machines.includes(header.machine)) throw new FerryError('SAVE_FAILED', `${file}: machine type ${JSON.stringify(header.machine)} is not one this host's QEMU ${this.qemu.version} offers`);
    if (header.cpuModel !== this.qemu.cpuModel) throw new FerryError('SAVE_FAILED', `${file}: CPU model ${JSON.stringify(header.cpuModel)} is not this host's (${this.qemu.cpuModel})`);
    const c = parseDomainConfig(header.config);
    let live = this.domains.get(c.name);
    if (live) {
      if (live.rec.config.uuid !== c.uuid) throw new FerryError('DOMAIN_EXISTS', `Another domain named "${c.name}" exists on ${this.cfg.name}`);
      if (hasProcess(live.rec.state)) throw new FerryError('DOMAIN_EXISTS', `Domain "${c.name}" is already ${describeKind(live.rec.state.kind)} on ${this.cfg.name}`);
    } else {
      this.checkUnique(c);
    }
    this.checkNetworks(c);
    this.checkPaths(c);
    this.checkMemory(c, 'restore');
    const created = !live;
    if (!live) {
      live = { rec: { config: c, state: { kind: 'defined' } } };
      this.domains.set(c.name, live);
    } else {
      live.rec.config = c;
    }
    const l = live;
    l.busy = 'restoring';
    let sockPath = '';
    let pid: number | undefined;
    try {
      const sp = await this.spawn(c, { incoming: true, machine: header.machine, cpuModel: header.cpuModel });
      pid = sp.pid;
      l.rec.runtime = sp.runtime;
      sockPath = path.join(this.qemuDirOf(l), 'restore.sock');
      fs.rmSync(sockPath, { force: true });
      await sp.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
      const watch = new MigrationWatcher(sp.qmp);
      await sp.qmp.execute('migrate-incoming', { uri: `unix:${sockPath}` });
      await new Promise<void>((resolve, reject) => {
        const s = net.createConnection({ path: sockPath });
        let rs: fs.ReadStream | undefined;
        // The descriptor is closed by restore() once this settles: stop reading it first.
        const fail = (e: Error): void => { rs?.destroy(); reject(e); };
        s.once('error', fail);
        s.once('connect', () => {
          rs = fs.createReadStream('', { fd, start: offset, autoClose: false });
          rs.once('error', fail);
          rs.pipe(s);
          s.once('finish', resolve);
        });
      });
      // The stream is in; wait until QEMU has loaded it.
      try {
        await this.migrationDone(sp.qmp, watch, 600_000);
      } catch (e) {
        throw new FerryError('SAVE_FAILED', `QEMU could not load ${file} (${(e as Error).message}): see ${sp.runtime.logPath}`);
      } finally {
        watch.dispose();
      }
      this.apply(l, { type: 'start', pid, domid: this.allocDomid(), at: Date.now() });
      await this.attach(l, pid, sp.qmp);
      l.busy = undefined;
      // xm restore resumes the domain; a domain saved while paused stays paused.
      if (header.wasRunning) await sp.qmp.execute('cont');
      else this.apply(l, { type: 'pause', at: Date.now() });
      return { ...this.domainInfo(c.name), restoreMs: Date.now() - t0 };
    } catch (e) {
      l.busy = undefined;
      if (pid) await killAndWait(pid, 0);
      this.cleanupRuntime(l);
      if (created) { this.domains.delete(c.name); fs.rmSync(path.join(this.domainsDir, `${c.name}.json`), { force: true }); }
      throw e instanceof FerryError ? e : new FerryError('SAVE_FAILED', `Cannot restore ${file}: ${(e as Error).message}`);
    } finally {
      fs.rmSync(sockPath, { force: true });
    }
  }

  // ---------- memory sampling (the pattern checker's eyes) ----------

  /**
   * Returns the first byte of every 4 KiB page in [startMiB, endMiB) of guest RAM, read
   * while the guest is stopped (it is resumed afterwards if it ran).
   */
  async sampleMemory(name: string, startMiB: number, endMiB: number): Promise<{ bytes: string; pages: number }> {
    const live = this.get(name);
    const { qmp } = this.needProcess(live, 'read the memory of');
    if (endMiB <= startMiB || endMiB > live.rec.config.memoryMiB) throw new FerryError('API_BAD_REQUEST', `Range ${startMiB}-${endMiB} MiB is outside domain "${name}" (${live.rec.config.memoryMiB} MiB)`);
    const wasRunning = live.rec.state.kind === 'running';
    live.busy = 'sampling memory';
    try {
      if (wasRunning) await qmp.execute('stop');
      const pages = (endMiB - startMiB) * 256;
      const out = Buffer.alloc(pages);
      await this.withRam(live, false, async (ram) => {
        const chunk = Buffer.alloc(1048576);
        for (let mib = 0; mib < endMiB - startMiB; mib++) {
          await ram.read(chunk, chunk.length, (startMiB + mib) * 1048576);
          for (let p = 0; p < 256; p++) out[mib * 256 + p] = chunk[p * 4096];
        }
      });
      return { bytes: out.toString('base64'), pages };
    } finally {
      live.busy = undefined;
      if (wasRunning && live.qmp) await live.qmp.execute('cont');
    }
  }

  /**
   * Runs `f` on a domain's main RAM (qemu/memory.ts) and closes it afterwards. Only while
   * the guest is stopped do the bytes mean anything. Failures of ferry's own (a refused
   * write, a peer's answer) pass through; any other is MEMORY_UNREADABLE.
   */
  async withRam<T>(live: Live, write: boolean, f: (ram: GuestRam) => Promise<T>): Promise<T> {
    const s = live.rec.state;
    const c = live.rec.config;
    if (!hasProcess(s) || !live.qmp) throw new FerryError('DOMAIN_BAD_STATE', `Domain "${c.name}" has no QEMU to read memory from`);
    const fail = (e: unknown): never => {
      if (e instanceof FerryError) throw e;
      // EACCES or EPERM: no ptrace access (kernel.yama.ptrace_scope=3, or an LSM).
      throw new FerryError('MEMORY_UNREADABLE', `Cannot ${write ? 'write' : 'read'} the RAM of domain "${c.name}" on ${this.cfg.name}: ${(e as Error).message}`);
    };
    const ram = await openGuestRam(live.qmp, s.pid, c.memoryMiB * 1048576, write).catch(fail);
    // Opened first, then proven: had the pid been reused before the open, the process
    // it names now would have another start time (or not be the QEMU user's).
    const want = live.rec.runtime?.startTicks;
    const owner = this.qemuUser ? processUid(s.pid) : undefined;
    if ((want !== undefined && processStartTicks(s.pid) !== want) || (this.qemuUser && owner !== this.qemuUser.uid)) {
      ram.close();
      throw new FerryError('MEMORY_UNREADABLE', `Domain "${c.name}": pid ${s.pid} is no longer the QEMU ferryd started (start time or owner changed); not touching its memory`);
    }
    try {
      return await f(ram).catch(fail);
    } finally {
      ram.close();
    }
  }

  /** Per-chunk SHA-256 of a paused domain's RAM (the migration memory check). */
  ramDigests(live: Live): Promise<RamDigests> {
    return this.withRam(live, false, digestRam);
  }

  /** SHA-256 of some chunks of a paused domain's RAM, in the order given. */
  ramChunkDigests(live: Live, chunks: number[]): Promise<{ bytes: number; chunkBytes: number; digests: Buffer }> {
    return this.withRam(live, false, async (ram) => {
      const chunkBytes = chunkBytesFor(ram.bytes);
      const n = Math.ceil(ram.bytes / chunkBytes);
      const bad = chunks.find((c) => c >= n);
      if (bad !== undefined) throw new FerryError('MIGRATION_PROTOCOL', `chunk ${bad} is outside the ${n} chunks of domain "${live.rec.config.name}"`);
      return { bytes: ram.bytes, chunkBytes, digests: await digestChunks(ram, chunkBytes, chunks) };
    });
  }

  /** Closes QMP and consoles without touching QEMU: domains outlive ferryd. */
  detachAll(): void {
    for (const l of this.domains.values()) {
      l.qmp?.removeAllListeners('close');
      l.qmp?.close();
      l.console?.close();
    }
  }
}
