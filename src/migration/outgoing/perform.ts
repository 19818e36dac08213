/**
 * Source phase perform: the disks mirrored into the destination's exports until in sync
 * (--copy-storage), then RAM streamed by QEMU and supervised to its end (supervise.ts).
 * The guest-perceived probe and the STOP listener start here; the plan, measured while
 * Begin ran, arrives during the first pass.
 */
import net from 'node:net';
import { FerryError } from '../../errors.ts';
import { MigrationWatcher } from '../../qemu/migstatus.ts';
import { MigrationQmp, QEMU_THROTTLE_INITIAL_PCT, uri } from '../../qemu/migration.ts';
import type { Progress } from '../../api/protocol.ts';
import type { Report } from '../jobs.ts';
import { GuestProbe, guestIp } from '../guestprobe.ts';
import { plan as makePlan, throttleInitialPct, type PlanInput } from '../plan.ts';
import { DiskMirror } from '../mirror.ts';
import { diskShare, publish } from './progress.ts';
import { supervise } from './supervise.ts';
import type { OutgoingRun, Autopilot } from './run.ts';

/** Phase perform: the disks mirrored into the destination's exports until in sync, then RAM streamed, supervised to its end. */
export async function perform(run: OutgoingRun): Promise<void> {
  const { j, p, mode, stats, side: s } = run;
  const q = run.q!;
  // The pause on one clock, this host's monotonic one: from the source QEMU's STOP
  // event to the destination's word that its guest resumed (an upper bound: it
  // includes that answer's way back).
  run.watchStop(q);
  const ip = run.wasRunning && p.probeGuest !== false ? guestIp(run.dom.rec.config.nics) : undefined;
  if (p.probeGuest === false) stats.guestProbe = 'not measured (--no-probe)';
  if (ip) {
    run.probe = new GuestProbe(ip);
    run.probe.start();
  }
  const w = new MigrationWatcher(q);
  run.watch = w;
  try {
    await run.setupP;
    if (run.copyDisks.length) await mirrorDisks(run);
    // The operator's --strategy postcopy needs no measurement to act on.
    const auto: Autopilot = {
      postcopyOn: run.postcopyOn,
      pick: mode !== 'live' ? 'offline' : p.strategy === 'postcopy' && run.postcopyOn ? 'postcopy' : 'pending',
      onTimeout: p.onTimeout ?? (run.postcopyOn ? 'postcopy' : 'cancel'),
    };
    await capabilities(run, auto);
    const planned = whenPlanned(run, auto);
    const mq = new MigrationQmp(q, 'source');
    if (mode === 'offline' && run.wasRunning) await mq.stop();
    s.step(j, { type: 'stream-started' });
    await mq.migrate(uri.tcp(run.prepared!.dataAddress, run.prepared!.dataPort));
    run.mark('migrateIssued');
    const done = await supervise(run, auto);
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
    if (!run.inPostcopy) w.dispose();
  }
  if (stats.setupMs != null) run.timeline.firstByte = stats.setupMs;
  const completedAt = w.at.get('completed');
  if (completedAt !== undefined) run.timeline.streamCompleted = Math.round(completedAt - run.t0);
  s.step(j, { type: 'stream-completed' });
}

/**
 * The capabilities the plan needs, set once it is known (before the stream): post-copy
 * (with its preempt channel, so that the pages the guest faults on overtake the bulk)
 * whenever it is offered; auto-converge where the plan picked it, or where nothing else
 * could rescue a pre-copy that does not converge. The policy records what QEMU accepted.
 */
async function capabilities(run: OutgoingRun, auto: Autopilot): Promise<void> {
  if (run.mode !== 'live') return;
  // With post-copy on the table nothing needs throttling: it bounds the time instead.
  const autoConverge = !auto.postcopyOn;
  await new MigrationQmp(run.q!, 'source').setCapabilities({ autoConverge, postcopy: auto.postcopyOn, postcopyPreempt: auto.postcopyOn });
  if (autoConverge) run.policy.push('auto-converge on: QEMU throttles the vCPUs if the guest dirties memory faster than the link');
  if (auto.postcopyOn)
    run.policy.push(`post-copy offered (postcopy-ram, postcopy-preempt on both hosts); at the deadline: ${auto.onTimeout}`);
}

/**
 * The plan arrives while the first pass runs (the dirty rate takes DIRTY_SAMPLE_MS to
 * measure): the stream does not wait for it, and the autopilot acts on it from the end
 * of that pass.
 */
function whenPlanned(run: OutgoingRun, auto: Autopilot): Promise<void> | undefined {
  const { p, peer } = run;
  return run.planP?.then(
    async (pl0) => {
      let pl = pl0;
      if (!run.postcopyOn && pl.plan.input.postcopyAllowed) {
        // The destination cannot take post-copy: the plan without it.
        const why = run.postcopyWanted ? `${peer.name} cannot take post-copy` : 'post-copy is not offered for this move';
        pl = run.side.planner.planView(makePlan({ ...pl.plan.input, postcopyAllowed: false, postcopyWhyNot: why }), {
          domain: p.domain,
          dest: peer.name,
          dirtyBytesPerS: pl.view.dirtyRateMBps === null ? null : pl.plan.input.dirtyBytesPerS,
          onTimeout: p.onTimeout === 'postcopy' ? 'cancel' : p.onTimeout,
          compress: p.compress,
        });
      }
      run.stats.plan = pl.view;
      auto.pick = pl.plan.pick;
      await throttleStart(run, auto, pl.plan.input);
      const v = pl.view;
      run.policy.push(
        `plan: ${v.pick}: ${v.reason} (dirty rate ${v.dirtyRateMBps ?? '?'} MB/s by ${v.dirtyRateFrom}; link ${v.linkMBps} MB/s, ${v.linkFrom})`,
      );
      run.mark('planned');
    },
    (e) => {
      run.policy.push(`no plan: ${(e as Error).message}`);
    },
  );
}

/**
 * Where auto-converge starts (plan.throttleInitialPct), set as the plan arrives: during
 * the first pass, before QEMU can have judged the guest (two periods of a second). A
 * guest dirtying far faster than the link then converges after one step, not seven.
 * setup() put QEMU's default back first, so an earlier move's start does not linger.
 */
async function throttleStart(run: OutgoingRun, auto: Autopilot, input: PlanInput): Promise<void> {
  if (run.mode !== 'live' || auto.postcopyOn) return;
  const pct = throttleInitialPct(input);
  if (pct === QEMU_THROTTLE_INITIAL_PCT) return;
  try {
    await new MigrationQmp(run.q!, 'source').setParameters({ cpuThrottleInitial: pct });
    run.policy.push(
      `auto-converge starts at ${pct} %, not QEMU's ${QEMU_THROTTLE_INITIAL_PCT} %: the guest dirties ${(input.dirtyBytesPerS / 1e6).toFixed(0)} MB/s against a link of ${(input.linkBytesPerS / 1e6).toFixed(0)} MB/s (it throttles only if the passes stop shrinking)`,
    );
  } catch (e) {
    run.policy.push(`auto-converge start not set (${(e as Error).message}); QEMU's ${QEMU_THROTTLE_INITIAL_PCT} % applies`);
  }
}

/** --copy-storage: every disk mirrored into the destination's NBD exports until in sync. */
async function mirrorDisks(run: OutgoingRun): Promise<void> {
  const nbd = run.prepared!.nbd;
  if (!nbd || net.isIP(String(nbd.address)) === 0 || !Number.isInteger(nbd.port) || nbd.port < 1 || nbd.port > 65535)
    throw new FerryError('MIGRATION_PROTOCOL', `${run.peer.name} prepared no disk export for --copy-storage`);
  run.j.nbd = { address: nbd.address, port: nbd.port };
  run.side.store.saveLater(run.j);
  run.stats.storage = await copyDisks(run, nbd, run.begun!.copyDisks ?? []);
  run.mark('disksInSync');
}

/**
 * --copy-storage, between Prepare and the RAM stream: mirrors every copied disk into
 * the destination's exports and waits until all are in sync, showing disk bytes on the
 * bar; the operator's cancel and --timeout stop it (the abandon then forces the jobs
 * off). --bandwidth caps each mirror too.
 */
async function copyDisks(
  run: OutgoingRun,
  nbd: { address: string; port: number },
  placed: { index: number; path: string }[],
): Promise<NonNullable<Report['storage']>> {
  const { j, p, t0, timeoutS, cancelledP, side: s } = run;
  const disks = run.copyDisks;
  const tls = run.insecure ? null : { creds: 'ferry-tls-out', hostname: run.peer.name };
  const mirror = new DiskMirror(run.q!, disks);
  run.mirror = mirror;
  const tc = performance.now();
  let timer: NodeJS.Timeout | undefined;
  const stop = new Promise<string>((resolve) => {
    void cancelledP.then(() => resolve('cancelled'));
    timer = setTimeout(
      () =>
        resolve(
          `copying the disks did not finish within --timeout ${timeoutS} s; cancelled, the domain keeps running on ${s.host.cfg.name} with its own disks`,
        ),
      Math.max(0, t0 + timeoutS * 1000 - Date.now()),
    );
  });
  const tick = diskTicker(run, mirror);
  try {
    await mirror.start(nbd, tls, p.bandwidthMiBs ? Math.round(p.bandwidthMiBs * 1048576) : 0);
    await mirror.untilReady(stop);
  } finally {
    clearInterval(tick);
    clearTimeout(timer);
  }
  mirror.last = await mirror.progress().catch(() => mirror.last);
  const copyMs = Math.round(performance.now() - tc);
  const cfg = s.host.get(j.domain).rec.config;
  return {
    disks: disks.map((d) => ({ index: d.index, from: cfg.disks[d.index].path, to: placed.find((x) => x.index === d.index)?.path ?? null })),
    copiedBytes: mirror.last.total,
    copyMs,
    sourceKept: p.deleteSourceStorage !== true,
  };
}

/** The disk copy's bytes on the job's progress, every 300 ms, as their share of the whole move. */
function diskTicker(run: OutgoingRun, mirror: DiskMirror): NodeJS.Timeout {
  const { j, side: s } = run;
  let prev = { at: performance.now(), copied: 0 };
  return setInterval(
    () =>
      void mirror.progress().then(
        (d) => {
          mirror.last = d;
          const now = performance.now();
          const rate = Math.max(0, (d.copied - prev.copied) / ((now - prev.at) / 1000));
          prev = { at: now, copied: d.copied };
          const share = diskShare(s, j, d.total);
          const prog: Progress = {
            domain: j.domain,
            jobId: j.jobId,
            phase: j.phase,
            percent: Math.max(j.progress?.percent ?? 0, d.total ? (d.copied / d.total) * 100 * share : 0),
            transferred: 0,
            remaining: 0,
            total: 0,
            rateMBps: rate / 1e6,
            pass: 0,
            etaS: rate > 0 ? (d.total - d.copied) / rate : null,
            elapsedMs: Date.now() - run.t0,
            dirtyRate: 0,
            throttlePct: 0,
            stage: `copying disks: ${(d.copied / 1048576).toFixed(0)} of ${(d.total / 1048576).toFixed(0)} MiB`,
            disk: d,
          };
          publish(s, j, prog);
        },
        () => undefined,
      ),
    300,
  );
}
