/**
 * `ferry host evacuate HOST`: empty a host for maintenance. The CLI drives it through
 * the API of the hosts involved, and the moves themselves are ordinary migration jobs
 * in HOST's ferryd, so an interrupted evacuation leaves no half-state of its own: run
 * it again and it takes what is still on HOST (a move already under way is left to
 * finish, and said so).
 *
 *   1. HOST goes into maintenance: it starts nothing and takes no incoming move.
 *   2. Each running domain gets a destination (placement/place.ts, the same choice as an
 *      HA restart's) among --to, or HOST's peers (cluster mode: every live host, as HOST's
 *      etcd watch sees them, and the placement rules: no host is polled); with
 *      --include-stopped, each shut-off one too (its definition moves, last).
 *   3. The autopilot predicts each move (migration.plan, which measures the guest), so
 *      the whole evacuation has an ETA, and the shortest moves go first.
 *   4. Up to --parallel moves at once per destination; one progress view.
 * A domain that cannot move is reported with its reason; the others still move.
 */
import type { Command } from 'commander';
import { ApiClient, call, type Target } from '../api/client.ts';
import { resolveTarget } from './targets.ts';
import type { DomainSummary, HostInfo, Progress, Report } from '../api/protocol.ts';
import { FerryError, asFerryError } from '../errors.ts';
import { table, printJson, act } from './output.ts';
import { placeAll, makespanMs, hostView, whereOf, type DomainView, type HostView } from '../placement/place.ts';
import type { Rule } from '../placement/rules.ts';

interface EvacOpts {
  to?: string[];
  parallel?: number;
  maxDowntime?: number;
  timeout?: number;
  plan?: boolean;
  includeStopped?: boolean;
  json?: boolean;
}

/** One domain's line in the view and the report. */
interface Row {
  domain: string;
  memoryMiB: number;
  to: string | null;
  state: 'planned' | 'queued' | 'moving' | 'moved' | 'failed' | 'unplaced' | 'busy';
  /** live: a running (or paused) domain; definition: a shut-off one (--include-stopped). */
  move: 'live' | 'definition';
  predictedMs: number | null;
  why: string;
  percent: number;
  stage: string;
  report?: Pick<Report, 'totalMs' | 'pauseMs' | 'strategy'>;
  error?: { code: string; message: string };
}

export interface EvacuationReport {
  host: string;
  planOnly: boolean;
  maintenance: boolean;
  parallel: number;
  predictedMs: number | null;
  elapsedMs: number;
  domains: Row[];
  /** Hosts that were no candidate because they could not be asked (standalone) or hold no live lease (cluster), each with why. */
  unreachable: string[];
  outcome: 'done' | 'incomplete' | 'planned';
}

/** A host's API: a lab name goes to its socket; a peer by the address HOST's ferryd.json gives it (TLS). */
export function peerTarget(name: string, peers: Record<string, string>): Target {
  const t = resolveTarget(name);
  return t.kind === 'unix' || !peers[name] ? t : resolveTarget(peers[name]);
}

export async function evacuate(
  hostArg: string,
  o: EvacOpts,
  onView?: (rows: Row[], etaMs: number | null) => void,
): Promise<EvacuationReport> {
  const t0 = Date.now();
  const parallel = o.parallel ?? 1;
  if (!Number.isInteger(parallel) || parallel < 1 || parallel > 8)
    throw new FerryError('CLI_USAGE', '--parallel must be a whole number from 1 to 8');
  const src = resolveTarget(hostArg);
  const info = await call(src, 'host.info');
  const { candidates, unreachable, rules, where } =
    info.mode === 'cluster'
      ? await fromCluster(src, info, o.to)
      : { ...(await fromPeers(info, o.to)), ...(await standaloneRules(src, info)) };
  if (!o.plan && !info.maintenance.on) await call(src, 'host.maintenance', { on: true });
  // HOST's events, for the whole run: moves' progress, and the end of moves an earlier run left.
  const events = o.plan ? undefined : await ApiClient.connect(src);
  try {
    if (events) await events.request('events.subscribe', {});
    return await evacuateWith(o, onView, { t0, parallel, src, info, candidates, unreachable, rules, where, events });
  } finally {
    events?.close();
  }
}

/**
 * Standalone: each peer (or --to host) is asked what it offers now; an unreachable one is
 * no candidate, and said so.
 */
export async function fromPeers(info: HostInfo, to: string[] | undefined): Promise<{ candidates: HostView[]; unreachable: string[] }> {
  const names = (to?.length ? to : Object.keys(info.peers)).filter((n) => n !== info.name);
  const candidates: HostView[] = [];
  const unreachable: string[] = [];
  for (const n of names) {
    try {
      const hi: HostInfo = await call(peerTarget(n, info.peers), 'host.info', {}, 10000);
      candidates.push({
        name: hi.name,
        memoryMiB: hi.memory.offeredMiB,
        freeMiB: hi.memory.freeMiB,
        cpuModel: hi.cpuModel,
        cpuModels: hi.cpuModels ?? null,
        accel: hi.accel,
        networks: Object.keys(hi.networks),
        maintenance: hi.maintenance?.on === true,
      });
    } catch (e) {
      unreachable.push(`${n} (${asFerryError(e).message.slice(0, 120)})`);
    }
  }
  return { candidates, unreachable };
}

/**
 * Standalone: the placement rules (HOST's list; `ferry rule add` gives every host the
 * same one) and, when there are any, where each domain is, from HOST and each peer that
 * answers (a domain with a QEMU wins over a definition left elsewhere).
 */
export async function standaloneRules(src: Target, info: HostInfo): Promise<{ rules: Rule[]; where: Map<string, string> }> {
  const rules: Rule[] = await call(src, 'rule.list', {}, 10000);
  const where = new Map<string, string>();
  if (!rules.length) return { rules, where };
  const hosts: [string, Target][] = [
    [info.name, src],
    ...Object.keys(info.peers)
      .filter((n) => n !== info.name)
      .map((n): [string, Target] => [n, peerTarget(n, info.peers)]),
  ];
  const lists = await Promise.all(
    hosts.map(async ([n, t]) => ({ host: n, domains: await call(t, 'domain.list', {}, 10000).catch(() => []) })),
  );
  for (const l of lists) for (const d of l.domains) if (d.state === 'running' || d.state === 'paused') where.set(d.name, l.host);
  for (const l of lists) for (const d of l.domains) if (!where.has(d.name)) where.set(d.name, l.host);
  return { rules, where };
}

/**
 * Cluster mode: one question to HOST, answered from its etcd watches (every live host's
 * published facts), instead of one per host. A --to host without a live lease is no
 * candidate, and said so. Refused when HOST cannot reach etcd: its view may be stale,
 * and no move could start anyway (CLUSTER_NO_QUORUM).
 */
async function fromCluster(
  src: Target,
  info: HostInfo,
  to: string[] | undefined,
): Promise<{ candidates: HostView[]; unreachable: string[]; rules: Rule[]; where: Map<string, string> }> {
  const fleet = await call(src, 'cluster.fleet');
  if (!fleet.quorate)
    throw new FerryError(
      'CLUSTER_NO_QUORUM',
      `${info.name} cannot reach etcd now, so it knows no current placement and can start no move; check \`ferry cluster status\``,
    );
  const live = new Map(fleet.hosts.map((h) => [h.name, h]));
  const names = (to?.length ? to : [...live.keys()]).filter((n) => n !== info.name);
  const candidates: HostView[] = [];
  const unreachable: string[] = [];
  for (const n of names) {
    const h = live.get(n);
    if (!h) unreachable.push(`${n} (no live cluster lease: down, or not a member)`);
    else candidates.push(hostView(h));
  }
  // Where every domain is (or is going): keep-apart and keep-together read it.
  const where = whereOf(fleet.domains);
  return { candidates, unreachable, rules: fleet.rules, where };
}

/** What placing HOST's domains reads: HOST, the candidates (and who could not be asked), the rules and where every domain is. */
interface Placing {
  src: Target;
  info: HostInfo;
  candidates: HostView[];
  unreachable: string[];
  rules: Rule[];
  where: Map<string, string>;
}

/** The budget of every live move of an evacuation (--max-downtime, --timeout). */
type Budget = { maxDowntimeMs?: number; timeoutS?: number };

/**
 * Moves an interrupted run left under way finish first (up to 15 min): their rows show
 * as waiting, woken by HOST's events. The domains of HOST once none is leaving.
 */
async function settleEarlier(
  src: Target,
  events: ApiClient | undefined,
  onView: ((rows: Row[], etaMs: number | null) => void) | undefined,
): Promise<DomainSummary[]> {
  let all: DomainSummary[] = await call(src, 'domain.list');
  const settleBy = Date.now() + 15 * 60000;
  while (events && all.some((d) => d.state === 'migrating-out') && Date.now() < settleBy) {
    const busy = all
      .filter((d) => d.state === 'migrating-out')
      .map((d): Row => ({
        domain: d.name,
        memoryMiB: d.memoryMiB,
        to: null,
        state: 'busy',
        move: 'live',
        predictedMs: null,
        why: "a move under way (an earlier run's): waiting for it",
        percent: 0,
        stage: 'waiting',
      }));
    onView?.(busy, null);
    // Woken by a state change or a move's end on HOST (a slow re-check only as a safety net).
    await new Promise<void>((resolve) => {
      const done = (): void => {
        clearTimeout(t);
        events.off('event', on);
        resolve();
      };
      const on = (ev: { event: string; data: unknown }): void => {
        if (ev.event === 'migration.progress') {
          const p = ev.data as Progress;
          const r = busy.find((x) => x.domain === p.domain);
          if (r) {
            r.percent = p.percent;
            r.stage = p.stage ?? '';
            onView?.(busy, null);
          }
        } else if (ev.event === 'domain.state' || ev.event === 'migration.done') done();
      };
      const t = setTimeout(done, 5000);
      events.on('event', on);
    });
    all = await call(src, 'domain.list');
  }
  return all;
}

/** One row per domain of HOST: where it goes (placement.ts) and the autopilot's predicted time for each live move. */
async function rowsFor(all: DomainSummary[], o: EvacOpts, c: Placing & { budget: Budget }): Promise<Row[]> {
  const { src, info, candidates, unreachable, budget } = c;
  const rows: Row[] = [];
  const leaving: DomainView[] = [];
  for (const d of all) {
    if (d.state === 'migrating-out' || d.state === 'incoming') {
      rows.push({
        domain: d.name,
        memoryMiB: d.memoryMiB,
        to: null,
        state: 'busy',
        move: 'live',
        predictedMs: null,
        why: `already ${d.state}: left to finish`,
        percent: 0,
        stage: '',
      });
      continue;
    }
    const stopped = d.state !== 'running' && d.state !== 'paused';
    // Shut off: its definition stays here unless asked to move too (vCenter's "powered-off VMs").
    if (stopped && !o.includeStopped) continue;
    const di = await call(src, 'domain.info', { domain: d.name });
    const nics = ((di.config as { nics?: { network: string }[] }).nics ?? []).map((n) => n.network);
    leaving.push({
      name: d.name,
      host: info.name,
      memoryMiB: d.memoryMiB,
      networks: [...new Set(nics)],
      cpuModel: di.cpuModel ?? info.cpuModel,
      accel: di.accel,
      stopped,
    });
  }
  for (const a of placeAll(leaving, candidates, { rules: c.rules, where: c.where })) {
    const l = leaving.find((x) => x.name === a.domain)!;
    rows.push({
      domain: a.domain,
      memoryMiB: l.memoryMiB,
      to: a.to,
      state: a.to ? (o.plan ? 'planned' : 'queued') : 'unplaced',
      move: l.stopped ? 'definition' : 'live',
      predictedMs: null,
      why: a.to ? a.why : `${a.why}${unreachable.length ? `; unreachable: ${unreachable.join(', ')}` : ''}`,
      percent: 0,
      stage: '',
    });
  }
  // The autopilot's prediction for each placed live move (it measures the guest's dirty
  // rate). A definition move copies a record, not memory: it has no prediction and no
  // share of the ETA.
  for (const r of rows.filter((x) => x.to && x.move === 'live')) {
    try {
      const pv = await call(src, 'migration.plan', { domain: r.domain, dest: r.to!, ...budget }, 30000);
      r.predictedMs = pv.predictions.find((p) => p.strategy === pv.pick)?.totalMs ?? null;
    } catch (e) {
      r.why += `; no prediction (${asFerryError(e).message.slice(0, 120)})`;
    }
  }
  return rows;
}

/** The moves, one queue per destination with `parallel` at a time each, each row updated from HOST's progress events. */
async function runMoves(
  rows: Row[],
  c: {
    src: Target;
    events: ApiClient;
    parallel: number;
    budget: Budget;
    onView: ((rows: Row[], etaMs: number | null) => void) | undefined;
  },
): Promise<void> {
  const { src, events, parallel, budget, onView } = c;
  const placed = rows.filter((r) => r.to);
  const eta = (): number | null => {
    const rest = rows.filter((r) => r.move === 'live' && (r.state === 'queued' || r.state === 'moving'));
    if (rest.some((r) => r.predictedMs === null)) return null;
    return makespanMs(
      rest.map((r) => ({ to: r.to!, ms: r.state === 'moving' ? r.predictedMs! * (1 - r.percent / 100) : r.predictedMs! })),
      parallel,
    );
  };
  const show = (): void => onView?.(rows, eta());
  events.on('event', (ev: { event: string; data: unknown }) => {
    if (ev.event !== 'migration.progress') return;
    const p = ev.data as Progress;
    const r = rows.find((x) => x.domain === p.domain && x.state === 'moving');
    if (r) {
      r.percent = p.percent;
      r.stage = p.stage ?? '';
      show();
    }
  });
  show();
  const move = async (r: Row): Promise<void> => {
    r.state = 'moving';
    show();
    try {
      const rep = await call(
        src,
        'migration.start',
        r.move === 'live'
          ? { domain: r.domain, dest: r.to!, live: true, priority: 'evacuation' as const, ...budget }
          : { domain: r.domain, dest: r.to!, priority: 'evacuation' as const },
      );
      if (rep.error) {
        r.state = 'failed';
        r.error = rep.error;
      } else {
        r.state = 'moved';
        r.percent = 100;
        r.report = { totalMs: rep.totalMs, pauseMs: rep.pauseMs, strategy: rep.strategy };
      }
    } catch (e) {
      r.state = 'failed';
      r.error = asFerryError(e).toJSON() as { code: string; message: string };
    }
    show();
  };
  const byDest = new Map<string, Row[]>();
  for (const r of placed) byDest.set(r.to!, [...(byDest.get(r.to!) ?? []), r]);
  await Promise.all(
    [...byDest.values()].flatMap((q) =>
      Array.from({ length: parallel }, async () => {
        for (let r = q.shift(); r; r = q.shift()) await move(r);
      }),
    ),
  );
}

/** The rest of an evacuation, with HOST's event stream open (none for --plan). */
async function evacuateWith(
  o: EvacOpts,
  onView: ((rows: Row[], etaMs: number | null) => void) | undefined,
  c: Placing & { t0: number; parallel: number; events: ApiClient | undefined },
): Promise<EvacuationReport> {
  const { t0, parallel, src, info, candidates, unreachable, rules, where, events } = c;
  // Moves still under way (an interrupted run's) finish first; what stays here is taken again.
  const all = await settleEarlier(src, events, onView);
  const budget = {
    ...(o.maxDowntime !== undefined ? { maxDowntimeMs: o.maxDowntime } : {}),
    ...(o.timeout !== undefined ? { timeoutS: o.timeout } : {}),
  };
  const rows = await rowsFor(all, o, { src, info, candidates, unreachable, rules, where, budget });
  // Shortest first, as the plan says; unknown predictions last among equals in size;
  // definitions after every live move.
  rows.sort(
    (a, b) =>
      (a.to ? 0 : 1) - (b.to ? 0 : 1) ||
      Number(a.move === 'definition') - Number(b.move === 'definition') ||
      (a.predictedMs ?? Infinity) - (b.predictedMs ?? Infinity) ||
      a.memoryMiB - b.memoryMiB,
  );
  const placed = rows.filter((r) => r.to);
  const timed = placed.filter((r) => r.move === 'live');
  const predictedMs = timed.every((r) => r.predictedMs !== null)
    ? makespanMs(
        timed.map((r) => ({ to: r.to!, ms: r.predictedMs! })),
        parallel,
      )
    : null;
  const report = (outcome: EvacuationReport['outcome']): EvacuationReport => ({
    host: info.name,
    planOnly: !!o.plan,
    maintenance: !o.plan || info.maintenance.on,
    parallel,
    predictedMs,
    elapsedMs: Date.now() - t0,
    domains: rows,
    unreachable,
    outcome,
  });
  if (o.plan) return report('planned');

  // The moves: one queue per destination, `parallel` at a time each.
  if (!events) throw new FerryError('INTERNAL', 'evacuate: no event stream');
  await runMoves(rows, { src, events, parallel, budget, onView });
  return report(rows.every((r) => r.state === 'moved') ? 'done' : 'incomplete');
}

function printEvacuation(r: EvacuationReport): void {
  const ms = (v: number | null | undefined): string =>
    v === null || v === undefined ? '?' : v < 10000 ? `${v} ms` : `${(v / 1000).toFixed(1)} s`;
  process.stdout.write(
    `${r.planOnly ? 'Plan to evacuate' : 'Evacuation of'} ${r.host}${r.maintenance ? ' (in maintenance)' : ''}: ${r.domains.length} domain${r.domains.length === 1 ? '' : 's'}, up to ${r.parallel} at once per destination; predicted ${ms(r.predictedMs)}${r.planOnly ? '' : `, took ${ms(r.elapsedMs)}`}\n\n`,
  );
  const rows: (string | number)[][] = [['Domain', 'Mem', 'To', 'Predicted', 'State', 'Detail']];
  for (const d of r.domains)
    rows.push([
      d.domain,
      `${d.memoryMiB} MiB`,
      d.to ?? '-',
      ms(d.predictedMs),
      d.state,
      d.error
        ? `${d.error.code}: ${d.error.message}`
        : d.report
          ? d.move === 'definition'
            ? `definition moved in ${ms(d.report.totalMs)}`
            : `${ms(d.report.totalMs)}, pause ${ms(d.report.pauseMs)}${d.report.strategy ? `, ${d.report.strategy}` : ''}`
          : d.why,
    ]);
  process.stdout.write(table(rows, ['l', 'r', 'l', 'r', 'l', 'l']));
  if (r.unreachable.length) process.stdout.write(`\nNot candidates: ${r.unreachable.join('; ')}\n`);
}

/** The live view on a terminal: one line per domain and the whole ETA, redrawn in place. */
function terminalView(): (rows: Row[], etaMs: number | null) => void {
  let drawn = 0;
  return (rows, etaMs) => {
    const lines = [
      `evacuating: ${rows.filter((r) => r.state === 'moved').length}/${rows.filter((r) => r.to).length} moved, ETA ${etaMs === null ? '?' : `${(etaMs / 1000).toFixed(1)} s`}`,
      ...rows.map(
        (r) =>
          `  ${r.domain.padEnd(16)} → ${(r.to ?? '-').padEnd(10)} ${r.state.padEnd(8)} ${r.state === 'moving' ? `${r.percent.toFixed(0).padStart(3)}% ${r.stage}` : r.error ? r.error.code : r.state === 'unplaced' ? r.why.slice(0, 60) : ''}`,
      ),
    ];
    process.stderr.write((drawn ? `\x1b[${drawn}A` : '') + lines.map((l) => `\x1b[2K${l}\n`).join(''));
    drawn = lines.length;
  };
}

export function registerEvacuate(host: Command): void {
  const collect = (v: string, prev: string[] = []): string[] => [...prev, v];
  const int =
    (name: string) =>
    (v: string): number => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 1) throw new FerryError('CLI_USAGE', `${name} must be a whole number of at least 1, got "${v}"`);
      return n;
    };
  host
    .command('maintenance')
    .description('put a host in maintenance (no domain starts there, no move comes in), or take it out')
    .argument('<host>')
    .argument('<on|off>')
    .option('--json', 'JSON output')
    .action(
      act(
        async (h: string, onOff: string) => {
          if (onOff !== 'on' && onOff !== 'off') throw new FerryError('CLI_USAGE', `say on or off, got "${onOff}"`);
          return call(resolveTarget(h), 'host.maintenance', { on: onOff === 'on' });
        },
        (r) => process.stdout.write(`${r.host}: maintenance ${r.maintenance.on ? `on since ${r.maintenance.since}` : 'off'}\n`),
      ),
    );
  host
    .command('evacuate')
    .description('empty a host: maintenance on, then every running domain moves live to another host, with one progress view and an ETA')
    .argument('<host>')
    .option('--to <host>', "only to this host (repeat for several; default: the host's peers, in cluster mode every live host)", collect)
    .option('--parallel <n>', 'moves at once per destination (default 1)', int('--parallel'))
    .option('--max-downtime <ms>', 'longest pause for each move (default 300)', int('--max-downtime'))
    .option('--timeout <s>', "each move's time budget (default 600)", int('--timeout'))
    .option('--include-stopped', "move shut-off domains' definitions too (after the running ones)")
    .option('--plan', 'move nothing: print where each domain would go and the predicted time')
    .option('--json', 'print one final JSON report')
    .action(
      act(
        async (h: string, o: EvacOpts): Promise<EvacuationReport | undefined> => {
          const tty = !o.json && !!process.stderr.isTTY;
          // Interrupted: the moves under way are ferryd's jobs and finish; a second run takes the rest.
          process.once('SIGINT', () => {
            process.stderr.write(
              `\nferry: evacuation of ${h} interrupted; moves under way finish on their own. Run it again to move the rest (${h} stays in maintenance)\n`,
            );
            process.exit(130);
          });
          const r = await evacuate(h, o, tty && !o.plan ? terminalView() : undefined);
          if (r.outcome === 'incomplete') {
            // The report is the answer either way; the exit code says it is not done.
            const n = r.domains.filter((d) => d.state !== 'moved').length;
            const fe = new FerryError(
              'EVACUATION_INCOMPLETE',
              `${n} domain${n === 1 ? '' : 's'} did not leave ${r.host}; the table says why. Fix that and run the evacuation again: it takes what is still there`,
            );
            if (o.json) printJson({ ...r, error: fe.toJSON() });
            else {
              printEvacuation(r);
              process.stderr.write(`ferry: ${fe.code}: ${fe.message}\n`);
            }
            process.exitCode = fe.exitCode;
            return undefined;
          }
          return r;
        },
        (r) => {
          if (r) printEvacuation(r);
        },
      ),
    );
}
