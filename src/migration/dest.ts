/**
 * The destination side of a migration: a state loop driven by the source's messages
 * (relocation.begin/prepare/finish/confirm/abandon/status), as in Cloud Hypervisor's
 * receiver. Every message is untrusted input: it is checked against the phase, the
 * job and the TLS identity of the peer that sent it.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { FerryError, asFerryError } from '../errors.ts';
import { parseDomainConfig, domainConfigToJson, type DomainConfig } from '../domain/config.ts';
import { killAndWait, isOurQemu, qemuPidsWith } from '../qemu/process.ts';
import type { MigrationHost, DomainHandle as Live, MigrationLog, RelocationContext as ConnContext, TunnelHome } from './ports.ts';
import { hostArch } from '../qemu/probe.ts';
import { destTransition, type DestEvent } from './phases.ts';
import { MigrationWatcher, FINAL_STATUSES, qmpEventMs } from '../qemu/migstatus.ts';
import { checkOffer, checkFiles, checkL2, checkStorageMarkers, tunnelsNeeded, peerAddresses, compareVersions } from './preflight.ts';
import { parseBegin, type BeginMsg } from '../api/relocation.ts';
import type { Params } from '../api/schema.ts';
import type { JobStore, DestJob } from './jobs.ts';
import { DataGate } from './gate.ts';
import { nodeOf, EXPORT, type CopyDisk } from './mirror.ts';
import type { QmpClient } from '../qmp/client.ts';
import { MigrationQmp, uri } from '../qemu/migration.ts';
import type { Results } from '../api/protocol.ts';

/** The incoming QEMU's migration commands (qemu/migration.ts). */
const incomingOf = (q: QmpClient): MigrationQmp => new MigrationQmp(q, 'destination');

/** How long a finished incoming job waits for the source's Confirm before settling itself. */
const CONFIRM_GRACE_MS = 20000;


export class Destination {
  private probes = new Map<string, net.Server>();
  /** Plain-TCP jobs' data ports, held by ferryd (gate.ts). */
  private gates = new Map<string, DataGate>();
  /** Per job: abandons it if the source goes quiet before Finish (limits.reservationS). */
  private quiet = new Map<string, NodeJS.Timeout>();
  /** Jobs whose control connection is gone abandon themselves if still before Finish. */
  private begins = new Map<string, BeginMsg>();

  constructor(private readonly host: MigrationHost, private readonly store: JobStore, private readonly log: MigrationLog) {
    host.on('qemu.gone', (ev: { domain: string; pid: number }) => {
      for (const j of store.jobs.values()) {
        if (j.role === 'destination' && j.domain === ev.domain && j.pid === ev.pid && (j.phase === 'prepared')) {
          this.log.warn('incoming QEMU died during the transfer', { jobId: j.jobId, domain: j.domain });
          void this.abandonLocal(j, 'destination QEMU exited during the transfer').catch(() => undefined);
        }
      }
    });
  }

  /**
   * Moves the job to its next phase and persists it. Before an irreversible step
   * (prepared, resuming) the phase must be on disk first: if it cannot be written the
   * job stays where it was and STATE_WRITE_FAILED goes back to the source, which
   * abandons. Events that record what already happened (resumed, confirmed, abandon:
   * its undoing is done) stay in memory and are retried until the disk has room.
   */
  private step(j: DestJob, e: DestEvent): void {
    const strict = e.type === 'prepared' || e.type === 'resuming';
    if (!this.store.advance(j, destTransition(j.phase, e), strict)) this.log.warn('migration phase not persisted yet (retrying)', { jobId: j.jobId, phase: j.phase });
    this.log.info('migration phase', { role: 'destination', jobId: j.jobId, domain: j.domain, phase: j.phase });
    this.host.emit('migration.phase', { domain: j.domain, jobId: j.jobId, role: 'destination', phase: j.phase });
  }

  private job(jobId: unknown, ctx: ConnContext): DestJob {
    const j = typeof jobId === 'string' ? this.store.jobs.get(jobId) : undefined;
    if (!j || j.role !== 'destination') throw new FerryError('JOB_NOT_FOUND', `No incoming migration job ${typeof jobId === "string" ? jobId.slice(0, 40) : "?"} on ${this.host.cfg.name}`);
    if (ctx.caller.transport === 'tls' && ctx.caller.peerName !== j.peer.name) throw new FerryError('MIGRATION_PROTOCOL', `Job ${j.jobId} belongs to ${j.peer.name}, not ${ctx.caller.peerName}`);
    this.touch(j);
    return j;
  }

  /**
   * The one deadline of a job that holds memory, a data port and a QEMU: a begun job
   * must be prepared within limits.reservationS of its Begin (armed once: other
   * messages do not extend it); a prepared job is abandoned once its source neither
   * sends a message nor streams for that long. Called at Begin, after Prepare, and on
   * every message for the job.
   */
  private touch(j: DestJob): void {
    const old = this.quiet.get(j.jobId);
    if (j.phase === 'begun' && old) return;
    if (old) clearTimeout(old);
    if (j.phase !== 'begun' && j.phase !== 'prepared') { this.quiet.delete(j.jobId); return; }
    const s = this.host.cfg.limits.reservationS;
    const t = setTimeout(() => {
      this.quiet.delete(j.jobId);
      if (j.phase === 'begun') { void this.abandonLocal(j, `no Prepare within ${s} s of Begin (limits.reservationS)`).catch(() => undefined); return; }
      if (j.phase !== 'prepared') return;
      const st = this.watches.get(j.jobId)?.status;
      // A stream in flight is the source speaking, however long a pre-copy takes.
      if (st && st !== 'none' && st !== 'setup' && !FINAL_STATUSES.includes(st as never)) { this.touch(j); return; }
      void this.abandonLocal(j, `the source ${j.peer.name} was quiet for ${s} s (limits.reservationS)`).catch(() => undefined);
    }, s * 1000);
    t.unref();
    this.quiet.set(j.jobId, t);
  }

  /** Begin: pre-flight. Nothing is reserved; the data port is probed by the source. */
  async begin(p: Params<'relocation.begin'>, ctx: ConnContext): Promise<Results['relocation.begin']> {
    const m = parseBegin(p);
    const peerName = ctx.caller.transport === 'tls' ? ctx.caller.peerName! : m.peer.name;
    if (peerName !== m.peer.name) throw new FerryError('MIGRATION_PROTOCOL', `relocation.begin: peer says it is "${m.peer.name}" but its certificate names "${peerName}"`);
    if (this.store.jobs.has(m.jobId)) throw new FerryError('MIGRATION_PROTOCOL', `relocation.begin: job ${m.jobId} was already begun (replay?)`);
    const h = this.host;
    if (h.maintenance().on) throw new FerryError('MIGRATION_DEST_MAINTENANCE', `Cannot migrate domain "${m.config.name}": ${h.cfg.name} is in maintenance since ${h.maintenance().since ?? 'earlier'} and takes no incoming move; pick another host`);
    // The destination decides whether its QEMU may read an unauthenticated stream.
    if (m.insecure && !h.cfg.relocation.allowInsecure) throw new FerryError('MIGRATION_DEST_INSECURE', `Cannot migrate domain "${m.config.name}" without TLS: ${h.cfg.name} does not accept plain-TCP migration streams; drop --insecure, or set relocation.allowInsecure on ${h.cfg.name} (trusted networks only)`);
    const open = [...this.store.jobs.values()].filter((x) => x.role === 'destination' && (x.phase === 'begun' || x.phase === 'prepared'));
    const lim = h.cfg.limits;
    if (open.filter((x) => (x as DestJob).peer.name === peerName).length >= lim.incomingPerPeer) throw new FerryError('API_LIMIT', `${h.cfg.name} already has ${lim.incomingPerPeer} unfinished incoming migrations from ${peerName} (limits.incomingPerPeer); finish or abandon those first`);
    if (open.length >= lim.incomingTotal) throw new FerryError('API_LIMIT', `${h.cfg.name} already has ${lim.incomingTotal} unfinished incoming migrations (limits.incomingTotal); try again later`);
    const running = m.mode !== 'definition';
    checkOffer(m.version, m.peer, {
      name: h.cfg.name, qemuVersion: h.qemu.version, arch: hostArch(), accel: h.accel.accel, cpuModel: h.qemu.cpuModel, cpuFeatures: h.qemu.cpuFeatures, cpuUnavailable: h.qemu.cpuUnavailable, machines: h.qemu.machines,
      networks: h.cfg.networks, ...h.memoryFacts(), domainNames: h.domainNames(), domainUuids: h.domainUuids(),
    }, m.config, running);
    if (running && m.cpuModel !== h.qemu.cpuModel) throw new FerryError('MIGRATION_DEST_CPU', `Cannot migrate domain "${m.config.name}": it runs with CPU model ${m.cpuModel}, ${h.cfg.name} offers ${h.qemu.cpuModel}`);
    // --copy-storage: the disks to copy get their place here; everything else must be shared.
    const copies = this.placeCopies(m, running);
    const shared: DomainConfig = { ...m.config, disks: m.config.disks.filter((_, i) => !copies.some((c) => c.index === i)) };
    // Pools first: a peer learns nothing about files outside them (not even existence).
    try { h.checkPaths({ ...shared, disks: [...shared.disks, ...copies.flatMap((c) => (c.backing ? [{ path: c.backing.path, format: c.backing.format as 'raw' | 'qcow2', readOnly: true, bus: 'virtio' as const }] : []))] }); } catch (e) {
      const fe = asFerryError(e);
      if (fe.code === 'DISK_NOT_FOUND') throw new FerryError('MIGRATION_DEST_DISK', `Cannot migrate domain "${m.config.name}": ${fe.message}; disks, their backing files and boot files must be on shared storage at the same path`);
      throw fe;
    }
    checkFiles(shared, m.fileSizes, h.cfg.name);
    checkStorageMarkers(shared, m.jobId, m.storageNonce, h.cfg.name, peerName);
    // Where the copies land: the domain's config here names them.
    for (const c of copies) m.config.disks[c.index] = { ...m.config.disks[c.index], path: c.path };
    // Post-copy only where this host's QEMU can take it: the source learns it from Begin's answer.
    const pc = h.postcopyIncoming();
    if (m.postcopy && !pc.ok) { m.postcopy = false; this.log.info('post-copy declined for an incoming move', { jobId: m.jobId, why: pc.why }); }
    // NICs whose segment is another subnet here get it carried through a tunnel
    // (daemon/tunnels.ts), only to a host the source names and only for a running guest.
    const need = tunnelsNeeded(m.config, m.homes, { name: h.cfg.name, networks: h.cfg.networks, tunnels: h.cfg.relocation.tunnels, address: h.cfg.relocation.address }, peerName);
    const peerAddr = (ctx.caller.peerAddress ?? '').replace(/^::ffff:/, '');
    const known = new Set([peerAddr, ...peerAddresses(h.cfg.peers)]);
    for (const [i, home] of need) {
      if (!running) throw new FerryError('MIGRATION_DEST_L2', `Cannot migrate shut-off domain "${m.config.name}": network "${m.config.nics[i].network}" is another subnet on ${h.cfg.name} than its segment ${home.subnet}, and a tunnel follows a running domain only; start it first, or move it to a host on ${home.subnet}`);
      if (!known.has(home.address)) throw new FerryError('MIGRATION_PROTOCOL', `relocation.begin: NIC ${i}'s home ${home.host} at ${home.address} is neither the source nor a peer of ${h.cfg.name}`);
    }
    const job: DestJob = {
      role: 'destination', jobId: m.jobId, domain: m.config.name, uuid: m.config.uuid, mode: m.mode, encrypted: !m.insecure,
      startedAt: Date.now(), updatedAt: Date.now(), history: [{ phase: 'begun', at: Date.now() }], phase: 'begun',
      peer: { name: peerName, address: ctx.caller.peerAddress ?? '', ...(ctx.caller.peerDn ? { dn: ctx.caller.peerDn } : {}) }, dataPort: 0, memoryMiB: m.config.memoryMiB,
      config: { ...domainConfigToJson(m.config), _machine: m.machine, _cpuModel: m.cpuModel },
      ...(m.postcopy ? { postcopy: true } : {}),
    };
    try {
      // Persisted before the QEMU below starts: a restarted ferryd that finds "begun"
      // kills an incoming QEMU of this uuid and forgets everything (manager.ts).
      this.store.save(job);
    } catch (e) {
      this.store.discard(job);
      throw e;
    }
    this.begins.set(job.jobId, m);
    this.touch(job);
    ctx.onClose(() => this.onControlClosed(job.jobId));
    if (!running) {
      const l2 = await checkL2(m.config, m.peer, h.cfg.networks, h.cfg.name, false, 'segments').catch(async (e) => { await this.abandonLocal(job, (e as Error).message); throw e; });
      this.log.info('migration begun', { jobId: job.jobId, domain: job.domain, peer: peerName, mode: m.mode, l2 });
      return { jobId: job.jobId, host: h.cfg.name, dataAddress: h.cfg.relocation.address, dataPort: 0, checks: l2 };
    }
    // The incoming QEMU starts now (reserved, stopped, no listener), in parallel with
    // the L2 probe: QEMU's start-up is the longest step before the first byte. Its
    // listener opens only at Prepare, which must come within limits.reservationS (touch).
    h.reserve(job.jobId, job.domain, job.memoryMiB);
    if (copies.length) {
      // Each on record once made (never before: a file that was there is not ours to delete).
      job.createdDisks = [];
      try {
        for (const c of copies) {
          h.createDisk(c.path, c.format, c.virtualSize, c.backing);
          job.createdDisks.push(c.path);
          this.store.save(job);
        }
      } catch (e) {
        await this.abandonLocal(job, `creating the disk copies: ${(e as Error).message}`);
        throw e;
      }
    }
    let bridges: (string | undefined)[] = [];
    try {
      bridges = need.size ? h.openAway(m.config, need) : [];
    } catch (e) {
      await this.abandonLocal(job, `tunnel: ${(e as Error).message}`);
      throw e;
    }
    const tunnels = new Map([...need].map(([i, home]) => [i, { bridge: bridges[i]!, home }]));
    this.tunnels.set(job.jobId, tunnels);
    const started = this.startIncoming(job, m, bridges);
    this.starting.set(job.jobId, started);
    started.catch(() => undefined);
    try {
      // NICs behind a tunnel are probed at Prepare, once the source has opened the home end.
      const [l2, port] = await Promise.all([checkL2(m.config, m.peer, h.cfg.networks, h.cfg.name, true, 'segments', tunnels), this.openProbe(job.jobId)]);
      job.dataPort = port;
      this.store.saveLater(job);
      this.log.info('migration begun', { jobId: job.jobId, domain: job.domain, peer: peerName, mode: m.mode, dataPort: port, l2, tunnels: [...need.keys()] });
      return {
        jobId: job.jobId, host: h.cfg.name, dataAddress: h.cfg.relocation.address, dataPort: port, checks: l2, postcopy: m.postcopy, ...(m.postcopy ? {} : { postcopyWhy: pc.why }),
        ...(need.size ? { tunnels: [...need].map(([nic, home]) => ({ nic, vni: home.vni, address: h.cfg.relocation.address })) } : {}),
        ...(copies.length ? { copyDisks: copies.map((c) => ({ index: c.index, path: c.path })) } : {}),
      };
    } catch (e) {
      await this.abandonLocal(job, `pre-flight: ${(e as Error).message}`);
      throw e;
    }
  }

  /**
   * --copy-storage: where each disk the source copies lands (storage.localDir, named by
   * domain and disk) and whether there is room: the source's allocated bytes, 10 % more
   * for the copy's own metadata, and 64 MiB to spare. Only a running domain's disks are
   * mirrored (a shut-off one has no QEMU to mirror from).
   */
  private placeCopies(m: BeginMsg, running: boolean): (CopyDisk & { path: string })[] {
    const h = this.host;
    const who = `Cannot migrate domain "${m.config.name}"`;
    if (!m.copyDisks.length) return [];
    if (!running) throw new FerryError('MIGRATION_DEST_STORAGE', `${who}: --copy-storage copies a running domain's disks (QEMU mirrors them while the guest runs); start it first, or copy its disks by hand`);
    const out = m.copyDisks.map((c) => ({ ...c, path: path.join(h.cfg.storage.localDir, `${m.config.name}.disk${c.index}.${c.format}`) }));
    for (const c of out) if (fs.existsSync(c.path)) throw new FerryError('MIGRATION_DEST_STORAGE', `${who}: ${c.path} exists already on ${h.cfg.name} (a disk of an earlier copy?); remove it there first`, { path: c.path });
    const need = out.reduce((a, c) => a + Math.ceil(c.allocated * 1.1), 0) + 64 * 1048576;
    const free = h.localFreeBytes();
    if (free < need) throw new FerryError('MIGRATION_DEST_STORAGE', `${who}: its disks need about ${(need / 1048576).toFixed(0)} MiB on ${h.cfg.name} (${h.cfg.storage.localDir}), which has ${(free / 1048576).toFixed(0)} MiB free; free space there, or move it elsewhere`, { needBytes: need, freeBytes: free });
    return out;
  }

  /**
   * Starts the incoming QEMU for a begun job: stopped (-S), `-incoming defer` (no
   * listener yet), events on, TLS credentials and the authz for the source's certificate
   * in place. Everything but the listener, which Prepare opens.
   */
  private async startIncoming(j: DestJob, m: BeginMsg, bridges: (string | undefined)[]): Promise<Live> {
    const h = this.host;
    const live = await h.startIncoming(m.config, j.jobId, { preallocate: m.mode === 'offline', machine: m.machine, cpuModel: m.cpuModel, bridges }, (pid) => {
      j.pid = pid;
      this.store.saveLater(j);
    });
    const q = live.qmp!;
    this.watches.set(j.jobId, new MigrationWatcher(q));
    const mq = incomingOf(q);
    // Post-copy is offered by the source: both QEMUs need it (and its preempt channel) before the stream.
    await mq.setCapabilities({ events: true, multifd: m.parallel > 1, postcopy: m.postcopy, postcopyPreempt: m.postcopy });
    if (m.parallel > 1) await mq.setParameters({ multifdChannels: m.parallel });
    if (!m.insecure) {
      await mq.addTlsCreds('ferry-tls', h.qemuTlsDir(live));
      // Only the source host's own certificate may feed this QEMU.
      await mq.addAuthz('ferry-authz', j.peer.dn ?? `O=ferry,OU=host,CN=${j.peer.name}`);
      await mq.setParameters({ tlsCreds: 'ferry-tls', tlsAuthz: 'ferry-authz' });
    }
    return live;
  }

  /** A short-lived plain listener on the chosen data port, so the source can prove it reaches it. */
  private async openProbe(jobId: string): Promise<number> {
    // Anyone may knock (the source proves it reaches the port); nobody is kept waiting.
    const { port, server } = await this.bindDataPort(() => net.createServer((s) => { s.on('error', () => s.destroy()); s.end(); setTimeout(() => s.destroy(), 1000).unref(); }), '');
    this.probes.set(jobId, server);
    setTimeout(() => this.closeProbe(jobId), 30000).unref();
    return port;
  }

  /**
   * The first data port of the configured range that no unfinished incoming job holds
   * and that `make()`'s server can listen on; the server is returned listening.
   */
  private async bindDataPort(make: () => net.Server, what: string): Promise<{ port: number; server: net.Server }> {
    const [first, last] = this.host.cfg.relocation.dataPorts;
    const used = new Set([...this.store.jobs.values()].filter((j) => j.role === 'destination' && j.phase !== 'confirmed' && j.phase !== 'abandoned').map((j) => (j as DestJob).dataPort));
    for (let port = first; port <= last; port++) {
      if (used.has(port)) continue;
      const server = make();
      const okBind = await new Promise<boolean>((resolve) => {
        server.once('error', () => resolve(false));
        server.listen(port, this.host.cfg.relocation.address, () => resolve(true));
      });
      if (okBind) return { port, server };
    }
    throw new FerryError('MIGRATION_DEST_PORT', `${this.host.cfg.name} has no free migration data port in ${first}-${last}${what}`);
  }

  /** Stops listening now; connections still open (an outsider's) are not waited for. */
  private closeProbe(jobId: string): void {
    this.probes.get(jobId)?.close();
    this.probes.delete(jobId);
  }

  private onControlClosed(jobId: string): void {
    const j = this.store.jobs.get(jobId) as DestJob | undefined;
    if (!j || (j.phase !== 'begun' && j.phase !== 'prepared')) return;
    // The source is gone before Finish: it will resume its own copy (or already has).
    this.log.warn('source closed the control channel before Finish; abandoning', { jobId, domain: j.domain });
    void this.abandonLocal(j, 'the source closed the control channel before Finish').catch((e) => this.log.error('abandon failed', { jobId, error: String(e) }));
  }

  /** Prepare: reserve memory, define the domain, start QEMU with a one-shot TLS listener. */
  async prepare(p: Params<'relocation.prepare'>, ctx: ConnContext): Promise<Results['relocation.prepare']> {
    const j = this.job(p.jobId, ctx);
    // An abandon that arrives meanwhile (the source's connection dropped) waits for
    // this to finish and then undoes all of it, including a QEMU started just now.
    const run = this.doPrepare(j);
    this.preparing.set(j.jobId, run.then(() => undefined, () => undefined));
    try { return await run; } finally { this.preparing.delete(j.jobId); }
  }

  private preparing = new Map<string, Promise<void>>();
  /** The incoming QEMU each running job started at Begin (resolves once configured). */
  private starting = new Map<string, Promise<Live>>();
  /** Each incoming QEMU's migration status, from its events. */
  private watches = new Map<string, MigrationWatcher>();
  /** Per job: the NICs whose segment comes through a tunnel, their away bridge and home. */
  private tunnels = new Map<string, Map<number, { bridge: string; home: TunnelHome }>>();

  private async doPrepare(j: DestJob): Promise<Results['relocation.prepare']> {
    const m = this.begins.get(j.jobId);
    if (!m) throw new FerryError('MIGRATION_PROTOCOL', `Job ${j.jobId} has no Begin in this ferryd's life; begin again`);
    const h = this.host;
    // Checked before anything: legal only once, right after Begin.
    destTransition(j.phase, { type: 'prepared' });
    const started = this.starting.get(j.jobId);
    if (!started) throw new FerryError('MIGRATION_ILLEGAL_PHASE', `Job ${j.jobId} has no incoming QEMU to prepare (mode ${j.mode})`);
    try {
      const live = await started;
      const q = live.qmp;
      if (!q) throw new FerryError('MIGRATION_FAILED', `the incoming QEMU of "${j.domain}" is gone`);
      // The source has opened the tunnels' home ends: the segment must answer through them.
      const tunnels = this.tunnels.get(j.jobId);
      if (tunnels?.size) this.log.info('tunnel checked', { jobId: j.jobId, l2: await checkL2(m.config, m.peer, h.cfg.networks, h.cfg.name, true, 'tunnels', tunnels) });
      this.step(j, { type: 'prepared' });
      this.touch(j);
      this.closeProbe(j.jobId);
      if (m.insecure) {
        const sock = path.join(h.qemuDirOf(live), 'incoming.sock');
        fs.rmSync(sock, { force: true });
        await incomingOf(q).incoming(uri.unix(sock));
        // Post-copy's preempt channel is one more connection.
        const gate = new DataGate({ address: h.cfg.relocation.address, port: j.dataPort, allowFrom: j.peer.address.replace(/^::ffff:/, ''), target: sock, channels: m.parallel + (m.postcopy ? 1 : 0), log: this.log });
        this.gates.set(j.jobId, gate);
        await gate.open();
      } else {
        await incomingOf(q).incoming(uri.tcp(h.cfg.relocation.address, j.dataPort));
      }
      this.log.info('incoming listener open', { jobId: j.jobId, domain: j.domain, port: j.dataPort, tls: !m.insecure, pid: j.pid });
      const nbd = m.copyDisks.length ? await this.exportDisks(j, m, q) : undefined;
      return { dataAddress: h.cfg.relocation.address, dataPort: j.dataPort, tlsHostname: h.cfg.name, ...(nbd ? { nbd } : {}) };
    } catch (e) {
      // If an abandon is already waiting for this Prepare, it undoes everything once we return.
      if (!this.abandoning.has(j.jobId)) await this.abandonLocal(j, `prepare failed: ${(e as Error).message}`, true);
      throw e instanceof FerryError ? e : new FerryError('MIGRATION_FAILED', `Destination ${h.cfg.name} could not prepare: ${(e as Error).message}`);
    }
  }

  /**
   * --copy-storage: the incoming QEMU serves the new disks over NBD on one more data
   * port, with the same TLS credentials and authz as the stream (the source's
   * certificate only), writable, until Finish stops the server.
   */
  private async exportDisks(j: DestJob, m: BeginMsg, q: QmpClient): Promise<{ address: string; port: number }> {
    const h = this.host;
    const port = await this.freeDataPort(j.jobId);
    // One connection per disk (the source's mirror targets), and a client that does not
    // finish its handshake within 10 s is dropped (handshake-max-seconds, QEMU 10 and later).
    const mq = incomingOf(q);
    await mq.nbdServe({
      address: h.cfg.relocation.address, port, maxConnections: m.copyDisks.length,
      ...(compareVersions(h.qemu.version, '10.0') >= 0 ? { handshakeMaxSeconds: 10 } : {}),
      ...(m.insecure ? {} : { tls: { creds: 'ferry-tls', authz: 'ferry-authz' } }),
    });
    for (const c of m.copyDisks) await mq.nbdExport(`ferry-export${c.index}`, await nodeOf(q, c.index), EXPORT(c.index));
    this.log.info('disks exported for the copy', { jobId: j.jobId, domain: j.domain, port, disks: m.copyDisks.map((c) => c.index) });
    return { address: h.cfg.relocation.address, port };
  }

  /**
   * --copy-storage, at Finish (and its recovery): the copies are complete (the source
   * ended its mirrors before Finish), so nobody writes them from outside any more.
   */
  private async stopExports(j: DestJob, q: QmpClient): Promise<void> {
    if (j.createdDisks?.length) await incomingOf(q).nbdStop();
  }

  /**
   * Waits until the incoming QEMU has loaded the whole stream (it stays paused: it was
   * started with -S). Abandons if it never does. Legal only in phase prepared.
   */
  private async loaded(j: DestJob, what: string): Promise<{ live: Live; q: NonNullable<Live['qmp']> }> {
    // Abandoned on its own (its QEMU died, its control connection dropped): say so plainly.
    if (j.phase === 'abandoned') throw new FerryError('MIGRATION_FAILED', `Destination ${this.host.cfg.name} abandoned the migration of "${j.domain}": ${j.error?.message ?? 'no reason recorded'}`, { abandoned: true });
    if (j.phase !== 'prepared') throw new FerryError('MIGRATION_ILLEGAL_PHASE', `Job ${j.jobId} is ${j.phase}, cannot ${what}`);
    const h = this.host;
    const live = h.find(j.domain);
    if (!live || live.rec.state.kind !== 'incoming' || !live.qmp) {
      await this.abandonLocal(j, `no incoming QEMU to ${what}`);
      throw new FerryError('MIGRATION_FAILED', `Destination ${h.cfg.name} has no incoming QEMU for "${j.domain}"; abandoned`, { abandoned: true });
    }
    const q = live.qmp;
    const w = this.watches.get(j.jobId);
    // The source asks only after its QEMU sent everything. If no stream has even
    // connected, the request is out of order: refuse at once instead of waiting.
    // (QEMU 10 says "setup" as soon as it listens, and "active" once a stream connected;
    // a source that finished sending is past that, give or take the main loop's turn.)
    const noStream = (): FerryError => new FerryError('MIGRATION_PROTOCOL', `relocation: cannot ${what} job ${j.jobId} before any migration stream arrived`);
    if (!w || w.status === 'none') throw noStream();
    if (w.status === 'setup') await w.until(['active', ...FINAL_STATUSES], 2000).catch(() => { throw noStream(); });
    let status: string;
    try {
      // Post-copy: the source stopped its guest and sent the devices; the rest of RAM
      // follows as this guest runs. Its run state is inmigrate until QEMU has loaded them.
      const s = await w.until(j.postcopy ? [...FINAL_STATUSES, 'postcopy-active'] : FINAL_STATUSES, 120000);
      status = s === 'completed' || s === 'postcopy-active' ? (await incomingOf(q).runState()).status : `migration ${s}`;
    } catch (e) {
      status = (e as Error).message;
    }
    if (status !== 'paused' && status !== 'prelaunch' && !(j.postcopy && status === 'inmigrate' && w.status === 'postcopy-active')) {
      await this.abandonLocal(j, `incoming state did not load (status ${status})`);
      throw new FerryError('MIGRATION_FAILED', `Destination ${h.cfg.name} could not load the state of "${j.domain}" (QEMU status ${status}); abandoned, the source keeps it`, { abandoned: true });
    }
    return { live, q };
  }

  /**
   * Digest: per-chunk SHA-256 of the loaded guest RAM, for the source to compare with
   * its own before anything runs here (qemu/memory.ts says why). Changes no phase: the
   * guest stays paused and the job stays prepared, so the source can still abandon.
   */
  async digest(p: Params<'relocation.digest'>, ctx: ConnContext): Promise<unknown> {
    const j = this.job(p.jobId, ctx);
    const { live } = await this.loaded(j, 'digest its memory');
    if (p.chunks) {
      // Only these chunks (the ones just repaired): the check's second look.
      const chunks = p.chunks;
      const r = await this.ramOrAbandon(j, 'read', () => this.host.ramChunkDigests(live, chunks));
      return { bytes: r.bytes, chunkBytes: r.chunkBytes, chunks, digests: r.digests.toString('base64') };
    }
    const d = await this.ramOrAbandon(j, 'read', () => this.host.ramDigests(live));
    this.log.info('incoming memory digested', { jobId: j.jobId, domain: j.domain, bytes: d.bytes, ms: d.ms });
    return { bytes: d.bytes, chunkBytes: d.chunkBytes, digests: d.digests.toString('base64'), ms: d.ms };
  }

  /**
   * Repair: the source's version of RAM that arrived different, written into the loaded
   * and still paused guest. The source already sent this guest's whole memory in the
   * stream, so this trusts it with nothing new; legal exactly when Digest is.
   */
  async repair(p: Params<'relocation.repair'>, ctx: ConnContext, attachment?: Buffer): Promise<Results['relocation.repair']> {
    const j = this.job(p.jobId, ctx);
    const { live } = await this.loaded(j, 'repair its memory');
    const data = attachment ?? Buffer.alloc(0);
    if (data.length !== p.length) throw new FerryError('MIGRATION_PROTOCOL', `relocation.repair of job ${j.jobId}: ${data.length} bytes arrived, ${p.length} announced`);
    const n = (this.repairs.get(j.jobId) ?? 0) + 1;
    this.repairs.set(j.jobId, n);
    if (n === 1) this.log.warn('incoming memory arrived different; rewriting it from the source', { jobId: j.jobId, domain: j.domain });
    await this.ramOrAbandon(j, 'write', () => this.host.withRam(live, true, async (ram) => {
      try {
        ram.write(p.offset, data);
      } catch (e) {
        // The peer's fault, not this host's: refused, and nothing changed.
        throw new FerryError('MIGRATION_PROTOCOL', `relocation.repair of job ${j.jobId}: ${(e as Error).message}`);
      }
    }));
    return { written: data.length };
  }

  /**
   * Runs a RAM access. If this host cannot read or write the guest's RAM, it cannot
   * vouch for the guest, so it abandons; a refused request (the peer's fault) changes nothing.
   */
  private async ramOrAbandon<T>(j: DestJob, verb: string, f: () => Promise<T>): Promise<T> {
    try {
      return await f();
    } catch (e) {
      if (e instanceof FerryError && e.code === 'MIGRATION_PROTOCOL') throw e;
      await this.abandonLocal(j, `could not ${verb} the incoming RAM: ${(e as Error).message}`);
      throw new FerryError('MIGRATION_FAILED', `Destination ${this.host.cfg.name} could not ${verb} the incoming RAM of "${j.domain}" (${(e as Error).message}); abandoned, the source keeps it`, { abandoned: true });
    }
  }

  /** Finish: wait for the state to load, then resume here. Point of no return. */
  async finish(p: Params<'relocation.finish'>, ctx: ConnContext): Promise<Results['relocation.finish']> {
    const j = this.job(p.jobId, ctx);
    if (j.mode === 'definition') return this.finishDefinition(j);
    const { live, q } = await this.loaded(j, 'finish');
    const h = this.host;
    this.repairs.delete(j.jobId);
    const running = p.running !== false;
    // ---- point of no return: persisted before the guest runs here ----
    if (this.abandoning.has(j.jobId)) throw new FerryError('MIGRATION_FAILED', `Destination ${h.cfg.name} is abandoning the migration of "${j.domain}"`, { abandoned: true });
    try {
      this.step(j, { type: 'resuming' });
    } catch (e) {
      // Not on disk, so not past the point of no return: give the guest back.
      await this.abandonLocal(j, `could not persist the point of no return: ${(e as Error).message}`);
      throw new FerryError(asFerryError(e).code, `Destination ${h.cfg.name} cannot write its state (${(e as Error).message}); abandoned before resuming "${j.domain}"`, { abandoned: true });
    }
    let resumedAt: number | null = null;
    await this.stopExports(j, q);
    if (running) {
      const resumed = q.waitEvent('RESUME', 10000).then(qmpEventMs).catch(() => Date.now());
      resumed.catch(() => undefined);
      try {
        await incomingOf(q).cont();
      } catch (e) {
        // A QEMU that is gone may have run the guest first: that is a crash here, below.
        if (!q.closed) await this.resumeFailed(j, live, q, (e as Error).message);
      }
      if (!q.closed) resumedAt = await resumed;
    }
    // Tell the L2 segment where the MAC lives now (RARP), so no traffic is black-holed.
    if (!q.closed && live.rec.config.nics.length) await incomingOf(q).announce().catch((e) => this.log.warn('announce-self failed', { error: String(e) }));
    // QEMU died as it resumed: the guest may have run here, so the source must not run
    // its copy again. The handover happened, and the domain crashed on arrival.
    const crashed = q.closed;
    h.setBusy(live, undefined);
    if (crashed) {
      this.log.error('the incoming QEMU exited as the guest resumed; the domain crashed here', { jobId: j.jobId, domain: j.domain });
      h.cleanupRuntime(live);
      h.apply(live, { type: 'crash', reason: 'QEMU exited as the guest resumed after a migration', at: Date.now() });
    } else {
      h.apply(live, { type: 'incoming-done', running, at: Date.now() });
    }
    h.release(j.jobId);
    this.step(j, { type: 'resumed' });
    this.begins.delete(j.jobId);
    const w = this.watches.get(j.jobId);
    if (j.postcopy && w && !crashed && !w.final) {
      // Post-copy: the stream (and a plain one's gate) lives until the last page is here.
      this.touchOff(j.jobId);
      void w.until([...FINAL_STATUSES]).then((s) => this.log.info('post-copy stream ended', { jobId: j.jobId, domain: j.domain, status: s }), () => undefined).finally(() => this.forgetRun(j.jobId));
    } else {
      this.forgetRun(j.jobId);
    }
    setTimeout(() => this.selfConfirm(j, `no Confirm from ${j.peer.name} within ${CONFIRM_GRACE_MS / 1000} s`), CONFIRM_GRACE_MS).unref();
    return { phase: j.phase, resumedAt, host: h.cfg.name, ...(crashed ? { crashed: true } : {}) };
  }

  /**
   * QEMU refused `cont` past the point of no return (say, a disk it cannot lock). If it
   * says the guest is not running, the guest never ran here: give it back (the source
   * resumes its copy on this word) instead of holding a job nobody can finish. If its
   * state is unknown, stay in finishing: the source keeps asking, and nothing runs twice.
   */
  async resumeFailed(j: DestJob, live: Live, q: QmpClient, why: string): Promise<never> {
    const st = await incomingOf(q).runState().catch(() => undefined);
    if (!st || st.running) throw new FerryError('MIGRATION_FAILED', `Destination ${this.host.cfg.name} could not resume "${j.domain}" (${why}) and cannot tell whether it runs; the source keeps its copy paused`);
    const reason = `QEMU on ${this.host.cfg.name} refused to run the guest (${why}); it never ran there`;
    this.log.error('could not resume an incoming guest; giving it back to the source', { jobId: j.jobId, domain: j.domain, error: why, status: st.status });
    await this.undo(j, reason, { type: 'resume-failed', reason });
    throw new FerryError('MIGRATION_FAILED', `Destination ${this.host.cfg.name} could not resume "${j.domain}": ${why}. It never ran there, so the source keeps it`, { abandoned: true });
  }

  private finishDefinition(j: DestJob): Results['relocation.finish'] {
    if (j.phase !== 'begun') throw new FerryError('MIGRATION_ILLEGAL_PHASE', `Job ${j.jobId} is ${j.phase}, cannot finish`);
    const c = parseDomainConfig(Object.fromEntries(Object.entries(j.config).filter(([k]) => !k.startsWith('_'))));
    this.step(j, { type: 'prepared' });
    this.step(j, { type: 'resuming' });
    this.host.defineMoved(c);
    this.step(j, { type: 'resumed' });
    this.begins.delete(j.jobId);
    return { phase: j.phase, resumedAt: null, host: this.host.cfg.name };
  }

  /**
   * The driver of a job whose in-process context is gone (ferryd restarted), from its
   * persisted phase:
   *   begun, prepared → abandon: kill the incoming QEMU, forget the definition
   *   finishing → roll forward: the source persisted "finish" before asking and resumes
   *       its copy only on our word that we abandoned, which we give only if QEMU refuses
   *       to run the guest and says it is not running (resumeFailed)
   *   finished → the guest runs here; the source's Confirm went to the old process
   *   confirmed, abandoned → nothing
   */
  async drive(j: DestJob, why: string): Promise<void> {
    const live = this.host.find(j.domain);
    const mine = live && live.rec.config.uuid === j.uuid ? live : undefined;
    switch (j.phase) {
      case 'begun':
      case 'prepared': {
        await this.abandonLocal(j, `${why} in phase ${j.phase}`);
        // abandonLocal killed the QEMU on record. One started just before a crash may
        // not be on record yet: find the incoming one by its uuid and the run directory.
        for (const pid of qemuPidsWith(j.uuid, ['-incoming', this.host.runDir])) {
          this.log.warn('killing an incoming QEMU that was not on record', { jobId: j.jobId, pid });
          await killAndWait(pid, 0);
        }
        // Its taps, too: spawn creates them (named by uuid) before QEMU starts.
        const nics = Array.isArray((j.config as { nics?: unknown[] }).nics) ? (j.config as { nics: unknown[] }).nics.length : 0;
        this.host.removeTaps(j.uuid, nics);
        return;
      }
      case 'finishing': {
        if (mine && mine.qmp && mine.rec.state.kind === 'incoming') {
          const q = mine.qmp;
          await this.stopExports(j, q);
          try {
            await incomingOf(q).cont();
          } catch (e) {
            await this.resumeFailed(j, mine, q, (e as Error).message).catch((err) => this.log.warn('incoming guest not resumed', { jobId: j.jobId, error: String(err) }));
            return;
          }
          await incomingOf(q).announce().catch(() => undefined);
          this.host.setBusy(mine, undefined);
          this.host.apply(mine, { type: 'incoming-done', running: true, at: Date.now() });
        } else if (mine && mine.rec.state.kind === 'incoming') {
          this.host.cleanupRuntime(mine);
          this.host.apply(mine, { type: 'crash', reason: 'QEMU exited while resuming an incoming migration', at: Date.now() });
        }
        this.host.release(j.jobId);
        this.step(j, { type: 'resumed' });
        this.selfConfirm(j, `rolled forward (${why}); the source's Confirm went to the old process`);
        return;
      }
      case 'finished':
        this.selfConfirm(j, `${why} before the source confirmed`);
        return;
      case 'confirmed':
      case 'abandoned':
        return;
      default: {
        const never: never = j.phase;
        throw new FerryError('INTERNAL', `unknown destination phase ${String(never)}`);
      }
    }
  }

  /**
   * Confirm without the source: once the guest runs here and Finish was answered, the
   * source's Confirm only tidies up, and it can be lost (the source or this ferryd
   * died in between). Legal only from finished; changes nothing but the record.
   */
  selfConfirm(j: DestJob, why: string): void {
    if (j.phase !== 'finished') return;
    this.log.info('confirming a finished job without the source', { jobId: j.jobId, domain: j.domain, why });
    this.step(j, { type: 'confirmed' });
    this.store.prune();
  }

  confirm(p: Params<'relocation.confirm'>, ctx: ConnContext): Results['relocation.confirm'] {
    const j = this.job(p.jobId, ctx);
    if (j.phase === 'confirmed') return { phase: j.phase };
    this.step(j, { type: 'confirmed' });
    this.store.prune();
    return { phase: j.phase };
  }

  async abandon(p: Params<'relocation.abandon'>, ctx: ConnContext): Promise<Results['relocation.abandon']> {
    const j = this.job(p.jobId, ctx);
    if (j.phase === 'abandoned') return { phase: j.phase };
    if (j.phase !== 'begun' && j.phase !== 'prepared') throw new FerryError('MIGRATION_ILLEGAL_PHASE', `Job ${j.jobId} is ${j.phase} on ${this.host.cfg.name}: past the point of no return, it cannot be abandoned`);
    await this.abandonLocal(j, p.reason?.slice(0, 500) ?? 'the source abandoned');
    return { phase: j.phase };
  }

  /**
   * Recover: the post-copy stream broke (both QEMUs in postcopy-paused: the guest here
   * waits for pages only the source has). A new one-shot listener on the incoming QEMU
   * (migrate-recover), with the same TLS credentials and authz, or a new gate for a plain
   * stream; the source resumes into it. A destination QEMU that has not noticed the
   * break yet is paused first (migrate-pause): the source saw it break.
   */
  async recover(p: Params<'relocation.recover'>, ctx: ConnContext): Promise<Results['relocation.recover']> {
    const j = this.job(p.jobId, ctx);
    const h = this.host;
    if (!j.postcopy || (j.phase !== 'finished' && j.phase !== 'confirmed')) throw new FerryError('MIGRATION_ILLEGAL_PHASE', `Job ${j.jobId} is ${j.phase}${j.postcopy ? '' : ' and not a post-copy'}: nothing to recover`);
    const live = h.find(j.domain);
    const q = live && live.rec.config.uuid === j.uuid ? live.qmp : undefined;
    if (!q) throw new FerryError('MIGRATION_FAILED', `Destination ${h.cfg.name} has no QEMU for "${j.domain}" to recover`);
    const w = new MigrationWatcher(q);
    try {
      let st = (await incomingOf(q).info()).status ?? 'none';
      if (st === 'postcopy-active') {
        await incomingOf(q).pause();
        st = await w.until(['postcopy-paused', ...FINAL_STATUSES], 10000);
      }
      if (st !== 'postcopy-paused') throw new FerryError('MIGRATION_ILLEGAL_PHASE', `The incoming QEMU of "${j.domain}" is ${st}, not paused in post-copy: nothing to recover`);
    } finally {
      w.dispose();
    }
    const port = await this.freeDataPort(j.jobId);
    if (!j.encrypted) {
      const sock = path.join(h.qemuDirOf(live!), 'recover.sock');
      fs.rmSync(sock, { force: true });
      await incomingOf(q).recover(uri.unix(sock));
      this.gates.get(j.jobId)?.close();
      const gate = new DataGate({ address: h.cfg.relocation.address, port, allowFrom: j.peer.address.replace(/^::ffff:/, ''), target: sock, channels: 2, log: this.log });
      this.gates.set(j.jobId, gate);
      await gate.open();
    } else {
      await incomingOf(q).recover(uri.tcp(h.cfg.relocation.address, port));
    }
    this.log.warn('post-copy stream broke; recovery listener open', { jobId: j.jobId, domain: j.domain, port });
    return { dataAddress: h.cfg.relocation.address, dataPort: port };
  }

  /** A data port nobody listens on now (a recovery's new listener). */
  private async freeDataPort(jobId: string): Promise<number> {
    const { port, server } = await this.bindDataPort(() => net.createServer(), ` to recover job ${jobId}`);
    await new Promise<void>((r) => server.close(() => r()));
    return port;
  }

  status(p: Params<'relocation.status'>, ctx: ConnContext): Results['relocation.status'] {
    try {
      const j = this.job(p.jobId, ctx);
      return { phase: j.phase, domain: j.domain };
    } catch (e) {
      if (e instanceof FerryError && e.code === 'JOB_NOT_FOUND') return { phase: 'unknown' };
      throw e;
    }
  }

  private abandoning = new Map<string, Promise<void>>();
  /** Repair messages taken per job, until it finishes or abandons. */
  private repairs = new Map<string, number>();

  /**
   * Undoes everything this side did: QEMU, taps, definition, reservation, probe.
   * Idempotent, also when two causes race (the QEMU died while Prepare was failing).
   */
  abandonLocal(j: DestJob, reason: string, fromPrepare = false): Promise<void> {
    const existing = this.abandoning.get(j.jobId);
    if (existing) return existing;
    this.repairs.delete(j.jobId);
    if (j.phase !== 'begun' && j.phase !== 'prepared') return Promise.resolve();
    // Claimed synchronously, so that Finish cannot pass the point of no return meanwhile;
    // an in-flight Prepare is let finish first, so that everything it started is undone.
    const inflight = fromPrepare ? undefined : this.preparing.get(j.jobId);
    const starting = this.starting.get(j.jobId);
    const p: Promise<void> = (async () => {
      if (inflight) await inflight;
      if (starting) await starting.catch(() => undefined);
      if (j.phase === 'begun' || j.phase === 'prepared') await this.undo(j, reason);
    })().finally(() => this.abandoning.delete(j.jobId));
    this.abandoning.set(j.jobId, p);
    return p;
  }

  /** Stops a job's quiet deadline (a post-copy stream may be silent while the guest needs nothing). */
  private touchOff(jobId: string): void {
    const q = this.quiet.get(jobId);
    if (q) clearTimeout(q);
    this.quiet.delete(jobId);
  }

  /** Drops what this ferryd holds in memory for a job's incoming QEMU. */
  private forgetRun(jobId: string): void {
    this.gates.get(jobId)?.close();
    this.gates.delete(jobId);
    const q = this.quiet.get(jobId);
    if (q) clearTimeout(q);
    this.quiet.delete(jobId);
    this.starting.delete(jobId);
    this.tunnels.delete(jobId);
    this.watches.get(jobId)?.dispose();
    this.watches.delete(jobId);
  }

  private async undo(j: DestJob, reason: string, event: DestEvent = { type: 'abandon', reason }): Promise<void> {
    const h = this.host;
    this.closeProbe(j.jobId);
    const live = h.find(j.domain);
    if (live && (live.rec.state.kind === 'incoming' || live.rec.state.kind === 'defined') && live.rec.config.uuid === j.uuid) {
      // A record still 'defined' has had no pid on it yet: the job's pid (if any) is the QEMU.
      if (live.rec.state.kind === 'defined' && j.pid && isOurQemu(j.pid, j.uuid)) await killAndWait(j.pid, 0);
      await h.discardIncoming(live);
    } else if (j.pid && isOurQemu(j.pid, j.uuid)) {
      // No record (a restart, or Prepare failed early): the pid on file must still be our QEMU.
      await killAndWait(j.pid, 0);
    }
    h.release(j.jobId);
    // Away ends opened for this guest (it never ran here, so it has no others here).
    h.closeAway(j.uuid);
    // Half-made disk copies: the source's disks stay the only live ones.
    for (const f of j.createdDisks ?? []) fs.rmSync(f, { force: true });
    if (j.createdDisks?.length) this.log.info('disk copies removed', { jobId: j.jobId, files: j.createdDisks });
    this.forgetRun(j.jobId);
    j.error = { code: 'MIGRATION_FAILED', message: reason };
    this.step(j, event);
    this.begins.delete(j.jobId);
    this.store.prune();
    this.log.info('incoming migration abandoned', { jobId: j.jobId, domain: j.domain, reason });
  }
}
