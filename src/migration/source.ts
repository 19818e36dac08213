/**
 * The source side of a migration, and the protocol's sequence:
 *
 *   CLI            source ferryd (S)                          destination ferryd (D)
 *    | migrate ---> |                                                   |
 *    |              |== TLS, mutual auth, hostsAllow =================>|  D's name: its certificate's CN
 *    |              |-- relocation.begin {version, facts, config, -->|  fast pre-flight; reserve;
 *    |              |     homes of its NICs, copyDisks}                |  away ends of tunnels (tunnels.ts);
 *    |              |   (meanwhile: S's QEMU migration settings)       |  disk copies created (mirror.ts);
 *    |              |                                                  |  start QEMU -S -incoming defer
 *    |              |                                                  |  (no listener) ‖ ARP L2 probe
 *    |              |<--- {dataPort, tunnels} (probe listener open) ---|
 *    |              |   home ends list D (here, or relocation.tunnel to the home host)
 *    |              |-- TCP connect to dataPort (≤3 s) --------------->|  firewall check
 *    |              |-- relocation.prepare --------------------------->|  ARP through the tunnels; persist
 *    |              |<------------- {dataPort, nbd} (TLS, authz) ------|  prepared; one-shot listener; NBD exports
 *    |              |== blockdev-mirror into D's NBD exports (TLS) ===>|  (--copy-storage) until all in sync
 *    |              |== QEMU migrate (TLS) ===========================>|  pre-copy passes (live) or stop+copy
 *    |  progress <--|   MIGRATION completed: S's guest stopped [switchover]
 *    |              |   mirrors end as point-in-time copies (block-job-cancel)
 *    |              |-- relocation.digest (--verify-memory) ---------->|  SHA-256 per RAM chunk; still paused
 *    |              |   digest own RAM, compare chunk by chunk         |
 *    |              |-- relocation.repair + raw bytes × differing ---->|  write source's bytes into its RAM
 *    |              |-- relocation.digest {chunks}; any differ → abandon
 *    |              |   persist finish  ── POINT OF NO RETURN ──       |
 *    |              |-- relocation.finish ---------------------------->|  persist finishing; NBD server off;
 *    |              |                                                  |  cont; announce-self
 *    |              |<------------------------------- {resumedAt} -----|  persist finished
 *    |              |   quit source QEMU, forget the definition;      |
 *    |              |   drop an away end here, its home stops flooding here
 *    |              |-- relocation.confirm --------------------------->|
 *    | <- report ---|                                                   |
 *
 * Before `finish`, any failure abandons: S cancels QEMU's migration, resumes its guest
 * if it was running, and tells D to abandon (D also abandons by itself when the
 * control connection drops). From `finish` on, S resumes its copy only if D says
 * that it abandoned; if D cannot be asked, S keeps its copy paused and keeps asking.
 */
import fs from 'node:fs';
import net from 'node:net';
import crypto from 'node:crypto';
import dns from 'node:dns/promises';
import { FerryError, asFerryError } from '../errors.ts';
import { domainConfigToJson, type DomainConfig } from '../domain/config.ts';
import { hasProcess } from '../domain/state.ts';
import { ApiClient } from '../api/client.ts';
import { type Progress, type CancelResult, type ResolveResult, type PlanView } from '../api/protocol.ts';
import type { QmpClient } from '../qmp/client.ts';
import type { MigrationHost, DomainHandle as Live, MigrationLog, TunnelHome } from './ports.ts';
import { hostArch } from '../qemu/probe.ts';
import { dirtyTrackingUnreliable } from '../qemu/memory.ts';
import type { BeginInput } from '../api/relocation.ts';
import { MigrationQmp, uri, UNLIMITED_BANDWIDTH } from '../qemu/migration.ts';

import { PROTOCOL_VERSION, sourceTransition, sourceCanAbandon, type SourceEvent } from './phases.ts';
import { fileSizes, writeStorageMarkers, isIpv4 } from './preflight.ts';
import { MigrationWatcher, FINAL_STATUSES, type MigrateInfo } from '../qemu/migstatus.ts';
import { FERRY_VERSION } from '../version.ts';
import { GuestProbe, guestIp } from './guestprobe.ts';
import { plan as makePlan, precopyEtaS } from './plan.ts';
import { Planner, DEFAULT_MAX_DOWNTIME_MS, DEFAULT_TIMEOUT_S } from './autopilot.ts';
import { MemoryCheck } from './memcheck.ts';
import { DiskMirror, describeDisks, abortMirrors, type CopyDisk } from './mirror.ts';


import type { JobStore, SourceJob, Report, Mode } from './jobs.ts';
import { OutgoingRun, type StartParams, type Resolution, type Autopilot } from './outgoing.ts';

export type { StartParams, Resolution } from './outgoing.ts';

/** The source QEMU's migration commands (qemu/migration.ts). */
const outgoingOf = (q: QmpClient): MigrationQmp => new MigrationQmp(q, 'source');

/**
 * Past the point of no return, D is asked again after 0.5 s, then twice as long each
 * time up to 5 s, forever; `ferry migrate` waits for the first 30 s of that.
 */
export const FINISH_RETRY_FIRST_MS = 500;
export const FINISH_RETRY_CAP_MS = 5000;
export const FINISH_ASK_FOREGROUND_MS = 30000;

/** What QEMU reports it sends and what the guest dirties, in bytes per second. */
function rates(m: MigrateInfo): { rate: number; dirty: number } {
  const ram = m.ram ?? {};
  return { rate: (ram.mbps ?? 0) * 1e6 / 8, dirty: (ram['dirty-pages-rate'] ?? 0) * (ram['page-size'] ?? 4096) };
}

export class Source {
  /** The moves running in this ferryd (outgoing.ts), by job id: their cancellation and disk mirrors. */
  private runs = new Map<string, OutgoingRun>();
  /** Jobs past the point of no return being settled in the background (driveFinish). */
  private driving = new Map<string, Promise<void>>();

  /** The autopilot's measurements and plan (autopilot.ts). */
  readonly planner: Planner;
  /** --verify-memory (memcheck.ts). */
  private readonly memcheck: MemoryCheck;

  constructor(private readonly host: MigrationHost, private readonly store: JobStore, private readonly log: MigrationLog) {
    this.planner = new Planner(host, store, log);
    this.memcheck = new MemoryCheck(host, log);
  }

  /**
   * Moves the job to its next phase and persists it. A phase that leads to a step
   * (everything up to finish-sent, the point of no return) must be on disk first: if it
   * cannot be written the job stays where it was and the error abandons the migration.
   * Events that record what already happened (dest-finished, abandon, dest-abandoned)
   * stay in memory and are retried until the disk has room.
   */
  private step(j: SourceJob, e: SourceEvent): void {
    const fact = e.type === 'dest-finished' || e.type === 'abandon' || e.type === 'dest-abandoned';
    if (!this.store.advance(j, sourceTransition(j.phase, e), !fact)) this.log.warn('migration phase not persisted yet (retrying)', { jobId: j.jobId, phase: j.phase });
    this.log.info('migration phase', { role: 'source', jobId: j.jobId, domain: j.domain, phase: j.phase, event: e.type });
    this.host.emit('migration.phase', { domain: j.domain, jobId: j.jobId, role: 'source', phase: j.phase });
  }

  /** DEST is a peer name (ferryd.json "peers"), NAME, ADDRESS or ADDRESS:PORT. */
  async resolvePeer(dest: string): Promise<{ name?: string; address: string; port: number }> {
    const mapped = this.host.cfg.peers[dest];
    const spec = mapped ?? dest;
    const m = /^(\[[^\]]+\]|[^:]+)(?::(\d+))?$/.exec(spec);
    if (!m) throw new FerryError('HOST_UNKNOWN', `Cannot parse destination "${dest}": use NAME, ADDRESS or ADDRESS:PORT`);
    const port = m[2] ? Number(m[2]) : this.host.cfg.relocation.port;
    let address = m[1].replace(/^\[|\]$/g, '');
    if (net.isIP(address) === 0) {
      try { address = (await dns.lookup(address)).address; } catch { throw new FerryError('HOST_UNKNOWN', `Cannot resolve destination "${dest}": not a known peer (ferryd.json "peers") nor a resolvable name`); }
    }
    return { name: mapped ? dest : net.isIP(m[1]) ? undefined : m[1], address, port };
  }

  /**
   * Opens the control channel. The peer's name is the CN of the certificate it proved
   * it holds (checked against the cluster CA and the name or address dialled), so no
   * hello round trip is needed; a refusal by the peer arrives as the first request's error.
   */
  async connectPeer(dest: string): Promise<{ client: ApiClient; peer: { name: string; address: string; port: number } }> {
    const r = await this.resolvePeer(dest);
    const client = await ApiClient.connect({ kind: 'tls', host: r.address, port: r.port, tlsDir: this.host.cfg.tlsDir, label: dest, servername: r.name }, 5000);
    const name = client.peerName();
    if (!name) {
      client.close();
      throw new FerryError('TLS_REFUSED', `${dest} presented a certificate without a host name (CN)`);
    }
    return { client, peer: { name, address: r.address, port: r.port } };
  }

  cancel(domain: string): CancelResult {
    const j = this.store.active(domain);
    if (!j || j.role !== 'source') throw new FerryError('JOB_NOT_FOUND', `No outgoing migration of "${domain}" on ${this.host.cfg.name}`);
    if (!sourceCanAbandon(j.phase)) throw new FerryError('MIGRATION_ILLEGAL_PHASE', `Migration of "${domain}" is in phase ${j.phase}, past the point of no return: it cannot be cancelled`);
    const run = this.runs.get(j.jobId);
    if (!run) throw new FerryError('JOB_NOT_FOUND', `Migration of "${domain}" is not running in this ferryd`);
    run.cancel();
    return { jobId: j.jobId, domain, cancelling: true };
  }

  /**
   * A move, as libvirt's phases: begin (checks, the destination's pre-flight), prepare
   * (its listener), perform (disks, then RAM), switchover (the guest paused here: disk
   * copies end, the memory check), finish (the point of no return: the destination
   * resumes the guest) and confirm (this host lets go). Each phase takes the run
   * (outgoing.ts), which owns what the job holds. Refusals before a job exists are
   * thrown; after that the answer is the job's report, failures included.
   */
  async start(params: StartParams): Promise<Report> {
    const run = await this.open(params);
    const { j, live } = run;
    this.runs.set(j.jobId, run);
    try {
      await this.begin(run);
      if (run.mode === 'definition' || !run.q) return await this.moveDefinition(j, run.client, live, (o, m) => run.report(o, m));
      await this.prepare(run);
      await this.perform(run);
      await this.switchover(run);
      await this.finish(run);
      return await this.confirm(run);
    } catch (e) {
      return await this.failed(run, e);
    } finally {
      await run.dispose();
      this.host.setBusy(live, undefined);
      this.runs.delete(j.jobId);
    }
  }

  /** Checks what can be checked here, connects to the destination, and makes the job (not yet persisted). */
  private async open(params: StartParams): Promise<OutgoingRun> {
    const t0 = Date.now();
    const live = this.host.get(params.domain);
    // Multifd where it helps and nothing is lost by it: a large guest, two spare cores, and
    // no post-copy to fall back on (QEMU 10.0 cannot combine the two), unless told.
    const spare = this.planner.spareCores();
    const autoParallel = params.parallel === undefined && params.live && !live.rec.config.postcopy && live.rec.config.memoryMiB >= 2048 && spare >= 2 ? 2 : undefined;
    const p: StartParams = { ...params, parallel: params.parallel ?? autoParallel };
    // A finished incoming job only waits for its source's Confirm: the guest runs here.
    if (this.store.openJobs(p.domain).some((o) => !(o.role === 'destination' && o.phase === 'finished'))) throw new FerryError('MIGRATION_IN_PROGRESS', `Domain "${p.domain}" already has a migration job`);
    if (live.busy) throw new FerryError('DOMAIN_BAD_STATE', `Domain "${p.domain}" is busy (${live.busy})`);
    const s = live.rec.state;
    if (p.deleteSourceStorage && !p.copyStorage) throw new FerryError('CLI_USAGE', '--delete-source-storage goes with --copy-storage');
    if (s.kind === 'incoming' || s.kind === 'migrating-out') throw new FerryError('MIGRATION_IN_PROGRESS', `Domain "${p.domain}" is ${s.kind}`);
    if (s.kind === 'crashed') throw new FerryError('DOMAIN_BAD_STATE', `Domain "${p.domain}" crashed; destroy or start it before migrating`);
    const mode: Mode = hasProcess(s) ? (p.live ? 'live' : 'offline') : 'definition';
    // Nothing has changed yet: a failure to reach or trust the peer leaves the domain as it is.
    const { client, peer } = await this.connectPeer(p.dest);
    const j: SourceJob = {
      role: 'source', jobId: crypto.randomUUID(), domain: p.domain, uuid: live.rec.config.uuid, mode, encrypted: p.insecure !== true,
      startedAt: t0, updatedAt: t0, history: [{ phase: 'begin', at: t0 }], phase: 'begin', peer, wasRunning: s.kind === 'running',
    };
    const run = new OutgoingRun(j, live, p, { client, peer, host: this.host.cfg.name }, { maxDowntimeMs: DEFAULT_MAX_DOWNTIME_MS, timeoutS: DEFAULT_TIMEOUT_S });
    if (autoParallel) run.policy.push(`multifd on by itself (2 channels): ${live.rec.config.memoryMiB} MiB of RAM, ${spare} spare cores, and post-copy forbidden by the domain's config`);
    run.mark('connected');
    return run;
  }

  /** Local disks: copied with --copy-storage (every writable disk), else refused when they sit in this host's own directory, which is never shared. */
  private async disksToCopy(run: OutgoingRun): Promise<CopyDisk[]> {
    const { p, q, policy } = run;
    const h = this.host;
    const cfg0 = run.live.rec.config;
    const writable = cfg0.disks.flatMap((d, i) => (d.readOnly ? [] : [i]));
    const localDir = h.cfg.storage.localDir + '/';
    if (!p.copyStorage) {
      const local = writable.map((i) => cfg0.disks[i].path).filter((f) => f.startsWith(localDir));
      if (local.length) throw new FerryError('MIGRATION_DEST_STORAGE', `Cannot migrate domain "${p.domain}": its writable disk ${local.join(', ')} is on ${h.cfg.name}'s own storage (storage.localDir), which no other host shares; move it along with --copy-storage`, { disks: local });
      return [];
    }
    if (!q) throw new FerryError('MIGRATION_DEST_STORAGE', `Cannot copy the disks of shut-off domain "${p.domain}": --copy-storage mirrors a running domain's disks while it runs; start it first, or copy its disks by hand`);
    if (!writable.length) { policy.push('--copy-storage: the domain has no writable disk; nothing to copy'); return []; }
    const disks = await describeDisks(q, writable.map((i) => ({ index: i, path: cfg0.disks[i].path })));
    policy.push(`--copy-storage: ${disks.map((c) => `disk${c.index} (${(c.virtualSize / 1048576).toFixed(0)} MiB, ${(c.allocated / 1048576).toFixed(0)} MiB allocated, sync ${c.backing ? 'top over its shared backing file' : 'full'})`).join(', ')} mirrored to ${run.peer.name}'s own storage while the guest runs`);
    return disks;
  }

  /**
   * Whether the move offers post-copy: the autopilot (migration/plan.ts) decides whether
   * it switches as it goes, but both QEMUs need the capability before the stream. Never
   * on an engine whose dirty tracking can lose pages (QEMU < 9 under TCG: the memory
   * check needs both copies paused, and post-copy has no such moment).
   */
  private offerPostcopy(run: OutgoingRun): void {
    const { p, live, policy, mode } = run;
    const h = this.host;
    run.engineLoses = dirtyTrackingUnreliable(live.rec.runtime?.accel ?? h.accel.accel, h.qemu.version);
    run.postcopyWanted = mode === 'live' && live.rec.config.postcopy && !run.engineLoses && p.verifyMemory !== true && (p.parallel ?? 1) <= 1 && !(p.strategy === 'precopy' && p.onTimeout !== 'postcopy') && !run.copyDisks.length;
    if (mode !== 'live' || !live.rec.config.postcopy) return;
    if (run.copyDisks.length) policy.push('post-copy not offered: the disk copies complete while the guest is paused, and post-copy has no such moment');
    if (p.verifyMemory === true) policy.push('post-copy not offered: --verify-memory compares both copies while both are paused, and post-copy has no such moment');
    if (run.engineLoses) policy.push(`post-copy not offered: QEMU ${h.qemu.version} under ${live.rec.runtime?.accel ?? h.accel.accel} can lose dirty pages, and post-copy leaves no moment to check the copy`);
  }

  /** Phase begin: the job persisted, this QEMU set up and the guest measured while the destination runs its pre-flight. */
  private async begin(run: OutgoingRun): Promise<void> {
    const { j, live, p, peer, mode } = run;
    const h = this.host;
    if (peer.name === h.cfg.name) throw new FerryError('MIGRATION_SAME_HOST', `Cannot migrate domain "${p.domain}": ${p.dest} is this host`);
    this.store.save(j);
    const rt = live.rec.runtime;
    run.q = mode === 'definition' ? undefined : live.qmp;
    if (mode !== 'definition' && !run.q) throw new FerryError('MIGRATION_FAILED', `The source QEMU of "${p.domain}" is not connected`);
    const q = run.q;
    run.copyDisks = await this.disksToCopy(run);
    // The source QEMU's own settings need nothing from the destination but its name
    // (its certificate's, known since the handshake): made while Begin runs there.
    run.setupP = q ? this.setup(q, live, p, mode, run.insecure, peer.name, run.maxDowntimeMs, run.policy) : Promise.resolve();
    run.setupP.catch(() => undefined); // awaited in perform; a Begin refusal must not leave it unhandled
    this.offerPostcopy(run);
    // The autopilot samples the guest's dirty rate while Begin runs there.
    run.planP = mode === 'live' && q ? this.planner.planFor(live, q, peer.name, p) : undefined;
    run.planP?.catch(() => undefined);
    // Markers beside writable disks, for the destination to prove it shares them.
    // (Copied disks need no proof of sharing.)
    const cfg0 = live.rec.config;
    const markers = writeStorageMarkers(run.copyDisks.length ? { ...cfg0, disks: cfg0.disks.filter((d) => d.readOnly) } : cfg0, j.jobId);
    run.homes = h.tunnelHomes(cfg0);
    // The message's type comes from the protocol module the destination parses it with.
    const msg: BeginInput = {
      version: PROTOCOL_VERSION, jobId: j.jobId, mode, insecure: run.insecure, parallel: p.parallel ?? 1, postcopy: run.postcopyWanted, homes: run.homes,
      peer: { name: h.cfg.name, version: FERRY_VERSION, qemuVersion: h.qemu.version, arch: hostArch(), accel: h.accel.accel, cpuModel: h.qemu.cpuModel, cpuFeatures: h.qemu.cpuFeatures, machine: rt?.machine ?? h.qemu.machine, networks: h.cfg.networks },
      domain: { config: domainConfigToJson(cfg0), fileSizes: fileSizes(cfg0), storageNonce: markers.nonce, machine: rt?.machine ?? h.qemu.machine, cpuModel: rt?.cpuModel ?? h.qemu.cpuModel, ...(run.copyDisks.length ? { copyDisks: run.copyDisks } : {}) },
    };
    run.begun = await run.client.request('relocation.begin', msg, 60000).finally(markers.remove);
    run.mark('begun');
    this.step(j, { type: 'dest-accepted' });
  }

  /** Phase prepare: tunnels, the data port reached, the domain marked as leaving, the destination's one-shot listener open. */
  private async prepare(run: OutgoingRun): Promise<void> {
    const { j, live, p, peer, policy } = run;
    const h = this.host;
    const begun = run.begun!;
    // The destination takes post-copy only where its QEMU can (userfaultfd, its config).
    run.postcopyOn = run.postcopyWanted;
    if (run.postcopyWanted && begun.postcopy !== true) {
      run.postcopyOn = false;
      policy.push(`post-copy not offered: ${peer.name} cannot take it (${String(begun.postcopyWhy ?? 'it did not say why').slice(0, 200)})`);
    }
    if (begun.tunnels?.length) {
      await this.extendTunnels(j, live, run.homes, begun.tunnels, policy);
      run.mark('tunnelsOpen');
    }
    await this.probePort(p.domain, peer.name, begun.dataAddress, begun.dataPort);
    run.mark('dataPortReached');
    if (run.cancelled) throw new FerryError('MIGRATION_CANCELLED', 'cancelled');
    h.apply(live, { type: 'migrate-out', jobId: j.jobId, at: Date.now() });
    // The data channel's tls-hostname is the name in the peer's certificate (setup),
    // never a name the peer states in a message.
    run.prepared = await run.client.request('relocation.prepare', { jobId: j.jobId }, 60000);
    j.dataPort = run.prepared.dataPort;
    run.mark('prepared');
    this.step(j, { type: 'dest-prepared' });
    h.setBusy(live, `migrating to ${peer.name}`);
  }

  /** Phase perform: the disks mirrored into the destination's exports until in sync, then RAM streamed, supervised to its end. */
  private async perform(run: OutgoingRun): Promise<void> {
    const { j, p, mode, stats } = run;
    const q = run.q!;
    // The pause on one clock, this host's monotonic one: from the source QEMU's STOP
    // event to the destination's word that its guest resumed (an upper bound: it
    // includes that answer's way back).
    run.watchStop(q);
    const ip = run.wasRunning && p.probeGuest !== false ? guestIp(run.live.rec.config.nics) : undefined;
    if (p.probeGuest === false) stats.guestProbe = 'not measured (--no-probe)';
    if (ip) { run.probe = new GuestProbe(ip); run.probe.start(); }
    run.watch = new MigrationWatcher(q);
    try {
      await run.setupP;
      if (run.copyDisks.length) await this.mirrorDisks(run);
      // The operator's --strategy postcopy needs no measurement to act on.
      const auto: Autopilot = { postcopyOn: run.postcopyOn, pick: mode !== 'live' ? 'offline' : p.strategy === 'postcopy' && run.postcopyOn ? 'postcopy' : 'pending', onTimeout: p.onTimeout ?? (run.postcopyOn ? 'postcopy' : 'cancel') };
      await this.capabilities(q, mode, auto, run.policy);
      const planned = this.whenPlanned(run, auto);
      if (mode === 'offline' && run.wasRunning) await outgoingOf(q).stop();
      this.step(j, { type: 'stream-started' });
      await outgoingOf(q).migrate(uri.tcp(run.prepared!.dataAddress, run.prepared!.dataPort));
      run.mark('migrateIssued');
      const done = await this.supervise(run, auto);
      Object.assign(stats, done);
      await planned;
      stats.strategy = done.strategy ?? (mode === 'offline' ? 'offline' : auto.throttled ? 'auto-converge' : 'precopy');
      if (auto.switchedAt !== undefined) {
        // Past the point of no return already: the source guest stopped, and the
        // destination holds its devices. The job says so before anything else happens.
        run.inPostcopy = true;
        j.postcopy = { startedAt: Date.now() };
        stats.postcopy = { startedAtMs: Math.round(auto.switchedAt - performance.now() + Date.now() - run.t0), windowMs: null };
      }
    } finally {
      run.unwatchStop();
      if (!run.inPostcopy) run.watch.dispose();
    }
    if (stats.setupMs != null) run.timeline.firstByte = stats.setupMs;
    const completedAt = run.watch.at.get('completed');
    if (completedAt !== undefined) run.timeline.streamCompleted = Math.round(completedAt - run.t0);
    this.step(j, { type: 'stream-completed' });
  }

  /** --copy-storage: every disk mirrored into the destination's NBD exports until in sync. */
  private async mirrorDisks(run: OutgoingRun): Promise<void> {
    const nbd = run.prepared!.nbd;
    if (!nbd || net.isIP(String(nbd.address)) === 0 || !Number.isInteger(nbd.port) || nbd.port < 1 || nbd.port > 65535) throw new FerryError('MIGRATION_PROTOCOL', `${run.peer.name} prepared no disk export for --copy-storage`);
    run.j.nbd = { address: nbd.address, port: nbd.port };
    this.store.saveLater(run.j);
    run.stats.storage = await this.copyDisks(run, nbd, run.begun!.copyDisks ?? []);
    run.mark('disksInSync');
  }

  /**
   * The plan arrives while the first pass runs (the dirty rate takes DIRTY_SAMPLE_MS to
   * measure): the stream does not wait for it, and the autopilot acts on it from the end
   * of that pass.
   */
  private whenPlanned(run: OutgoingRun, auto: Autopilot): Promise<void> | undefined {
    const { p, peer } = run;
    return run.planP?.then((pl0) => {
      let pl = pl0;
      if (!run.postcopyOn && pl.plan.input.postcopyAllowed) {
        // The destination cannot take post-copy: the plan without it.
        pl = this.planner.planView(makePlan({ ...pl.plan.input, postcopyAllowed: false }), p.domain, peer.name, pl.view.dirtyRateMBps === null ? null : pl.plan.input.dirtyBytesPerS, p.onTimeout === 'postcopy' ? 'cancel' : p.onTimeout, run.postcopyWanted ? `${peer.name} cannot take post-copy` : 'post-copy is not offered for this move');
      }
      run.stats.plan = pl.view;
      auto.pick = pl.plan.pick;
      const v = pl.view;
      run.policy.push(`plan: ${v.pick}: ${v.reason} (dirty rate ${v.dirtyRateMBps ?? '?'} MB/s by ${v.dirtyRateFrom}; link ${v.linkMBps} MB/s, ${v.linkFrom})`);
      run.mark('planned');
    }, (e) => { run.policy.push(`no plan: ${(e as Error).message}`); });
  }

  /**
   * Phase switchover, the guest paused here and its RAM there: each disk copy ends as a
   * point-in-time copy, and the memory check runs. Still before the point of no return:
   * both guests are paused, so a mismatch abandons like any other failure and the domain
   * resumes here.
   */
  private async switchover(run: OutgoingRun): Promise<void> {
    const { p, policy, mode } = run;
    const h = this.host;
    const mirror = run.mirror;
    if (mirror) {
      const tc = performance.now();
      await mirror.complete();
      if (run.stats.storage) run.stats.storage.copyMs += Math.round(performance.now() - tc);
      run.mark('disksCompleted');
    }
    const unreliable = run.engineLoses;
    if (run.inPostcopy) {
      if (p.verifyMemory || unreliable) policy.push('memory check skipped: in post-copy the destination\'s RAM is complete only after its guest runs');
    } else if (p.verifyMemory ?? (mode === 'live' && unreliable)) {
      const how = 'guest RAM is compared by SHA-256 on both hosts before the destination runs, and what differs is rewritten from the source';
      policy.push(p.verifyMemory ? `memory check requested: ${how}`
        : `memory check on: QEMU ${h.qemu.version} under TCG can lose dirty pages in a live migration (fixed in QEMU 9.0), so ${how}`);
      run.stats.memoryCheck = await this.memcheck.verify(run.j, run.client, run.live, mode, unreliable);
    } else if (mode === 'live' && unreliable) {
      policy.push(`memory check skipped (--no-verify-memory) although QEMU ${h.qemu.version} under TCG can lose dirty pages in a live migration`);
    }
  }

  /**
   * Phase finish, the point of no return: persisted before the destination is asked to
   * run the guest. From here the source's copy never runs again unless the destination
   * says, in so many words, that it abandoned.
   */
  private async finish(run: OutgoingRun): Promise<void> {
    const { j, p, peer } = run;
    const h = this.host;
    this.step(j, { type: 'finish-sent' });
    const fin = await this.finishOrResolve(j, run.client, run.wasRunning);
    if (fin === null) {
      // D cannot be asked now: the source copy stays paused, and the driver (from the
      // failure path) keeps asking.
      throw new FerryError('MIGRATION_UNRESOLVED', `Domain "${p.domain}": ${peer.name} has not said whether it resumed the guest (${j.waiting?.lastError ?? 'no answer'}). The copy on ${h.cfg.name} stays paused so that it never runs twice; ferryd keeps asking every few seconds and settles the moment ${peer.name} answers. Watch: \`ferry job ${p.domain}\`. If you know where it runs: \`ferry job resolve ${p.domain} --assume-destination|--assume-source\``);
    }
    if (j.phase !== 'finish') {
      // Settled by the operator while we asked.
      throw new FerryError(j.phase === 'abandoned' ? 'MIGRATION_FAILED' : 'MIGRATION_UNRESOLVED', `Migration of "${p.domain}" was settled by the operator (\`ferry job resolve\`): it ${j.phase === 'abandoned' ? `runs on ${h.cfg.name}` : `runs on ${peer.name}`}`);
    }
    if (fin.abandoned) {
      // The destination's word that it never ran the guest: the only way back from finish.
      await this.settleFinish(j, run.live, fin);
      throw new FerryError('MIGRATION_FAILED', `Destination ${peer.name} could not take domain "${p.domain}" (${fin.reason}); it keeps running on ${h.cfg.name}`);
    }
    run.fin = fin;
    run.mark('destRunning');
    if (run.inPostcopy) await this.finishPostcopy(run);
    else this.step(j, { type: 'dest-finished' });
  }

  /**
   * Post-copy: the guest runs there; the pages it has not got yet are still here. This
   * QEMU lives until the stream completes (a broken stream is resumed within the
   * operator's budget, at least 60 s more), and its copy is never resumed.
   */
  private async finishPostcopy(run: OutgoingRun): Promise<void> {
    const { j, stats } = run;
    this.step(j, { type: 'dest-running' });
    const pcStart = performance.now();
    try {
      if (!run.fin!.crashed) await this.awaitPostcopy(j, run.q!, run.watch!, run.t0, Math.max(run.t0 + run.timeoutS * 1000, Date.now() + 60000), (n, ms) => {
        run.policy.push(`post-copy stream broke and was resumed after ${ms} ms (${n} attempt${n > 1 ? 's' : ''})`);
        if (stats.postcopy) stats.postcopy.recoveries = (stats.postcopy.recoveries ?? 0) + 1;
      });
      j.waiting = undefined;
    } finally {
      run.watch!.dispose();
    }
    if (stats.postcopy) stats.postcopy.windowMs = Math.round(performance.now() - pcStart);
    run.mark('postcopyCompleted');
    this.step(j, { type: 'postcopy-done' });
  }

  /** Phase confirm: the figures, this host let go of the domain, the guest-perceived gap measured, the destination told. */
  private async confirm(run: OutgoingRun): Promise<Report> {
    const { j, p, peer, stats, policy } = run;
    const h = this.host;
    const fin = run.fin!;
    Object.assign(stats, await this.streamStats(j, run.q!, run.t0, stats.passes ?? 0));
    const sourceDisks = stats.storage?.disks.map((d) => d.from) ?? [];
    await this.retire(run.live, j);
    if (p.deleteSourceStorage && sourceDisks.length) {
      // The guest runs there on its copies; the operator asked for these to go.
      for (const f of sourceDisks) fs.rmSync(f, { force: true });
      policy.push(`--delete-source-storage: ${sourceDisks.join(', ')} deleted on ${h.cfg.name}`);
    } else if (sourceDisks.length) {
      policy.push(`the source's disks stay on ${h.cfg.name} (${sourceDisks.join(', ')}) until you delete them; the guest runs on its copies on ${peer.name}`);
    }
    run.mark('sourceClean');
    if (fin.crashed) throw new FerryError('MIGRATION_FAILED', `Domain "${p.domain}" crashed on ${peer.name} as it resumed there (its QEMU exited). It may have run there, so the copy on ${h.cfg.name} was not resumed: the domain is defined on ${peer.name}, crashed; \`ferry -H ${peer.name} start ${p.domain}\` boots it afresh`);
    // totalMs ends here: the guest runs on the destination and the source is clean.
    stats.totalMs = Date.now() - run.t0;
    await this.guestGap(run, fin);
    run.client.request('relocation.confirm', { jobId: j.jobId }, 10000).catch(() => undefined);
    const r = run.report('succeeded', { ...stats, pauseMs: run.stopAt !== null && fin.answeredAt !== undefined && fin.resumedAt ? Math.round(fin.answeredAt - run.stopAt) : null });
    j.report = r;
    this.store.saveLater(j);
    this.store.prune();
    h.emit('migration.done', { domain: p.domain, report: r });
    return r;
  }

  /**
   * The guest-perceived gap ends with the guest's first answer from its new host; the
   * network handover, from the destination's word that the guest resumed to that answer.
   */
  private async guestGap(run: OutgoingRun, fin: Resolution): Promise<void> {
    const probe = run.probe;
    if (!probe) return;
    const { stats } = run;
    const h = this.host;
    const resumedAt = fin.answeredAt ?? performance.now();
    const answered = await probe.waitForReplyAfter(Math.max(resumedAt, performance.now() - 1), 10000);
    const first = probe.firstReplyAfter(resumedAt);
    stats.networkHandoverMs = first !== null ? Math.round(first - resumedAt) : null;
    const ip = guestIp(run.live.rec.config.nics);
    if (!answered && first === null) stats.warnings = [...(stats.warnings ?? []), `the guest did not answer at ${ip} from ${h.cfg.name}'s side of its segment within 10 s of resuming on ${run.peer.name}: its network may not have followed it (check the segment, the bridge and the guest)`];
    const g = await probe.stop();
    run.probe = undefined;
    stats.guestDowntimeMs = g.replies > 1 ? g.longestGapMs : null;
    stats.guestProbe = g.replies > 1 ? `TCP SYN to ${g.target} every ${g.intervalMs} ms from ${h.cfg.name}: ${g.replies}/${g.sent} answered` : `no answers from ${g.target}`;
  }

  /**
   * Any failure: the same driver as after a restart, from the phase on disk (abandon
   * before the point of no return, keep asking past it), and the report says why.
   */
  private async failed(run: OutgoingRun, e: unknown): Promise<Report> {
    const { j, p, peer } = run;
    let fe = asFerryError(e);
    if (run.cancelled && sourceCanAbandon(j.phase)) fe = new FerryError('MIGRATION_CANCELLED', `Migration of "${p.domain}" to ${peer.name} was cancelled; it keeps running on ${this.host.cfg.name}`);
    if (this.store.jobs.has(j.jobId)) await this.drive(j, fe.message, run.client);
    const outcome = fe.code === 'MIGRATION_CANCELLED' ? 'cancelled' : j.phase === 'finish' || (j.phase === 'postcopy' && fe.code === 'MIGRATION_UNRESOLVED') ? 'unresolved' : 'failed';
    const r = run.report(outcome, { ...run.stats, error: { code: fe.code, message: fe.message } });
    j.report = r;
    j.error = r.error;
    if (this.store.jobs.has(j.jobId)) this.store.saveLater(j);
    this.host.emit('migration.done', { domain: p.domain, report: r });
    return r;
  }

  private async moveDefinition(j: SourceJob, client: ApiClient, live: Live, report: (o: Report['outcome'], m: Partial<Report>) => Report): Promise<Report> {
    this.step(j, { type: 'dest-prepared' });
    this.step(j, { type: 'stream-completed' });
    this.step(j, { type: 'finish-sent' });
    // Past the point of no return, as for a running domain: only D's word settles it.
    const fin = await this.finishOrResolve(j, client, false);
    if (fin === null) {
      // The caller's catch hands the job to the driver, which keeps asking.
      throw new FerryError('MIGRATION_UNRESOLVED', `Definition of "${j.domain}": ${j.peer.name} has not said whether it took it (${j.waiting?.lastError ?? 'no answer'}); it stays here, locked, and ferryd keeps asking. Watch: \`ferry job ${j.domain}\``);
    }
    if (j.phase !== 'finish') throw new FerryError('MIGRATION_FAILED', `Migration of "${j.domain}" was settled by the operator (\`ferry job resolve\`)`);
    if (fin.abandoned) {
      await this.settleFinish(j, live, fin);
      throw new FerryError('MIGRATION_FAILED', `Destination ${j.peer.name} could not take the definition of "${j.domain}" (${fin.reason}); it stays on ${this.host.cfg.name}`);
    }
    this.step(j, { type: 'dest-finished' });
    this.host.forget(live.rec.config.name);
    client.request('relocation.confirm', { jobId: j.jobId }, 10000).catch(() => undefined);
    const r = report('succeeded', {});
    j.report = r;
    this.store.saveLater(j);
    return r;
  }

  /** `ferry migrate DOMAIN DEST --plan`: the autopilot's plan for a live move; nothing moves. */
  async planOnly(p: StartParams): Promise<PlanView> {
    const live = this.host.get(p.domain);
    if (!hasProcess(live.rec.state) || !live.qmp) throw new FerryError('DOMAIN_BAD_STATE', `Domain "${p.domain}" is not running: only a live move has a plan (a shut-off domain moves as its definition)`);
    if (live.busy) throw new FerryError('DOMAIN_BAD_STATE', `Domain "${p.domain}" is busy (${live.busy})`);
    // The peer's name, as a move would learn it: from its certificate.
    const { client, peer } = await this.connectPeer(p.dest);
    client.close();
    if (peer.name === this.host.cfg.name) throw new FerryError('MIGRATION_SAME_HOST', `Cannot migrate domain "${p.domain}": ${p.dest} is this host`);
    return (await this.planner.planFor(live, live.qmp, peer.name, p)).view;
  }

  /** A firewall that drops the data port makes connect hang: give up in 3 s and name the range. */
  private probePort(domain: string, dest: string, address: string, port: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection({ host: address, port });
      const [a, b] = this.host.cfg.relocation.dataPorts;
      const fail = (why: string): void => {
        s.destroy();
        reject(new FerryError('MIGRATION_DEST_PORT', `Cannot migrate domain "${domain}": ${dest}'s migration data port ${address}:${port} is not reachable from ${this.host.cfg.name} (${why}); open TCP ${a}-${b} on ${dest} to ${this.host.cfg.name} (see README "Firewalls")`, { port, range: [a, b] }));
      };
      const t = setTimeout(() => fail('no answer within 3 s'), 3000);
      s.once('connect', () => { clearTimeout(t); s.destroy(); resolve(); });
      s.once('error', (e) => { clearTimeout(t); fail((e as NodeJS.ErrnoException).code ?? e.message); });
    });
  }

  private async setup(q: QmpClient, live: Live, p: StartParams, mode: Mode, insecure: boolean, tlsHostname: string, maxDowntimeMs: number, policy: string[]): Promise<void> {
    const parallel = p.parallel ?? 1;
    // A QEMU keeps its capabilities from one migration to the next: an earlier move's
    // post-copy would make multifd refused ("Postcopy is not yet compatible with multifd").
    const mq = outgoingOf(q);
    await mq.setCapabilities({ events: true, postcopy: false, postcopyPreempt: false, multifd: parallel > 1 });
    if (parallel > 1) policy.push(`multifd: ${parallel} parallel channels`);
    await mq.delObject('ferry-tls-out');
    if (!insecure) await mq.addTlsCreds('ferry-tls-out', this.host.qemuTlsDir(live));
    await mq.setParameters({
      maxBandwidth: p.bandwidthMiBs ? Math.round(p.bandwidthMiBs * 1048576) : UNLIMITED_BANDWIDTH,
      downtimeLimit: maxDowntimeMs,
      ...(parallel > 1 ? { multifdChannels: parallel } : {}),
      ...(insecure ? { tlsCreds: '' } : { tlsCreds: 'ferry-tls-out', tlsHostname }),
    });
  }

  /**
   * The capabilities the plan needs, set once it is known (before the stream): post-copy
   * (with its preempt channel, so that the pages the guest faults on overtake the bulk)
   * whenever it is offered; auto-converge where the plan picked it, or where nothing else
   * could rescue a pre-copy that does not converge. `policy` records what QEMU accepted.
   */
  private async capabilities(q: QmpClient, mode: Mode, auto: Autopilot, policy: string[]): Promise<void> {
    if (mode !== 'live') return;
    // With post-copy on the table nothing needs throttling: it bounds the time instead.
    const autoConverge = !auto.postcopyOn;
    await outgoingOf(q).setCapabilities({ autoConverge, postcopy: auto.postcopyOn, postcopyPreempt: auto.postcopyOn });
    if (autoConverge) policy.push('auto-converge on: QEMU throttles the vCPUs if the guest dirties memory faster than the link');
    if (auto.postcopyOn) policy.push(`post-copy offered (postcopy-ram, postcopy-preempt on both hosts); at the deadline: ${auto.onTimeout}`);
  }

  /**
   * Follows QEMU's migration to its end through MIGRATION events; a timer reads the
   * byte counters (QEMU has no event for them) for the progress bar and applies the
   * convergence policy and deadline.
   */
  private async supervise(run: OutgoingRun, auto: Autopilot): Promise<Partial<Report>> {
    const { j, mode, t0, timeoutS, maxDowntimeMs, policy, cancelledP } = run;
    const q = run.q!;
    const w = run.watch!;
    const isCancelled = (): boolean => run.cancelled;
    let cancelSent = false;
    let timedOut = false;
    let suspended = false;
    const cancel = (): void => { if (!cancelSent) { cancelSent = true; outgoingOf(q).cancel().catch(() => undefined); } };
    void cancelledP.then(cancel);
    // Post-copy starts once QEMU says so (status postcopy-active): the switch is asked
    // for at most once, and only while the stream is active.
    const toPostcopy = async (why: string): Promise<void> => {
      if (auto.switchAsked || !auto.postcopyOn || w.status !== 'active') return;
      auto.switchAsked = true;
      try {
        await outgoingOf(q).startPostcopy();
        // Said once QEMU is there: a pre-copy may still complete first.
        auto.switchWhy = why;
      } catch (e) {
        policy.push(`post-copy refused by QEMU (${(e as Error).message}); pre-copy goes on`);
      }
    };
    let ticking = false;
    const tick = async (): Promise<void> => {
      if (ticking || w.final || w.status === 'postcopy-active') return;
      ticking = true;
      try {
        // A disk copy that broke (--copy-storage) ends the move: the guest stays here.
        const mirror = run.mirror;
        if (mirror?.failed && !cancelSent) { policy.push(`disk copy failed: ${mirror.failed}`); cancel(); }
        if (mirror) mirror.last = await mirror.progress().catch(() => mirror.last);
        const m = await outgoingOf(q).info();
        const etaS = this.progress(j, t0, m, w.passes, maxDowntimeMs);
        const elapsed = (Date.now() - t0) / 1000;
        const ram = m.ram ?? {};
        const pass = ram['dirty-sync-count'] ?? w.passes;
        if ((m['cpu-throttle-percentage'] ?? 0) > 0) auto.throttled = true;
        // The autopilot: the plan's post-copy switches once the first full pass is sent;
        // any other plan switches (where post-copy is offered) when the live figures say
        // pre-copy will miss the deadline.
        if (mode === 'live' && auto.postcopyOn && !auto.switchAsked && m.status === 'active') {
          if (auto.pick === 'postcopy' && pass >= 2) await toPostcopy(`the plan's pick, after the first full pass (${elapsed.toFixed(1)} s)`);
          else if (pass >= 3) {
            const { rate, dirty } = rates(m);
            if (elapsed + etaS > timeoutS * 0.8) await toPostcopy(`pre-copy would miss the budget: pass ${pass} after ${elapsed.toFixed(1)} s, ${((ram.remaining ?? 0) / 1e6).toFixed(0)} MB left, the guest dirties ${(dirty / 1e6).toFixed(0)} MB/s against ${(rate / 1e6).toFixed(0)} MB/s sent (ETA ${Number.isFinite(etaS) ? `${etaS.toFixed(1)} s` : 'never'})`);
          }
        }
        // The deadline, still in pre-copy: the operator's rule (--on-timeout).
        if (elapsed > timeoutS && !cancelSent && !suspended && !auto.switchAsked) {
          if (mode === 'live' && auto.onTimeout === 'postcopy' && auto.postcopyOn) {
            await toPostcopy(`deadline of ${timeoutS} s reached (--on-timeout postcopy)`);
          } else if (mode === 'live' && auto.onTimeout === 'suspend') {
            // As virsh migrate --timeout-suspend: the guest stops and the rest is copied
            // while it does not run; the pause is as long as that copy.
            suspended = true;
            await outgoingOf(q).stop().then(() => policy.push(`deadline of ${timeoutS} s reached (--on-timeout suspend): guest suspended to finish the copy`), (e) => policy.push(`suspend refused by QEMU: ${(e as Error).message}`));
          } else {
            timedOut = true;
            policy.push(`deadline of ${timeoutS} s reached: cancelled`);
            cancel();
          }
        }
      } catch { /* QEMU gone: the watcher says so */ } finally {
        ticking = false;
      }
    };
    const timer = setInterval(() => void tick(), 200);
    let status: string;
    try {
      status = await w.until(auto.postcopyOn ? [...FINAL_STATUSES, 'postcopy-active'] : FINAL_STATUSES);
    } catch {
      throw new FerryError('MIGRATION_FAILED', `The source QEMU of "${j.domain}" exited during the migration`);
    } finally {
      clearInterval(timer);
    }
    const active = w.at.get('active');
    const setupMs = active !== undefined ? Math.max(0, Math.round(active - t0)) : null;
    if (status === 'failed') {
      const m = await outgoingOf(q).info().catch((): MigrateInfo => ({}));
      throw new FerryError('MIGRATION_FAILED', `QEMU's migration of "${j.domain}" failed: ${m['error-desc'] ?? 'no reason given'}`);
    }
    if (status === 'cancelled') {
      const diskFailed = run.mirror?.failed;
      if (diskFailed) throw new FerryError('MIGRATION_FAILED', `Copying the disks of "${j.domain}" failed (${diskFailed}); cancelled, the domain keeps running on the source with its own disks`);
      if (timedOut && mode === 'live') throw new FerryError('MIGRATION_NOT_CONVERGING', `Migration of "${j.domain}" did not converge within ${timeoutS} s with pauses of at most ${maxDowntimeMs} ms (${policy.join('; ')}); cancelled, the domain keeps running on the source. Allow post-copy (--on-timeout postcopy, where the domain's config permits it), accept a longer pause (--max-downtime, or --on-timeout suspend), or migrate offline`);
      if (timedOut) throw new FerryError('TIMEOUT', `Migration of "${j.domain}" did not finish within ${timeoutS} s; cancelled, the domain keeps running on the source`);
      if (isCancelled()) throw new FerryError('MIGRATION_CANCELLED', 'cancelled');
      throw new FerryError('MIGRATION_FAILED', `QEMU cancelled the migration of "${j.domain}"`);
    }
    if (auto.switchWhy && status === 'completed') policy.push(`post-copy was asked for (${auto.switchWhy}), but pre-copy completed first`);
    if (status === 'postcopy-active') {
      policy.push(`switched to post-copy: ${auto.switchWhy ?? 'QEMU entered post-copy'}`);
      auto.switchedAt = performance.now();
      return { setupMs, passes: w.passes, strategy: 'postcopy' };
    }
    return { setupMs, passes: w.passes, ...(suspended ? { strategy: 'suspend' } : {}) };
  }

  /**
   * Post-copy, after the destination's guest runs: this QEMU sends what is left (the
   * pages the guest faults on first) until the stream completes. The progress bar shows
   * the pages still here. A stream that fails leaves a guest that cannot finish: say so.
   */
  private async awaitPostcopy(j: SourceJob, q: QmpClient, w: MigrationWatcher, t0: number, deadline = Infinity, onRecovered?: (attempts: number, ms: number) => void): Promise<void> {
    const timer = setInterval(() => void outgoingOf(q).info().then((m) => this.progress(j, t0, m, w.passes, 0)).catch(() => undefined), 250);
    try {
      for (;;) {
        const s = await w.until([...FINAL_STATUSES, 'postcopy-paused']);
        if (s === 'completed') return;
        if (s === 'postcopy-paused') {
          const t = performance.now();
          const attempts = await this.recoverPostcopy(j, q, w, deadline);
          onRecovered?.(attempts, Math.round(performance.now() - t));
          continue;
        }
        throw new FerryError('MIGRATION_FAILED', `The post-copy stream of "${j.domain}" to ${j.peer.name} ended ${s} (${(await outgoingOf(q).info().catch((): MigrateInfo => ({})))['error-desc'] ?? 'no reason given'}) with pages still on ${this.host.cfg.name}: the guest on ${j.peer.name} cannot get them`);
      }
    } catch (e) {
      if (e instanceof FerryError) throw e;
      throw new FerryError('MIGRATION_FAILED', `The source QEMU of "${j.domain}" exited during post-copy: the guest on ${j.peer.name} has lost the pages it had not fetched`);
    } finally {
      clearInterval(timer);
    }
  }

  /**
   * Publishes a query-migrate answer as the job's progress (the CLI's bar, `ferry job`);
   * returns the ETA in seconds (Infinity: never, at the rates QEMU reports now).
   */
  private progress(j: SourceJob, t0: number, m: MigrateInfo, passes: number, maxDowntimeMs: number): number {
    const ram = m.ram ?? {};
    const done = m.status === 'completed';
    const total = ram.total ?? 0;
    const remaining = done ? 0 : ram.remaining ?? total;
    const { rate: sending, dirty } = rates(m);
    const rate = done ? 0 : sending;
    const post = (m.status ?? '').startsWith('postcopy');
    const pass = ram['dirty-sync-count'] ?? passes;
    // The ETA from the same model as the plan: a pre-copy pass that re-sends dirtied
    // pages is not progress lost. The bar itself never runs backwards.
    const eta = done ? 0 : rate <= 0 ? null : post ? remaining / rate : precopyEtaS(remaining, dirty, rate, maxDowntimeMs);
    const ramPct = done ? 100 : total ? Math.min(100, ((total - remaining) / total) * 100) : 0;
    // With disks copied first (--copy-storage), the bar spans both: the disks' share is done.
    const disk = this.runs.get(j.jobId)?.mirror?.last;
    const share = disk ? this.diskShare(j, disk.total) : 0;
    const raw = share * 100 + (1 - share) * ramPct;
    const prog: Progress = {
      domain: j.domain, jobId: j.jobId, status: m.status, phase: j.phase, percent: Math.max(raw, j.progress?.percent ?? 0),
      transferred: ram.transferred ?? 0, remaining, total, rateMBps: rate / 1e6, pass: passes,
      etaS: eta === null || !Number.isFinite(eta) ? null : eta, elapsedMs: Date.now() - t0, dirtyRate: done ? 0 : ram['dirty-pages-rate'] ?? 0, throttlePct: done ? 0 : m['cpu-throttle-percentage'] ?? 0,
      stage: done ? 'completed' : post ? `post-copy: ${(remaining / 1048576).toFixed(0)} MiB still on ${this.host.cfg.name}` : m.status === 'device' || m.status === 'pre-switchover' ? 'switchover' : `pre-copy pass ${pass}`,
      ...(disk ? { disk } : {}),
    };
    j.progress = prog;
    this.host.emit('migration.progress', prog);
    return eta ?? Infinity;
  }

  /**
   * The completed stream's figures, asked once the guest runs on the destination: QEMU
   * may say "completed" before it fills in total-time and downtime, and waiting for
   * them must not lengthen the guest's pause.
   */
  private async streamStats(j: SourceJob, q: QmpClient, t0: number, passes: number): Promise<Partial<Report>> {
    const mq = outgoingOf(q);
    let m = await mq.info().catch((): MigrateInfo => ({}));
    for (let i = 0; i < 20 && !((m['total-time'] ?? 0) > 0); i++) { await new Promise((r) => setTimeout(r, 5)); m = await mq.info().catch(() => m); }
    const r2 = m.ram ?? {};
    const bytes = r2.transferred ?? 0;
    const totalTime = m['total-time'] ?? (Date.now() - t0);
    this.progress(j, t0, { ...m, status: 'completed' }, passes, 0);
    return { downtimeMs: m.downtime ?? null, bytes, passes: r2['dirty-sync-count'] ?? passes, throughputMBps: totalTime > 0 ? +(bytes / 1e6 / (totalTime / 1000)).toFixed(1) : 0 };
  }

  /**
   * Sends Finish. If the answer is lost, asks D until it can tell, for at most
   * `FINISH_ASK_FOREGROUND_MS` while the operator's command waits; null if D still
   * has not said (the caller hands the job to `driveFinish`).
   */
  private async finishOrResolve(j: SourceJob, client: ApiClient, running: boolean): Promise<Resolution | null> {
    try {
      const r = await client.request('relocation.finish', { jobId: j.jobId, running }, 150000);
      return { abandoned: false, resumedAt: r.resumedAt ?? undefined, answeredAt: performance.now(), crashed: r.crashed === true };
    } catch (e) {
      const fe = asFerryError(e);
      if (fe.details?.abandoned) return { abandoned: true, reason: fe.message };
      this.log.warn('finish answer lost; asking the destination', { jobId: j.jobId, error: fe.message });
      return this.resolveAfterFinish(j, Date.now() + FINISH_ASK_FOREGROUND_MS);
    }
  }

  /**
   * One question to D about a job past the point of no return: its answer, or why
   * there is none yet. A D that never resumed is made to abandon before we say so.
   */
  private async askDestination(j: SourceJob, timeoutMs = 5000): Promise<Resolution | string> {
    const { client } = await this.connectPeer(`${j.peer.address}:${j.peer.port}`);
    try {
      const st = await client.request('relocation.status', { jobId: j.jobId }, timeoutMs);
      if (st.phase === 'finished' || st.phase === 'confirmed') return { abandoned: false };
      if (st.phase === 'finishing') return `${j.peer.name} is resuming the guest`;
      if (st.phase === 'abandoned' || st.phase === 'unknown') return { abandoned: true, reason: `${j.peer.name} reports ${st.phase}` };
      // begun/prepared: D never resumed; make it abandon before we resume.
      const ab = await client.request('relocation.abandon', { jobId: j.jobId, reason: 'finish was not delivered' }, timeoutMs);
      if (ab.phase === 'abandoned') return { abandoned: true, reason: `${j.peer.name} abandoned after a lost Finish` };
      return `${j.peer.name} answered abandon with phase ${ab.phase}`;
    } finally {
      client.close();
    }
  }

  /**
   * Asks D until it answers, with capped backoff, for as long as it takes (or until
   * `deadline`: then null). The job shows who is asked, how often and why it failed
   * (`ferry job`, the CLI's progress). Returns early if the operator settled the job.
   */
  async resolveAfterFinish(j: SourceJob, deadline = Infinity): Promise<Resolution | null> {
    // A driver taking over from the command's own wait goes on counting where it stopped.
    const got = await this.keepTrying(j, deadline, (j.waiting?.attempts ?? 0) + 1, 'destination not answering about a finished transfer; the source copy stays paused', '', async () => {
      if (j.phase !== 'finish') return { abandoned: j.phase === 'abandoned', reason: 'settled by the operator', byOperator: true };
      try { return await this.askDestination(j); } catch (e) { return asFerryError(e).message; }
    });
    if (got && got.attempts > 1 && !got.value.byOperator) this.log.info('destination answered about a finished transfer', { jobId: j.jobId, attempts: got.attempts, abandoned: got.value.abandoned });
    return got?.value ?? null;
  }

  /**
   * The capped backoff of both waits past the point of no return (asking the destination
   * about Finish, resuming a broken post-copy stream): `attempt` answers a result, or in
   * words why there is none yet. Each miss is shown on the job (`waiting`: `ferry jobs`,
   * the progress output) and logged at the first and every tenth try; the next try comes
   * after 0.5 s, doubling up to 5 s. Null once that try would fall after `deadline`.
   */
  private async keepTrying<T>(j: SourceJob, deadline: number, first: number, warning: string, prefix: string, attempt: () => Promise<T | string>): Promise<{ value: T; attempts: number } | null> {
    let delay = Math.min(FINISH_RETRY_FIRST_MS * 2 ** (first - 1), FINISH_RETRY_CAP_MS);
    for (let n = first; ; n++) {
      const r = await attempt();
      if (typeof r !== 'string') {
        j.waiting = undefined;
        return { value: r, attempts: n };
      }
      const nextTryAt = Date.now() + delay;
      j.waiting = { since: j.waiting?.since ?? Date.now(), attempts: n, lastError: prefix + r, nextTryAt };
      if (n === 1 || n % 10 === 0) this.log.warn(warning, { jobId: j.jobId, domain: j.domain, attempts: n, error: r });
      this.host.emit('migration.waiting', { domain: j.domain, jobId: j.jobId, role: 'source', peer: j.peer.name, ...j.waiting });
      if (nextTryAt > deadline) return null;
      await new Promise((res) => setTimeout(res, delay));
      delay = Math.min(delay * 2, FINISH_RETRY_CAP_MS);
    }
  }

  /**
   * The driver of a job whose in-process context is gone or broken: a failure on the
   * normal path, a lost connection, a restart of ferryd. It acts on the persisted phase
   * alone, so all of them go through the same steps:
   *
   *   begin, prepare, perform, switchover → abandon: Finish was never sent, so the
   *       destination never ran the guest; cancel QEMU's stream, resume the guest if it
   *       ran, tell the destination (which abandons by itself too when we vanish)
   *   finish → ask the destination until it answers (driveFinish, in the background):
   *       finished → retire the copy here; abandoned → resume it; meanwhile it stays paused
   *   confirmed, abandoned → the tail a crash may have cut: the phase is on disk before
   *       the copy here is retired or resumed, so a domain still "migrating-out" gets it now
   */
  async drive(j: SourceJob, why: string, client?: ApiClient): Promise<void> {
    const live = this.host.find(j.domain);
    const mine = live && live.rec.config.uuid === j.uuid ? live : undefined;
    switch (j.phase) {
      case 'begin':
      case 'prepare':
      case 'perform':
      case 'switchover': {
        if (!mine) { this.step(j, { type: 'abandon', reason: `${why}; the domain is gone from ${this.host.cfg.name}` }); return; }
        let c = client;
        if (!c) try { c = (await this.connectPeer(`${j.peer.address}:${j.peer.port}`)).client; } catch { c = undefined; }
        try { await this.abandon(j, mine, c, why); } finally { if (!client) c?.close(); }
        return;
      }
      case 'finish':
        // The definition gone already means retirement had finished before a crash.
        if (!mine) { this.step(j, { type: 'dest-finished' }); return; }
        this.driveFinish(j, mine);
        return;
      case 'postcopy':
        // The guest runs there; this QEMU still holds pages it needs. Never resumed here:
        // wait for the stream to complete, then retire.
        if (!mine) { this.step(j, { type: 'postcopy-done' }); return; }
        this.drivePostcopy(j, mine);
        return;
      case 'confirmed':
      case 'abandoned': {
        if (!mine || mine.rec.state.kind !== 'migrating-out') return;
        if (this.store.latest(j.domain)?.jobId !== j.jobId) return; // only the newest job of a domain speaks for it
        this.log.warn('finishing a settled migration that a restart interrupted', { jobId: j.jobId, domain: j.domain, phase: j.phase });
        if (j.phase === 'confirmed') await this.retire(mine, j);
        else await this.resumeSource(mine, j.wasRunning);
        return;
      }
      default: {
        const never: never = j.phase;
        throw new FerryError('INTERNAL', `unknown source phase ${String(never)}`);
      }
    }
  }

  /**
   * The one driver for a job past the point of no return whose destination has not
   * answered: after a lost Finish, after a restart, whatever the path. Asks until
   * D answers, then settles. At most one per job.
   */
  driveFinish(j: SourceJob, live: Live): void {
    if (this.driving.has(j.jobId)) return;
    const run = (async (): Promise<void> => {
      const r = await this.resolveAfterFinish(j);
      if (r && !r.byOperator) await this.settleFinish(j, live, r);
    })().catch((e) => this.log.error('settling a finished transfer failed', { jobId: j.jobId, error: String(e) }))
      .finally(() => this.driving.delete(j.jobId));
    this.driving.set(j.jobId, run);
  }

  /**
   * The post-copy stream broke and both QEMUs paused (postcopy-paused): the guest on the
   * destination waits for pages that only this QEMU has. Asks the destination for a new
   * one-shot listener (relocation.recover) and resumes the stream into it (migrate with
   * resume), with capped backoff until it takes or `deadline` passes (then
   * MIGRATION_UNRESOLVED: the job's driver goes on trying in the background). Never
   * resumes the copy here. Returns the attempts it took.
   */
  private async recoverPostcopy(j: SourceJob, q: QmpClient, w: MigrationWatcher, deadline: number): Promise<number> {
    this.log.warn('post-copy stream broke; recovering', { jobId: j.jobId, domain: j.domain, peer: j.peer.name });
    const got = await this.keepTrying(j, deadline, 1, 'post-copy recovery failed; trying again', 'post-copy recovery: ', async (): Promise<true | string> => {
      try {
        const { client } = await this.connectPeer(`${j.peer.address}:${j.peer.port}`);
        try {
          const r = await client.request('relocation.recover', { jobId: j.jobId }, 15000);
          if (!Number.isInteger(r.dataPort) || r.dataPort < this.host.cfg.relocation.dataPorts[0] || r.dataPort > 65535) throw new FerryError('MIGRATION_PROTOCOL', `${j.peer.name} answered recover with port ${String(r.dataPort)}`);
          const back = w.next(['postcopy-active', 'completed', 'failed', 'postcopy-paused'], 15000);
          back.catch(() => undefined);
          await outgoingOf(q).migrate(uri.tcp(r.dataAddress, r.dataPort), true);
          const st = await back;
          if (st === 'postcopy-paused') throw new FerryError('MIGRATION_FAILED', 'the resumed stream broke again');
          if (st !== 'failed') return true;
          return 'the resumed stream failed';
        } finally {
          client.close();
        }
      } catch (e) {
        if (q.closed) throw new FerryError('MIGRATION_FAILED', `The source QEMU of "${j.domain}" exited while post-copy was paused: the guest on ${j.peer.name} cannot get the pages it had not fetched`);
        return asFerryError(e).message;
      }
    });
    if (!got) throw new FerryError('MIGRATION_UNRESOLVED', `The post-copy stream of "${j.domain}" to ${j.peer.name} broke and is not back yet (${j.waiting?.lastError.replace(/^post-copy recovery: /, '') ?? 'no answer'}): the guest there waits for pages only ${this.host.cfg.name} has. ferryd keeps trying to resume it (never the copy here). Watch: \`ferry job ${j.domain}\``);
    this.log.info('post-copy recovered', { jobId: j.jobId, domain: j.domain, attempts: got.attempts });
    return got.attempts;
  }

  /**
   * The driver of a job in post-copy whose command is gone (a restart, a lost answer):
   * follows the source QEMU's stream to its end, then retires the copy here. At most one
   * per job. A QEMU that is gone already ends it too: nothing here can help the guest.
   */
  drivePostcopy(j: SourceJob, live: Live): void {
    if (this.driving.has(j.jobId)) return;
    const run = (async (): Promise<void> => {
      const q = live.qmp;
      if (q && !q.closed) {
        const w = new MigrationWatcher(q);
        try {
          const m = await outgoingOf(q).info().catch((): MigrateInfo => ({}));
          if (m.status && m.status !== 'completed') await this.awaitPostcopy(j, q, w, j.startedAt).catch((e) => { j.error = { code: asFerryError(e).code, message: asFerryError(e).message }; this.log.error('post-copy did not complete', { jobId: j.jobId, error: String(e) }); });
        } finally {
          w.dispose();
        }
      }
      j.waiting = undefined;
      this.step(j, { type: 'postcopy-done' });
      await this.retire(live, j);
      this.store.saveLater(j);
      this.store.prune();
      this.host.emit('migration.settled', { domain: j.domain, jobId: j.jobId, phase: j.phase, reason: 'post-copy ended' });
    })().catch((e) => this.log.error('settling a post-copy failed', { jobId: j.jobId, error: String(e) }))
      .finally(() => this.driving.delete(j.jobId));
    this.driving.set(j.jobId, run);
  }

  /**
   * Applies D's answer (or the operator's word) to a job in `finish`: the phase
   * changes first, synchronously, so that two answers can never both act.
   */
  async settleFinish(j: SourceJob, live: Live, r: Resolution): Promise<void> {
    if (j.phase !== 'finish') return;
    if (!r.abandoned && j.postcopy) {
      // Post-copy: the guest runs there, fetching what is still here.
      this.step(j, { type: 'dest-running' });
      j.waiting = undefined;
      this.store.saveLater(j);
      this.drivePostcopy(j, live);
      return;
    }
    if (r.abandoned) {
      this.step(j, { type: 'dest-abandoned', reason: r.reason ?? 'destination abandoned' });
      await this.retractTunnels(j);
      await this.resumeSource(live, j.wasRunning);
      this.log.warn('migration settled: the domain stays here', { jobId: j.jobId, domain: j.domain, reason: r.reason });
    } else {
      this.step(j, { type: 'dest-finished' });
      await this.retire(live, j);
      this.log.info('migration settled: the domain runs on the destination', { jobId: j.jobId, domain: j.domain, peer: j.peer.name });
      void this.connectPeer(`${j.peer.address}:${j.peer.port}`).then(({ client }) => client.request('relocation.confirm', { jobId: j.jobId }, 10000).finally(() => client.close())).catch(() => undefined);
    }
    j.waiting = undefined;
    if (j.report) j.report = { ...j.report, outcome: r.abandoned ? 'failed' : 'succeeded', phase: j.phase, ...(r.abandoned ? {} : { error: undefined }) };
    this.store.saveLater(j);
    this.store.prune();
    this.host.emit('migration.settled', { domain: j.domain, jobId: j.jobId, phase: j.phase, reason: r.reason ?? null });
  }

  /**
   * `ferry job resolve DOMAIN --assume-destination|--assume-source`: the operator's word
   * for a job past the point of no return that D has not settled. One last question to
   * D first: if it answers, its answer wins and a contrary assumption is refused.
   */
  async resolveByOperator(domain: string, assume: 'destination' | 'source'): Promise<ResolveResult> {
    const j = this.store.active(domain);
    if (!j || j.role !== 'source') throw new FerryError('JOB_NOT_FOUND', `No outgoing migration of "${domain}" on ${this.host.cfg.name} to resolve`);
    if (j.phase !== 'finish') throw new FerryError('MIGRATION_ILLEGAL_PHASE', `Migration of "${domain}" is in phase ${j.phase}: only a job past the point of no return (finish) is resolved by hand; before it, use \`ferry job abort ${domain}\``);
    const live = this.host.get(domain);
    let answer: Resolution | string;
    try { answer = await this.askDestination(j, 2000); } catch (e) { answer = asFerryError(e).message; }
    if (typeof answer !== 'string') {
      const theirs = answer.abandoned ? 'source' : 'destination';
      if (theirs !== assume) throw new FerryError('MIGRATION_ILLEGAL_PHASE', `${j.peer.name} answered: ${answer.abandoned ? `it does not run "${domain}" (${answer.reason})` : `it runs "${domain}"`}; refusing --assume-${assume}. Nothing changed; the answer settles the job now`, { peerAnswered: theirs });
      await this.settleFinish(j, live, answer);
      return { jobId: j.jobId, domain, phase: j.phase, settledBy: 'destination', runsOn: answer.abandoned ? this.host.cfg.name : j.peer.name };
    }
    this.log.warn('migration resolved by the operator', { jobId: j.jobId, domain, assume, peer: j.peer.name, lastError: answer });
    await this.settleFinish(j, live, assume === 'source' ? { abandoned: true, reason: `the operator said ${j.peer.name} does not run it` } : { abandoned: false, reason: 'the operator said the destination runs it' });
    return { jobId: j.jobId, domain, phase: j.phase, settledBy: 'operator', runsOn: assume === 'source' ? this.host.cfg.name : j.peer.name };
  }

  /**
   * Before the stream: each NIC the destination carries through a tunnel gets the
   * destination listed at its home end (here, or at the home host of a tunnel this
   * host holds), so the destination's ARP probe at Prepare reaches the segment.
   */
  private async extendTunnels(j: SourceJob, live: Live, homes: TunnelHome[], asked: { nic: number; vni: number; address: string }[], policy: string[]): Promise<void> {
    const c = live.rec.config;
    j.tunnels = [];
    for (const t of asked) {
      const home = Number.isInteger(t.nic) ? homes[t.nic] : undefined;
      if (!home || t.vni !== home.vni || !isIpv4(t.address)) throw new FerryError('MIGRATION_PROTOCOL', `${j.peer.name} asked for a tunnel that does not match domain "${c.name}" (NIC ${String(t.nic).slice(0, 8)}, VNI ${String(t.vni).slice(0, 12)})`);
      // Listed before it is made: an abandon retracts it whatever happens next.
      j.tunnels.push({ nic: t.nic, home: home.host, remote: t.address });
      this.store.saveLater(j);
      await this.tunnelAt(home.host, 'extend', c.uuid, t.nic, t.address, c);
      policy.push(`network ${c.nics[t.nic].network}: segment ${home.subnet} carried to ${j.peer.name} through a VXLAN tunnel (VNI ${home.vni}) from ${home.host}`);
    }
  }

  /** The move will not happen: the home ends stop flooding to the destination this move listed there. */
  private async retractTunnels(j: SourceJob): Promise<void> {
    for (const t of j.tunnels ?? []) await this.tunnelAt(t.home, 'retract', j.uuid, t.nic, t.remote).catch((e) => this.log.warn('tunnel not retracted', { jobId: j.jobId, home: t.home, error: String(e) }));
  }

  /** A home end's change: here if this host is the home, else asked of the home host (relocation.tunnel). */
  private async tunnelAt(home: string, op: 'extend' | 'retract', uuid: string, nic: number, remote: string, c?: DomainConfig): Promise<void> {
    const h = this.host;
    if (home === h.cfg.name) {
      if (op === 'extend') h.extendHome(c!, nic, remote);
      else h.retractHome(uuid, nic, remote);
      return;
    }
    const { client } = await this.connectPeer(home);
    try {
      await client.request('relocation.tunnel', { op, uuid, nic, remote }, 10000);
    } finally {
      client.close();
    }
  }

  /** The guest runs on the destination: the source QEMU ends, and an away end here goes (its home stops flooding here). */
  private async retire(live: Live, j: SourceJob): Promise<void> {
    await this.host.retireMigrated(live, j.peer);
    await this.leaveTunnels(j.uuid, j.domain);
  }

  /** The domain no longer runs here (moved on, or stopped): its away ends go, and their homes stop flooding here. */
  async leaveTunnels(uuid: string, domain: string): Promise<void> {
    for (const t of this.host.closeAway(uuid)) {
      await this.tunnelAt(t.home.host, 'retract', uuid, t.nic, this.host.cfg.relocation.address)
        .catch((e) => this.log.warn('tunnel home end not told; it keeps flooding here until told', { domain, home: t.home.host, error: String(e) }));
    }
  }

  /**
   * --copy-storage, between Prepare and the RAM stream: mirrors every copied disk into
   * the destination's exports and waits until all are in sync, showing disk bytes on the
   * bar; the operator's cancel and --timeout stop it (the abandon then forces the jobs
   * off). --bandwidth caps each mirror too.
   */
  private async copyDisks(run: OutgoingRun, nbd: { address: string; port: number }, placed: { index: number; path: string }[]): Promise<NonNullable<Report['storage']>> {
    const { j, p, t0, timeoutS, cancelledP } = run;
    const disks = run.copyDisks;
    const tls = run.insecure ? null : { creds: 'ferry-tls-out', hostname: run.peer.name };
    const mirror = new DiskMirror(run.q!, disks);
    run.mirror = mirror;
    const tc = performance.now();
    let timer: NodeJS.Timeout | undefined;
    const stop = new Promise<string>((resolve) => {
      void cancelledP.then(() => resolve('cancelled'));
      timer = setTimeout(() => resolve(`copying the disks did not finish within --timeout ${timeoutS} s; cancelled, the domain keeps running on ${this.host.cfg.name} with its own disks`), Math.max(0, t0 + timeoutS * 1000 - Date.now()));
    });
    let prev = { at: performance.now(), copied: 0 };
    const tick = setInterval(() => void mirror.progress().then((d) => {
      mirror.last = d;
      const now = performance.now();
      const rate = Math.max(0, (d.copied - prev.copied) / ((now - prev.at) / 1000));
      prev = { at: now, copied: d.copied };
      const share = this.diskShare(j, d.total);
      const prog: Progress = {
        domain: j.domain, jobId: j.jobId, phase: j.phase, percent: Math.max(j.progress?.percent ?? 0, d.total ? (d.copied / d.total) * 100 * share : 0),
        transferred: 0, remaining: 0, total: 0, rateMBps: rate / 1e6, pass: 0, etaS: rate > 0 ? (d.total - d.copied) / rate : null, elapsedMs: Date.now() - t0, dirtyRate: 0, throttlePct: 0,
        stage: `copying disks: ${(d.copied / 1048576).toFixed(0)} of ${(d.total / 1048576).toFixed(0)} MiB`, disk: d,
      };
      j.progress = prog;
      this.host.emit('migration.progress', prog);
    }, () => undefined), 300);
    try {
      await mirror.start(nbd, tls, p.bandwidthMiBs ? Math.round(p.bandwidthMiBs * 1048576) : 0);
      await mirror.untilReady(stop);
    } finally {
      clearInterval(tick);
      clearTimeout(timer);
    }
    mirror.last = await mirror.progress().catch(() => mirror.last);
    const copyMs = Math.round(performance.now() - tc);
    const cfg = this.host.get(j.domain).rec.config;
    return { disks: disks.map((d) => ({ index: d.index, from: cfg.disks[d.index].path, to: placed.find((x) => x.index === d.index)?.path ?? null })), copiedBytes: mirror.last.total, copyMs, sourceKept: p.deleteSourceStorage !== true };
  }

  /** The disks' part of the whole move's bytes (disks, then RAM), for one progress bar. */
  private diskShare(j: SourceJob, diskTotal: number): number {
    const ram = (this.host.find(j.domain)?.rec.config.memoryMiB ?? 0) * 1048576;
    return diskTotal + ram > 0 ? diskTotal / (diskTotal + ram) : 0;
  }

  /** Abandon before the point of no return: the source domain runs again as it was. */
  async abandon(j: SourceJob, live: Live, client: ApiClient | undefined, reason: string): Promise<void> {
    const q = live.qmp;
    if (q) {
      try {
        // One query for where it stands (this may run after a restart), then events.
        const watch = new MigrationWatcher(q);
        try {
          const m = await outgoingOf(q).info();
          if (m.status === 'active' || m.status === 'setup' || m.status === 'pre-switchover' || m.status === 'device') {
            await outgoingOf(q).cancel();
            await watch.until(FINAL_STATUSES, 2000).catch(() => undefined);
          }
        } finally {
          watch.dispose();
        }
      } catch { /* QEMU gone: handled below */ }
    }
    // Disk copies in flight stop here (forced: a dead link must not hang it); the source's disks are untouched.
    if (q && !q.closed) {
      const n = await abortMirrors(q, j.nbd);
      if (n) this.log.info('disk copies cancelled', { jobId: j.jobId, jobs: n });
    }
    if (client) await client.request('relocation.abandon', { jobId: j.jobId, reason: reason.slice(0, 500) }, 15000).catch((e) => this.log.warn('destination did not acknowledge abandon', { jobId: j.jobId, error: String(e) }));
    // The guest stays: its segment no longer floods to the destination.
    await this.retractTunnels(j);
    await this.resumeSource(live, j.wasRunning);
    this.step(j, { type: 'abandon', reason });
    this.store.prune();
  }

  /** Puts the source domain back as it was: running if it ran, paused if it was paused. */
  /** A source QEMU that died meanwhile cannot be resumed: the domain crashed here. */
  async resumeSource(live: Live, wasRunning: boolean): Promise<void> {
    const q = live.qmp;
    if (live.rec.state.kind === 'migrating-out' && (!q || q.closed)) {
      this.host.cleanupRuntime(live);
      this.host.apply(live, { type: 'crash', reason: 'QEMU exited during a migration', at: Date.now() });
      return;
    }
    if (wasRunning && q) {
      const st = await outgoingOf(q).runState().catch(() => undefined);
      if (st && !st.running) await outgoingOf(q).cont();
    }
    if (live.rec.state.kind === 'migrating-out') this.host.apply(live, { type: 'migrate-out-abandoned', running: wasRunning, at: Date.now() });
  }


}
