/**
 * `npm run faults:cluster -- --seed S --count N [--no-report]`: the fault campaign in
 * cluster mode (3 hosts, an etcd member each). Each round starts a bandwidth-capped live
 * move of the pattern guest (HA-marked in every other round) from the host that runs it
 * to another, waits a random 0–3 s, and injects one cluster fault:
 *   etcd-kill        one etcd member (any host's) killed for 4 s: the quorum holds;
 *   partition-src    the source host's links cut for 2–6 s (shorter than TTL − margin);
 *   partition-dst    the destination's, likewise;
 *   lease-expiry-src the source host cut off and its ferryd frozen for 14 s: its lease
 *                    expires in the middle of the move (an HA guest is fenced and
 *                    restarted elsewhere; a non-HA one waits on the source);
 *   lease-expiry-dst the same on the destination.
 * Then it restores what it broke, lets everything settle and checks the invariants:
 * exactly one host runs the domain (never two, never none), exactly one host has its
 * definition, the cluster's ownership record names that host, the memory pattern is
 * consistent, and no migration listener or reservation is left. Replayable from
 * (seed, index). Writes reliability/cluster-faults-<seed>.json and the cluster part of
 * RELIABILITY.md's fault section (unless --no-report); exits 1 if a round failed.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { rng, campaignCommit } from './campaign.ts';
import { ferry as runCli } from '../test/helpers.ts';
import { pidAlive as alive } from '../src/qemu/process.ts';
import { labLink, requireLab, restartEtcd } from '../src/lab/lab.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const arg = (k: string, d: number): number => (args.includes(k) ? Number(args[args.indexOf(k) + 1]) : d);
const SEED = arg('--seed', 1);
const COUNT = arg('--count', 15);
const REPORT = !args.includes('--no-report');
const DOM = 'cz';
const HOSTS = ['host1', 'host2', 'host3'];
const FAULTS = ['etcd-kill', 'partition-src', 'partition-dst', 'lease-expiry-src', 'lease-expiry-dst'] as const;
type Fault = (typeof FAULTS)[number];

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const ferry = (a: string[], timeoutMs = 180000): ReturnType<typeof runCli> => runCli(a, { timeoutMs });

interface Round {
  index: number;
  fault: Fault;
  ha: boolean;
  delayMs: number;
  from: string;
  to: string;
  outcome: string;
  code?: string;
  runsOn: string | null;
  survived: boolean;
  problems: string[];
}

/** Where the domain runs, by each host's own answer (a host that does not answer counts as not running it). */
async function runningOn(): Promise<{ host: string; pid: number }[]> {
  const on: { host: string; pid: number }[] = [];
  for (const h of HOSTS) {
    const r = await ferry(['-H', h, 'info', DOM, '--json'], 20000);
    if (r.code === 0 && (r.json.state === 'running' || r.json.state === 'paused') && alive(r.json.pid))
      on.push({ host: h, pid: r.json.pid });
  }
  return on;
}

async function definedOn(): Promise<string[]> {
  const out: string[] = [];
  for (const h of HOSTS) {
    const r = await ferry(['-H', h, 'list', '--json'], 20000);
    if (r.code === 0 && r.json.some((d: any) => d.name === DOM)) out.push(h);
  }
  return out;
}

async function settled(): Promise<boolean> {
  for (const h of HOSTS) {
    const st = await ferry(['-H', h, 'cluster', 'status', '--json'], 20000);
    if (st.code !== 0 || !st.json.lease.quorate) return false;
    const jobs = await ferry(['-H', h, 'jobs', '--json'], 20000);
    if (jobs.code !== 0 || jobs.json.some((j: any) => j.domain === DOM && j.phase !== 'confirmed' && j.phase !== 'abandoned')) return false;
  }
  return true;
}

/** Injects the fault and returns how to undo it (after `holdMs`). */
function inject(fault: Fault, from: string, to: string, rand: () => number): { holdMs: number; undo: () => Promise<void> } {
  const lab = requireLab();
  const host = (h: string) => lab.hosts.find((x) => x.name === h)!;
  switch (fault) {
    case 'etcd-kill': {
      const victim = HOSTS[Math.floor(rand() * 3)];
      try {
        process.kill(host(victim).etcdPid!, 'SIGKILL');
      } catch {
        /* gone */
      }
      return {
        holdMs: 4000,
        undo: async () => {
          for (let i = 0; i < 50 && alive(host(victim).etcdPid!); i++) await sleep(100);
          restartEtcd(victim);
        },
      };
    }
    case 'partition-src':
    case 'partition-dst': {
      const h = fault === 'partition-src' ? from : to;
      labLink(h, false);
      return { holdMs: 2000 + Math.floor(rand() * 4000), undo: async () => void labLink(h, true) };
    }
    case 'lease-expiry-src':
    case 'lease-expiry-dst': {
      const h = fault === 'lease-expiry-src' ? from : to;
      const pid = host(h).pid;
      labLink(h, false);
      process.kill(pid, 'SIGSTOP');
      return {
        holdMs: 14000,
        undo: async () => {
          process.kill(pid, 'SIGCONT');
          labLink(h, true);
        },
      };
    }
  }
}

async function check(r: Omit<Round, 'survived' | 'problems' | 'runsOn'>): Promise<{ problems: string[]; runsOn: string | null }> {
  const problems: string[] = [];
  const on = await runningOn();
  if (on.length !== 1) problems.push(`runs on ${on.length} hosts (${on.map((x) => x.host).join(',') || 'none'})`);
  const defs = await definedOn();
  if (defs.length !== 1) problems.push(`defined on ${defs.length} hosts (${defs.join(',')})`);
  const all = await ferry(['-H', HOSTS[0], 'list', '--all', '--json'], 20000);
  const rec = all.code === 0 ? all.json.find((d: any) => d.name === DOM) : undefined;
  if (!rec) problems.push('no ownership record');
  else if (on.length === 1 && rec.owner !== on[0].host) problems.push(`the record names ${rec.owner}, it runs on ${on[0].host}`);
  if (on.length === 1) {
    const v = await ferry(['lab', 'verify', DOM, '--json'], 60000);
    if (v.json?.ok !== true) problems.push(`memory: ${v.json?.error?.message ?? v.stdout}`);
  }
  for (const h of HOSTS) {
    const info = await ferry(['-H', h, 'host', 'info', '--json'], 20000);
    if (info.json?.memory?.reservedMiB) problems.push(`reservation left on ${h}`);
    const ss = execFileSync('ip', ['netns', 'exec', `ferry-${h}`, 'ss', '-Hltn']).toString();
    const listeners = ss
      .split('\n')
      .map((l) => Number(/:(\d+)\s/.exec(l)?.[1]))
      .filter((p) => p >= 49152 && p <= 49215);
    if (listeners.length) problems.push(`migration listeners left on ${h}: ${listeners.join(',')}`);
  }
  void r;
  return { problems, runsOn: on.length === 1 ? on[0].host : null };
}

async function main(): Promise<void> {
  await ferry(['lab', 'down']);
  const up = await ferry(['lab', 'up', '--hosts', '3', '--cluster', '--json']);
  if (up.code !== 0) throw new Error(up.stderr);
  const rounds: Round[] = [];
  const rand = rng(SEED);
  try {
    for (let i = 0; i < 120 && !(await settled()); i++) await sleep(250);
    const cfg = (await ferry(['lab', 'guest', 'pattern', DOM, '--memory', '64', '--json'])).json;
    const f = path.join(os.tmpdir(), `${DOM}-${process.pid}.json`);
    fs.writeFileSync(f, JSON.stringify(cfg));
    await ferry(['-H', 'host1', 'create', f]);
    fs.rmSync(f, { force: true });
    await sleep(1500);
    for (let i = 0; i < COUNT; i++) {
      const fault = FAULTS[Math.floor(rand() * FAULTS.length)];
      const ha = i % 2 === 1;
      const delayMs = Math.floor(rand() * 3000);
      const from = (await runningOn())[0]?.host ?? 'host1';
      const others = HOSTS.filter((h) => h !== from);
      const to = others[Math.floor(rand() * 2)];
      await ferry(['-H', from, 'ha', ha ? 'add' : 'remove', DOM]);
      const mig = ferry([
        '-H',
        from,
        'migrate',
        DOM,
        to,
        '--live',
        '--bandwidth',
        '24',
        '--max-downtime',
        '3000',
        '--timeout',
        '30',
        '--json',
      ]);
      await sleep(delayMs);
      const { holdMs, undo } = inject(fault, from, to, rand);
      await sleep(holdMs);
      await undo();
      const m = await mig;
      for (let w = 0; w < 240 && !(await settled()); w++) await sleep(250);
      await sleep(2000); // a returning host's reconcile
      const base = { index: i, fault, ha, delayMs, from, to, outcome: m.json?.outcome ?? `exit ${m.code}`, code: m.json?.error?.code };
      const { problems, runsOn } = await check(base);
      const survived = problems.length === 0;
      rounds.push({ ...base, runsOn, survived, problems });
      process.stderr.write(
        `  [${i + 1}/${COUNT}] ${fault.padEnd(16)} ${ha ? 'HA ' : '   '} ${from}→${to} at ${String(delayMs).padStart(4)} ms → ${(base.code ?? base.outcome).padEnd(22)} runs on ${runsOn ?? '?'}  ${survived ? 'ok' : `FAILED: ${problems.join('; ')}`}\n`,
      );
      if (!survived) break;
    }
  } finally {
    await ferry(['lab', 'down']);
  }
  // The commit the campaign ran on, so a result names its code.
  const commit = campaignCommit(ROOT);
  const failed = rounds.filter((r) => !r.survived);
  if (REPORT) {
    fs.writeFileSync(
      path.join(ROOT, 'reliability', `cluster-faults-${SEED}.json`),
      JSON.stringify({ seed: SEED, count: rounds.length, date: new Date().toISOString(), commit, rounds }, null, 2) + '\n',
    );
    writeReport();
  }
  process.stderr.write(`${rounds.length} cluster faults injected, ${rounds.length - failed.length} survived, ${failed.length} failed\n`);
  process.stdout.write(JSON.stringify({ seed: SEED, injected: rounds.length, survived: rounds.length - failed.length, failed }) + '\n');
  if (failed.length || rounds.length < COUNT) process.exitCode = 1;
}

/** The cluster part of RELIABILITY.md's fault section, from every reliability/cluster-faults-*.json. */
function writeReport(): void {
  const dir = path.join(ROOT, 'reliability');
  const files = fs
    .readdirSync(dir)
    .filter((f) => /^cluster-faults-\d+\.json$/.test(f))
    .sort();
  const runs = files.map((f) => JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8')));
  const rounds: Round[] = runs.flatMap((r) => r.rounds);
  const twice = rounds.filter((r) => r.problems.some((p) => /runs on [2-9] hosts/.test(p))).length;
  const lost = rounds.filter((r) => r.problems.some((p) => /runs on 0 hosts/.test(p))).length;
  const byFault = FAULTS.map((f) => {
    const rs = rounds.filter((r) => r.fault === f);
    const outcomes = [...new Set(rs.map((r) => r.code ?? r.outcome))].join(', ');
    return `| ${f} | ${rs.length} | ${rs.filter((r) => r.survived).length} | ${outcomes || '-'} |`;
  });
  const md = [
    '<!-- cluster-faults:begin -->',
    '### Cluster mode',
    '',
    `\`npm run faults:cluster -- --seed S --count N\` (${files.join(', ')}; commits ${[...new Set(runs.map((r) => String(r.commit).slice(0, 12)))].join(', ')}): 3 hosts with an etcd member each; every round moves the pattern guest (HA-marked in every other round) and, 0–3 s in, kills an etcd member for 4 s, cuts the source's or the destination's links for 2–6 s, or cuts one of them off with its ferryd frozen for 14 s, so that its lease expires in the middle of the move. After every round: the domain runs on exactly one host, is defined on one, the ownership record names that host, its memory pattern is consistent, and nothing is left listening or reserved (checked once each round has settled: a second copy that ran for a moment and was fenced before the check would not show here; the lab tests check that order from process start and exit times). **${rounds.length} faults, ${rounds.filter((r) => r.survived).length} survived; ${lost} domains lost, ${twice} run twice.**`,
    '',
    '| fault | rounds | survived | move outcomes |',
    '|---|---|---|---|',
    ...byFault,
    '<!-- cluster-faults:end -->',
    '',
  ].join('\n');
  const f = path.join(ROOT, 'RELIABILITY.md');
  const cur = fs.readFileSync(f, 'utf8');
  const re = /<!-- cluster-faults:begin -->[\s\S]*<!-- cluster-faults:end -->\n?/;
  fs.writeFileSync(f, re.test(cur) ? cur.replace(re, md) : `${cur.trimEnd()}\n\n${md}`);
}

main().catch((e) => {
  process.stderr.write(`faults:cluster: ${e instanceof Error ? e.stack : String(e)}\n`);
  process.exit(1);
});
