/**
 * `npm run bench`: ferry against the engine baseline (the same migration driven
 * directly through QMP), side by side in one lab, interleaved, several times each.
 * Writes bench/results/<scenario>.json and the table in BENCHMARKS.md.
 *
 *   npm run bench [-- --reps N] [--only REGEX] [--smoke]
 *
 * --smoke runs one small scenario once and checks that the output is well formed (CI).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { QmpClient } from '../src/qmp/client.ts';
import { parseDomainConfig, type DomainConfig } from '../src/domain/config.ts';
import { domainArgv } from '../src/qemu/argv.ts';
import { createImage } from '../src/domain/storage.ts';
import { startQemuWith, killAndWait, connectUnix } from '../src/qemu/process.ts';
import { MigrationWatcher, FINAL_STATUSES } from '../src/qemu/migstatus.ts';
import { UNLIMITED_BANDWIDTH } from '../src/qemu/migration.ts';
import type { Report } from '../src/migration/jobs.ts';
import { tlsStreamBench, streamFacts, type StreamFacts } from './tls-stream.ts';
import { outcomeRows, spread, cell, pairedRatio, median } from './stats.ts';
import { ferry as runCli, ok as cliOk, CHURN_48MIB } from '../test/helpers.ts';
import { benchCommit } from './section.ts';

/** The qmp contender's migration port on the destination. */
const QMP_PORT = 49216;
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const LAB = '/var/lib/ferry-lab';
const args = process.argv.slice(2);
const opt = (k: string): string | undefined => {
  const i = args.indexOf(k);
  return i >= 0 ? args[i + 1] : undefined;
};
const SMOKE = args.includes('--smoke');
const REPS = Number(opt('--reps') ?? (SMOKE ? 1 : 7));
const ONLY = opt('--only');
const OUT = opt('--out') ?? path.join(ROOT, 'bench', 'results');
const tty = !!process.stderr.isTTY;
const say = (m: string): void => {
  process.stderr.write(`${tty ? '\x1b[1m' : ''}bench:${tty ? '\x1b[0m' : ''} ${m}\n`);
};

// ---------------------------------------------------------------- helpers

// The same CLI runner as the end-to-end tests; bench migrations may run for minutes.
const ferry = (a: string[], input?: string, timeoutMs = 600000): ReturnType<typeof runCli> => runCli(a, { input, timeoutMs });
const ferryOk = (a: string[], input?: string): Promise<any> => cliOk(a, { input, timeoutMs: 600000 });
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
async function waitFor(what: string, fn: () => boolean | Promise<boolean>, ms = 60000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await fn())) {
    if (Date.now() > end) throw new Error(`timed out: ${what}`);
    await sleep(100);
  }
}
const ns = (h: string): string => `ferry-${h}`;
function inNs(h: string, cmd: string[]): string {
  return execFileSync('ip', ['netns', 'exec', ns(h), ...cmd], { stdio: ['ignore', 'pipe', 'pipe'] }).toString();
}

/**
 * The guest-perceived downtime probe, the same for every contender: ferry's GuestProbe
 * in its own process in the lab's client namespace (a real client on the segment),
 * started before the command and stopped after it returned and the guest answered
 * from its new host (bench/probe-helper.ts).
 */
/** What the probe process found: the longest gap, how many SYNs it sent and got answered, over how long, and whether the guest answered after the command returned. */
interface ProbeResult {
  longestGapMs: number | null;
  replies: number;
  sent: number;
  durationMs: number;
  answeredAfter: boolean;
}

function externalProbe(ip: string): { ready: Promise<void>; stop: () => Promise<ProbeResult | null> } {
  const c = spawn(
    'ip',
    ['netns', 'exec', 'ferry-client', process.execPath, '--import', 'tsx', path.join(ROOT, 'bench', 'probe-helper.ts'), ip],
    { cwd: ROOT, stdio: ['pipe', 'pipe', 'ignore'] },
  );
  let out = '';
  const ready = new Promise<void>((r) =>
    c.stdout.on('data', (d) => {
      out += d;
      if (out.includes('probing')) r();
    }),
  );
  return {
    ready,
    stop: () =>
      new Promise((resolve) => {
        c.on('close', () => {
          const l = out.trim().split('\n').pop();
          try {
            resolve(JSON.parse(l!) as ProbeResult);
          } catch {
            resolve(null);
          }
        });
        c.stdin.end();
      }),
  };
}

// ---------------------------------------------------------------- contenders

interface Opts {
  live: boolean;
  bandwidthMiBs?: number;
  maxDowntimeMs: number;
  timeoutS: number;
  insecure?: boolean;
  parallel?: number;
  verify?: boolean;
  tls?: boolean;
  postcopy?: boolean;
  copyStorage?: boolean;
  /** ferry: leave ferryd's own guest probe on (the others run with --no-probe). */
  ferryProbe?: boolean;
  /** multifd compression (ferry --compress; virsh --compressed --comp-methods); auto: ferry's own choice; none: ferry told not to. */
  compress?: 'zstd' | 'auto' | 'none';
}
/** One run, timed by the bench from the command's start to its return (domain running on the destination, source clean). */
interface Run {
  contender: string;
  outcome: string;
  totalMs: number | null;
  setupMs: number | null;
  downtimeMs: number | null;
  pauseMs?: number | null;
  guestDowntimeMs: number | null;
  /** ferry-probed: ferryd's own guest-perceived figure, beside the bench's probe of the same run. */
  reportedGuestDowntimeMs?: number | null;
  /** The bench's probe in this run: SYNs sent, answered, and their mean spacing (its resolution). */
  probe?: { sent: number; replies: number; spacingMs: number } | null;
  bytes: number | null;
  throughputMBps: number | null;
  passes: number | null;
  note?: string;
  memoryCheck?: Report['memoryCheck'];
  timeline?: Record<string, number>;
  /** ferry: the strategy the move used, the plan's pick, and the plan's predicted total for that strategy against ferryd's own totalMs. */
  strategy?: string;
  pick?: string;
  predictedTotalMs?: number | null;
  reportTotalMs?: number | null;
}
/**
 * What a contender's migrate returns. endAt: when its command itself ended (`virsh
 * migrate` returned; the qmp script's source is gone): the clock stops there, and the
 * queries after it (domjobinfo, a pool refresh, the console re-attached) run off it.
 */
type Measured = Omit<Run, 'totalMs' | 'guestDowntimeMs'> & { endAt?: number };

interface Guest {
  name: string;
  ip?: string;
  host: string;
  pause(): Promise<void>;
  resume(): Promise<void>;
  send(cmd: string): Promise<void>;
  /** Where it goes from `host` (default: host1 ⇄ host2). */
  other?(host: string): string;
  /** Runs the contender's whole migration command; the bench times it. */
  migrate(to: string, o: Opts): Promise<Measured>;
  /** After a move: the guest runs where it went (its host's own word: ferry info, virsh domstate, query-status). */
  alive(): Promise<boolean>;
  destroy(): Promise<void>;
}

/**
 * What every contender's guest of a scenario is: the lab guest's kind and memory, the
 * extra `lab guest` arguments (a dense guest's --fill), and the console line that says
 * it is ready to be moved (a dense guest: its fill is complete).
 */
interface GuestSpec {
  kind: 'linux' | 'pattern';
  memoryMiB: number;
  extra: string[];
  ready: string;
}

/**
 * A guest run by ferry: created with `ferry create`, moved with `ferry migrate`.
 * `disk`: a qcow2 data disk of that many MiB, in the lab's shared pool or in host1's own
 * directory (moved with --copy-storage); `pair`: the two hosts it moves between.
 */
async function ferryGuest(
  spec: GuestSpec,
  name: string,
  o: { disk?: { mib: number; local: boolean }; pair?: [string, string] } = {},
): Promise<Guest> {
  const cfg = await ferryOk([
    'lab',
    'guest',
    spec.kind,
    name,
    '--memory',
    String(spec.memoryMiB),
    ...spec.extra,
    '--json',
    ...(o.disk ? ['--data-disk', String(o.disk.mib)] : []),
  ]);
  if (o.disk && !o.disk.local) {
    // On the shared pool instead: every host sees it at the same path.
    const shared = path.join(LAB, 'pool', path.basename(cfg.disks[0].path));
    fs.renameSync(cfg.disks[0].path, shared);
    cfg.disks[0].path = shared;
  }
  const pair = o.pair ?? ['host1', 'host2'];
  const f = path.join(os.tmpdir(), `bench-${name}.json`);
  fs.writeFileSync(f, JSON.stringify(cfg));
  await ferryOk(['-H', 'host1', 'create', f]);
  await waitFor(
    `${name} ready`,
    () => {
      try {
        return fs.readFileSync(`${LAB}/host1/state/run/${name}/console.log`, 'utf8').includes(spec.ready);
      } catch {
        return false;
      }
    },
    600000,
  ); // a dense guest fills GiBs under TCG first
  const g: Guest = {
    name,
    host: 'host1',
    ip: cfg.nics[0]?.ip?.split('/')[0],
    other: (h) => (h === pair[0] ? pair[1] : pair[0]),
    pause: async () => {
      await ferryOk(['-H', g.host, 'pause', name]);
    },
    resume: async () => {
      await ferryOk(['-H', g.host, 'unpause', name]);
    },
    send: async (cmd) => {
      await ferryOk(['-H', g.host, 'console', name, '--idle', '1500'], cmd + '\n');
    },
    migrate: async (to, o) => {
      // --no-probe: the bench's own probe measures every contender; a second one (ferryd's)
      // would double the SYNs that only ferry's guest has to answer.
      const a = [
        '-H',
        g.host,
        'migrate',
        name,
        to,
        '--json',
        ...(o.ferryProbe ? [] : ['--no-probe']),
        '--max-downtime',
        String(o.maxDowntimeMs),
        '--timeout',
        String(o.timeoutS),
      ];
      if (o.live) a.push('--live');
      if (o.bandwidthMiBs) a.push('--bandwidth', String(o.bandwidthMiBs));
      if (o.insecure) a.push('--insecure');
      if (o.parallel) a.push('--parallel', String(o.parallel));
      if (o.compress) a.push('--compress', o.compress);
      if (o.verify) a.push('--verify-memory');
      // The copy left behind goes each time, so the next move back finds the place free.
      if (o.copyStorage) a.push('--copy-storage', '--delete-source-storage');
      const r = await ferry(a);
      const endAt = Date.now();
      const rep = r.json ?? {};
      if (rep.outcome === 'succeeded') g.host = to;
      return {
        contender: '',
        endAt,
        outcome: rep.outcome ?? 'failed',
        setupMs: rep.setupMs ?? null,
        pauseMs: rep.pauseMs ?? null,
        downtimeMs: rep.downtimeMs ?? null,
        reportedGuestDowntimeMs: rep.guestDowntimeMs ?? null,
        bytes: rep.bytes ?? null,
        throughputMBps: rep.throughputMBps ?? null,
        passes: rep.passes ?? null,
        note:
          [
            rep.error?.code,
            ...(rep.policy ?? []).filter((x: string) => !x.startsWith('auto-converge on') && !x.startsWith('memory check requested')),
          ]
            .filter(Boolean)
            .join('; ') || undefined,
        memoryCheck: rep.memoryCheck ?? null,
        timeline: rep.timeline,
        strategy: rep.strategy,
        pick: rep.plan?.pick,
        reportTotalMs: rep.totalMs ?? null,
        predictedTotalMs:
          rep.plan?.predictions?.find((x: { strategy: string }) => x.strategy === (rep.strategy === 'suspend' ? 'precopy' : rep.strategy))
            ?.totalMs ?? null,
      };
    },
    alive: async () => (await ferry(['-H', g.host, 'info', name, '--json'])).json?.state === 'running',
    destroy: async () => {
      await ferry(['-H', g.host, 'destroy', name]);
      await ferry(['-H', g.host, 'delete', name]);
    },
  };
  return g;
}

/**
 * The engine baseline: the same guest, QEMU argv, machine type, TLS certificates,
 * bandwidth, downtime and auto-converge settings as ferry, driven directly through QMP
 * by this script (events, as ferry). No pre-flight, no persisted phases, no policy:
 * what QEMU alone does.
 */
async function qmpGuest(spec: GuestSpec, name: string, machine: string): Promise<Guest> {
  const raw = await ferryOk(['lab', 'guest', spec.kind, name, '--memory', String(spec.memoryMiB), ...spec.extra, '--json']);
  const c: DomainConfig = parseDomainConfig(raw);
  const dir = path.join(LAB, 'bench', name);
  fs.mkdirSync(dir, { recursive: true });
  // "bq": the bench's own taps, apart from ferryd's ("ft…") and its tunnels' ("fb…", "fx…").
  const tap = `bq${c.uuid.slice(0, 8)}`;
  let host = 'host1';
  let cur: { pid: number; qmp: QmpClient } | undefined;
  const start = async (h: string, incoming: boolean, prealloc = false): Promise<{ pid: number; qmp: QmpClient }> => {
    if (c.nics.length) {
      try {
        inNs(h, ['ip', 'link', 'del', tap]);
      } catch {
        /* none */
      }
      inNs(h, ['ip', 'tuntap', 'add', 'dev', tap, 'mode', 'tap']);
      inNs(h, ['ip', 'link', 'set', tap, 'master', 'br0', 'up']);
    }
    const rt = {
      accel: 'tcg' as const,
      cpuModel: 'qemu64',
      machine,
      qmpPath: path.join(dir, `${h}.qmp`),
      consolePath: path.join(dir, `${h}.con`),
      taps: [tap],
      incoming,
      preallocate: prealloc,
    };
    // QEMU runs inside the host's namespace through `ip netns exec` (which execs it).
    return startQemuWith('ip', ['netns', 'exec', ns(h), 'qemu-system-x86_64', ...domainArgv(c, rt)], {
      qmpPath: rt.qmpPath,
      logPath: path.join(dir, `${h}.log`),
      what: 'bench QEMU',
    });
  };
  cur = await start('host1', false);
  let conLog = '';
  const con = await connectUnix(path.join(dir, 'host1.con'), 5000);
  con.on('data', (d) => {
    conLog += d.toString('latin1');
  });
  let conSock = con;
  await cur.qmp.execute('cont');
  await waitFor(`${name} ready`, () => conLog.includes(spec.ready), 600000);
  const g: Guest = {
    name,
    ip: c.nics[0]?.ip?.split('/')[0],
    host,
    pause: async () => {
      await cur!.qmp.execute('stop');
    },
    resume: async () => {
      await cur!.qmp.execute('cont');
    },
    send: async (cmd) => {
      conSock.write(cmd + '\n');
      await sleep(1500);
    },
    migrate: async (to, o) => {
      const t0 = Date.now();
      const dst = await start(to, true, !o.live);
      // Every contender migrates over the lab's migration network, as ferry does.
      const toAddr = to === 'host1' ? '198.19.0.11' : '198.19.0.12';
      const fromName = host;
      const src = cur!;
      let outcome = 'failed';
      let m: any = {};
      let endAt: number | undefined;
      const sw = new MigrationWatcher(src.qmp);
      const dw = new MigrationWatcher(dst.qmp);
      try {
        for (const q of [src.qmp, dst.qmp])
          await q.execute('migrate-set-capabilities', {
            capabilities: [
              { capability: 'events', state: true },
              ...(q === src.qmp ? [{ capability: 'auto-converge', state: o.live }] : []),
            ],
          });
        if (!o.insecure) {
          await dst.qmp.execute('object-add', {
            'qom-type': 'tls-creds-x509',
            id: 'tls0',
            dir: `${LAB}/${to}/tls`,
            endpoint: 'server',
            'verify-peer': true,
          });
          await dst.qmp.execute('object-add', { 'qom-type': 'authz-simple', id: 'authz0', identity: `O=ferry,OU=host,CN=${fromName}` });
          await dst.qmp.execute('migrate-set-parameters', { 'tls-creds': 'tls0', 'tls-authz': 'authz0' });
          await src.qmp.execute('object-del', { id: 'tls0' }).catch(() => undefined);
          await src.qmp.execute('object-add', {
            'qom-type': 'tls-creds-x509',
            id: 'tls0',
            dir: `${LAB}/${fromName}/tls`,
            endpoint: 'client',
            'verify-peer': true,
          });
        }
        // Outside ferry's data ports (49152–49215): a ferry move's listener may still be closing.
        await dst.qmp.execute('migrate-incoming', { uri: `tcp:${toAddr}:${QMP_PORT}` });
        await src.qmp.execute('migrate-set-parameters', {
          'max-bandwidth': o.bandwidthMiBs ? o.bandwidthMiBs * 1048576 : UNLIMITED_BANDWIDTH,
          'downtime-limit': o.maxDowntimeMs,
          ...(o.insecure ? { 'tls-creds': '' } : { 'tls-creds': 'tls0', 'tls-hostname': to }),
        });
        if (!o.live) await src.qmp.execute('stop');
        await src.qmp.execute('migrate', { uri: `tcp:${toAddr}:${QMP_PORT}` });
        const watchdog = setTimeout(() => {
          src.qmp.execute('migrate_cancel').catch(() => undefined);
          outcome = 'not converged (watchdog)';
        }, o.timeoutS * 1000);
        const st = await sw.until(FINAL_STATUSES).finally(() => clearTimeout(watchdog));
        m = await src.qmp.execute('query-migrate');
        for (let i = 0; i < 20 && st === 'completed' && !(m['total-time'] > 0); i++) {
          await sleep(5);
          m = await src.qmp.execute('query-migrate');
        }
        if (st === 'completed') {
          await dw.until(FINAL_STATUSES, 60000);
          await dst.qmp.execute('cont');
          await dst.qmp.execute('announce-self', { initial: 50, max: 550, rounds: 5, step: 100 }).catch(() => undefined);
          outcome = 'succeeded';
        }
      } catch (e) {
        // A run that fails is a result (its row says so), not the end of the benchmark.
        m = { ...m, status: 'error', 'error-desc': (e as Error).message };
      } finally {
        sw.dispose();
        dw.dispose();
        if (outcome === 'succeeded') {
          await src.qmp.execute('quit').catch(() => undefined);
          await killAndWait(src.pid, 2000);
          try {
            inNs(fromName, ['ip', 'link', 'del', tap]);
          } catch {
            /* gone */
          }
          endAt = Date.now();
          cur = dst;
          host = to;
          g.host = to;
          conSock.destroy();
          conSock = await connectUnix(path.join(dir, `${to}.con`), 5000);
          conSock.on('data', () => undefined);
        } else {
          await dst.qmp.execute('quit').catch(() => undefined);
          await killAndWait(dst.pid, 2000);
          try {
            inNs(to, ['ip', 'link', 'del', tap]);
          } catch {
            /* gone */
          }
          if (o.live === false) await src.qmp.execute('cont').catch(() => undefined);
        }
      }
      const bytes = m.ram?.transferred ?? null;
      const active = sw.at.get('active');
      return {
        contender: '',
        ...(endAt ? { endAt } : {}),
        outcome,
        setupMs: active !== undefined ? Math.round(active - t0) : null,
        downtimeMs: m.downtime ?? null,
        bytes,
        throughputMBps: bytes && m['total-time'] ? +(bytes / 1e6 / (m['total-time'] / 1000)).toFixed(1) : null,
        passes: m.ram?.['dirty-sync-count'] ?? null,
        note:
          outcome === 'succeeded'
            ? undefined
            : `QEMU status ${m.status}${m['error-desc'] ? `: ${m['error-desc']}` : ''} after ${((Date.now() - t0) / 1000).toFixed(1)} s`,
      };
    },
    alive: async () => (await cur!.qmp.execute<{ status: string }>('query-status')).status === 'running',
    destroy: async () => {
      conSock.destroy();
      cur?.qmp.close();
      if (cur) await killAndWait(cur.pid, 0);
      try {
        inNs(host, ['ip', 'link', 'del', tap]);
      } catch {
        /* gone */
      }
    },
  };
  return g;
}

// ---------------------------------------------------------------- libvirt

const LV_ADDR: Record<string, string> = { host1: '198.19.0.11', host2: '198.19.0.12' };
const lvUri = (h: string): string => `qemu+tcp://${LV_ADDR[h]}/system`;
let libvirtUp = false;
/** The installed libvirtd's version: the table names it even when `--only` skips libvirt's scenarios. */
const libvirtVersion: string | null = (() => {
  try {
    return /(\d+\.\d+\.\d+)/.exec(execFileSync('libvirtd', ['--version']).toString())?.[1] ?? null;
  } catch {
    return null;
  }
})();

/** Installs libvirt (without starting any service) and runs one libvirtd per lab host. */
async function ensureLibvirt(): Promise<void> {
  if (libvirtUp) return;
  const have = (p: string): boolean => {
    try {
      execFileSync('dpkg', ['-s', p], { stdio: 'ignore' });
      return true;
    } catch {
      return false;
    }
  };
  const pkgs = ['libvirt-daemon-system', 'libvirt-daemon-driver-qemu', 'libvirt-clients'].filter((p) => !have(p));
  if (pkgs.length) {
    say(`installing ${pkgs.join(' ')} (services are not started)`);
    // policy-rc.d 101: Debian's maintainer scripts must not start libvirtd on the real host.
    const rc = '/usr/sbin/policy-rc.d';
    const hadRc = fs.existsSync(rc);
    if (!hadRc) fs.writeFileSync(rc, '#!/bin/sh\nexit 101\n', { mode: 0o755 });
    try {
      execFileSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...pkgs], {
        stdio: ['ignore', 'ignore', 'inherit'],
        env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
      });
    } finally {
      if (!hadRc) fs.rmSync(rc, { force: true });
    }
  }
  for (const d of ['/run/libvirt', '/var/lib/libvirt', '/var/log/libvirt', '/var/cache/libvirt']) fs.mkdirSync(d, { recursive: true });
  for (const [i, h] of ['host1', 'host2'].entries()) {
    const c = spawn(
      path.join(ROOT, 'bench', 'libvirt-host.sh'),
      [ns(h), LV_ADDR[h], `${LAB}/libvirt/${h}`, `00000000-0000-4000-8000-00000000000${i + 1}`, `${LAB}/${h}/tls`],
      { detached: true, stdio: 'ignore' },
    );
    c.unref();
  }
  for (const h of ['host1', 'host2'])
    await waitFor(
      `libvirtd on ${h}`,
      () => {
        try {
          inNs(h, ['virsh', '-c', lvUri(h), 'version']);
          return true;
        } catch {
          return false;
        }
      },
      30000,
    );
  // Each libvirtd's own /var/lib/libvirt/images (its private mount) as a pool, so that
  // `--copy-storage-all` can create the destination's disk as ferry's Begin does.
  for (const h of ['host1', 'host2']) {
    fs.mkdirSync(lvImages(h), { recursive: true });
    virsh(h, ['pool-create-as', 'images', 'dir', '--target', '/var/lib/libvirt/images']);
  }
  libvirtUp = true;
}

/** A libvirt host's /var/lib/libvirt/images, as this process sees it. */
const lvImages = (h: string): string => `${LAB}/libvirt/${h}/lib/images`;

function virsh(h: string, a: string[], timeoutMs = 600000): string {
  return execFileSync('ip', ['netns', 'exec', ns(h), 'virsh', '-c', lvUri(h), ...a], {
    stdio: ['ignore', 'pipe', 'pipe'],
    timeout: timeoutMs,
  }).toString();
}

/** libvirt's `virsh migrate --live` between two lab libvirtds, same guest and settings. */
async function libvirtGuest(spec: GuestSpec, name: string, machine: string, dataDiskMiB?: number): Promise<Guest> {
  await ensureLibvirt();
  // A data disk in host1's own images directory, for --copy-storage-all.
  const dataDisk = dataDiskMiB ? `${name}-data.qcow2` : undefined;
  if (dataDisk) createImage(path.join(lvImages('host1'), dataDisk), 'qcow2', dataDiskMiB! * 1048576);
  const raw = await ferryOk(['lab', 'guest', spec.kind, name, '--memory', String(spec.memoryMiB), ...spec.extra, '--json']);
  const c: DomainConfig = parseDomainConfig(raw);
  const esc = (x: string): string => x.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/'/g, '&apos;');
  const os =
    c.boot.kind === 'kernel'
      ? `<loader type='rom'>/usr/share/qemu/qboot.rom</loader><kernel>${esc(c.boot.kernel)}</kernel><initrd>${esc(c.boot.initrd ?? '')}</initrd><cmdline>${esc(c.boot.cmdline)}</cmdline>`
      : `<boot dev='fd'/>`;
  const disks =
    c.disks
      .map((d) =>
        d.bus === 'floppy'
          ? `<disk type='file' device='floppy'><driver name='qemu' type='raw'/><source file='${esc(d.path)}'/><target dev='fda' bus='fdc'/><readonly/></disk>`
          : `<disk type='file' device='disk'><driver name='qemu' type='${d.format}'/><source file='${esc(d.path)}'/><target dev='vda' bus='virtio'/>${d.readOnly ? '<readonly/>' : ''}</disk>`,
      )
      .join('') +
    (dataDisk
      ? `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/libvirt/images/${dataDisk}'/><target dev='vda' bus='virtio'/></disk>`
      : '');
  const nics = c.nics
    .map((n) => `<interface type='bridge'><source bridge='br0'/><mac address='${n.mac}'/><model type='virtio'/></interface>`)
    .join('');
  const xml = `<domain type='qemu'><name>${name}</name><uuid>${c.uuid}</uuid><memory unit='MiB'>${c.memoryMiB}</memory><vcpu>${c.vcpus}</vcpu>
<os><type arch='x86_64' machine='${machine}'>hvm</type>${os}</os>
<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model></cpu>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>${disks}${nics}
<serial type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/${name}.con'/></serial>
<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>`;
  const xf = path.join(os_tmp(), `${name}.xml`);
  fs.writeFileSync(xf, xml);
  virsh('host1', ['define', xf]);
  virsh('host1', ['start', name]);
  let host = 'host1';
  const conPath = (h: string): string => `${LAB}/libvirt/${h}/lib/qemu/${name}.con`;
  let conLog = '';
  const attachCon = async (h: string): Promise<import('node:net').Socket> => {
    await waitFor('libvirt console socket', () => fs.existsSync(conPath(h)), 10000);
    const s = await connectUnix(conPath(h), 5000);
    s.on('data', (d) => {
      conLog += d.toString('latin1');
    });
    return s;
  };
  let con = await attachCon('host1');
  await waitFor(`${name} ready`, () => conLog.includes(spec.ready), 600000);
  const g: Guest = {
    name,
    ip: c.nics[0]?.ip?.split('/')[0],
    host,
    pause: async () => {
      virsh(host, ['suspend', name]);
    },
    resume: async () => {
      virsh(host, ['resume', name]);
    },
    send: async (cmd) => {
      con.write(cmd + '\n');
      await sleep(1500);
    },
    migrate: async (to, o) => {
      const a = ['migrate', name, lvUri(to), '--unsafe', '--persistent', '--undefinesource'];
      // virsh allows --timeout (suspend to finish) only for live migrations.
      if (o.live) a.push('--live', '--timeout', String(o.timeoutS), '--auto-converge');
      // libvirt's post-copy: switch once the first pre-copy pass is sent.
      if (o.postcopy) a.push('--postcopy', '--postcopy-after-precopy');
      if (o.tls) a.push('--tls');
      // libvirt's best flags for a slow link: multifd channels, zstd on each.
      if (o.parallel) a.push('--parallel', '--parallel-connections', String(o.parallel));
      if (o.compress === 'zstd') a.push('--compressed', '--comp-methods', o.compress);
      // NBD + drive-mirror of every writable disk, over TLS with --tls.
      if (o.copyStorage) a.push('--copy-storage-all');
      if (o.bandwidthMiBs) a.push('--bandwidth', String(o.bandwidthMiBs));
      // libvirt's job-completed event, heard on the source: its figures where domjobinfo
      // on the destination has none afterwards (a post-copy move).
      const heard = jobCompleted(host, name, o.timeoutS + 120);
      const t0 = Date.now();
      let outcome = 'succeeded';
      let note: string | undefined;
      try {
        virsh(host, a, (o.timeoutS + 120) * 1000);
      } catch (e) {
        outcome = 'failed';
        note = String((e as { stderr?: Buffer }).stderr ?? e)
          .trim()
          .slice(0, 200);
      }
      const endAt = Date.now();
      const cmdMs = endAt - t0;
      let info = '';
      if (outcome === 'succeeded') {
        info = virsh(to, ['domjobinfo', name, '--completed']);
        // libvirt leaves the source's copy; ferry-copy deletes its own (--delete-source-storage).
        // Removed after the clock stopped, so that every move creates its destination disk.
        // The pool must learn it is gone, or libvirt would take its stale entry for the disk.
        if (dataDisk) {
          fs.rmSync(path.join(lvImages(host), dataDisk), { force: true });
          virsh(host, ['pool-refresh', 'images']);
        }
        con.destroy();
        host = to;
        g.host = to;
        con = await attachCon(to);
      }
      const num = (label: string): number | null => {
        const m = new RegExp(`${label}:\\s+([\\d.]+)\\s*(\\S+)?`).exec(info);
        if (!m) return null;
        const v = Number(m[1]);
        const u = m[2] ?? '';
        return u.startsWith('GiB') ? v * 2 ** 30 : u.startsWith('MiB') ? v * 2 ** 20 : u.startsWith('KiB') ? v * 1024 : v;
      };
      const ev = await heard.fields();
      const elapsed = num('Time elapsed') ?? ev.time_elapsed ?? null;
      // With the disk copied, RAM alone (as ferry-copy's row counts it), at libvirt's RAM rate.
      const bytes = o.copyStorage
        ? (num('Memory processed') ?? ev.memory_processed ?? null)
        : (num('Data processed') ?? num('Memory processed') ?? ev.data_processed ?? ev.memory_processed ?? null);
      const memRate = o.copyStorage ? num('Memory bandwidth') : null;
      if (/suspend/i.test(info) || (o.live && outcome === 'succeeded' && cmdMs > o.timeoutS * 1000))
        note = `--timeout ${o.timeoutS} s: libvirt suspended the guest to finish`;
      return {
        contender: '',
        endAt,
        outcome,
        setupMs: null,
        downtimeMs: num('Total downtime') ?? ev.downtime ?? null,
        bytes: bytes !== null ? Math.round(bytes) : null,
        throughputMBps: memRate ? +(memRate / 1e6).toFixed(1) : bytes && elapsed ? +(bytes / 1e6 / (elapsed / 1000)).toFixed(1) : null,
        passes: null,
        note:
          note ??
          (outcome === 'succeeded'
            ? `libvirt's own job time ${elapsed} ms; ${o.tls ? 'TLS (--tls)' : 'plain TCP'}${o.postcopy ? '; post-copy after the first pass' : ''}${o.copyStorage ? '; --copy-storage-all' : ''}`
            : undefined),
      };
    },
    alive: async () => virsh(host, ['domstate', name]).trim() === 'running',
    destroy: async () => {
      con.destroy();
      try {
        virsh(host, ['destroy', name]);
      } catch {
        /* not running */
      }
      try {
        virsh(host, ['undefine', name]);
      } catch {
        /* gone */
      }
    },
  };
  return g;
}

/**
 * `virsh event --event job-completed` for one domain on `h`, from now. `fields()`, called
 * once the migrate command returned, waits up to 5 s more for the event, then ends the
 * listener and resolves with the event's numeric fields (time_elapsed, downtime,
 * data_processed, memory_processed…), or {} when none came.
 */
function jobCompleted(h: string, name: string, timeoutS: number): { fields: () => Promise<Record<string, number>> } {
  const c = spawn(
    'ip',
    ['netns', 'exec', ns(h), 'virsh', '-c', lvUri(h), 'event', '--domain', name, '--event', 'job-completed', '--timeout', String(timeoutS)],
    {
      stdio: ['ignore', 'pipe', 'ignore'],
    },
  );
  let out = '';
  const closed = new Promise<void>((r) => c.on('close', () => r()));
  c.stdout.on('data', (d) => (out += d));
  return {
    fields: async () => {
      const t = setTimeout(() => c.kill(), 5000);
      // virsh prints the whole event at once; a moment for the rest of its lines, then stop listening.
      await Promise.race([
        closed,
        waitFor('job-completed', () => /job-completed/.test(out), 5000)
          .then(() => sleep(200))
          .catch(() => undefined),
      ]);
      clearTimeout(t);
      c.kill();
      await closed;
      const f: Record<string, number> = {};
      for (const m of out.matchAll(/^\t(\w+): (\d+)$/gm)) f[m[1]] = Number(m[2]);
      return f;
    },
  };
}

function os_tmp(): string {
  return os.tmpdir();
}

/**
 * A run counts as succeeded only when it is checked, not just reported: the guest runs
 * where it went, answered its probe after the command (guests with an address), and the
 * pause and bytes were recorded. Otherwise the outcome names what is missing.
 */
async function verified(g: Guest, m: Measured, p: ProbeResult | null): Promise<string> {
  const missing = [
    ...((await g.alive().catch(() => false)) ? [] : ['the guest running on the destination']),
    ...(g.ip && !p?.answeredAfter ? ['an answer from the guest after the move'] : []),
    ...(m.downtimeMs === null ? ['downtime'] : []),
    ...(m.bytes === null ? ['bytes sent'] : []),
  ];
  return missing.length ? `unverified (no ${missing.join(', no ')})` : 'succeeded';
}

// ---------------------------------------------------------------- scenarios

type Contender =
  | 'ferry'
  | 'ferry-probed'
  | 'ferry-verify'
  | 'ferry-plain'
  | 'ferry-par2'
  | 'ferry-zstd'
  | 'ferry-zstd-p2'
  | 'ferry-auto'
  | 'ferry-none'
  | 'qmp'
  | 'libvirt'
  | 'libvirt-tls'
  | 'libvirt-tls-postcopy'
  | 'ferry-tunnel'
  | 'ferry-copy'
  | 'libvirt-tls-copy'
  | 'libvirt-tls-best';
interface Scenario {
  id: string;
  title: string;
  kind: 'linux' | 'pattern';
  memoryMiB: number;
  workload?: string;
  opts: Opts;
  contenders: Contender[];
  reps?: number;
  /** A data disk for ferry's guests (MiB): on shared storage, or host1's own for ferry-copy. */
  diskMiB?: number;
  /** boundaries: a 3-host lab with 2 segments (host3 on the other): ferry-tunnel moves host1 ⇄ host3. link-1gbit, link-10gbit: 2 hosts, each migration link shaped to that rate both ways (lab up --link-rate). */
  lab?: 'boundaries' | keyof typeof LINK_RATES;
  /** A dense Linux guest: this much of its RAM filled (mixed), and a writer dirtying this many MiB/s apart. */
  fill?: { mib: number; dirtyMiBs: number; kind?: 'random' };
}

/** The contenders that compress, or are told not to (the others pass no --compress). */
const COMPRESS_OF: Partial<Record<Contender, Opts['compress']>> = {
  'ferry-zstd': 'zstd',
  'ferry-zstd-p2': 'zstd',
  'libvirt-tls-best': 'zstd',
  'ferry-auto': 'auto',
  'ferry-none': 'none',
};

/** The shaped labs' link rates (bits/s): the physical limit's denominator. */
const LINK_RATES = { 'link-1gbit': 1e9, 'link-10gbit': 10e9 } as const;
const linkLab = (l: string | undefined): l is keyof typeof LINK_RATES => !!l && l in LINK_RATES;

const LIVE: Contender[] = ['ferry', 'ferry-probed', 'ferry-verify', 'ferry-par2', 'qmp', 'libvirt', 'libvirt-tls'];
/** Guests that do not converge by pre-copy: ferry's autopilot against libvirt's two answers (suspend at --timeout, post-copy). */
const NONCONV: Contender[] = ['ferry', 'libvirt-tls', 'libvirt-tls-postcopy'];

const SCENARIOS: Scenario[] = SMOKE
  ? [
      {
        id: 'smoke-linux-128m-idle',
        title: 'Linux 128 MiB, idle, live (smoke)',
        kind: 'linux',
        memoryMiB: 128,
        opts: { live: true, maxDowntimeMs: 300, timeoutS: 120 },
        contenders: ['ferry', 'qmp'],
      },
    ]
  : [
      {
        id: 'linux-1g-idle',
        title: 'Linux 1 GiB, idle, live',
        kind: 'linux',
        memoryMiB: 1024,
        opts: { live: true, maxDowntimeMs: 300, timeoutS: 120 },
        contenders: LIVE,
      },
      {
        id: 'linux-1g-churn',
        title: 'Linux 1 GiB rewriting 48 MiB in a loop, live',
        kind: 'linux',
        memoryMiB: 1024,
        workload: CHURN_48MIB,
        opts: { live: true, maxDowntimeMs: 300, timeoutS: 120 },
        contenders: LIVE,
      },
      {
        id: 'pattern-1g-nonconv',
        title: 'pattern guest 1 GiB rewriting every page, live, budget 300 ms / 30 s',
        kind: 'pattern',
        memoryMiB: 1024,
        opts: { live: true, maxDowntimeMs: 300, timeoutS: 30 },
        contenders: NONCONV,
        reps: 3,
      },
      {
        id: 'linux-1g-churn-16mib',
        title: 'Linux 1 GiB rewriting 48 MiB, live over a 16 MiB/s link, budget 300 ms / 60 s',
        kind: 'linux',
        memoryMiB: 1024,
        workload: CHURN_48MIB,
        opts: { live: true, maxDowntimeMs: 300, timeoutS: 60, bandwidthMiBs: 16 },
        contenders: NONCONV,
        reps: 3,
      },
      {
        id: 'pattern-512m-offline',
        title: 'pattern guest 512 MiB (every page non-zero), offline: the stream',
        kind: 'pattern',
        memoryMiB: 512,
        opts: { live: false, maxDowntimeMs: 300, timeoutS: 120 },
        contenders: ['ferry', 'ferry-par2', 'ferry-plain', 'qmp'],
      },
      // Moves across boundaries (README "Moves across segments", "Local disks"): the same
      // guest on the same segment with a shared disk, to the other segment through a tunnel,
      // and with its disk copied along.
      {
        id: 'linux-1g-disk-boundaries',
        title: 'Linux 1 GiB with a 256 MiB disk (64 MiB written), idle, live: same segment and shared disk, across segments, disk copied',
        kind: 'linux',
        memoryMiB: 1024,
        diskMiB: 256,
        workload: 'dd if=/dev/urandom of=/dev/vda bs=1M count=64 conv=fsync 2>/dev/null',
        opts: { live: true, maxDowntimeMs: 300, timeoutS: 120 },
        contenders: ['ferry', 'ferry-tunnel', 'ferry-copy', 'libvirt-tls-copy'],
        lab: 'boundaries',
      },
      // A dense guest over a real link's rate: where compression and channels should pay.
      {
        id: 'dense-1g-1gbit',
        title: 'Linux 1 GiB, 768 MiB filled (mixed), dirtying 8 MiB/s, live over a 1 Gbit/s link',
        kind: 'linux',
        memoryMiB: 1024,
        fill: { mib: 768, dirtyMiBs: 8 },
        opts: { live: true, maxDowntimeMs: 300, timeoutS: 120 },
        contenders: ['ferry', 'ferry-zstd', 'ferry-auto', 'libvirt-tls', 'libvirt-tls-best'],
        reps: 5,
        lab: 'link-1gbit',
      },
      // The issue's target guest (README "Compression"): 4 GiB, 3 GiB of it filled, over a
      // 1 Gbit/s and a 10 Gbit/s link and the unshaped veth.
      ...(['link-1gbit', 'link-10gbit', undefined] as const).map((lab): Scenario => ({
        id: `dense-4g-${lab ? lab.slice('link-'.length) : 'unshaped'}`,
        title: `Linux 4 GiB, 3 GiB filled (mixed), dirtying 32 MiB/s, live over ${lab ? `a ${LINK_RATES[lab] / 1e9} Gbit/s link` : 'the unshaped lab link'}`,
        kind: 'linux',
        memoryMiB: 4096,
        fill: { mib: 3072, dirtyMiBs: 32 },
        opts: { live: true, maxDowntimeMs: 300, timeoutS: 300 },
        contenders: ['ferry', 'ferry-zstd', 'ferry-auto', 'libvirt-tls', 'libvirt-tls-best'],
        reps: 5,
        lab,
      })),
      // On the same guest, over 1 and 10 Gbit/s, two questions. channels: libvirt's best flags
      // are zstd over two channels; the same in ferry, beside one zstd channel, says whether the
      // second channel pays (10 Gbit/s: the CPU binds) and what it costs where the link binds.
      // default: since compression by default (plan.ts defaultCompression), ferry as it comes,
      // beside ferry told not to compress and libvirt's best flags.
      ...(
        [
          ['channels', 'zstd over one channel or two', ['ferry-zstd', 'ferry-zstd-p2', 'libvirt-tls-best'], [] as const],
          [
            'default',
            "ferry's default, which weighs compression, against --compress none",
            ['ferry', 'ferry-none', 'libvirt-tls-best'],
            [undefined] as const,
          ],
        ] as const
      ).flatMap(([tag, about, contenders, more]) =>
        (['link-1gbit', 'link-10gbit', ...more] as const).map((lab): Scenario => ({
          id: `dense-4g-${lab ? lab.slice('link-'.length) : 'unshaped'}-${tag}`,
          title: `Linux 4 GiB, 3 GiB filled (mixed), dirtying 32 MiB/s, live over ${lab ? `a ${LINK_RATES[lab] / 1e9} Gbit/s link` : 'the unshaped lab link'}: ${about}`,
          kind: 'linux',
          memoryMiB: 4096,
          fill: { mib: 3072, dirtyMiBs: 32 },
          opts: { live: true, maxDowntimeMs: 300, timeoutS: 300 },
          contenders: [...contenders],
          reps: 5,
          lab,
        })),
      ),
      // The same guest over the lab's unshaped veth: there the CPU, not the link, binds.
      {
        id: 'dense-1g-unshaped',
        title: 'Linux 1 GiB, 768 MiB filled (mixed), dirtying 8 MiB/s, live over the unshaped lab link',
        kind: 'linux',
        memoryMiB: 1024,
        fill: { mib: 768, dirtyMiBs: 8 },
        opts: { live: true, maxDowntimeMs: 300, timeoutS: 120 },
        contenders: ['ferry', 'ferry-zstd', 'ferry-auto', 'libvirt-tls', 'libvirt-tls-best'],
        reps: 5,
      },
      // Pages that do not compress: auto must not choose zstd for compression's sake (zstd still
      // won here, 0.56x, for multifd's own thread: BENCHMARKS.md).
      {
        id: 'dense-1g-random-unshaped',
        title: 'Linux 1 GiB, 768 MiB filled with random data, dirtying 8 MiB/s, live over the unshaped lab link',
        kind: 'linux',
        memoryMiB: 1024,
        fill: { mib: 768, dirtyMiBs: 8, kind: 'random' },
        opts: { live: true, maxDowntimeMs: 300, timeoutS: 120 },
        contenders: ['ferry', 'ferry-zstd', 'ferry-auto'],
        reps: 5,
      },
    ];

/**
 * One scenario's runs as the table shows them; commit: the code they ran on (result
 * files from before the bench recorded it have none, and were measured by its older
 * rules: virsh's follow-up queries inside its total, success as each contender reported it).
 */
interface ScenarioResult {
  scenario: Scenario;
  runs: Run[];
  summary: Record<string, any>;
  commit?: string;
}

// ---------------------------------------------------------------- statistics

const METRICS = ['totalMs', 'setupMs', 'downtimeMs', 'pauseMs', 'guestDowntimeMs', 'bytes', 'throughputMBps'] as const;
function summarize(runs: Run[]): Record<string, any> {
  const out: Record<string, any> = {};
  for (const c of [...new Set(runs.map((r) => r.contender))]) {
    const rs = runs.filter((r) => r.contender === c);
    const ok = rs.filter((r) => r.outcome === 'succeeded');
    out[c] = { runs: rs.length, succeeded: ok.length };
    for (const m of METRICS) {
      const xs = ok.map((r) => r[m]).filter((x): x is number => typeof x === 'number');
      out[c].n = out[c].n ?? {};
      out[c].n[m] = xs.length;
      out[c][m] = { median: median(xs), min: xs.length ? Math.min(...xs) : null, max: xs.length ? Math.max(...xs) : null };
    }
  }
  return out;
}

// ---------------------------------------------------------------- main

async function main(): Promise<void> {
  const t0 = Date.now();
  execFileSync('bash', [path.join(ROOT, 'scripts', 'setup.sh')], { stdio: ['ignore', 'ignore', 'inherit'] });
  await ferry(['lab', 'down']);
  await ferryOk(['lab', 'up', '--hosts', '2', '--allow-insecure']);
  let labKind: 'plain' | NonNullable<Scenario['lab']> = 'plain';
  fs.mkdirSync(OUT, { recursive: true });
  const hostInfo = await ferryOk(['-H', 'host1', 'host', 'info', '--json']);
  const all: ScenarioResult[] = [];
  try {
    const list = SCENARIOS.filter((s) => !ONLY || new RegExp(ONLY).test(s.id));
    for (const [si, s] of list.entries()) {
      say(`[${si + 1}/${list.length}] ${s.title}`);
      if ((s.lab ?? 'plain') !== labKind) {
        // Boundaries: 3 hosts, host3's "lab" network on the second segment.
        labKind = s.lab ?? 'plain';
        await ferry(['lab', 'down']);
        libvirtUp = false; // lab down ends every process in the lab's namespaces, libvirtds too
        await ferryOk([
          'lab',
          'up',
          ...(labKind === 'boundaries'
            ? ['--hosts', '3', '--segments', '2']
            : linkLab(labKind)
              ? ['--hosts', '2', '--link-rate', labKind.slice('link-'.length)]
              : ['--hosts', '2', '--allow-insecure']),
        ]);
      }
      const guests: Record<string, Guest> = {};
      const spec: GuestSpec = {
        kind: s.kind,
        memoryMiB: s.memoryMiB,
        extra: s.fill
          ? ['--fill', String(s.fill.mib), '--dirty-rate', String(s.fill.dirtyMiBs), ...(s.fill.kind ? ['--fill-kind', s.fill.kind] : [])]
          : [],
        ready: s.fill ? `fill done: ${s.fill.mib} MiB` : 'ready',
      };
      for (const c of s.contenders) {
        const name = `b${si}${c.replace(/[^a-z]/g, '').slice(0, 6)}`;
        const disk = s.diskMiB ? { mib: s.diskMiB, local: c === 'ferry-copy' } : undefined;
        // ferry's variants share ferry's guest (but where the disk or the pair of hosts
        // differs); libvirt's TLS and plain runs share one.
        guests[c] =
          c === 'qmp'
            ? await qmpGuest(spec, name, hostInfo.machine)
            : c === 'libvirt-tls-copy'
              ? await libvirtGuest(spec, name, hostInfo.machine, s.diskMiB)
              : c.startsWith('libvirt')
                ? (guests.libvirt ??
                  guests['libvirt-tls'] ??
                  guests['libvirt-tls-postcopy'] ??
                  guests['libvirt-tls-best'] ??
                  (await libvirtGuest(spec, name, hostInfo.machine)))
                : c === 'ferry-tunnel'
                  ? await ferryGuest(spec, name, { disk, pair: ['host1', 'host3'] })
                  : c === 'ferry-copy'
                    ? await ferryGuest(spec, name, { disk })
                    : (Object.entries(guests).find(([k]) => k.startsWith('ferry') && k !== 'ferry-tunnel' && k !== 'ferry-copy')?.[1] ??
                      (await ferryGuest(spec, name, { disk })));
      }
      const uniq = [...new Set(Object.values(guests))];
      if (s.workload) for (const g of uniq) await g.send(s.workload);
      for (const g of uniq) await g.pause();
      const runs: Run[] = [];
      const reps = s.reps ?? REPS;
      for (let r = 0; r < reps; r++) {
        const order = r % 2 ? [...s.contenders].reverse() : s.contenders;
        for (const c of order) {
          const g = guests[c];
          await g.resume();
          await sleep(s.workload ? 3000 : 1000);
          const to = g.other ? g.other(g.host) : g.host === 'host1' ? 'host2' : 'host1';
          // Every contender alike: the probe starts first, the clock at the command.
          const probe = g.ip ? externalProbe(g.ip) : undefined;
          if (probe) {
            await probe.ready;
            await sleep(300);
          }
          const t = Date.now();
          const m = await g.migrate(to, {
            ...s.opts,
            insecure: c.endsWith('-plain'),
            parallel: c === 'ferry-par2' || c === 'ferry-zstd-p2' || c === 'libvirt-tls-best' ? 2 : undefined,
            compress: COMPRESS_OF[c],
            verify: c === 'ferry-verify',
            tls: c.startsWith('libvirt-tls'),
            postcopy: c === 'libvirt-tls-postcopy',
            copyStorage: c === 'ferry-copy' || c === 'libvirt-tls-copy',
            ferryProbe: c === 'ferry-probed',
          });
          const { endAt, ...measured } = m;
          const totalMs = (endAt ?? Date.now()) - t;
          const p = probe ? await probe.stop() : null;
          const run: Run = {
            ...measured,
            contender: c,
            outcome: m.outcome === 'succeeded' ? await verified(g, m, p) : m.outcome,
            totalMs: m.outcome === 'succeeded' ? totalMs : null,
            guestDowntimeMs: m.outcome === 'succeeded' ? (p?.longestGapMs ?? null) : null,
            probe: p ? { sent: p.sent, replies: p.replies, spacingMs: +(p.durationMs / Math.max(1, p.sent)).toFixed(2) } : null,
          };
          runs.push(run);
          say(
            `   ${c.padEnd(12)} ${run.outcome.padEnd(10)} total ${run.totalMs ?? '-'} ms, QEMU downtime ${run.downtimeMs ?? '-'} ms, guest-perceived ${run.guestDowntimeMs ?? '-'} ms, ${run.throughputMBps ?? '-'} MB/s${run.note ? ` (${run.note})` : ''}`,
          );
          await g.pause().catch(() => undefined);
        }
      }
      for (const g of uniq) await g.destroy().catch(() => undefined);
      const summary = summarize(runs);
      all.push({ scenario: s, runs, summary, commit: machine(hostInfo).commit as string });
      fs.writeFileSync(
        path.join(OUT, `${s.id}.json`),
        JSON.stringify({ scenario: s, machine: machine(hostInfo), runs, summary }, null, 2) + '\n',
      );
    }
  } finally {
    await ferry(['lab', 'down']);
  }
  let stream: Record<string, number[]> | undefined;
  let facts: StreamFacts | undefined;
  if (!SMOKE && (!ONLY || new RegExp(ONLY).test('tls-stream'))) {
    say('TLS and the migration stream alone: 512 MiB of non-zero pages between two QEMUs on loopback');
    facts = streamFacts();
    stream = await tlsStreamBench(path.join(ROOT, 'images', 'pattern.img'), REPS);
    fs.writeFileSync(
      path.join(OUT, 'tls-stream.json'),
      JSON.stringify({ machine: machine(hostInfo), facts, gbps: stream }, null, 2) + '\n',
    );
  }
  let cli: Record<string, number[]> | undefined;
  if (!SMOKE && (!ONLY || new RegExp(ONLY).test('cli-startup'))) {
    say('CLI start-up: `ferry --version` against `node -e 0`, 10 runs each, interleaved');
    cli = { ferry: [], node: [] };
    const time = (argv: string[]): number => {
      const t = performance.now();
      execFileSync(process.execPath, argv, { stdio: 'ignore' });
      return Math.round(performance.now() - t);
    };
    time([path.join(ROOT, 'bin', 'ferry.mjs'), '--version']); // warm the page cache
    for (let i = 0; i < 10; i++) {
      cli.ferry.push(time([path.join(ROOT, 'bin', 'ferry.mjs'), '--version']));
      cli.node.push(time(['-e', '0']));
    }
    fs.writeFileSync(path.join(OUT, 'cli-startup.json'), JSON.stringify({ machine: machine(hostInfo), ms: cli }, null, 2) + '\n');
  }
  if (!cli && !SMOKE) {
    try {
      cli = JSON.parse(fs.readFileSync(path.join(OUT, 'cli-startup.json'), 'utf8')).ms;
    } catch {
      /* none yet */
    }
  }
  // The table covers every scenario with results on disk, so `--only X` refreshes X
  // and keeps the rest of the last full run.
  const merged = SMOKE
    ? all
    : SCENARIOS.map(
        (sc) =>
          all.find((a) => a.scenario.id === sc.id) ??
          (() => {
            try {
              const j = JSON.parse(fs.readFileSync(path.join(OUT, `${sc.id}.json`), 'utf8'));
              return { scenario: sc, runs: j.runs as Run[], summary: j.summary, commit: j.machine?.commit as string | undefined };
            } catch {
              return undefined;
            }
          })(),
      ).filter((x): x is ScenarioResult => !!x);
  if (!stream && !SMOKE) {
    try {
      const j = JSON.parse(fs.readFileSync(path.join(OUT, 'tls-stream.json'), 'utf8'));
      stream = j.gbps;
      facts = j.facts;
    } catch {
      /* none yet */
    }
  }
  const md = render(merged, hostInfo, Date.now() - t0, { stream, facts }, cli);
  if (SMOKE) {
    // CI: well-formed output, not numbers.
    for (const a of all)
      for (const c of a.scenario.contenders) {
        const s = a.summary[c];
        if (!s || s.succeeded < 1 || typeof s.totalMs.median !== 'number')
          throw new Error(`smoke: ${c} produced no successful run in ${a.scenario.id}`);
      }
    process.stdout.write(md);
    return;
  }
  // The cluster, evacuation and save sections belong to `npm run bench:cluster`,
  // `bench:evacuation` and `bench:save` (bench/cluster.ts, evacuation.ts, save.ts): kept as they are.
  const prev = fs.existsSync(path.join(ROOT, 'BENCHMARKS.md')) ? fs.readFileSync(path.join(ROOT, 'BENCHMARKS.md'), 'utf8') : '';
  const kept = ['cluster', 'evacuation', 'save'].flatMap(
    (k) => new RegExp(`<!-- ${k}:begin -->[\\s\\S]*<!-- ${k}:end -->\\n?`).exec(prev)?.[0] ?? [],
  );
  fs.writeFileSync(path.join(ROOT, 'BENCHMARKS.md'), [md.trimEnd(), ...kept.map((k) => k.trimEnd())].join('\n\n') + '\n');
  process.stdout.write(md);
}

/** The verdict on the secure streams, from their medians against plain TCP's. */
function bestSecure(plain: number, secure: Record<string, number>): string {
  const [name, v] = Object.entries(secure).sort((a, b) => b[1] - a[1])[0];
  const x = (v / plain).toFixed(2);
  return v / plain < 0.5
    ? `So no secure transport on this machine reaches 0.5× plain; the fastest for large streams is ${name}, at ${x}×.`
    : `The fastest secure transport here is ${name}, at ${x}× plain.`;
}

function machine(h: any): Record<string, unknown> {
  return {
    cpus: os.cpus().length,
    cpuModel: os.cpus()[0]?.model,
    memGiB: Math.round(os.totalmem() / 2 ** 30),
    kernel: os.release(),
    qemu: h.qemuVersion,
    machine: h.machine,
    accel: h.accel,
    node: process.version,
    libvirt: libvirtVersion,
    // The code the figures come from (-dirty: with changes not committed).
    commit: benchCommit(),
  };
}

/**
 * The probe's own figures: per scenario and contender, the SYNs each run sent and the
 * guest answered, and their mean spacing (the resolution of guest-perceived); then
 * ferryd's own guest-perceived figure (ferry-probed) against the bench's in the same runs.
 */
function probeSections(all: { scenario: Scenario; runs: Run[] }[], L: string[]): void {
  const dec = (xs: number[]): string => {
    const s = [...xs].sort((a, b) => a - b);
    return `${median(s)!.toFixed(2)} (${s[0].toFixed(2)}–${s[s.length - 1].toFixed(2)})`;
  };
  const rows: string[] = [];
  for (const a of all)
    for (const c of a.scenario.contenders) {
      const rs = a.runs.filter((r) => r.contender === c && r.probe);
      if (!rs.length) continue;
      rows.push(
        `| ${a.scenario.title} | ${c} | ${rs.length} | ${cell(spread(rs.map((r) => r.probe!.sent)))} | ${cell(spread(rs.map((r) => r.probe!.replies)))} | ${dec(rs.map((r) => r.probe!.spacingMs))} |`,
      );
    }
  if (rows.length)
    L.push(
      '',
      "**The probe, run by run** (SYNs the bench's probe sent and the guest answered, per run, and their mean spacing: the resolution of *guest-perceived*; median (min–max)):",
      '',
      '| scenario | contender | runs | sent | answered | mean spacing, ms |',
      '|---|---|---|---|---|---|',
      ...rows,
    );
  const lines: string[] = [];
  for (const a of all) {
    const rs = a.runs.filter(
      (r) =>
        r.contender === 'ferry-probed' &&
        r.outcome === 'succeeded' &&
        typeof r.reportedGuestDowntimeMs === 'number' &&
        typeof r.guestDowntimeMs === 'number',
    );
    if (!rs.length) continue;
    const own = spread(rs.map((r) => r.reportedGuestDowntimeMs!));
    const ext = spread(rs.map((r) => r.guestDowntimeMs!));
    const diff = spread(rs.map((r) => r.reportedGuestDowntimeMs! - r.guestDowntimeMs!));
    lines.push(
      `- ${a.scenario.title}: ferryd ${cell(own, ' ms')}, the bench ${cell(ext, ' ms')}; ferryd − bench, run by run: ${cell(diff, ' ms')} over ${rs.length} runs`,
    );
  }
  if (lines.length)
    L.push(
      '',
      "**ferryd's own guest-perceived figure against the bench's** (ferry-probed: `ferry migrate` with ferryd's probe on, from the source host; the bench's probe from the client namespace, in the same runs):",
      '',
      ...lines,
    );
}

function fmt(x: number | null | undefined, unit = ''): string {
  return x === null || x === undefined ? '-' : `${Math.round(x)}${unit}`;
}

function render(
  all: ScenarioResult[],
  h: any,
  ms: number,
  tls: { stream?: Record<string, number[]>; facts?: StreamFacts },
  cli?: Record<string, number[]>,
): string {
  const { stream, facts } = tls;
  const m = machine(h);
  const L: string[] = [];
  const cellOf = (s: any, k: string, div = 1): string =>
    s[k].median === null ? '-' : `${fmt(s[k].median / div)} (${fmt(s[k].min / div)}–${fmt(s[k].max / div)})`;
  const ratio = (a: any, b: any, k: string): string => (a?.[k]?.median && b?.[k]?.median ? (a[k].median / b[k].median).toFixed(2) : '-');
  L.push('# Benchmarks', '');
  L.push(
    `Written by \`npm run bench\` (${new Date().toISOString().slice(0, 10)}; the last invocation took ${(ms / 60000).toFixed(1)} min). Raw runs: \`bench/results/*.json\`; \`npm run bench -- --only REGEX\` reruns some scenarios and keeps the others' last results.`,
    '',
  );
  L.push(
    `**Machine:** ${m.cpus} × ${m.cpuModel}, ${m.memGiB} GiB, Linux ${m.kernel}, QEMU ${m.qemu} (machine type ${h.machine}) under ${String(m.accel).toUpperCase()} for every contender, Node ${m.node}. Two lab hosts (network namespaces) on one bridge; every guest and both hosts' work run on the same two cores, so absolute figures are small-machine figures, and only ratios measured side by side mean much.`,
    '',
  );
  L.push(
    "**Method.** Each scenario runs each contender several times, in alternating order; while one contender runs, the others' guests are paused. Cells are median (min–max) over the runs that succeeded, and a run counts as succeeded only when it was checked: the guest runs on the destination (its host says so), it answered the probe after the command returned (guests with an address), and the move's downtime and bytes were recorded; otherwise its outcome says what was missing. Every contender is timed alike: *total* is the whole command, from its start to its return (domain running on the destination, source cleaned up): `ferry migrate` including the CLI's own start-up, the qmp script from starting the destination QEMU to ending the source's, `virsh migrate` alone (the queries after it, `domjobinfo`, a pool refresh and the console re-attached, run after the clock stopped). *Guest-perceived* is the longest gap in the guest's answers to a TCP SYN sent every 1 ms by one probe process in the lab's client namespace, started before the command and stopped once the guest answered from its new host (`bench/probe-helper.ts`; what it sent and got answered in each run, and so its resolution, is in the probe table below). *Setup*: from the request to QEMU's first byte (its `active` event; ferry: measured by ferryd from the request it received). *QEMU downtime*: as QEMU reports it (after a switch to post-copy QEMU counts the whole post-copy window, while the source was stopped and the guest already ran on the destination; the guest's own pause is in *pause* and *guest-perceived*). *Pause*: ferry only, from the source QEMU's STOP event to the destination's answer that the guest resumed, both on the source host's monotonic clock (an upper bound). *Sent*: bytes on the wire.",
    '',
  );
  L.push(
    'Contenders: **ferry** (`ferry migrate`: TLS, pre-flight, persisted phases, the autopilot picking pre-copy or post-copy for the budget), **ferry-verify** (the same with `--verify-memory`), **qmp** (the same QEMU argv, machine type, certificates, bandwidth, downtime and auto-converge settings, driven directly through QMP: the engine baseline, TLS), **libvirt** and **libvirt-tls** (`virsh migrate --live --auto-converge --unsafe --persistent --undefinesource --timeout T`, without and with `--tls`, between two libvirtd ' +
      (libvirtVersion ?? '') +
      " lab hosts with the same guest, CPU model and machine type; at `--timeout` libvirt suspends the guest to finish), **libvirt-tls-postcopy** (the same with `--tls --postcopy --postcopy-after-precopy`: post-copy once the first pass is sent), **ferry-plain** (`--insecure`, to hosts that allow it; the destination ferryd gates the data port and relays the stream to a unix socket of QEMU, so that no other connection reaches QEMU: that relay, in Node on the same two cores, is the price), **ferry-par2** (`--parallel 2`: multifd, two TLS channels), **ferry-probed** (ferry with ferryd's own guest probe left on; every other ferry run has `--no-probe`, so that the bench's probe is the only one), **ferry-zstd** (`--compress zstd`: multifd with zstd, one TLS channel), **ferry-zstd-p2** (`--compress zstd --parallel 2`: libvirt-tls-best's flags, in ferry), **ferry-auto** (`--compress auto`: zstd where a sample of the guest's pages compresses to 80 % or less), **ferry-none** (`--compress none`: ferry told not to compress; since compression by default, **ferry** weighs it for a guest with 2 GiB or more in use; in `dense-4g-1gbit`, `dense-4g-10gbit` and `dense-4g-unshaped`, run before that change, **ferry** moved uncompressed, as this does), **libvirt-tls-best** (`virsh migrate --tls --parallel --parallel-connections 2 --compressed --comp-methods zstd`: libvirt's flags for a slow link); in the boundaries scenario (3 hosts, two segments) **ferry** moves host1 ⇄ host2 with the disk on the shared pool, **ferry-tunnel** host1 ⇄ host3 across segments through the VXLAN, **ferry-copy** host1 ⇄ host2 with the disk in the host's own directory and `--copy-storage --delete-source-storage`, and **libvirt-tls-copy** the same move by `virsh migrate --live --tls --copy-storage-all` with the disk in each libvirtd's own /var/lib/libvirt/images, a storage pool there, so that libvirt creates the destination's disk itself (the source's copy it leaves is deleted after the clock stops). For the disk copies, *setup* includes the copy and *sent* counts RAM only.",
    '',
  );
  L.push(
    '| scenario | contender | ok | total ms | setup ms | QEMU downtime ms | pause ms | guest-perceived ms | sent MiB | MB/s |',
    '|---|---|---|---|---|---|---|---|---|---|',
  );
  for (const a of all) {
    for (const c of a.scenario.contenders) {
      const s = a.summary[c];
      if (!s) continue;
      L.push(
        `| ${a.scenario.title} | ${c} | ${s.succeeded}/${s.runs} | ${cellOf(s, 'totalMs')} | ${cellOf(s, 'setupMs')} | ${cellOf(s, 'downtimeMs')} | ${s.pauseMs ? cellOf(s, 'pauseMs') : '-'} | ${cellOf(s, 'guestDowntimeMs')} | ${cellOf(s, 'bytes', 1048576)} | ${cellOf(s, 'throughputMBps')} |`,
      );
    }
  }
  const legacy = all.filter((a) => !a.commit).map((a) => a.scenario.title);
  if (legacy.length)
    L.push(
      '',
      `*Measured by the bench's earlier rules* (their result files record no commit, from before 2026-12-05): ${legacy.join('; ')}. In those rows \`virsh migrate\`'s total includes its follow-up queries (domjobinfo, a pool refresh, the console re-attached), and *ok* counts the runs each contender reported as succeeded, unchecked. Every other row was measured as the method above says.`,
    );
  probeSections(all, L);
  L.push('', '**Ratios** (medians, side by side in the same run):', '');
  for (const a of all) {
    const S = a.summary;
    if (!S.ferry) continue;
    const parts: string[] = [];
    if (S.libvirt)
      parts.push(
        `guest-perceived ferry ÷ libvirt ${ratio(S.ferry, S.libvirt, 'guestDowntimeMs')} (÷ libvirt-tls ${ratio(S.ferry, S['libvirt-tls'], 'guestDowntimeMs')})`,
      );
    if (S.qmp && a.scenario.opts.live) parts.push(`guest-perceived ferry ÷ qmp ${ratio(S.ferry, S.qmp, 'guestDowntimeMs')}`);
    if (S.libvirt)
      parts.push(
        `whole command ferry ÷ virsh migrate ${ratio(S.ferry, S.libvirt, 'totalMs')} (÷ virsh migrate --tls ${ratio(S.ferry, S['libvirt-tls'], 'totalMs')})`,
      );
    if (S.qmp) parts.push(`total ferry ÷ qmp ${ratio(S.ferry, S.qmp, 'totalMs')}`);
    if (S['ferry-zstd'] && S.ferry)
      parts.push(
        `--compress zstd ÷ default: whole command ${ratio(S['ferry-zstd'], S.ferry, 'totalMs')}, sent ${ratio(S['ferry-zstd'], S.ferry, 'bytes')}`,
      );
    if (S['ferry-zstd-p2'])
      parts.push(
        `--compress zstd --parallel 2 ÷ --compress zstd: whole command ${ratio(S['ferry-zstd-p2'], S['ferry-zstd'], 'totalMs')}${S['libvirt-tls-best'] ? `; whole command ÷ libvirt's best flags: ferry-zstd-p2 ${ratio(S['ferry-zstd-p2'], S['libvirt-tls-best'], 'totalMs')}, ferry-zstd ${ratio(S['ferry-zstd'], S['libvirt-tls-best'], 'totalMs')}` : ''}`,
      );
    if (S['ferry-none'] && S.ferry)
      parts.push(
        `default ÷ --compress none: whole command ${ratio(S.ferry, S['ferry-none'], 'totalMs')}, sent ${ratio(S.ferry, S['ferry-none'], 'bytes')}`,
      );
    if (S['ferry-auto'])
      parts.push(
        `--compress auto ÷ default: whole command ${ratio(S['ferry-auto'], S.ferry, 'totalMs')} (÷ --compress zstd ${ratio(S['ferry-auto'], S['ferry-zstd'], 'totalMs')})`,
      );
    if (S['libvirt-tls-best'] && S.ferry)
      parts.push(
        `whole command ferry ÷ libvirt's best flags ${ratio(S.ferry, S['libvirt-tls-best'], 'totalMs')}${S['ferry-zstd'] ? ` (ferry-zstd ÷ them ${ratio(S['ferry-zstd'], S['libvirt-tls-best'], 'totalMs')})` : ''}`,
      );
    if (linkLab(a.scenario.lab)) {
      // The physical limit: the bytes each contender sent (after zero pages and compression)
      // ÷ the link's rate, against its whole command.
      const bps = LINK_RATES[a.scenario.lab];
      const lim = (c: string): string =>
        S[c]?.bytes?.median && S[c]?.totalMs?.median ? (S[c].totalMs.median / ((S[c].bytes.median * 8) / bps) / 1000).toFixed(2) : '-';
      parts.push(`whole command ÷ (bytes sent ÷ ${bps / 1e9} Gbit/s): ${a.scenario.contenders.map((c) => `${c} ${lim(c)}`).join(', ')}`);
    }
    if (S['ferry-verify']) parts.push(`pause with --verify-memory ÷ without ${ratio(S['ferry-verify'], S.ferry, 'pauseMs')}`);
    if (S['ferry-par2'] && a.scenario.opts.live)
      parts.push(
        `--parallel 2 ÷ default: whole command ${ratio(S['ferry-par2'], S.ferry, 'totalMs')}, guest-perceived ${ratio(S['ferry-par2'], S.ferry, 'guestDowntimeMs')}, setup ${ratio(S['ferry-par2'], S.ferry, 'setupMs')}`,
      );
    if (S['ferry-tunnel'])
      parts.push(
        `across segments (VXLAN) ÷ same segment: whole command ${ratio(S['ferry-tunnel'], S.ferry, 'totalMs')}, guest-perceived ${ratio(S['ferry-tunnel'], S.ferry, 'guestDowntimeMs')}`,
      );
    if (S['ferry-copy'])
      parts.push(
        `disk copied ÷ shared disk: whole command ${ratio(S['ferry-copy'], S.ferry, 'totalMs')}, pause ${ratio(S['ferry-copy'], S.ferry, 'pauseMs')}, guest-perceived ${ratio(S['ferry-copy'], S.ferry, 'guestDowntimeMs')}`,
      );
    if (S['ferry-copy'] && S['libvirt-tls-copy'])
      parts.push(
        `disk copied, ferry ÷ \`virsh migrate --tls --copy-storage-all\`: whole command ${ratio(S['ferry-copy'], S['libvirt-tls-copy'], 'totalMs')}, guest-perceived ${ratio(S['ferry-copy'], S['libvirt-tls-copy'], 'guestDowntimeMs')}`,
      );
    if (S['ferry-plain'])
      parts.push(
        `secure stream ÷ plain TCP throughput ${ratio(S.ferry, S['ferry-plain'], 'throughputMBps')}${S['ferry-par2'] ? `, multifd 2 × TLS ÷ plain ${ratio(S['ferry-par2'], S['ferry-plain'], 'throughputMBps')}` : ''}`,
      );
    parts.push(`ferry setup median ${fmt(S.ferry.setupMs.median)} ms`);
    L.push(`- ${a.scenario.title}: ${parts.join('; ')}`);
  }
  // The autopilot's plan against what happened (issue: within ±30 % on the bench scenarios).
  const planned = all.flatMap((a) =>
    a.runs
      .filter((r) => r.contender === 'ferry' && r.outcome === 'succeeded' && r.predictedTotalMs && r.reportTotalMs)
      .map((r) => ({ a, r, ratio: r.reportTotalMs! / r.predictedTotalMs! })),
  );
  if (planned.length) {
    L.push(
      '',
      '**Autopilot: plan against actual** (ferry; the plan\'s predicted total for the strategy the move used, against ferryd\'s own `totalMs`; README "Autopilot"):',
      '',
      '| scenario | strategies used | runs | actual ÷ predicted, median (min–max) | within ±30 % |',
      '|---|---|---|---|---|',
    );
    for (const a of all) {
      const xs = planned.filter((x) => x.a === a);
      if (!xs.length) continue;
      const rs = xs.map((x) => x.ratio);
      const used = [...new Set(xs.map((x) => x.r.strategy ?? '?'))].join(', ');
      L.push(
        `| ${a.scenario.title} | ${used} | ${xs.length} | ${median(rs)!.toFixed(2)} (${Math.min(...rs).toFixed(2)}–${Math.max(...rs).toFixed(2)}) | ${rs.filter((r) => r >= 0.7 && r <= 1.3).length}/${rs.length} |`,
      );
    }
  }
  const checked = all.flatMap((a) => a.runs.filter((r) => r.memoryCheck).map((r) => ({ a, r, m: r.memoryCheck! })));
  if (checked.length) {
    const perGiB = checked.map((x) => x.m.ms / (x.m.bytes / 2 ** 30));
    L.push(
      '',
      `**Memory check** (\`--verify-memory\`, README "Memory check"): ${checked.length} runs; the check's own time, all of it inside the pause: ${fmt(median(checked.map((x) => x.m.ms)))} ms median (${fmt(Math.min(...checked.map((x) => x.m.ms)))}–${fmt(Math.max(...checked.map((x) => x.m.ms)))}), ${fmt(median(perGiB))} ms per GiB of guest RAM; RAM that arrived different: ${checked.filter((x) => x.m.repairedBytes > 0).length} runs. Here both hosts hash at once on the same two cores.`,
    );
  }
  if (stream) {
    const med = (k: string): number | null => median(stream[k] ?? []);
    const f = (k: string): string => {
      const v = med(k);
      return v === null || !stream[k]?.length
        ? '-'
        : `${v.toFixed(2)} (${Math.min(...stream[k]).toFixed(2)}–${Math.max(...stream[k]).toFixed(2)})`;
    };
    L.push(
      '',
      '**TLS and the stream alone** (Gbit/s, median (min–max); a stopped 512 MiB pattern guest, all pages non-zero, between two QEMUs on loopback, `bench/tls-stream.ts`):',
      '',
    );
    L.push(
      '| plain TCP | TLS (gnutls default) | TLS AES-128-GCM only | TLS, multifd 2 channels | TLS, multifd 4 channels | plain, multifd 2 channels | plain QEMU stream over a Node TLS relay per side |',
      '|---|---|---|---|---|---|---|',
    );
    L.push(
      `| ${f('plain')} | ${f('tls-default')} | ${f('tls-aes128gcm')} | ${f('tls-multifd2')} | ${f('tls-multifd4')} | ${f('plain-multifd2')} | ${f('tls-ferryd-relay')} |`,
    );
    const p = med('plain');
    const t = med('tls-default');
    const m2 = med('tls-multifd2');
    const m4 = med('tls-multifd4');
    const rl = med('tls-ferryd-relay');
    if (p && t && m2) {
      L.push(
        '',
        `On this machine QEMU's single TLS stream runs at ${(t / p).toFixed(2)}× plain TCP, two multifd TLS channels at ${(m2 / p).toFixed(2)}×${m4 ? `, four at ${(m4 / p).toFixed(2)}×` : ''}. ` +
          (facts?.aesGcmGbps
            ? `The cipher is not the limit (\`openssl speed -evp aes-128-gcm\`, measured by this run: ${facts.aesGcmGbps} Gbit/s on one core): `
            : 'The limit: ') +
          `QEMU encrypts a channel record by record in that channel's one thread, and on ${facts ? `this run's ${facts.cores}` : 'the'} cores both hosts' QEMUs, the guests and the hashing all share them, so more channels than cores cannot help. ` +
          '*Estimate for larger hosts* (reasoning, not measured here): each multifd channel encrypts on its own thread at about the single-stream rate, so on hosts with 8 or more free cores per side N channels should scale close to N × the single-stream rate until the NIC or memory bandwidth binds (8 channels: roughly 15–20 Gbit/s). ' +
          `ferry keeps one TLS channel by default: multifd over TLS delays the first byte (the \`--parallel 2\` rows' setup; plain multifd does not, so it is the extra channels' TLS set-up), and needs spare cores (here two channels carried ${(pairedRatio(stream['tls-multifd2'], stream['tls-default']) ?? m2 / t).toFixed(2)}× one in the median round, on ${facts ? facts.cores : 'the'} cores the whole bench shares); \`--parallel N\` is the lever for large or busy guests on hosts with spare cores. ` +
          (rl
            ? `A ferryd relay (QEMU plain into a unix socket, Node TLS between two relay processes, as two ferryds would carry it) runs at ${(rl / p).toFixed(2)}× plain, ${rl < t ? 'slower than' : 'about as fast as'} QEMU's own TLS: it adds two copies and a process hop per side on the same two cores, so ferry does not relay. `
            : '') +
          (facts
            ? `Kernel TLS, which would encrypt without the copies, is ${facts.ktls ? 'offered' : 'not available'} here (as this run found: ${facts.ktls ? 'the kernel offers the `tls` ULP' : 'this kernel has no `tls` ULP'}); the kernel's AES drivers (/proc/crypto): ${facts.kernelAes.join(', ') || 'none loaded'}. `
            : '') +
          bestSecure(p, {
            'one TLS channel (the default)': t,
            'multifd over TLS (`--parallel 2`)': m2,
            'multifd over TLS on 4 channels': m4 ?? 0,
          }),
      );
    }
  }
  if (cli?.ferry?.length) {
    const c = (k: string): string => `${fmt(median(cli[k]))} ms (${Math.min(...cli[k])}–${Math.max(...cli[k])})`;
    L.push(
      '',
      `**CLI start-up** (\`bench/results/cli-startup.json\`, 10 runs each, interleaved): \`ferry --version\` ${c('ferry')}, \`node -e 0\` ${c('node')}. The CLI runs from the bundle in dist/, with no TypeScript transpiled at start-up.`,
    );
  }
  const notes = all.flatMap((a) => outcomeRows(a.scenario.title, a.runs));
  if (notes.length)
    L.push(
      '',
      "**Outcomes and policy decisions** (each scenario's runs per contender: how they ended, each policy statement once, and each plan pick with its reason and how many runs it was; the figures each plan quoted are in the runs' JSON):",
      '',
      '| Scenario | Contender | Runs | Policy | Plan |',
      '|---|---|---|---|---|',
      ...notes,
    );
  L.push('');
  return L.join('\n') + '\n';
}

main().catch(async (e) => {
  process.stderr.write(`bench: ${e instanceof Error ? e.stack : e}\n`);
  await ferry(['lab', 'down']);
  process.exit(1);
});
