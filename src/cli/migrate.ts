/**
 * `ferry migrate DOMAIN DEST [-l]` (as `xm migrate`), `ferry jobs`, `ferry job DOMAIN`,
 * `ferry job abort DOMAIN`. On a terminal a progress bar shows RAM % sent, rate, pass,
 * remaining and ETA; with --json one final report object is printed.
 */
import type { Command } from 'commander';
import { FerryError, asFerryError, isErrorCode } from '../errors.ts';
import { ApiClient, call } from '../api/client.ts';
import { resolveTarget } from './targets.ts';
import type { Report, JobView, Progress, EventMsg, PlanView } from '../api/protocol.ts';

/** What `job abort` and `job resolve` answer. */
type JobAnswer = { domain: string; cancelling: true } | { domain: string; settledBy: 'operator' | 'destination'; runsOn: string };
import { printJson, table, fmtBytes, reportError, act, hostOpt } from './output.ts';
import { choose } from '../placement/place.ts';
import { fromPeers, standaloneRules } from './evacuate.ts';
import { checkMove, hostNamed } from '../placement/place.ts';
import { COMPRESS_CHOICES } from '../api/compression.ts';

function num(name: string, min: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isFinite(n) || n < min) throw new FerryError('CLI_USAGE', `${name} must be a number of at least ${min}, got "${v}"`);
    return n;
  };
}

function bar(p: Progress): string {
  const w = 24;
  const filled = Math.round((p.percent / 100) * w);
  const eta = p.etaS === null ? '?' : p.etaS < 1 ? `${(p.etaS * 1000).toFixed(0)} ms` : `${p.etaS.toFixed(1)} s`;
  const disk = p.disk && !p.stage?.startsWith('copying disks') ? `  disks ${fmtBytes(p.disk.copied)}/${fmtBytes(p.disk.total)}` : '';
  return `[${'#'.repeat(filled)}${'-'.repeat(w - filled)}] ${p.percent.toFixed(1).padStart(5)}%  ${p.stage ?? `pass ${p.pass}`}  ${p.rateMBps.toFixed(0).padStart(5)} MB/s  remaining ${fmtBytes(p.remaining)}  ETA ${eta}${p.throttlePct ? `  throttle ${p.throttlePct}%` : ''}${disk}`;
}

export function printReport(r: Report): void {
  const ms = (v: number | null | undefined): string => (v === null || v === undefined ? '-' : `${v} ms`);
  const rows: (string | number)[][] = [
    ['outcome', r.outcome],
    ['mode', r.mode],
    ['domain', r.domain],
    ['from → to', `${r.source} → ${r.destination}`],
    ['total', ms(r.totalMs)],
    ['setup', ms(r.setupMs)],
    ['downtime (QEMU)', ms(r.downtimeMs)],
    ['pause (STOP → resumed there)', ms(r.pauseMs)],
  ];
  if (r.networkHandoverMs !== undefined)
    rows.push([
      'network handover',
      r.networkHandoverMs === null ? '-' : `${r.networkHandoverMs} ms (the guest's first answer on its address after it resumed there)`,
    ]);
  for (const w of r.warnings ?? []) rows.push(['WARNING', w]);
  if (r.rulesIgnored?.length) rows.push(['RULES IGNORED', r.rulesIgnored.join('; ')]);
  if (r.guestDowntimeMs !== undefined)
    rows.push([
      'guest-perceived downtime',
      r.guestDowntimeMs === null ? '-' : `${r.guestDowntimeMs} ms${r.guestProbe ? ` (${r.guestProbe})` : ''}`,
    ]);
  if (r.memoryCheck) {
    const m = r.memoryCheck;
    const fixed =
      m.repairedBytes > 0
        ? `; ${fmtBytes(m.repairedBytes)} had arrived different and ${m.repairedChunks === 1 ? 'was' : 'were'} rewritten from the source`
        : '';
    rows.push(['memory check', `SHA-256 of ${fmtBytes(m.bytes)} equal on both hosts (${m.ms} ms${fixed})`]);
  }
  if (r.storage)
    rows.push([
      'disks copied',
      `${r.storage.disks.map((d) => `disk${d.index} ${d.from} → ${d.to ?? '?'}`).join('; ')} (${fmtBytes(r.storage.copiedBytes)} in ${r.storage.copyMs} ms; the source's copy ${r.storage.sourceKept ? 'is kept' : 'was deleted'})`,
    ]);
  if (r.timeline && Object.keys(r.timeline).length)
    rows.push([
      'timeline',
      Object.entries(r.timeline)
        .map(([k, v]) => `${k} ${v}`)
        .join(', ') + ' ms',
    ]);
  rows.push(
    ['sent', fmtBytes(r.bytes)],
    ['passes', r.passes],
    ['throughput', `${r.throughputMBps} MB/s`],
    ['encrypted', r.encrypted ? 'yes (TLS)' : 'NO (--insecure)'],
  );
  if (r.strategy)
    rows.push([
      'strategy',
      r.strategy +
        (r.postcopy
          ? ` (after ${r.postcopy.startedAtMs} ms; the guest's memory was on both hosts for ${r.postcopy.windowMs ?? '?'} ms)`
          : ''),
    ]);
  if (r.plan) {
    const pred = r.plan.predictions.find((x) => x.strategy === (r.strategy === 'suspend' ? 'precopy' : r.strategy));
    if (pred)
      rows.push([
        'predicted → actual',
        `total ${pred.totalMs === null ? 'never' : `${pred.totalMs} ms`} → ${r.totalMs} ms; pause ${pred.pauseMs === null ? 'never' : `${pred.pauseMs} ms`} → ${r.pauseMs ?? '-'} ms; sent ${pred.bytes === null ? '-' : fmtBytes(pred.bytes)} → ${fmtBytes(r.bytes)}`,
      ]);
  }
  for (const pol of r.policy ?? []) rows.push(['policy', pol]);
  if (r.error) rows.push(['error', `${r.error.code}: ${r.error.message}`]);
  process.stdout.write(table(rows, ['l', 'l']));
}

/** `ferry migrate --plan`: each strategy's predicted cost, and the pick. */
export function printPlan(v: PlanView): void {
  const ms = (x: number | null): string => (x === null ? 'never' : x < 10000 ? `${x} ms` : `${(x / 1000).toFixed(1)} s`);
  process.stdout.write(
    `Plan for a live move of ${v.domain} to ${v.destination}: ${fmtBytes(v.ramBytes)} of RAM${v.touchedBytes !== null ? ` (${fmtBytes(v.touchedBytes)} holding data)` : ''}, dirtied at ${v.dirtyRateMBps ?? '?'} MB/s (${v.dirtyRateFrom}); link ${v.linkMBps} MB/s (${v.linkFrom}); budget: pause ≤ ${v.maxDowntimeMs} ms, total ≤ ${v.timeoutS} s${v.compress !== 'none' ? `; pages compressed with ${v.compress} (${v.compressRatio !== null ? `predicted to ${Math.round(v.compressRatio * 100)} % of their size, from a sample` : 'no sample: the predictions count them whole'})` : ''}\n\n`,
  );
  const rows: (string | number)[][] = [['Strategy', 'Total', 'Pause', 'Sent', 'Fits', 'Note']];
  for (const p of v.predictions)
    rows.push([
      p.strategy === v.pick ? `${p.strategy} *` : p.strategy,
      ms(p.totalMs),
      ms(p.pauseMs),
      p.bytes === null ? '-' : fmtBytes(p.bytes),
      p.fitsBudget ? 'yes' : 'no',
      p.note,
    ]);
  process.stdout.write(table(rows, ['l', 'r', 'r', 'r', 'l', 'l']));
  process.stdout.write(`\nPick: ${v.pick}: ${v.reason}. At the deadline, still in pre-copy: ${v.onTimeout}.\n`);
}

/** `ferry migrate`'s options, as commander parses them. */
interface MigrateOpts {
  copyStorage?: boolean;
  deleteSourceStorage?: boolean;
  live?: boolean;
  bandwidth?: number;
  maxDowntime?: number;
  timeout?: number;
  parallel?: number;
  compress?: string;
  insecure?: boolean;
  verifyMemory?: boolean;
  probe?: boolean;
  cancel?: boolean;
  json?: boolean;
  plan?: boolean;
  strategy?: string;
  onTimeout?: string;
  ignoreRules?: boolean;
}

/**
 * `ferry migrate DOMAIN` without a destination: placement picks one (placement/place.ts),
 * the same choice an evacuation or an HA restart makes. Cluster mode: the source host
 * answers from its etcd watches, rules included; standalone: each peer is asked.
 */
async function pickDest(hostArg: string | undefined, domain: string, ignoreRules: boolean): Promise<{ to: string; why: string }> {
  const src = resolveTarget(hostArg);
  const info = await call(src, 'host.info');
  if (info.mode === 'cluster') {
    const c = await call(src, 'cluster.place', { domain, ignoreRules });
    return { to: c.to!, why: c.why };
  }
  const di = await call(src, 'domain.info', { domain });
  const { candidates, unreachable } = await fromPeers(info, undefined);
  const { rules, where } = ignoreRules ? { rules: [], where: new Map<string, string>() } : await standaloneRules(src, info);
  const c = choose(
    {
      name: domain,
      host: info.name,
      memoryMiB: di.memoryMiB,
      cpuModel: di.cpuModel ?? info.cpuModel,
      accel: di.accel,
      networks: di.nics.map((n) => n.network),
      stopped: di.state !== 'running' && di.state !== 'paused',
    },
    candidates,
    { rules, where },
  );
  if (!c.to)
    throw new FerryError(
      'PLACEMENT_NONE',
      `No host can take "${domain}": ${c.why}${unreachable.length ? `; unreachable: ${unreachable.join(', ')}` : ''}`,
    );
  return { to: c.to, why: c.why };
}

/**
 * Standalone: an operator's move to DEST that would break a rule of the source host's
 * list is PLACEMENT_RULE, unless --ignore-rules; then the rules broken, for the report.
 * (In cluster mode the source ferryd checks, from etcd: daemon/placement.ts.)
 */
async function standaloneRuleCheck(hostArg: string | undefined, domain: string, dest: string, ignore: boolean): Promise<string[]> {
  const src = resolveTarget(hostArg);
  const info = await call(src, 'host.info');
  if (info.mode === 'cluster') return [];
  const { rules, where } = await standaloneRules(src, info);
  if (!rules.length) return [];
  return checkMove(domain, hostNamed(dest, Object.entries(info.peers)), { where, rules }, ignore);
}

/** The options `--plan` and a move share, as API params. */
function budgetParams(o: MigrateOpts): Record<string, unknown> {
  const params: Record<string, unknown> = { insecure: !!o.insecure };
  // --verify-memory rules post-copy out, so the plan must know it too.
  if (o.verifyMemory !== undefined) params.verifyMemory = !!o.verifyMemory;
  if (o.bandwidth !== undefined) params.bandwidthMiBs = o.bandwidth;
  if (o.maxDowntime !== undefined) params.maxDowntimeMs = o.maxDowntime;
  if (o.timeout !== undefined) params.timeoutS = o.timeout;
  if (o.strategy !== undefined) {
    if (!['auto', 'precopy', 'postcopy'].includes(o.strategy))
      throw new FerryError('CLI_USAGE', `--strategy must be auto, precopy or postcopy, got "${o.strategy}"`);
    params.strategy = o.strategy;
  }
  if (o.onTimeout !== undefined) {
    if (!['cancel', 'suspend', 'postcopy'].includes(o.onTimeout))
      throw new FerryError('CLI_USAGE', `--on-timeout must be cancel, suspend or postcopy, got "${o.onTimeout}"`);
    params.onTimeout = o.onTimeout;
  }
  if (o.parallel !== undefined) {
    if (!Number.isInteger(o.parallel) || o.parallel > 16)
      throw new FerryError('CLI_USAGE', '--parallel must be a whole number from 1 to 16');
    params.parallel = o.parallel;
  }
  if (o.compress !== undefined) {
    if (!(COMPRESS_CHOICES as readonly string[]).includes(o.compress))
      throw new FerryError('CLI_USAGE', `--compress must be ${COMPRESS_CHOICES.join(', ')}, got "${o.compress}"`);
    params.compress = o.compress;
  }
  return params;
}

async function migrate(
  hostArg: string | undefined,
  move: { domain: string; dest: string; picked?: { to: string; why: string }; rulesIgnored: string[] },
  o: MigrateOpts,
): Promise<number> {
  const { domain, dest, picked, rulesIgnored } = move;
  const c = await ApiClient.connect(resolveTarget(hostArg));
  const tty = !o.json && !!process.stderr.isTTY;
  let lastLen = 0;
  try {
    if (tty) {
      await c.request('events.subscribe', { domain });
      c.on('event', (ev: EventMsg) => {
        if (ev.event === 'migration.progress') {
          const line = bar(ev.data as Progress);
          process.stderr.write(`\r${line}${' '.repeat(Math.max(0, lastLen - line.length))}`);
          lastLen = line.length;
        } else if (ev.event === 'migration.waiting') {
          const w = ev.data as NonNullable<JobView['waiting']> & { peer: string };
          if (lastLen) process.stderr.write('\n');
          lastLen = 0;
          const again = Math.max(0, Math.round((w.nextTryAt - Date.now()) / 1000));
          if (w.lastError.startsWith('post-copy recovery'))
            process.stderr.write(
              `  the post-copy stream to ${w.peer} broke; resuming it (try ${w.attempts}: ${w.lastError.replace(/^post-copy recovery: /, '')}), again in ${again} s\n`,
            );
          else
            process.stderr.write(
              `  ${w.peer} has not said whether it resumed the guest (try ${w.attempts}: ${w.lastError}); the copy here stays paused, asking again in ${again} s\n`,
            );
        } else if (ev.event === 'migration.phase' && (ev.data as { role: string }).role === 'source') {
          if (lastLen) process.stderr.write('\n');
          lastLen = 0;
          process.stderr.write(`  phase: ${(ev.data as { phase: string }).phase}\n`);
        }
      });
    }
    const params: Record<string, unknown> = { domain, dest, live: !!o.live, ...budgetParams(o) };
    if (o.probe === false) params.probeGuest = false;
    if (o.copyStorage) params.copyStorage = true;
    if (o.deleteSourceStorage) params.deleteSourceStorage = true;
    if (o.ignoreRules) params.ignoreRules = true;
    try {
      // The answer is the job's report, failures included; `error` says why.
      const r = await c.request('migration.start', params);
      if (rulesIgnored.length) {
        // Standalone: the rules were checked here (standaloneRuleCheck), so the report says so here.
        r.policy.push(`placement rules ignored (--ignore-rules): ${rulesIgnored.join('; ')}`);
        r.rulesIgnored = rulesIgnored;
      }
      if (tty && lastLen) process.stderr.write('\n');
      if (o.json) printJson(picked ? { ...r, placement: picked } : r);
      else printReport(r);
      if (!r.error) return 0;
      const fe = new FerryError(isErrorCode(r.error.code) ? r.error.code : 'MIGRATION_FAILED', r.error.message);
      if (!o.json) process.stderr.write(`ferry: ${fe.code}: ${fe.message}\n`);
      return fe.exitCode;
    } catch (e) {
      if (tty && lastLen) process.stderr.write('\n');
      const fe = asFerryError(e);
      if (o.json) {
        printJson({
          outcome: 'failed',
          mode: o.live ? 'live' : 'offline',
          domain,
          source: hostArg ?? 'local',
          destination: dest,
          encrypted: !o.insecure,
          error: fe.toJSON(),
        });
        return fe.exitCode;
      }
      throw fe;
    }
  } finally {
    c.close();
  }
}

function printJobs(rows: JobView[]): void {
  const out: (string | number)[][] = [['Domain', 'Role', 'Mode', 'Peer', 'Phase', 'Progress', 'Started', 'Outcome']];
  for (const j of rows)
    out.push([
      j.domain,
      j.role,
      j.mode,
      j.peer,
      j.queue
        ? `queued #${j.queue.position} (${j.queue.priority})`
        : j.waiting
          ? `${j.phase} (${j.phase === 'postcopy' ? 'resuming the stream' : 'asking'}, try ${j.waiting.attempts})`
          : j.phase,
      j.queue
        ? j.queue.etaMs === null
          ? '-'
          : `ETA ${Math.ceil(j.queue.etaMs / 1000)} s`
        : j.progress
          ? `${j.progress.percent.toFixed(0)}%`
          : '-',
      j.startedAt,
      j.report?.outcome ?? (j.error ? 'failed' : '-'),
    ]);
  process.stdout.write(table(out, ['l', 'l', 'l', 'l', 'l', 'r', 'l', 'l']));
  for (const j of rows) if (j.queue?.waitingFor) process.stdout.write(`${j.domain}: waiting for ${j.queue.waitingFor}\n`);
  for (const j of rows) {
    if (!j.waiting) continue;
    if (j.phase === 'postcopy') {
      process.stdout.write(
        `\n${j.domain}: in post-copy the stream to ${j.peer} broke; the guest runs there and waits for pages only this host has. ferryd keeps resuming the stream (never the copy here).\n` +
          `  trying since ${new Date(j.waiting.since).toISOString()}, ${j.waiting.attempts} tries, last: ${j.waiting.lastError}\n`,
      );
      continue;
    }
    process.stdout.write(
      `\n${j.domain}: past the point of no return, ${j.peer} has not said whether it runs the guest; the copy here stays paused.\n` +
        `  asking since ${new Date(j.waiting.since).toISOString()}, ${j.waiting.attempts} tries, last: ${j.waiting.lastError}\n` +
        `  if you know where it runs: ferry job resolve ${j.domain} --assume-destination | --assume-source\n`,
    );
  }
}

export function registerMigrate(prog: Command): void {
  registerMigrateVerb(prog);
  registerJobVerbs(prog);
}

/** migrate DOMAIN DEST [-l]: the move, its plan (--plan) or its cancellation (--cancel). */
function registerMigrateVerb(prog: Command): void {
  prog
    .command('migrate')
    .description('move a domain to another host (offline; -l for live), as xm migrate')
    .argument('<domain>')
    .argument(
      '[dest]',
      'host name, address or address:port; without it ferry picks one (the placement rules, CPU, networks, memory) and says why',
    )
    .option('-l, --live', 'live migration (the autopilot picks pre-copy or post-copy for the budget)')
    .option('--bandwidth <MiB/s>', 'cap the migration stream (default: uncapped)', num('--bandwidth', 1))
    .option('--max-downtime <ms>', 'longest pause allowed for the final switchover (default 300)', num('--max-downtime', 1))
    .option(
      '--timeout <s>',
      "the move's time budget (default 600): the autopilot plans for it, and --on-timeout says what happens when it runs out",
      num('--timeout', 1),
    )
    .option('--parallel <n>', 'multifd: send the stream over N TLS connections, encrypted in parallel (default 1)', num('--parallel', 1))
    .option(
      '--compress <method>',
      "compress pages before they are sent and encrypted: zstd (multifd, on --parallel channels; no post-copy), auto (zstd where a sample of the guest's pages compresses well, over 2 channels where the host has 2 cores) or none; without it, a live move of a guest with 2 GiB or more in use compresses as auto would where pre-copy fits the budget or post-copy is off anyway",
    )
    .option('--insecure', 'send the migration stream as plain TCP (the report says so)')
    .option(
      '--copy-storage',
      "copy the domain's writable disks to the destination's own storage (storage.localDir) while it runs: NBD over TLS plus blockdev-mirror, then RAM; the switchover waits until the disks are in sync",
    )
    .option(
      '--delete-source-storage',
      "with --copy-storage: delete the source's disk files once the domain runs on the destination (default: kept)",
    )
    .option(
      '--verify-memory',
      'compare guest RAM on both hosts by SHA-256 before the destination runs, and rewrite what differs from the source (default: on for live moves under TCG with QEMU < 9.0)',
    )
    .option('--no-verify-memory', "skip that check even where QEMU's dirty tracking is known to lose pages")
    .option('--no-probe', 'do not measure guest-perceived downtime (no TCP SYN every 1 ms to the guest during the move)')
    .option(
      '--plan',
      "move nothing: measure the guest and print each strategy's predicted time, pause and bytes, and the one ferry would pick",
    )
    .option(
      '--strategy <s>',
      'auto (default: ferry picks for the budget), precopy, or postcopy (one pre-copy pass, then the guest runs on the destination)',
    )
    .option(
      '--on-timeout <rule>',
      'at --timeout, still in pre-copy: postcopy (default where allowed), suspend (stop the guest to finish), or cancel',
    )
    .option('--cancel', "cancel the domain's migration in progress (same as `ferry job abort`)")
    .option('--ignore-rules', 'move even where a placement rule forbids it (`ferry rule list`); the report names each rule broken')
    .option('--json', 'print one final JSON report')
    .action(async (domain: string, dest: string | undefined, o: MigrateOpts, cmd: Command) => {
      let picked: { to: string; why: string } | undefined;
      try {
        if (o.cancel) {
          const r = await call(resolveTarget(hostOpt(cmd)), 'migration.cancel', { domain });
          if (o.json) printJson(r);
          else process.stdout.write(`Cancelling the migration of ${domain}\n`);
          return;
        }
        if (!dest) {
          const p = await pickDest(hostOpt(cmd), domain, !!o.ignoreRules);
          dest = p.to;
          picked = p;
          if (!o.json) process.stderr.write(`ferry picked ${p.to} for ${domain}: ${p.why}\n`);
        }
        const rulesIgnored = picked ? [] : await standaloneRuleCheck(hostOpt(cmd), domain, dest, !!o.ignoreRules);
        if (o.plan) {
          const v = await call(resolveTarget(hostOpt(cmd)), 'migration.plan', { domain, dest, ...budgetParams(o) }, 60000);
          if (o.json) printJson(picked ? { ...v, placement: picked } : v);
          else printPlan(v);
          return;
        }
        process.exitCode = await migrate(hostOpt(cmd), { domain, dest, picked, rulesIgnored }, o);
      } catch (e) {
        process.exitCode = reportError(e, !!o.json);
      }
    });
}

/** jobs, job DOMAIN, job abort, job resolve. */
function registerJobVerbs(prog: Command): void {
  prog
    .command('jobs')
    .description('list migration jobs')
    .option('--json', 'JSON output')
    .action(act(async (_o: unknown, cmd: Command) => call(resolveTarget(hostOpt(cmd)), 'migration.jobs'), printJobs));
  prog
    .command('job')
    .description(
      "show a domain's migration job; `job abort DOMAIN` cancels it; `job resolve DOMAIN --assume-…` settles one the destination does not answer for",
    )
    .argument('<domain-or-verb>', 'DOMAIN, or abort / resolve')
    .argument('[domain]')
    .option('--json', 'JSON output')
    .option(
      '--assume-destination',
      'resolve: you checked that the destination runs the domain; the paused copy here is ended and its definition forgotten',
    )
    .option(
      '--assume-source',
      'resolve: you checked that the destination does NOT run the domain and never will (destroyed or absent there); the copy here resumes. If the destination does run it, the guest now runs twice and its disks are corrupted',
    )
    .action(
      act(
        async (
          a: string,
          b: string | undefined,
          o: { assumeDestination?: boolean; assumeSource?: boolean },
          cmd: Command,
        ): Promise<JobView | JobAnswer> => {
          if (a === 'abort') {
            if (!b) throw new FerryError('CLI_USAGE', 'usage: ferry job abort DOMAIN');
            return call(resolveTarget(hostOpt(cmd)), 'migration.cancel', { domain: b });
          }
          if (a === 'resolve') {
            if (!b) throw new FerryError('CLI_USAGE', 'usage: ferry job resolve DOMAIN --assume-destination|--assume-source');
            if (!!o.assumeDestination === !!o.assumeSource)
              throw new FerryError(
                'CLI_USAGE',
                'say where the domain runs: exactly one of --assume-destination or --assume-source (check the other host by hand first)',
              );
            return call(resolveTarget(hostOpt(cmd)), 'migration.resolve', { domain: b, assume: o.assumeSource ? 'source' : 'destination' });
          }
          if (b) throw new FerryError('CLI_USAGE', `unexpected argument "${b}"`);
          return call(resolveTarget(hostOpt(cmd)), 'migration.job', { domain: a });
        },
        (j: JobView | JobAnswer) => {
          if ('cancelling' in j) {
            process.stdout.write(`Cancelling the migration of ${j.domain}\n`);
            return;
          }
          if ('settledBy' in j) {
            process.stdout.write(
              `Migration of ${j.domain} settled (${j.settledBy === 'operator' ? 'on your word' : 'the destination answered'}): it runs on ${j.runsOn}\n`,
            );
            return;
          }
          printJobs([j]);
          if (j.report) {
            process.stdout.write('\n');
            printReport(j.report);
          }
        },
      ),
    );
}
