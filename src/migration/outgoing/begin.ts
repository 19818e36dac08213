/**
 * Source phase begin: the move checked here, connected to the destination, the job
 * persisted, and the destination's pre-flight asked for (relocation.begin) while this
 * QEMU gets its settings and the autopilot samples the guest.
 */
import crypto from 'node:crypto';
import { FerryError } from '../../errors.ts';
import { domainConfigToJson } from '../../domain/config.ts';
import { hasProcess } from '../../domain/state.ts';
import { hostArch } from '../../qemu/probe.ts';
import { dirtyTrackingUnreliable } from '../../qemu/memory.ts';
import { MigrationQmp, QEMU_THROTTLE_INITIAL_PCT, UNLIMITED_BANDWIDTH, multifdOn } from '../../qemu/migration.ts';
import type { BeginInput } from '../../api/relocation.ts';
import { FERRY_VERSION } from '../../version.ts';
import { PROTOCOL_VERSION } from '../phases.ts';
import { fileSizes, writeStorageMarkers } from '../preflight.ts';
import { LARGE_GUEST_BYTES } from '../plan.ts';
import { DEFAULT_MAX_DOWNTIME_MS, DEFAULT_TIMEOUT_S, withCompression } from '../autopilot.ts';
import { describeDisks, type CopyDisk } from '../mirror.ts';
import type { SourceJob, Mode } from '../jobs.ts';
import { OutgoingRun, type OutgoingSide, type StartParams } from './run.ts';
import { ask } from '../ask.ts';

/** Checks what can be checked here, connects to the destination, and makes the job (not yet persisted). */
export async function open(s: OutgoingSide, params: StartParams): Promise<OutgoingRun> {
  const t0 = Date.now();
  const dom = s.host.get(params.domain);
  // Multifd where it helps and nothing is lost by it: a large guest, two spare cores, and
  // no post-copy to fall back on (QEMU 10.0 cannot combine the two), unless told.
  const spare = s.planner.spareCores();
  const autoParallel =
    params.parallel === undefined &&
    params.live &&
    !dom.rec.config.postcopy &&
    dom.rec.config.memoryMiB * 1048576 >= LARGE_GUEST_BYTES &&
    spare >= 2
      ? 2
      : undefined;
  let p: StartParams = { ...params, parallel: params.parallel ?? autoParallel };
  // A finished incoming job only waits for its source's Confirm: the guest runs here.
  if (s.store.openJobs(p.domain).some((o) => !(o.role === 'destination' && o.phase === 'finished')))
    throw new FerryError('MIGRATION_IN_PROGRESS', `Domain "${p.domain}" already has a migration job`);
  if (dom.busy) throw new FerryError('DOMAIN_BAD_STATE', `Domain "${p.domain}" is busy (${dom.busy})`);
  const st = dom.rec.state;
  if (p.deleteSourceStorage && !p.copyStorage) throw new FerryError('CLI_USAGE', '--delete-source-storage goes with --copy-storage');
  if (st.kind === 'incoming' || st.kind === 'migrating-out')
    throw new FerryError('MIGRATION_IN_PROGRESS', `Domain "${p.domain}" is ${st.kind}`);
  if (st.kind === 'crashed') throw new FerryError('DOMAIN_BAD_STATE', `Domain "${p.domain}" crashed; destroy or start it before migrating`);
  const mode: Mode = hasProcess(st) ? (p.live ? 'live' : 'offline') : 'definition';
  // Nothing has changed yet: a failure to reach or trust the peer leaves the domain as it is.
  const { client, peer } = await s.connect(p.dest);
  // No --compress and no --parallel: the plan weighs compression for a large guest
  // (plan.ts defaultCompression) before Begin tells the destination the method.
  if (mode === 'live' && params.compress === undefined && params.parallel === undefined && dom.qmp) {
    // (Only multifd's own choice can stand in p.parallel here: its 2 channels, as zstd's.)
    const c = await s.planner.defaultCompression(dom, dom.qmp, peer.name, p);
    p = { ...withCompression(p, c, c.considered), ...(c.touchedBytes !== undefined ? { touchedBytes: c.touchedBytes } : {}) };
  }
  const j: SourceJob = {
    role: 'source',
    jobId: crypto.randomUUID(),
    domain: p.domain,
    uuid: dom.rec.config.uuid,
    mode,
    encrypted: p.insecure !== true,
    startedAt: t0,
    updatedAt: t0,
    history: [{ phase: 'begin', at: t0 }],
    phase: 'begin',
    peer,
    wasRunning: st.kind === 'running',
  };
  const run = new OutgoingRun(s, j, p, {
    dom,
    client,
    peer,
    defaults: { maxDowntimeMs: DEFAULT_MAX_DOWNTIME_MS, timeoutS: DEFAULT_TIMEOUT_S },
  });
  if (p.compressWhy) run.policy.push(p.compressWhy);
  if (autoParallel)
    run.policy.push(
      `multifd on by itself (2 channels): ${dom.rec.config.memoryMiB} MiB of RAM, ${spare} spare cores, and post-copy forbidden by the domain's config`,
    );
  run.mark('connected');
  return run;
}

/** Phase begin: the job persisted, this QEMU set up and the guest measured while the destination runs its pre-flight. */
export async function begin(run: OutgoingRun): Promise<void> {
  const { j, dom, p, peer, mode, side: s } = run;
  const h = s.host;
  if (peer.name === h.cfg.name) throw new FerryError('MIGRATION_SAME_HOST', `Cannot migrate domain "${p.domain}": ${p.dest} is this host`);
  s.store.save(j);
  run.q = mode === 'definition' ? undefined : dom.qmp;
  if (mode !== 'definition' && !run.q) throw new FerryError('MIGRATION_FAILED', `The source QEMU of "${p.domain}" is not connected`);
  const q = run.q;
  run.copyDisks = await disksToCopy(run);
  // The source QEMU's own settings need nothing from the destination but its name
  // (its certificate's, known since the handshake): made while Begin runs there.
  run.setupP = q ? setup(run) : Promise.resolve();
  run.setupP.catch(() => undefined); // awaited in perform; a Begin refusal must not leave it unhandled
  offerPostcopy(run);
  // The autopilot samples the guest's dirty rate while Begin runs there.
  run.planP = mode === 'live' && q ? s.planner.planFor(dom, q, peer.name, p) : undefined;
  run.planP?.catch(() => undefined);
  // Markers beside writable disks, for the destination to prove it shares them.
  // (Copied disks need no proof of sharing.)
  const cfg0 = dom.rec.config;
  const markers = writeStorageMarkers(run.copyDisks.length ? { ...cfg0, disks: cfg0.disks.filter((d) => d.readOnly) } : cfg0, j.jobId);
  run.homes = h.tunnelHomes(cfg0);
  run.begun = await ask(run.client, 'relocation.begin', beginMessage(run, markers.nonce), { timeoutMs: 60000 }).finally(markers.remove);
  run.mark('begun');
  s.step(j, { type: 'dest-accepted' });
}

/** Begin's message; its type comes from the protocol module the destination parses it with. */
function beginMessage(run: OutgoingRun, storageNonce: string): BeginInput {
  const { j, dom, p, mode } = run;
  const h = run.side.host;
  const rt = dom.rec.runtime;
  const cfg0 = dom.rec.config;
  return {
    version: PROTOCOL_VERSION,
    jobId: j.jobId,
    mode,
    insecure: run.insecure,
    parallel: p.parallel ?? 1,
    ...(p.compress && p.compress !== 'none' ? { compress: p.compress } : {}),
    postcopy: run.postcopyWanted,
    homes: run.homes,
    peer: {
      name: h.cfg.name,
      version: FERRY_VERSION,
      qemuVersion: h.qemu.version,
      arch: hostArch(),
      accel: h.accel.accel,
      cpuModel: h.qemu.cpuModel,
      cpuFeatures: h.qemu.cpuFeatures,
      machine: rt?.machine ?? h.qemu.machine,
      networks: h.cfg.networks,
    },
    domain: {
      config: domainConfigToJson(cfg0),
      fileSizes: fileSizes(cfg0),
      storageNonce,
      machine: rt?.machine ?? h.qemu.machine,
      cpuModel: rt?.cpuModel ?? h.qemu.cpuModel,
      ...(run.copyDisks.length ? { copyDisks: run.copyDisks } : {}),
    },
  };
}

/** Local disks: copied with --copy-storage (every writable disk), else refused when they sit in this host's own directory, which is never shared. */
async function disksToCopy(run: OutgoingRun): Promise<CopyDisk[]> {
  const { p, q, policy } = run;
  const h = run.side.host;
  const cfg0 = run.dom.rec.config;
  const writable = cfg0.disks.flatMap((d, i) => (d.readOnly ? [] : [i]));
  const localDir = h.cfg.storage.localDir + '/';
  if (!p.copyStorage) {
    const local = writable.map((i) => cfg0.disks[i].path).filter((f) => f.startsWith(localDir));
    if (local.length)
      throw new FerryError(
        'MIGRATION_DEST_STORAGE',
        `Cannot migrate domain "${p.domain}": its writable disk ${local.join(', ')} is on ${h.cfg.name}'s own storage (storage.localDir), which no other host shares; move it along with --copy-storage`,
        { disks: local },
      );
    return [];
  }
  if (!q)
    throw new FerryError(
      'MIGRATION_DEST_STORAGE',
      `Cannot copy the disks of shut-off domain "${p.domain}": --copy-storage mirrors a running domain's disks while it runs; start it first, or copy its disks by hand`,
    );
  if (!writable.length) {
    policy.push('--copy-storage: the domain has no writable disk; nothing to copy');
    return [];
  }
  const disks = await describeDisks(
    q,
    writable.map((i) => ({ index: i, path: cfg0.disks[i].path })),
  );
  policy.push(
    `--copy-storage: ${disks.map((c) => `disk${c.index} (${(c.virtualSize / 1048576).toFixed(0)} MiB, ${(c.allocated / 1048576).toFixed(0)} MiB allocated, sync ${c.backing ? 'top over its shared backing file' : 'full'})`).join(', ')} mirrored to ${run.peer.name}'s own storage while the guest runs`,
  );
  return disks;
}

/**
 * Whether the move offers post-copy: the autopilot (migration/plan.ts) decides whether
 * it switches as it goes, but both QEMUs need the capability before the stream. Never
 * on an engine whose dirty tracking can lose pages (QEMU < 9 under TCG: the memory
 * check needs both copies paused, and post-copy has no such moment).
 */
function offerPostcopy(run: OutgoingRun): void {
  const { p, dom, policy, mode } = run;
  const h = run.side.host;
  const accel = dom.rec.runtime?.accel ?? h.accel.accel;
  run.engineLoses = dirtyTrackingUnreliable(accel, h.qemu.version);
  run.postcopyWanted =
    mode === 'live' &&
    dom.rec.config.postcopy &&
    !run.engineLoses &&
    p.verifyMemory !== true &&
    (p.parallel ?? 1) <= 1 &&
    (p.compress ?? 'none') === 'none' &&
    !(p.strategy === 'precopy' && p.onTimeout !== 'postcopy') &&
    !run.copyDisks.length;
  if (mode !== 'live' || !dom.rec.config.postcopy) return;
  if (run.copyDisks.length)
    policy.push('post-copy not offered: the disk copies complete while the guest is paused, and post-copy has no such moment');
  if (p.verifyMemory === true)
    policy.push('post-copy not offered: --verify-memory compares both copies while both are paused, and post-copy has no such moment');
  if (run.engineLoses)
    policy.push(
      `post-copy not offered: QEMU ${h.qemu.version} under ${accel} can lose dirty pages, and post-copy leaves no moment to check the copy`,
    );
}

/** The source QEMU's migration settings for this move: channels, TLS to the peer's name, bandwidth and pause. */
async function setup(run: OutgoingRun): Promise<void> {
  const { p, insecure } = run;
  const parallel = p.parallel ?? 1;
  const compress = p.compress ?? 'none';
  const multifd = multifdOn(parallel, compress);
  // A QEMU keeps its capabilities from one migration to the next: an earlier move's
  // post-copy would make multifd refused ("Postcopy is not yet compatible with multifd").
  const mq = new MigrationQmp(run.q!, 'source');
  await mq.setCapabilities({ events: true, postcopy: false, postcopyPreempt: false, multifd });
  if (parallel > 1) run.policy.push(`multifd: ${parallel} parallel channels`);
  if (compress !== 'none') run.policy.push(`pages compressed with ${compress} (multifd, ${parallel} channel${parallel > 1 ? 's' : ''})`);
  await mq.delObject('ferry-tls-out');
  if (!insecure) await mq.addTlsCreds('ferry-tls-out', run.side.host.qemuTlsDir(run.dom));
  await mq.setParameters({
    maxBandwidth: p.bandwidthMiBs ? Math.round(p.bandwidthMiBs * 1048576) : UNLIMITED_BANDWIDTH,
    downtimeLimit: run.maxDowntimeMs,
    cpuThrottleInitial: QEMU_THROTTLE_INITIAL_PCT,
    ...(multifd ? { multifdChannels: parallel, multifdCompression: compress } : {}),
    ...(insecure ? { tlsCreds: '' } : { tlsCreds: 'ferry-tls-out', tlsHostname: run.peer.name }),
  });
}
