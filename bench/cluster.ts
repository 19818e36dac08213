/**
 * `npm run bench:cluster`: what cluster mode buys and what it costs, in a 3-host
 * cluster lab (`ferry lab up --hosts 3 --cluster`). Writes bench/results/cluster-*.json
 * and the "Cluster mode" section of BENCHMARKS.md (between its markers; `npm run bench`
 * keeps that section as it is).
 *
 *   npm run bench:cluster [-- --reps N] [--only failover|move|ops]
 *
 * failover  an HA pattern guest on hostX, hostX's links cut (the switch's ports, as
 *           `ferry lab link` does): from the cut to hostX's QEMU gone (fenced), to the
 *           lease's expiry (the manager's host-down event), to the new QEMU started on
 *           another host (/proc), to ferry reporting it running there. Hosts rotate.
 * move      the same live move host1 ⇄ host2 of one Linux guest with host1 and host2 in
 *           cluster mode and standalone, interleaved (both ferryds restarted in the
 *           other mode between runs): setup, pause and total from each move's report.
 * ops       the etcd transactions a move adds (markMoving at Prepare, takeOver at the
 *           point of no return), timed from host1's namespace against the lab's etcd.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { spread, cell, type Spread } from './stats.ts';
import { ferry as runCli, ok as cliOk, createGuest } from '../test/helpers.ts';
import { labLink, restartFerryd, requireLab, LAB_DIR } from '../src/lab/lab.ts';
import { pidAlive } from '../src/qemu/process.ts';
import { writeSection } from './section.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const OUT = path.join(ROOT, 'bench', 'results');
const args = process.argv.slice(2);
const opt = (k: string): string | undefined => (args.includes(k) ? args[args.indexOf(k) + 1] : undefined);
const REPS = Number(opt('--reps') ?? 6);
const ONLY = opt('--only');
const say = (m: string): void => void process.stderr.write(`bench:cluster: ${m}\n`);
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const ok = (a: string[]): Promise<any> => cliOk(a, { timeoutMs: 300000 });
const bootMs = (): number => Number(process.hrtime.bigint() / 1000000n);
const startedMs = (pid: number): number => {
  const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  return Number(st.slice(st.lastIndexOf(')') + 2).split(' ')[19]) * 10;
};

async function waitFor<T>(what: string, fn: () => Promise<T | null | undefined | false>, ms = 90000, every = 50): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn().catch(() => null);
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out: ${what}`);
    await sleep(every);
  }
}

async function quorate(h: string): Promise<boolean> {
  const r = await runCli(['-H', h, 'cluster', 'status', '--json']);
  return r.code === 0 && r.json.lease.quorate;
}

async function runsOn(name: string, hosts: string[]): Promise<{ host: string; pid: number } | null> {
  for (const h of hosts) {
    const r = await runCli(['-H', h, 'info', name, '--json']);
    if (r.code === 0 && r.json.state === 'running') return { host: h, pid: r.json.pid };
  }
  return null;
}

// ---------------------------------------------------------------- failover

interface FailoverRun {
  host: string;
  to: string;
  /** More than one host ran it at the end (checked on every host). */
  twice: boolean;
  /** How many hosts ran it at the end, after the failed host came back (1 is right). */
  endCopies: number;
  /** Whether the failed host's etcd member was etcd's leader (then etcd 3.4 renews every lease for a whole TTL when the next leader takes over). */
  wasLeader: boolean;
  /** Whether the failed host was the HA manager (then another is elected first). */
  wasManager: boolean;
  /** The cluster event log during the run, each line in ms from the cut. */
  story: string[];
  fencedMs: number | null;
  leaseExpiredMs: number | null;
  qemuStartedMs: number;
  runningMs: number;
}

/** The host whose etcd member leads now (asked of host1's ferryd), or null. */
async function etcdLeader(): Promise<string | null> {
  const r = await runCli(['-H', 'host1', 'cluster', 'status', '--json']);
  return r.code === 0 ? ((r.json as any).etcd.find((e: any) => e.leader)?.leader ?? null) : null;
}

async function failoverOnce(victim: string): Promise<FailoverRun> {
  const others = ['host1', 'host2', 'host3'].filter((h) => h !== victim);
  const name = `fo-${victim}-${Date.now() % 100000}`;
  await createGuest('pattern', name, victim);
  await ok(['-H', victim, 'ha', 'add', name]);
  await sleep(3000); // one renewal: the watchdog has it among its targets
  const pid = (await ok(['-H', victim, 'info', name, '--json'])).pid;
  const st = await ok(['-H', victim, 'cluster', 'status', '--json']);
  const wasLeader = st.etcd.some((e: any) => e.leader === victim);
  const wasManager = st.haManager === victim;
  let goneAt: number | null = null;
  const poll = setInterval(() => {
    if (goneAt === null && !pidAlive(pid)) goneAt = bootMs();
  }, 5);
  const wall0 = Date.now();
  const t0 = bootMs();
  labLink(victim, false);
  let moved: { host: string; pid: number };
  let runningAt: number;
  let started: number;
  try {
    moved = await waitFor('running elsewhere', () => runsOn(name, others), 120000, 50);
    runningAt = bootMs();
    started = startedMs(moved.pid);
  } finally {
    clearInterval(poll);
    labLink(victim, true);
  }
  // Right after the link returns, etcd may be changing leaders: asked until it answers.
  const ev = await waitFor(
    'the event log',
    async () => {
      const r = await runCli(['-H', moved.host, 'events', '--json', '--limit', '200']);
      return r.code === 0 ? (r.json as any[]) : null;
    },
    30000,
    500,
  );
  const down = ev.find((e: any) => e.type === 'host-down' && e.host === victim && Date.parse(e.at) >= wall0);
  // What the cluster's event log says of this run, in ms from the cut (for a reader of a slow run).
  const story = ev
    .filter((e: any) => Date.parse(e.at) >= wall0)
    .map((e: any) => `${Date.parse(e.at) - wall0} ms ${e.by} ${e.type}: ${e.detail}`);
  await waitFor(`${victim} back`, () => quorate(victim), 60000, 250);
  await sleep(2000); // its reconcile
  let copies = 0;
  for (const h of ['host1', 'host2', 'host3']) if (await runsOn(name, [h])) copies++;
  if (runningAt - t0 > 20000 || copies !== 1) {
    // A slow or odd run keeps every host's ferryd log for a look (the lab goes at the end).
    const dir = path.join(os.tmpdir(), `ferry-bench-odd-${victim}-${wall0}`);
    fs.mkdirSync(dir, { recursive: true });
    for (const h of ['host1', 'host2', 'host3'])
      fs.copyFileSync(path.join(LAB_DIR, h, 'state', 'ferryd.log'), path.join(dir, `${h}-ferryd.log`));
    say(`  ${copies} running copies, ${runningAt - t0} ms: ferryd logs in ${dir}`);
  }
  await runCli(['-H', moved.host, 'destroy', name]);
  await ok(['-H', moved.host, 'delete', name]);
  return {
    host: victim,
    to: moved.host,
    wasLeader,
    wasManager,
    story,
    twice: copies > 1,
    endCopies: copies,
    fencedMs: goneAt === null ? null : goneAt - t0,
    leaseExpiredMs: down ? Date.parse(down.at) - wall0 : null,
    qemuStartedMs: started - t0,
    runningMs: runningAt - t0,
  };
}

// ---------------------------------------------------------------- move

function setClusterMode(host: string, on: boolean): void {
  const h = requireLab().hosts.find((x) => x.name === host)!;
  const cfg = JSON.parse(fs.readFileSync(h.configPath, 'utf8'));
  const keep = path.join(path.dirname(h.configPath), 'cluster-section.json');
  if (on) {
    if (!cfg.cluster) cfg.cluster = JSON.parse(fs.readFileSync(keep, 'utf8'));
  } else if (cfg.cluster) {
    fs.writeFileSync(keep, JSON.stringify(cfg.cluster));
    delete cfg.cluster;
  }
  fs.writeFileSync(h.configPath, JSON.stringify(cfg, null, 2) + '\n');
}

async function mode(on: boolean): Promise<void> {
  for (const h of ['host1', 'host2']) {
    setClusterMode(h, on);
    await restartFerryd(h);
  }
  if (on) for (const h of ['host1', 'host2']) await waitFor(`${h} quorate`, () => quorate(h), 60000, 250);
}

interface MoveRun {
  mode: 'cluster' | 'standalone';
  from: string;
  setupMs: number | null;
  pauseMs: number | null;
  totalMs: number;
}

async function moveOnce(m: MoveRun['mode'], from: string, to: string): Promise<MoveRun> {
  const r = await ok(['-H', from, 'migrate', 'mv', to, '--live', '--json']);
  return { mode: m, from, setupMs: r.setupMs, pauseMs: r.pauseMs, totalMs: r.totalMs };
}

// ---------------------------------------------------------------- ops

/** In a host's namespace: N rounds of claim, markMoving, takeOver (as another host), timed. */
async function opsChild(endpoints: string[], tlsDir: string, n: number): Promise<void> {
  const { connectEtcd } = await import('../src/cluster/etcd.ts');
  const { Ownership } = await import('../src/cluster/ownership.ts');
  const etcd = connectEtcd({ endpoints, tlsDir });
  const src = new Ownership(etcd, 'bench-src');
  const dst = new Ownership(etcd, 'bench-dst');
  const out = { claim: [] as number[], markMoving: [] as number[], takeOver: [] as number[] };
  const t = async (k: keyof typeof out, f: () => Promise<unknown>): Promise<void> => {
    const t0 = performance.now();
    await f();
    out[k].push(performance.now() - t0);
  };
  for (let i = 0; i < n; i++) {
    const name = `bench-op-${i}`;
    const facts = { name, uuid: 'u', config: {}, cpuModel: 'qemu64', accel: 'tcg', memoryMiB: 1, restartable: { ok: true, why: '' } };
    await t('claim', () => src.claim(facts, 'bench'));
    await t('markMoving', () => src.markMoving(name, `j${i}`, 'bench-dst'));
    await t('takeOver', () => dst.takeOver(name, `j${i}`, 'bench-src'));
    await etcd.delete().key(`/ferry/domains/${name}`).exec();
  }
  etcd.close();
  process.stdout.write(JSON.stringify(out));
}

// ---------------------------------------------------------------- main

function section(fo: any, mv: any, ops: any): string {
  const lines: string[] = ['<!-- cluster:begin -->', '## Cluster mode', ''];
  lines.push(
    'Written by `npm run bench:cluster` in a 3-host cluster lab (an etcd 3.4 member per host, mutual TLS; lease TTL 10 s, fence margin 3 s, restart delay 2 s: the defaults). Cells are median (min–max) over the runs. Raw runs: `bench/results/cluster-*.json`.',
    '',
  );
  if (fo) {
    lines.push(
      `**Failover** (${fo.runs.length} runs; every other one cuts the host of etcd's leader, the others a host that is not, in turn): an HA pattern guest (64 MiB) on a host whose links are cut; every time is from the cut. *Fenced*: its QEMU there gone (ferryd stops the vCPUs, then kills it). *Declared down*: the HA manager's host-down event (its lease expired, or its heartbeat silent for TTL + delay). *QEMU started*: the new QEMU's start time on another host (/proc). *Running*: ferry reports it running there (polled every 50 ms). *Was manager*: runs where the failed host was also the HA manager (another is elected first). Target: lease TTL + 5 s = 15 s or less. Proxmox VE's HA (not measured here) documents about 2 minutes by default.`,
      '',
      '| failed host | runs | was manager | fenced ms | declared down ms | QEMU started elsewhere ms | running elsewhere ms | restarted twice | fenced after the new start | not running at the end |',
      '|---|---|---|---|---|---|---|---|---|---|',
      ...(['all', 'not etcd leader', 'etcd leader'] as const).map((k) => {
        const x = fo.summary.by[k];
        return `| ${k} | ${x.runs} | ${x.managers ?? '?'} | ${cell(x.fencedMs)} | ${cell(x.leaseExpiredMs)} | ${cell(x.qemuStartedMs)} | ${cell(x.runningMs)} | ${x.twice} | ${x.lateFence} | ${x.stopped ?? '?'} |`;
      }),
      '',
      "When the failed host's etcd member was the leader, the others first elect a new one, and etcd 3.4's new leader renews every lease for a whole TTL (plus an election timeout): the failed host's lease expires that much later. The HA manager does not wait for it: a host whose heartbeat (rewritten at every renewal) has not changed for TTL + the restart delay is down, and its HA domains restart (README, Cluster mode).",
      '',
    );
  }
  if (mv) {
    lines.push(
      `**A live move's cost in cluster mode** (${mv.runs.length} moves, a 1 GiB Linux guest host1 ⇄ host2, cluster and standalone interleaved): cluster mode adds the record's move mark to Prepare (one read, one transaction) and the handover transaction before the destination resumes the guest, which lands inside *pause*. *Setup* and *pause* as in the table above.`,
      '',
      '| mode | setup ms | pause ms | total ms |',
      '|---|---|---|---|',
      ...(['standalone', 'cluster'] as const).map(
        (m) => `| ${m} | ${cell(mv.summary[m].setupMs)} | ${cell(mv.summary[m].pauseMs)} | ${cell(mv.summary[m].totalMs)} |`,
      ),
      '',
    );
  }
  if (ops) {
    lines.push(
      `**The handover's etcd transactions** (${ops.summary.takeOver.n} rounds from host1's namespace; each a read and a compare-and-swap, the write committed by 2 of 3 members). Target: under 10 ms added to setup and switchover.`,
      '',
      '| claim ms | markMoving ms (setup) | takeOver ms (switchover) |',
      '|---|---|---|',
      `| ${cell(ops.summary.claim)} | ${cell(ops.summary.markMoving)} | ${cell(ops.summary.takeOver)} |`,
      '',
    );
  }
  lines.push('<!-- cluster:end -->');
  return lines.join('\n') + '\n';
}

const readJson = (n: string): any => {
  try {
    return JSON.parse(fs.readFileSync(path.join(OUT, n), 'utf8'));
  } catch {
    return null;
  }
};

async function main(): Promise<void> {
  if (args[0] === '--ops-child') return opsChild(args[1].split(','), args[2], Number(args[3]));
  fs.mkdirSync(OUT, { recursive: true });
  const t0 = Date.now();
  await runCli(['lab', 'down']);
  say('lab up --hosts 3 --cluster');
  await ok(['lab', 'up', '--hosts', '3', '--cluster', '--json']);
  try {
    for (const h of ['host1', 'host2', 'host3']) await waitFor(`${h} quorate`, () => quorate(h), 60000, 250);
    if (!ONLY || ONLY === 'ops') {
      say('ops: 50 rounds of the handover transactions from host1');
      const lab = requireLab();
      const h1 = lab.hosts[0];
      const raw = execFileSync(
        'ip',
        [
          'netns',
          'exec',
          h1.namespace,
          process.execPath,
          '--import',
          'tsx',
          fileURLToPath(import.meta.url),
          '--ops-child',
          lab.cluster!.endpoints.join(','),
          h1.tlsDir,
          '50',
        ],
        { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'] },
      ).toString();
      const ops = JSON.parse(raw);
      const summary = { claim: spread(ops.claim), markMoving: spread(ops.markMoving), takeOver: spread(ops.takeOver) };
      fs.writeFileSync(
        path.join(OUT, 'cluster-ops.json'),
        JSON.stringify({ at: new Date().toISOString(), runs: ops, summary }, null, 2) + '\n',
      );
    }
    if (!ONLY || ONLY === 'failover') {
      const runs: FailoverRun[] = [];
      for (let i = 0; i < REPS; i++) {
        // Every other run the host of etcd's leader fails (its lease outlives it: the heartbeat
        // decides); the others, a host that is not etcd's leader, in turn.
        const leader = await etcdLeader();
        const rest = ['host1', 'host2', 'host3'].filter((h) => h !== leader);
        const victim = i % 2 === 0 && leader ? leader : rest[Math.floor(i / 2) % rest.length];
        say(`failover ${i + 1}/${REPS}: ${victim} cut off`);
        const r = await failoverOnce(victim);
        say(`  fenced ${r.fencedMs} ms, lease expired ${r.leaseExpiredMs} ms, running on ${r.to} at ${r.runningMs} ms`);
        runs.push(r);
      }
      const sum = (rs: FailoverRun[]) => ({
        runs: rs.length,
        fencedMs: spread(rs.flatMap((r) => (r.fencedMs === null ? [] : [r.fencedMs]))),
        leaseExpiredMs: spread(rs.flatMap((r) => (r.leaseExpiredMs === null ? [] : [r.leaseExpiredMs]))),
        qemuStartedMs: spread(rs.map((r) => r.qemuStartedMs)),
        runningMs: spread(rs.map((r) => r.runningMs)),
        twice: rs.filter((r) => r.twice).length,
        stopped: rs.filter((r) => r.endCopies === 0).length,
        managers: rs.filter((r) => r.wasManager).length,
        lateFence: rs.filter((r) => r.fencedMs === null || r.fencedMs >= r.qemuStartedMs).length,
      });
      const summary = {
        by: {
          all: sum(runs),
          'not etcd leader': sum(runs.filter((r) => !r.wasLeader)),
          'etcd leader': sum(runs.filter((r) => r.wasLeader)),
        },
      };
      fs.writeFileSync(
        path.join(OUT, 'cluster-failover.json'),
        JSON.stringify({ at: new Date().toISOString(), runs, summary }, null, 2) + '\n',
      );
    }
    if (!ONLY || ONLY === 'move') {
      await createGuest('linux', 'mv', 'host1', 1024);
      const runs: MoveRun[] = [];
      for (let i = 0; i < REPS; i++) {
        const order: MoveRun['mode'][] = i % 2 ? ['standalone', 'cluster'] : ['cluster', 'standalone'];
        for (const m of order) {
          say(`move ${i + 1}/${REPS}: ${m}`);
          await mode(m === 'cluster');
          runs.push(await moveOnce(m, 'host1', 'host2'));
          runs.push(await moveOnce(m, 'host2', 'host1'));
        }
      }
      await mode(true);
      const by = (m: MoveRun['mode'], k: 'setupMs' | 'pauseMs' | 'totalMs'): Spread | null =>
        spread(runs.filter((r) => r.mode === m && r[k] !== null).map((r) => r[k] as number));
      const summary = Object.fromEntries(
        (['standalone', 'cluster'] as const).map((m) => [
          m,
          { setupMs: by(m, 'setupMs'), pauseMs: by(m, 'pauseMs'), totalMs: by(m, 'totalMs') },
        ]),
      );
      fs.writeFileSync(
        path.join(OUT, 'cluster-move.json'),
        JSON.stringify({ at: new Date().toISOString(), runs, summary }, null, 2) + '\n',
      );
    }
  } finally {
    // FERRY_BENCH_KEEP=1 keeps the lab after a failure, to read its hosts' logs.
    if (!process.env.FERRY_BENCH_KEEP) await runCli(['lab', 'down']);
  }
  writeSection('cluster', section(readJson('cluster-failover.json'), readJson('cluster-move.json'), readJson('cluster-ops.json')), false);
  say(`done in ${Math.round((Date.now() - t0) / 1000)} s`);
}

main().catch((e) => {
  process.stderr.write(`bench:cluster: ${e instanceof Error ? e.stack : String(e)}\n`);
  process.exit(1);
});
