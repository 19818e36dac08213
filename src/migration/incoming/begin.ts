/**
 * Destination phase begin: the source's offer checked (peer, limits, engine, CPU, disks,
 * storage, networks), the job persisted, memory reserved, disk copies created, tunnels'
 * away ends opened, and the incoming QEMU started (stopped, no listener) while the L2
 * probe runs. Nothing listens for the stream yet: Prepare opens that.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { FerryError, asFerryError } from '../../errors.ts';
import { domainConfigToJson, type DomainConfig } from '../../domain/config.ts';
import { hostArch, cpuMissing } from '../../qemu/probe.ts';
import { MigrationWatcher } from '../../qemu/migstatus.ts';
import { MigrationQmp, multifdOn } from '../../qemu/migration.ts';
import type { BeginMsg } from '../../api/relocation.ts';
import type { Results } from '../../api/protocol.ts';
import type { DomainHandle, RelocationContext, TunnelHome } from '../host.ts';
import type { DestJob } from '../jobs.ts';
import type { CopyDisk } from '../mirror.ts';
import { checkOffer, checkFiles, checkL2, checkStorageMarkers, tunnelsNeeded, peerAddresses } from '../preflight.ts';
import { abandonLocal, controlClosed, touch } from './abandon.ts';
import type { IncomingRun, IncomingSide } from './run.ts';

type Placed = CopyDisk & { path: string };

/** What Begin decided before anything is held: who asks, what is copied, which NICs need tunnels. */
interface Offer {
  m: BeginMsg;
  peerName: string;
  running: boolean;
  copies: Placed[];
  need: Map<number, TunnelHome>;
  postcopyWhy: string;
}

/** Begin: every check, then the job and what it holds. Answers the data port the source probes. */
export async function begin(side: IncomingSide, m: BeginMsg, ctx: RelocationContext): Promise<Results['relocation.begin']> {
  const o = checkBegin(side, m, ctx);
  const run = side.runOf(persistJob(side, o, ctx));
  run.begin = m;
  touch(run);
  ctx.onClose(() => controlClosed(run));
  return hold(run, o);
}

/** The checks: nothing is held yet, and a refusal leaves nothing behind. */
function checkBegin(side: IncomingSide, m: BeginMsg, ctx: RelocationContext): Offer {
  const h = side.host;
  const peerName = ctx.caller.transport === 'tls' ? ctx.caller.peerName! : m.peer.name;
  if (peerName !== m.peer.name)
    throw new FerryError(
      'MIGRATION_PROTOCOL',
      `relocation.begin: peer says it is "${m.peer.name}" but its certificate names "${peerName}"`,
    );
  if (side.store.jobs.has(m.jobId))
    throw new FerryError('MIGRATION_PROTOCOL', `relocation.begin: job ${m.jobId} was already begun (replay?)`);
  if (h.maintenance().on)
    throw new FerryError(
      'MIGRATION_DEST_MAINTENANCE',
      `Cannot migrate domain "${m.config.name}": ${h.cfg.name} is in maintenance since ${h.maintenance().since ?? 'earlier'} and takes no incoming move; pick another host`,
    );
  // The destination decides whether its QEMU may read an unauthenticated stream.
  if (m.insecure && !h.cfg.relocation.allowInsecure)
    throw new FerryError(
      'MIGRATION_DEST_INSECURE',
      `Cannot migrate domain "${m.config.name}" without TLS: ${h.cfg.name} does not accept plain-TCP migration streams; drop --insecure, or set relocation.allowInsecure on ${h.cfg.name} (trusted networks only)`,
    );
  checkLimits(side, peerName);
  const running = m.mode !== 'definition';
  checkOffer(
    { version: m.version, src: m.peer },
    {
      name: h.cfg.name,
      qemuVersion: h.qemu.version,
      arch: hostArch(),
      accel: h.accel.accel,
      cpuFor: m.cpuModel,
      cpuMissing: cpuMissing(h.qemu, m.cpuModel),
      cpuCeiling: h.qemu.ceiling,
      machines: h.qemu.machines,
      networks: h.cfg.networks,
      ...h.memoryFacts(),
      domainNames: h.domainNames(),
      domainUuids: h.domainUuids(),
    },
    m.config,
    running,
  );
  // --copy-storage: the disks to copy get their place here; everything else must be shared.
  const copies = placeCopies(side, m, running);
  checkStorage(side, m, copies, peerName);
  // Where the copies land: the domain's config here names them.
  for (const c of copies) m.config.disks[c.index] = { ...m.config.disks[c.index], path: c.path };
  // Post-copy only where this host's QEMU can take it: the source learns it from Begin's answer.
  const pc = h.postcopyIncoming();
  if (m.postcopy && !pc.ok) {
    m.postcopy = false;
    side.log.info('post-copy declined for an incoming move', { jobId: m.jobId, why: pc.why });
  }
  return { m, peerName, running, copies, need: tunnelsFor(side, m, running, ctx), postcopyWhy: pc.why };
}

/** limits.incomingPerPeer and limits.incomingTotal over the jobs still before Finish. */
function checkLimits(side: IncomingSide, peerName: string): void {
  const h = side.host;
  const open = [...side.store.jobs.values()].filter(
    (x): x is DestJob => x.role === 'destination' && (x.phase === 'begun' || x.phase === 'prepared'),
  );
  const lim = h.cfg.limits;
  if (open.filter((x) => x.peer.name === peerName).length >= lim.incomingPerPeer)
    throw new FerryError(
      'MIGRATION_DEST_BUSY',
      `${h.cfg.name} already takes ${lim.incomingPerPeer} incoming moves from ${peerName} (its limits.incomingPerPeer)`,
    );
  if (open.length >= lim.incomingTotal)
    throw new FerryError(
      'MIGRATION_DEST_BUSY',
      `${h.cfg.name} already takes ${lim.incomingTotal} incoming moves (its limits.incomingTotal)`,
    );
}

/** Shared disks: inside the pools (a peer learns nothing about files outside them, not even existence), the same sizes, the source's markers beside them. */
function checkStorage(side: IncomingSide, m: BeginMsg, copies: Placed[], peerName: string): void {
  const h = side.host;
  const shared: DomainConfig = { ...m.config, disks: m.config.disks.filter((_, i) => !copies.some((c) => c.index === i)) };
  const backings = copies.flatMap((c) =>
    c.backing ? [{ path: c.backing.path, format: c.backing.format as 'raw' | 'qcow2', readOnly: true, bus: 'virtio' as const }] : [],
  );
  try {
    h.checkPaths({ ...shared, disks: [...shared.disks, ...backings] });
  } catch (e) {
    const fe = asFerryError(e);
    if (fe.code === 'DISK_NOT_FOUND')
      throw new FerryError(
        'MIGRATION_DEST_DISK',
        `Cannot migrate domain "${m.config.name}": ${fe.message}; disks, their backing files and boot files must be on shared storage at the same path`,
      );
    throw fe;
  }
  checkFiles(shared, m.fileSizes, h.cfg.name);
  checkStorageMarkers(shared, { jobId: m.jobId, nonce: m.storageNonce }, h.cfg.name, peerName);
}

/**
 * NICs whose segment is another subnet here get it carried through a tunnel
 * (daemon/tunnels.ts), only to a host the source names and only for a running guest.
 */
function tunnelsFor(side: IncomingSide, m: BeginMsg, running: boolean, ctx: RelocationContext): Map<number, TunnelHome> {
  const h = side.host;
  const need = tunnelsNeeded(
    m.config,
    m.homes,
    { name: h.cfg.name, networks: h.cfg.networks, tunnels: h.cfg.relocation.tunnels, address: h.cfg.relocation.address },
    m.peer.name,
  );
  const peerAddr = (ctx.caller.peerAddress ?? '').replace(/^::ffff:/, '');
  const known = new Set([peerAddr, ...peerAddresses(h.peers())]);
  for (const [i, home] of need) {
    if (!running)
      throw new FerryError(
        'MIGRATION_DEST_L2',
        `Cannot migrate shut-off domain "${m.config.name}": network "${m.config.nics[i].network}" is another subnet on ${h.cfg.name} than its segment ${home.subnet}, and a tunnel follows a running domain only; start it first, or move it to a host on ${home.subnet}`,
      );
    if (!known.has(home.address))
      throw new FerryError(
        'MIGRATION_PROTOCOL',
        `relocation.begin: NIC ${i}'s home ${home.host} at ${home.address} is neither the source nor a peer of ${h.cfg.name}`,
      );
  }
  return need;
}

/**
 * The job, persisted before any QEMU starts: a restarted ferryd that finds "begun"
 * kills an incoming QEMU of this uuid and forgets everything (Destination.drive).
 */
function persistJob(side: IncomingSide, o: Offer, ctx: RelocationContext): DestJob {
  const { m, peerName } = o;
  const now = Date.now();
  const job: DestJob = {
    role: 'destination',
    jobId: m.jobId,
    domain: m.config.name,
    uuid: m.config.uuid,
    mode: m.mode,
    encrypted: !m.insecure,
    startedAt: now,
    updatedAt: now,
    history: [{ phase: 'begun', at: now }],
    phase: 'begun',
    peer: { name: peerName, address: ctx.caller.peerAddress ?? '', ...(ctx.caller.peerDn ? { dn: ctx.caller.peerDn } : {}) },
    dataPort: 0,
    memoryMiB: m.config.memoryMiB,
    config: { ...domainConfigToJson(m.config), _machine: m.machine, _cpuModel: m.cpuModel },
    ...(m.postcopy ? { postcopy: true } : {}),
  };
  try {
    side.store.save(job);
  } catch (e) {
    side.store.discard(job);
    throw e;
  }
  return job;
}

/** What a persisted job holds, each undone by an abandon if a later step fails. */
async function hold(run: IncomingRun, o: Offer): Promise<Results['relocation.begin']> {
  const { j, host: h } = run;
  const { m, peerName } = o;
  if (!o.running) {
    const l2 = await checkL2(
      m.config,
      m.peer,
      { networks: h.cfg.networks, host: h.cfg.name },
      { guestRunning: false, on: 'segments' },
    ).catch(async (e) => {
      await abandonLocal(run, (e as Error).message);
      throw e;
    });
    run.log.info('migration begun', { jobId: j.jobId, domain: j.domain, peer: peerName, mode: m.mode, l2 });
    return { jobId: j.jobId, host: h.cfg.name, dataAddress: h.cfg.relocation.address, dataPort: 0, checks: l2 };
  }
  // The incoming QEMU starts now (reserved, stopped, no listener), in parallel with
  // the L2 probe: QEMU's start-up is the longest step before the first byte. Its
  // listener opens only at Prepare, which must come within limits.reservationS (touch).
  h.reserve(j.jobId, j.domain, j.memoryMiB);
  await orAbandon(run, 'creating the disk copies', () => createCopies(run, o.copies));
  const bridges = await orAbandon(run, 'tunnel', () => (o.need.size ? h.openAway(m.config, o.need) : []));
  for (const [i, home] of o.need) run.tunnels.set(i, { bridge: bridges[i]!, home });
  run.starting = startIncoming(run, bridges);
  run.starting.catch(() => undefined);
  // NICs behind a tunnel are probed at Prepare, once the source has opened the home end.
  const checks = orAbandon(run, 'pre-flight', () =>
    Promise.all([
      checkL2(
        m.config,
        m.peer,
        { networks: h.cfg.networks, host: h.cfg.name },
        { guestRunning: true, on: 'segments', tunnels: run.tunnels },
      ),
      openProbe(run),
    ]),
  );
  const [l2, port] = await checks;
  j.dataPort = port;
  run.side.store.saveLater(j);
  run.log.info('migration begun', {
    jobId: j.jobId,
    domain: j.domain,
    peer: peerName,
    mode: m.mode,
    dataPort: port,
    l2,
    tunnels: [...o.need.keys()],
  });
  return {
    jobId: j.jobId,
    host: h.cfg.name,
    dataAddress: h.cfg.relocation.address,
    dataPort: port,
    checks: l2,
    postcopy: m.postcopy,
    ...(m.postcopy ? {} : { postcopyWhy: o.postcopyWhy }),
    ...(o.need.size ? { tunnels: [...o.need].map(([nic, home]) => ({ nic, vni: home.vni, address: h.cfg.relocation.address })) } : {}),
    ...(o.copies.length ? { copyDisks: o.copies.map((c) => ({ index: c.index, path: c.path })) } : {}),
  };
}

/** Runs a step of Begin; if it fails, the job is abandoned (everything held so far undone) and the error goes to the source. */
async function orAbandon<T>(run: IncomingRun, what: string, f: () => T | Promise<T>): Promise<T> {
  try {
    return await f();
  } catch (e) {
    await abandonLocal(run, `${what}: ${(e as Error).message}`);
    throw e;
  }
}

/** Each copy on record once made (never before: a file that was there is not ours to delete). */
function createCopies(run: IncomingRun, copies: Placed[]): void {
  if (!copies.length) return;
  const j = run.j;
  j.createdDisks = [];
  for (const c of copies) {
    run.host.createDisk(c.path, c.format, c.virtualSize, c.backing);
    j.createdDisks.push(c.path);
    run.side.store.save(j);
  }
}

/**
 * --copy-storage: where each disk the source copies lands (storage.localDir, named by
 * domain and disk) and whether there is room: the source's allocated bytes, 10 % more
 * for the copy's own metadata, and 64 MiB to spare. Only a running domain's disks are
 * mirrored (a shut-off one has no QEMU to mirror from).
 */
function placeCopies(side: IncomingSide, m: BeginMsg, running: boolean): Placed[] {
  const h = side.host;
  const who = `Cannot migrate domain "${m.config.name}"`;
  if (!m.copyDisks.length) return [];
  if (!running)
    throw new FerryError(
      'MIGRATION_DEST_STORAGE',
      `${who}: --copy-storage copies a running domain's disks (QEMU mirrors them while the guest runs); start it first, or copy its disks by hand`,
    );
  const out = m.copyDisks.map((c) => ({ ...c, path: path.join(h.cfg.storage.localDir, `${m.config.name}.disk${c.index}.${c.format}`) }));
  for (const c of out)
    if (fs.existsSync(c.path))
      throw new FerryError(
        'MIGRATION_DEST_STORAGE',
        `${who}: ${c.path} exists already on ${h.cfg.name} (a disk of an earlier copy?); remove it there first`,
        { path: c.path },
      );
  const need = out.reduce((a, c) => a + Math.ceil(c.allocated * 1.1), 0) + 64 * 1048576;
  const free = h.localFreeBytes();
  if (free < need)
    throw new FerryError(
      'MIGRATION_DEST_STORAGE',
      `${who}: its disks need about ${(need / 1048576).toFixed(0)} MiB on ${h.cfg.name} (${h.cfg.storage.localDir}), which has ${(free / 1048576).toFixed(0)} MiB free; free space there, or move it elsewhere`,
      { needBytes: need, freeBytes: free },
    );
  return out;
}

/**
 * Starts the incoming QEMU for a begun job: stopped (-S), `-incoming defer` (no
 * listener yet), events on, TLS credentials and the authz for the source's certificate
 * in place. Everything but the listener, which Prepare opens.
 */
async function startIncoming(run: IncomingRun, bridges: (string | undefined)[]): Promise<DomainHandle> {
  const { j, host: h } = run;
  const m = run.begin!;
  const dom = await h.startIncoming(
    m.config,
    j.jobId,
    { preallocate: m.mode === 'offline', machine: m.machine, cpuModel: m.cpuModel, bridges },
    (pid) => {
      j.pid = pid;
      run.side.store.saveLater(j);
    },
  );
  const q = dom.qmp!;
  run.watch = new MigrationWatcher(q);
  const mq = new MigrationQmp(q, 'destination');
  // Post-copy is offered by the source: both QEMUs need it (and its preempt channel) before the stream.
  const multifd = multifdOn(m.parallel, m.compress);
  await mq.setCapabilities({ events: true, multifd, postcopy: m.postcopy, postcopyPreempt: m.postcopy });
  // Both ends agree on the channels and the compression (an earlier move's setting stays in a QEMU otherwise).
  if (multifd) await mq.setParameters({ multifdChannels: m.parallel, multifdCompression: m.compress });
  if (!m.insecure) {
    await mq.addTlsCreds('ferry-tls', h.qemuTlsDir(dom));
    // Only the source host's own certificate may feed this QEMU.
    await mq.addAuthz('ferry-authz', j.peer.dn ?? `O=ferry,OU=host,CN=${j.peer.name}`);
    await mq.setParameters({ tlsCreds: 'ferry-tls', tlsAuthz: 'ferry-authz' });
  }
  return dom;
}

/** A short-lived plain listener on the chosen data port, so the source can prove it reaches it. */
async function openProbe(run: IncomingRun): Promise<number> {
  // Anyone may knock (the source proves it reaches the port); nobody is kept waiting.
  const knock = (s: net.Socket): void => {
    s.on('error', () => s.destroy());
    s.end();
    setTimeout(() => s.destroy(), 1000).unref();
  };
  const { port, server } = await bindDataPort(run.side, () => net.createServer(knock), '');
  run.probe = server;
  setTimeout(() => run.closeProbe(), 30000).unref();
  return port;
}

/**
 * The first data port of the configured range that no unfinished incoming job holds
 * and that `make()`'s server can listen on; the server is returned listening.
 */
export async function bindDataPort(
  side: IncomingSide,
  make: () => net.Server,
  what: string,
): Promise<{ port: number; server: net.Server }> {
  const cfg = side.host.cfg.relocation;
  const [first, last] = cfg.dataPorts;
  const used = new Set(
    [...side.store.jobs.values()]
      .filter((j): j is DestJob => j.role === 'destination' && j.phase !== 'confirmed' && j.phase !== 'abandoned')
      .map((j) => j.dataPort),
  );
  for (let port = first; port <= last; port++) {
    if (used.has(port)) continue;
    const server = make();
    const bound = await new Promise<boolean>((resolve) => {
      server.once('error', () => resolve(false));
      server.listen(port, cfg.address, () => resolve(true));
    });
    if (bound) return { port, server };
  }
  throw new FerryError('MIGRATION_DEST_PORT', `${side.host.cfg.name} has no free migration data port in ${first}-${last}${what}`);
}
