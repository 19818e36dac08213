/**
 * `npm run faults -- --seed S --count N [--no-report]`: a fault-injection campaign in
 * the lab with the memory-pattern guest. Each round starts a bandwidth-capped live
 * migration between host1 and host2 (64 MiB at 24 MiB/s with a 3 s downtime limit:
 * about 4 s when nothing goes wrong), waits a random time (so the fault lands in a
 * random phase), injects one fault, restarts what was killed, lets the daemons settle,
 * and checks the invariants:
 *   - exactly one running copy of the domain, or, where the source QEMU itself was
 *     killed, the domain crashed on one host and absent on the other;
 *   - the memory pattern consistent (on the running copy);
 *   - the definition on exactly one host;
 *   - no orphan QEMU, listener, reservation or tap.
 * With --aim (npm run faults -- --aim --per-phase N), each round is aimed at a phase
 * instead of a random moment: the fault lands the moment the chosen side's job reaches
 * it (every source phase from begin to finish, every destination phase from begun to
 * finished), N rounds per phase, and each phase also gets a freeze of each daemon
 * (SIGSTOP for --freeze-s seconds, then SIGCONT, no restart). Phases that last a few
 * milliseconds are caught by polling the job's record every millisecond; the phase
 * actually seen on each side at injection is recorded with the aim.
 * With --move tunnel or --move copy, every round's move is of that kind instead of a
 * move on one segment with a shared disk: tunnel puts host2 on another L2 segment (lab
 * up --segments 2) and gives the guest a NIC on host1's, so every move builds or drops
 * a VXLAN; copy gives the guest a data disk in host1's own disk directory, filled with
 * known random bytes, and moves it with --copy-storage --delete-source-storage. Each
 * adds its invariant: no tunnel device but where the domain is away from its segment;
 * the disk on exactly the host that holds the definition, its bytes unchanged.
 * With --postcopy N, N rounds of the post-copy fault class: each round moves the guest
 * with --strategy postcopy and, the moment the source's job is in its post-copy phase
 * (the guest runs on the destination while the source still holds pages), resets the
 * data connections or takes the destination's link down for 1–6 s, or kills either
 * ferryd; the stream must resume by itself and the memory arrive whole.
 * Every round is replayable from (seed, index). Writes reliability/faults-<seed>.json
 * and the fault section of RELIABILITY.md, unless --no-report (CI runs a fixed-seed
 * subset that way). Prints one JSON summary line on stdout; exits 1 if any round failed.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { rng, campaignCommit } from './campaign.ts';
import { ferry as runCli } from '../test/helpers.ts';
import { pidAlive as alive } from '../src/qemu/process.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const LAB = '/var/lib/ferry-lab';
const args = process.argv.slice(2);
const arg = (k: string, d: number): number => {
  const i = args.indexOf(k);
  return i >= 0 ? Number(args[i + 1]) : d;
};
const SEED = arg('--seed', 1);
const COUNT = arg('--count', 20);
const REPORT = !args.includes('--no-report');
const DOM = 'fz';
const MOVES = ['live', 'tunnel', 'copy'] as const;
const MOVE = ((): (typeof MOVES)[number] => {
  const i = args.indexOf('--move');
  const m = i >= 0 ? args[i + 1] : 'live';
  if (!(MOVES as readonly string[]).includes(m)) throw new Error(`--move must be ${MOVES.join(', ')}, got "${m}"`);
  return m as (typeof MOVES)[number];
})();
/** The copy campaign's data disk: its bytes, and the files in each host's own disk directory (a copy lands as DOM.diskI.FORMAT). */
const DISK_REF = path.join(os.tmpdir(), `${DOM}-data.raw`);
const disksOn = (h: string): string[] => {
  const dir = `${LAB}/${h}/disks`;
  return fs.existsSync(dir) ? fs.readdirSync(dir).map((f) => path.join(dir, f)) : [];
};
const FAULTS = [
  'kill-src-qemu',
  'kill-dst-qemu',
  'kill-src-ferryd',
  'kill-dst-ferryd',
  'link-cut',
  'packet-loss',
  'slow-link',
  'disk-full',
] as const;
const PC_FAULTS = ['pc-link-reset', 'pc-link-down', 'pc-kill-src-ferryd', 'pc-kill-dst-ferryd'] as const;
type Fault = (typeof FAULTS)[number] | (typeof PC_FAULTS)[number] | 'freeze-src-ferryd' | 'freeze-dst-ferryd';
const POSTCOPY = arg('--postcopy', 0);
const AIM = args.includes('--aim');
const PER_PHASE = arg('--per-phase', 25);
const FREEZE_S = arg('--freeze-s', 30);
/** `--only pc-link-reset`: every post-copy round injects this one fault (to replay a rare failure). */
const ONLY = ((): (typeof PC_FAULTS)[number] | undefined => {
  const i = args.indexOf('--only');
  if (i < 0) return undefined;
  const f = args[i + 1] as (typeof PC_FAULTS)[number];
  if (!PC_FAULTS.includes(f) || !POSTCOPY) throw new Error(`--only takes one of ${PC_FAULTS.join(', ')}, with --postcopy N`);
  return f;
})();
/** Where an aimed round's fault lands: a side and a phase of its job. */
const TARGETS: { side: 'source' | 'destination'; phase: string }[] = [
  ...['begin', 'prepare', 'perform', 'switchover', 'finish'].map((phase) => ({ side: 'source' as const, phase })),
  ...['begun', 'prepared', 'finishing', 'finished'].map((phase) => ({ side: 'destination' as const, phase })),
];

/** Copies every lab host's logs (ferryd's, and each QEMU's) to the temp directory and says where. */
function keepLogs(): void {
  const dir = path.join(os.tmpdir(), `ferry-faults-${SEED}`);
  fs.mkdirSync(dir, { recursive: true });
  for (const h of labState().hosts) {
    const top = path.dirname(h.configPath);
    for (const f of fs.readdirSync(top, { recursive: true }) as string[])
      if (f.endsWith('.log') || f.endsWith('.out'))
        fs.copyFileSync(path.join(top, f), path.join(dir, `${h.name}-${f.replaceAll('/', '_')}`));
  }
  process.stderr.write(`  logs of the failed campaign: ${dir}\n`);
}
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const ferry = (a: string[], timeoutMs = 120000): ReturnType<typeof runCli> => runCli(a, { timeoutMs });
const sh = (cmd: string, a: string[]): string => {
  try {
    return execFileSync(cmd, a, { stdio: ['ignore', 'pipe', 'pipe'] }).toString();
  } catch {
    return '';
  }
};
const labState = (): any => JSON.parse(fs.readFileSync(`${LAB}/lab.json`, 'utf8'));
const record = (h: string): any => {
  try {
    return JSON.parse(fs.readFileSync(`${LAB}/${h}/state/domains/${DOM}.json`, 'utf8'));
  } catch {
    return undefined;
  }
};
function qemusOf(uuid: string): number[] {
  return fs
    .readdirSync('/proc')
    .filter((p) => /^\d+$/.test(p))
    .map(Number)
    .filter((p) => {
      try {
        const c = fs.readFileSync(`/proc/${p}/cmdline`, 'utf8');
        return c.includes('qemu-system') && c.includes(uuid) && alive(p);
      } catch {
        return false;
      }
    });
}
function activeJobs(): number {
  let n = 0;
  for (const h of ['host1', 'host2']) {
    const dir = `${LAB}/${h}/state/jobs`;
    for (const f of fs.existsSync(dir) ? fs.readdirSync(dir) : []) {
      try {
        const j = JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8'));
        if (j.phase !== 'confirmed' && j.phase !== 'abandoned') n++;
      } catch {
        /* partial */
      }
    }
  }
  return n;
}
/** This round's job on host `h` in `role` (jobs from earlier rounds do not count). */
function roundJob(h: string, role: string, since: number): any {
  const dir = `${LAB}/${h}/state/jobs`;
  const jobs = (fs.existsSync(dir) ? fs.readdirSync(dir) : [])
    .filter((f) => f.endsWith('.json') && !f.startsWith('.'))
    .map((f) => {
      try {
        return JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8'));
      } catch {
        return undefined;
      }
    })
    .filter((j) => j && j.role === role && j.startedAt >= since - 1000)
    .sort((a, b) => b.startedAt - a.startedAt);
  return jobs[0];
}
function latestSourcePhase(h: string, since: number): string {
  return roundJob(h, 'source', since)?.phase ?? 'before-begin';
}
/** Waits (polling every millisecond) until this round's job on `h` reaches `phase`; false if it ended first or 30 s passed. */
async function reached(h: string, role: string, phase: string, since: number): Promise<boolean> {
  const end = Date.now() + 30000;
  while (Date.now() < end) {
    const j = roundJob(h, role, since);
    if (j?.phase === phase) return true;
    if (j && (j.history ?? []).some((x: { phase: string }) => x.phase === phase)) return false; // passed it between two looks
    if (j && (j.phase === 'confirmed' || j.phase === 'abandoned')) return false;
    await sleep(1);
  }
  return false;
}
const hostIndex = (h: string): number => Number(h.slice(4));
/**
 * Takes every link of host `h` on the lab's switch down (its guest segments and the
 * migration network, which carries relocation, the stream and any VXLAN), and queues
 * bringing them back. Campaigns before 2026-12-05 cut the first guest segment only.
 */
function cutLinks(h: string, undo: (() => void)[]): void {
  const n = hostIndex(h);
  const devs = [...Array.from({ length: labState().segments ?? 1 }, (_, seg) => `h${n}s${seg}`), `h${n}m`];
  for (const dev of devs) sh('ip', ['-n', 'ferry-switch', 'link', 'set', dev, 'down']);
  undo.push(() => {
    for (const dev of devs) sh('ip', ['-n', 'ferry-switch', 'link', 'set', dev, 'up']);
  });
}
/** Whether a data disk holds the bytes the copy campaign wrote (-U: QEMU holds it open; the pattern guest never writes it). */
function sameDisk(file: string): boolean {
  try {
    execFileSync('qemu-img', ['compare', '-U', '-q', '-f', 'raw', '-F', 'qcow2', DISK_REF, file], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}
/** Host `h`'s network devices by name (`ip -br link`, without the @peer suffix). */
const devices = (h: string): string[] =>
  sh('ip', ['-n', `ferry-${h}`, '-br', 'link'])
    .split('\n')
    .map((l) => l.split(/[\s@]/)[0])
    .filter(Boolean);
/** ferry's tunnel devices on host `h` (README "Moves across segments"). */
const tunnelDevs = (h: string): string[] => devices(h).filter((d) => /^f[xb]/.test(d));

async function restartIfDown(): Promise<void> {
  const s = labState();
  for (const h of s.hosts) if (!alive(h.pid)) await ferry(['lab', 'restart', h.name]);
}

interface Round {
  index: number;
  fault: Fault;
  delayMs: number;
  from: string;
  phase: string;
  outcome: string;
  code?: string;
  survived: boolean;
  problems: string[];
  repairedBytes?: number;
  /** The strategy the move used (the autopilot's pick, or the one asked for). */
  strategy?: string;
  /**
   * Post-copy: the source's QEMU failed the stream as it completed, with pages the
   * destination never got (QEMU cannot resume that); the guest is crashed there, as
   * designed (README "Post-copy, safely"). Invariants held, but the guest was lost.
   */
  guestLost?: boolean;
  aim?: { side: string; phase: string; hit: boolean; srcPhase: string; dstPhase: string };
}

async function main(): Promise<void> {
  execFileSync('bash', [path.join(ROOT, 'scripts', 'setup.sh')], { stdio: ['ignore', 'ignore', 'inherit'] });
  await ferry(['lab', 'down']);
  const up = await ferry(['lab', 'up', '--hosts', '2', '--state-size', '64', ...(MOVE === 'tunnel' ? ['--segments', '2'] : []), '--json']);
  if (up.code !== 0) throw new Error(up.stderr);
  const engine: string = (await ferry(['-H', 'host1', 'host', 'info', '--json'])).json?.qemuVersion ?? 'unknown';
  const rounds: Round[] = [];
  const rand = rng(SEED);
  try {
    const cfg = (await ferry(['lab', 'guest', 'pattern', DOM, '--memory', '64', '--json'])).json;
    // The pattern guest ignores both; ferry moves them all the same.
    if (MOVE === 'tunnel') cfg.nics = [{ network: 'lab' }];
    if (MOVE === 'copy') {
      fs.writeFileSync(DISK_REF, crypto.randomBytes(16 * 1048576));
      const file = `${LAB}/host1/disks/${DOM}-data.qcow2`;
      fs.mkdirSync(path.dirname(file), { recursive: true });
      execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', DISK_REF, file]);
      // IDE, not virtio: SeaBIOS leaves a virtio disk's rings in the RAM the pattern guest
      // then overwrites, and the destination's device writes them after the move, which the
      // pattern checker reads as lost pages (a shared virtio disk without a copy does the same).
      cfg.disks = [...cfg.disks, { path: file, format: 'qcow2', bus: 'ide' }];
    }
    const f = path.join(os.tmpdir(), `${DOM}.json`);
    fs.writeFileSync(f, JSON.stringify(cfg));
    await ferry(['-H', 'host1', 'create', f]);
    await sleep(1500);
    const uuid = cfg.uuid;
    // Aimed: PER_PHASE rounds per target, then one freeze of each daemon per target.
    const total = POSTCOPY ? POSTCOPY : AIM ? TARGETS.length * (PER_PHASE + 2) : COUNT;
    for (let i = 0; i < total; i++) {
      const target = POSTCOPY ? { side: 'source' as const, phase: 'postcopy' } : AIM ? TARGETS[i % TARGETS.length] : undefined;
      const k = Math.floor(i / TARGETS.length);
      const fault: Fault = POSTCOPY
        ? (ONLY ?? PC_FAULTS[i % PC_FAULTS.length])
        : AIM && k >= PER_PHASE
          ? k === PER_PHASE
            ? 'freeze-src-ferryd'
            : 'freeze-dst-ferryd'
          : FAULTS[Math.floor(rand() * FAULTS.length)];
      // Post-copy rounds: how long the link stays cut.
      const delayMs = POSTCOPY ? 1000 + Math.floor(rand() * 5000) : AIM ? 0 : Math.floor(rand() * 3000);
      const from = record('host1')?.state?.pid && alive(record('host1').state.pid) ? 'host1' : 'host2';
      const to = from === 'host1' ? 'host2' : 'host1';
      const problems: string[] = [];
      const since = Date.now();
      // The source's switchover lasts a millisecond or two unless the memory check runs in it.
      const check = target?.side === 'source' && target.phase === 'switchover' ? ['--verify-memory'] : [];
      const pc = POSTCOPY ? ['--strategy', 'postcopy', '--bandwidth', '12'] : ['--bandwidth', '24'];
      const copy = MOVE === 'copy' ? ['--copy-storage', '--delete-source-storage'] : [];
      const mig = ferry(
        ['-H', from, 'migrate', DOM, to, '--live', ...pc, ...copy, '--max-downtime', '3000', '--timeout', '30', ...check, '--json'],
        150000,
      );
      let aim: Round['aim'];
      if (target) {
        const hit = await reached(target.side === 'source' ? from : to, target.side, target.phase, since);
        aim = {
          ...target,
          hit,
          srcPhase: roundJob(from, 'source', since)?.phase ?? 'none',
          dstPhase: roundJob(to, 'destination', since)?.phase ?? 'none',
        };
      } else {
        await sleep(delayMs);
      }
      const phase = latestSourcePhase(from, since);
      const s = labState();
      const hostOf = (h: string): any => s.hosts.find((x: any) => x.name === h);
      const undo: (() => void)[] = [];
      // Killing the QEMU that runs the domain (the source's, or the destination's once it
      // has taken over) crashes the domain: then "crashed there, nowhere else" is right.
      let killedLiveCopyOn: string | undefined;
      const killQemu = (h: string): void => {
        const rec = record(h);
        const p = rec?.state?.pid;
        if (!p) return;
        // An incoming QEMU past the destination's point of no return holds the only copy
        // that may run (the source never resumes from there): killing it is a crash too.
        const dj = roundJob(h, 'destination', since);
        const pastNoReturn = rec.state.kind === 'incoming' && (dj?.phase === 'finishing' || dj?.phase === 'finished');
        if (rec.state.kind === 'running' || rec.state.kind === 'paused' || rec.state.kind === 'migrating-out' || pastNoReturn)
          killedLiveCopyOn = h;
        try {
          process.kill(p, 'SIGKILL');
        } catch {
          /* gone */
        }
      };
      switch (fault) {
        case 'kill-src-qemu':
          killQemu(from);
          break;
        case 'kill-dst-qemu': {
          for (let k = 0; k < 20 && !record(to)?.state?.pid; k++) await sleep(100);
          killQemu(to);
          break;
        }
        case 'kill-src-ferryd':
          try {
            process.kill(hostOf(from).pid, 'SIGKILL');
          } catch {
            /* gone */
          }
          break;
        case 'kill-dst-ferryd':
          try {
            process.kill(hostOf(to).pid, 'SIGKILL');
          } catch {
            /* gone */
          }
          break;
        case 'link-cut':
          cutLinks(to, undo);
          break;
        case 'packet-loss': {
          sh('ip', [
            'netns',
            'exec',
            `ferry-${to}`,
            'iptables',
            '-I',
            'INPUT',
            '-m',
            'statistic',
            '--mode',
            'random',
            '--probability',
            '0.2',
            '-j',
            'DROP',
          ]);
          undo.push(() =>
            sh('ip', [
              'netns',
              'exec',
              `ferry-${to}`,
              'iptables',
              '-D',
              'INPUT',
              '-m',
              'statistic',
              '--mode',
              'random',
              '--probability',
              '0.2',
              '-j',
              'DROP',
            ]),
          );
          break;
        }
        case 'disk-full': {
          // Fill the destination's state tmpfs to the last byte; ferryd's writes fail with ENOSPC.
          const dir = labState().hosts.find((x: any) => x.name === to).stateDir;
          const free = Number(sh('df', ['--output=avail', '-B1', dir]).split('\n')[1]);
          const fill = path.join(dir, 'fault-fill');
          sh('fallocate', ['-l', String(Math.max(free, 4096)), fill]);
          sh('dd', ['if=/dev/zero', `of=${fill}`, 'bs=64k', 'oflag=append', 'conv=notrunc', 'status=none']);
          undo.push(() => fs.rmSync(fill, { force: true }));
          break;
        }
        case 'freeze-src-ferryd':
        case 'freeze-dst-ferryd': {
          // Frozen, not killed: timers and connections resume where they were.
          const pid = hostOf(fault === 'freeze-src-ferryd' ? from : to).pid;
          try {
            process.kill(pid, 'SIGSTOP');
          } catch {
            /* gone */
          }
          await sleep(FREEZE_S * 1000);
          try {
            process.kill(pid, 'SIGCONT');
          } catch {
            /* gone */
          }
          break;
        }
        case 'pc-link-reset': {
          // The destination resets every data connection from the source: the stream breaks at its next packet.
          const rule = [
            'INPUT',
            '-p',
            'tcp',
            '-s',
            hostOf(from).migAddress,
            '--dport',
            '49152:49215',
            '-j',
            'REJECT',
            '--reject-with',
            'tcp-reset',
          ];
          sh('ip', ['netns', 'exec', `ferry-${to}`, 'iptables', '-I', ...rule]);
          undo.push(() => sh('ip', ['netns', 'exec', `ferry-${to}`, 'iptables', '-D', ...rule]));
          break;
        }
        case 'pc-link-down':
          cutLinks(to, undo);
          break;
        case 'pc-kill-src-ferryd':
          try {
            process.kill(hostOf(from).pid, 'SIGKILL');
          } catch {
            /* gone */
          }
          break;
        case 'pc-kill-dst-ferryd':
          try {
            process.kill(hostOf(to).pid, 'SIGKILL');
          } catch {
            /* gone */
          }
          break;
        case 'slow-link': {
          sh('ip', [
            'netns',
            'exec',
            `ferry-${to}`,
            'tc',
            'qdisc',
            'add',
            'dev',
            'mig0',
            'root',
            'tbf',
            'rate',
            '4mbit',
            'burst',
            '32kbit',
            'latency',
            '400ms',
          ]);
          undo.push(() => sh('ip', ['netns', 'exec', `ferry-${to}`, 'tc', 'qdisc', 'del', 'dev', 'mig0', 'root']));
          break;
        }
      }
      if (undo.length) {
        await sleep(POSTCOPY ? delayMs : 4000);
        for (const u of undo) u();
      }
      await sleep(1000);
      await restartIfDown();
      const r = await mig;
      const outcome = r.json?.outcome ?? (r.code === 0 ? 'succeeded' : `exit ${r.code}`);
      const code: string | undefined = r.json?.error?.code;
      const repairedBytes: number | undefined = r.json?.memoryCheck?.repairedBytes;
      // settle: no unfinished job on either host
      for (let w = 0; w < 120 && activeJobs() > 0; w++) await sleep(500);
      if (activeJobs() > 0) problems.push('a job never settled');
      // invariants
      const recs = { host1: record('host1'), host2: record('host2') };
      const defs = Object.entries(recs)
        .filter(([, v]) => v)
        .map(([h]) => h);
      if (defs.length !== 1) problems.push(`definitions on ${defs.length} hosts (${defs.join(',')})`);
      if (MOVE === 'copy' && defs.length === 1) {
        const other = defs[0] === 'host1' ? 'host2' : 'host1';
        if (disksOn(other).length)
          problems.push(
            `disk files left on ${other}: ${disksOn(other)
              .map((f) => path.basename(f))
              .join(',')}`,
          );
        const mine = disksOn(defs[0]);
        if (mine.length !== 1) problems.push(`${mine.length} disk files on ${defs[0]}, which holds the domain (want 1)`);
        else if (!sameDisk(mine[0])) problems.push(`the data disk on ${defs[0]} differs from what was written`);
      }
      const running = Object.entries(recs)
        .filter(([, v]) => v && ['running', 'paused'].includes(v.state.kind) && alive(v.state.pid))
        .map(([h]) => h);
      const crashed = Object.entries(recs)
        .filter(([, v]) => v && v.state.kind === 'crashed')
        .map(([h]) => h);
      if (MOVE === 'tunnel') {
        // host1 is the NIC's home: a domain running there needs no tunnel, one running on
        // host2 one each side; one crashed or shut off has none (ferry drops it at the end).
        const away = running.length === 1 && running[0] === 'host2';
        for (const h of ['host1', 'host2']) {
          const devs = tunnelDevs(h);
          const want = away ? (h === 'host1' ? 1 : 2) : 0;
          if (devs.length !== want) problems.push(`tunnel devices on ${h}: ${devs.join(',') || 'none'} (want ${want})`);
        }
      }
      // The destination may pass its point of no return between the look before the
      // SIGKILL and the signal itself: a job that reached finishing had a live QEMU then
      // (Finish checks it is loaded first), so the QEMU killed held the only copy.
      if (fault === 'kill-dst-qemu' && !killedLiveCopyOn) {
        const dj = roundJob(to, 'destination', since);
        if (dj?.history?.some((x: { phase: string }) => x.phase === 'finishing')) killedLiveCopyOn = to;
      }
      const q = qemusOf(uuid);
      // Lost in post-copy (see Round.guestLost): crashed on the destination alone, said so.
      const guestLost = code === 'MIGRATION_POSTCOPY_LOST' && running.length === 0 && crashed.length === 1 && crashed[0] === to;
      if (running.length === 1) {
        if (q.length !== 1) problems.push(`${q.length} QEMU processes for one running copy`);
        const v = await ferry(['lab', 'verify', DOM, '--json'], 60000);
        if (v.json?.ok !== true) problems.push(`memory: ${v.json?.error?.message ?? v.stdout}`);
      } else if (killedLiveCopyOn && running.length === 0 && crashed.length === 1 && crashed[0] === killedLiveCopyOn) {
        if (q.length !== 0) problems.push(`${q.length} orphan QEMU processes`);
      } else if (guestLost) {
        if (q.length !== 0) problems.push(`${q.length} QEMU processes left for a guest lost in post-copy`);
      } else {
        problems.push(`running copies: ${running.length} (${running.join(',')}), crashed: ${crashed.join(',') || 'none'}`);
      }
      for (const h of ['host1', 'host2']) {
        const info = await ferry(['-H', h, 'host', 'info', '--json']);
        if (info.json?.memory?.reservedMiB) problems.push(`reservation left on ${h}`);
        const taps = devices(h).filter((d) => d.startsWith('ft'));
        // The tunnel campaign's guest has a NIC: its tap belongs where it runs.
        const wantTaps = MOVE === 'tunnel' && running.length === 1 && running[0] === h ? 1 : 0;
        if (taps.length !== wantTaps) problems.push(`taps on ${h}: ${taps.length} (want ${wantTaps})`);
        const listeners = sh('ip', ['netns', 'exec', `ferry-${h}`, 'ss', '-Hltn'])
          .split('\n')
          .map((l) => Number(/:(\d+)\s/.exec(l)?.[1]))
          .filter((p) => p >= 49152 && p <= 49215);
        if (listeners.length) problems.push(`migration listeners left on ${h}: ${listeners.join(',')}`);
      }
      const survived = problems.length === 0;
      rounds.push({
        index: i,
        fault,
        delayMs,
        from,
        phase,
        outcome,
        code,
        survived,
        problems,
        ...(r.json?.strategy ? { strategy: r.json.strategy } : {}),
        ...(guestLost ? { guestLost } : {}),
        ...(repairedBytes !== undefined ? { repairedBytes } : {}),
        ...(aim ? { aim } : {}),
      });
      const where = aim
        ? `${aim.side} ${aim.phase}${aim.hit ? '' : ` (missed: ${aim.srcPhase}/${aim.dstPhase})`}`
        : `${delayMs} ms (${phase})`;
      process.stderr.write(
        `  [${i + 1}/${total}] ${fault.padEnd(17)} at ${where.padEnd(40)} → ${(code ?? outcome).padEnd(26)} ${survived ? (guestLost ? 'ok (guest lost: crashed on the destination)' : 'ok') : `FAILED: ${problems.join('; ')}`}\n`,
      );
      // bring the domain back for the next round if the fault crashed it
      if (crashed.length === 1 && running.length === 0) {
        await ferry(['-H', crashed[0], 'destroy', DOM]);
        await ferry(['-H', crashed[0], 'start', DOM]);
        await sleep(1500);
      }
      // The pattern guest answers no ARP, so ferry cannot see that host1's segment is its
      // NIC's home and refuses the move back (MIGRATION_DEST_L2): each tunnel round starts
      // from host1 again, with the domain removed from host2 (which drops its tunnel).
      if (MOVE === 'tunnel' && record('host2')) {
        await ferry(['-H', 'host2', 'destroy', DOM]);
        await ferry(['-H', 'host2', 'delete', DOM]);
        const left = [...tunnelDevs('host1'), ...tunnelDevs('host2')];
        if (left.length) process.stderr.write(`  tunnel devices left after the domain was deleted: ${left.join(',')}\n`);
        await ferry(['-H', 'host1', 'create', f]);
        await sleep(1500);
      }
      // A refused copy leaves the source QEMU with a TLB big enough to repeat the
      // refusal every round (README "Memory check"); an offline move starts a fresh one.
      if (code === 'MIGRATION_MEMORY_MISMATCH' && running.length === 1) {
        await ferry(['-H', running[0], 'migrate', DOM, running[0] === 'host1' ? 'host2' : 'host1']);
      }
      if (!survived) break;
    }
  } finally {
    // A failed round's daemon logs outlive the lab: they are what explains it.
    if (rounds.some((r) => !r.survived)) keepLogs();
    await ferry(['lab', 'down']);
    fs.rmSync(DISK_REF, { force: true });
  }
  // The commit the campaign ran on, so a result names its code.
  const commit = campaignCommit(ROOT);
  // links: what link-cut and pc-link-down take down (older files: the first guest segment only).
  const out = {
    seed: SEED,
    count: rounds.length,
    aimed: AIM,
    move: MOVE,
    links: 'all',
    date: new Date().toISOString(),
    commit,
    engine,
    rounds,
  };
  if (REPORT) {
    fs.writeFileSync(
      path.join(
        ROOT,
        'reliability',
        POSTCOPY
          ? `faults-postcopy-${SEED}.json`
          : AIM
            ? `faults-aimed-${SEED}.json`
            : `faults-${MOVE === 'live' ? '' : `${MOVE}-`}${SEED}.json`,
      ),
      JSON.stringify(out, null, 2) + '\n',
    );
    writeReport();
  }
  const failed = rounds.filter((r) => !r.survived);
  const lost = rounds.filter((r) => r.guestLost).length;
  process.stderr.write(
    `${rounds.length} faults injected, ${rounds.length - failed.length} survived${lost ? ` (in ${lost} the guest was lost in post-copy: crashed on the destination)` : ''}, ${failed.length} failed\n`,
  );
  process.stdout.write(
    JSON.stringify({
      seed: SEED,
      injected: rounds.length,
      survived: rounds.length - failed.length,
      guestLost: lost,
      failed: failed.map((r) => ({ index: r.index, fault: r.fault, problems: r.problems })),
      faults: rounds.map((r) => r.fault),
      outcomes: rounds.map((r) => r.code ?? r.outcome),
    }) + '\n',
  );
  if (failed.length || rounds.length < (POSTCOPY ? POSTCOPY : AIM ? TARGETS.length * (PER_PHASE + 2) : COUNT)) process.exitCode = 1;
}

/** RELIABILITY.md's fault section, from every reliability/faults-*.json on disk. */
function writeReport(): void {
  const files = fs.readdirSync(path.join(ROOT, 'reliability')).filter((f) => /^faults-((tunnel|copy)-)?\d+\.json$/.test(f));
  // Campaign files from before the engine change carry no engine: they ran QEMU 7.2.
  type Campaign = {
    file: string;
    seed: number;
    move: string;
    engine: string;
    commit: string | null;
    links: boolean;
    date: string;
    rounds: Round[];
  };
  const campaigns: Campaign[] = files
    .map((file) => {
      const j = JSON.parse(fs.readFileSync(path.join(ROOT, 'reliability', file), 'utf8'));
      return {
        file,
        seed: j.seed,
        move: j.move ?? 'live',
        engine: j.engine ?? '7.2',
        commit: j.commit ?? null,
        links: j.links === 'all',
        date: j.date,
        rounds: j.rounds,
      };
    })
    .sort((a, b) => a.date.localeCompare(b.date));
  const all: (Round & { seed: number; move: string })[] = campaigns.flatMap((c) =>
    c.rounds.map((r) => ({ ...r, seed: c.seed, move: c.move })),
  );
  const by = (k: (r: Round) => string): Map<string, { n: number; ok: number }> => {
    const m = new Map<string, { n: number; ok: number }>();
    for (const r of all) {
      const e = m.get(k(r)) ?? { n: 0, ok: 0 };
      e.n++;
      if (r.survived) e.ok++;
      m.set(k(r), e);
    }
    return m;
  };
  const moves = [...new Set(campaigns.map((c) => c.move))];
  const cell = (rs: Round[]): string => (rs.length ? `${rs.filter((r) => r.survived).length}/${rs.length}` : '-');
  const MOVE_TEXT: Record<string, string> = {
    live: 'live, autopilot, one segment, shared disk',
    tunnel: 'live, autopilot, across segments (VXLAN)',
    copy: 'live, autopilot, disk copied (`--copy-storage`)',
  };
  const L = [
    '## Fault injection',
    '',
    `Written by \`npm run faults\` (reliability/faults.ts) from ${files.length} campaign file(s): **${all.length} faults injected, ${all.filter((r) => r.survived).length} survived** (every invariant held), ${all.filter((r) => !r.survived).length} failed. Domains lost: ${all.filter((r) => r.problems.some((p) => p.startsWith('running copies: 0'))).length}; run twice: ${all.filter((r) => r.problems.some((p) => /running copies: [2-9]/.test(p))).length}; memory mismatches: ${all.filter((r) => r.problems.some((p) => p.startsWith('memory'))).length}. Every move is \`ferry migrate --live\` with the autopilot choosing its strategy; \`--move tunnel\` and \`--move copy\` campaigns add their own invariants (no tunnel device but where the domain is away from its segment; the data disk on exactly the host holding the domain, its bytes unchanged).`,
    '',
    '| campaign file | moves | commit | engine (QEMU) | injected | survived |',
    '|---|---|---|---|---|---|',
    ...campaigns.map(
      (c) =>
        `| ${c.file} | ${MOVE_TEXT[c.move] ?? c.move} | ${c.commit ? c.commit.slice(0, 12) + (c.commit.endsWith('+changes') ? '+changes' : '') : 'not recorded'}${c.links ? '' : ' †'} | ${c.engine} | ${c.rounds.length} | ${c.rounds.filter((r) => r.survived).length} |`,
    ),
    '',
    '† Campaigns whose file has no `links: "all"`: their `link-cut` took down only the destination\'s first guest-segment link, not its migration network (a defect of the campaign, found 2026-12-05), so those rounds cut the guest\'s network but not the move. Files without a commit ran on code older than 2026-12-04.',
    '',
    `| fault (survived/injected) | ${moves.join(' | ')} |`,
    `|---|${moves.map(() => '---').join('|')}|`,
    ...[...new Set(all.map((r) => r.fault))].map(
      (f) => `| ${f} | ${moves.map((m) => cell(all.filter((r) => r.fault === f && r.move === m))).join(' | ')} |`,
    ),
    '',
    '| source phase at injection | injected | survived |',
    '|---|---|---|',
    ...[...by((r) => r.phase)].map(([k, v]) => `| ${k} | ${v.n} | ${v.ok} |`),
    '',
    'What the migration itself answered (a fault may or may not stop it; either way the invariants must hold):',
    '',
    '| migration outcome | rounds |',
    '|---|---|',
    ...[...by((r) => r.code ?? r.outcome)].map(([k, v]) => `| ${k} | ${v.n} |`),
    '',
  ];
  const aimedFiles = fs.readdirSync(path.join(ROOT, 'reliability')).filter((f) => /^faults-aimed-\d+\.json$/.test(f));
  const aimed: (Round & { seed: number })[] = aimedFiles.flatMap((f) => {
    const j = JSON.parse(fs.readFileSync(path.join(ROOT, 'reliability', f), 'utf8'));
    return j.rounds.map((r: Round) => ({ ...r, seed: j.seed }));
  });
  if (aimed.length) {
    const rows = TARGETS.map((t) => {
      const rs = aimed.filter((r) => r.aim?.side === t.side && r.aim?.phase === t.phase);
      const frozen = rs.filter((r) => r.fault.startsWith('freeze'));
      return `| ${t.side} | ${t.phase} | ${rs.length} | ${rs.filter((r) => r.aim?.hit).length} | ${frozen.length} | ${rs.filter((r) => r.survived).length} |`;
    });
    L.push(
      '### Aimed by phase',
      '',
      `\`npm run faults -- --aim --per-phase N\` (${aimedFiles.join(', ')}): each fault lands the moment the chosen side's job reaches the phase; *hit* counts the rounds where the record showed exactly that phase at injection (a phase of a few milliseconds can pass between two looks: those rounds still count, with the phase actually seen recorded in the file). Each phase also gets a freeze of each daemon (SIGSTOP for ${FREEZE_S} s, then SIGCONT, no restart). **${aimed.length} faults, ${aimed.filter((r) => r.survived).length} survived.**`,
      '',
      '| side | phase | injected | hit | of them freezes | survived |',
      '|---|---|---|---|---|---|',
      ...rows,
      '',
    );
  }
  const pcFiles = fs.readdirSync(path.join(ROOT, 'reliability')).filter((f) => /^faults-postcopy-\d+\.json$/.test(f));
  const pcJson = pcFiles.map((f) => ({ f, j: JSON.parse(fs.readFileSync(path.join(ROOT, 'reliability', f), 'utf8')) }));
  const pcRounds: Round[] = pcJson.flatMap(({ j }) => j.rounds as Round[]);
  const pcOld = pcJson.filter(({ j }) => j.links !== 'all').map(({ f }) => f);
  if (pcRounds.length) {
    L.push(
      '### Post-copy',
      '',
      `\`npm run faults -- --postcopy N\` (${pcJson.map(({ f, j }) => `${f}, commit ${j.commit ? String(j.commit).slice(0, 12) : 'not recorded'}`).join('; ')}): each round moves the guest with \`--strategy postcopy\` and, the moment the source's job is in its post-copy phase (the guest runs on the destination, pages still on the source), resets the data connections or takes the destination's links down for 1–6 s, or kills a ferryd. **${pcRounds.length} faults, ${pcRounds.filter((r) => r.survived).length} survived**; the memory checker ran on the running copy after every round that left one.${pcRounds.some((r) => r.guestLost) ? ` **In ${pcRounds.filter((r) => r.guestLost).length} of them the guest was lost**: the reset came as the stream completed, the source's QEMU failed the stream instead of pausing it (QEMU 10.0 fails a post-copy whose return path breaks at completion, and cannot resume a failed one), and the destination lacked pages; ferry answered \`MIGRATION_POSTCOPY_LOST\`, crashed the guest on the destination and left nothing else behind (README "Post-copy, safely"). They count as survived because ferry's invariants held (one definition, nothing running twice, nothing left over, a clear answer), but the guest did not survive them: they are counted apart here, not hidden.` : ''}${pcOld.length ? ` In ${pcOld.join(', ')}, \`pc-link-down\` took down only the destination's guest-segment link, not its migration network (†, above).` : ''}`,
      '',
      '| fault | injected | hit the post-copy phase | survived | of them, guest lost | outcomes |',
      '|---|---|---|---|---|---|',
      ...PC_FAULTS.map((f) => {
        const rs = pcRounds.filter((r) => r.fault === f);
        const oc = new Map<string, number>();
        for (const r of rs) oc.set(r.code ?? r.outcome, (oc.get(r.code ?? r.outcome) ?? 0) + 1);
        return `| ${f} | ${rs.length} | ${rs.filter((r) => r.aim?.hit).length} | ${rs.filter((r) => r.survived).length} | ${rs.filter((r) => r.guestLost).length} | ${[...oc].map(([k, v]) => `${k} ${v}`).join(', ')} |`;
      }),
      '',
    );
    const pcFailed = pcJson.flatMap(({ f, j }) => (j.rounds as Round[]).filter((r) => !r.survived).map((r) => ({ f, r })));
    if (pcFailed.length)
      L.push(
        'Post-copy failures (replay with `npm run faults -- --postcopy INDEX+1 --seed S`):',
        '',
        ...pcFailed.map(
          ({ f, r }) =>
            `- ${f}, round ${r.index}: ${r.fault} (source ${r.aim?.srcPhase}, destination ${r.aim?.dstPhase}) → ${r.code ?? r.outcome}: ${r.problems.join('; ')}`,
        ),
        '',
      );
  }
  const checked = all.filter((r) => r.repairedBytes !== undefined);
  if (checked.length) {
    const fixed = checked.filter((r) => r.repairedBytes! > 0);
    L.push(
      `Memory check with repair (README "Memory check"; campaigns before it refused instead): ${checked.length} completed copies checked, ${fixed.length} of them had RAM that arrived different and was rewritten from the source before the guest ran (${(fixed.reduce((a, r) => a + r.repairedBytes!, 0) / 1048576).toFixed(1)} MiB in all).`,
      '',
    );
  }
  const failed = all.filter((r) => !r.survived);
  if (failed.length)
    L.push(
      'Failures (replay with `npm run faults -- --seed S --count INDEX+1`):',
      '',
      ...failed.map((r) => `- seed ${r.seed}, round ${r.index}: ${r.fault} at ${r.delayMs} ms (${r.phase}): ${r.problems.join('; ')}`),
      '',
    );
  const md = L.join('\n');
  const relPath = path.join(ROOT, 'RELIABILITY.md');
  let rel = fs.existsSync(relPath) ? fs.readFileSync(relPath, 'utf8') : '# Reliability\n\n';
  rel = rel.includes('## Fault injection')
    ? rel.replace(/## Fault injection[\s\S]*?(?=\n## |$)/, md)
    : rel.replace('# Reliability\n\n', `# Reliability\n\n${md}\n`);
  fs.writeFileSync(relPath, rel);
}

main().catch(async (e) => {
  process.stderr.write(`faults: ${e instanceof Error ? e.stack : e}\n`);
  await ferry(['lab', 'down']);
  process.exit(1);
});
