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
import { startQemuWith, killAndWait, connectUnix } from '../src/qemu/process.ts';
import { UNLIMITED_BANDWIDTH } from '../src/migration/source.ts';
import type { Report } from '../src/migration/jobs.ts';
import { tlsStreamBench } from './tls-stream.ts';
import { ferry as runCli, ok as cliOk } from '../test/helpers.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const LAB = '/var/lib/ferry-lab';
const args = process.argv.slice(2);
const opt = (k: string): string | undefined => { const i = args.indexOf(k); return i >= 0 ? args[i + 1] : undefined; };
const SMOKE = args.includes('--smoke');
const REPS = Number(opt('--reps') ?? (SMOKE ? 1 : 3));
const ONLY = opt('--only');
const OUT = opt('--out') ?? path.join(ROOT, 'bench', 'results');
const tty = !!process.stderr.isTTY;
const say = (m: string): void => { process.stderr.write(`${tty ? '\x1b[1m' : ''}bench:${tty ? '\x1b[0m' : ''} ${m}\n`); };

// ---------------------------------------------------------------- helpers

// The same CLI runner as the end-to-end tests; bench migrations may run for minutes.
const ferry = (a: string[], input?: string, timeoutMs = 600000): ReturnType<typeof runCli> => runCli(a, { input, timeoutMs });
const ferryOk = (a: string[], input?: string): Promise<any> => cliOk(a, { input, timeoutMs: 600000 });
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
async function waitFor(what: string, fn: () => boolean | Promise<boolean>, ms = 60000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await fn())) { if (Date.now() > end) throw new Error(`timed out: ${what}`); await sleep(100); }
}
const ns = (h: string): string => `ferry-${h}`;
function inNs(h: string, cmd: string[]): string { return execFileSync('ip', ['netns', 'exec', ns(h), ...cmd], { stdio: ['ignore', 'pipe', 'pipe'] }).toString(); }

/** The external probe: TCP SYNs every 1 ms from `host`'s namespace. */
function externalProbe(host: string, ip: string): { stop: () => Promise<{ longestGapMs: number; replies: number } | null> } {
  const c = spawn('ip', ['netns', 'exec', ns(host), process.execPath, '--import', 'tsx', path.join(ROOT, 'bench', 'probe-helper.ts'), ip], { cwd: ROOT, stdio: ['pipe', 'pipe', 'ignore'] });
  let out = '';
  c.stdout.on('data', (d) => { out += d; });
  return {
    stop: () => new Promise((resolve) => {
      c.on('close', () => { const l = out.trim().split('\n').pop(); try { const j = JSON.parse(l!); resolve(j.replies > 1 ? j : null); } catch { resolve(null); } });
      c.stdin.end();
    }),
  };
}

// ---------------------------------------------------------------- contenders

interface Opts { live: boolean; bandwidthMiBs?: number; maxDowntimeMs: number; timeoutS: number; insecure?: boolean; parallel?: number }
interface Run { contender: string; outcome: string; totalMs: number | null; setupMs: number | null; downtimeMs: number | null; guestDowntimeMs: number | null; bytes: number | null; throughputMBps: number | null; passes: number | null; note?: string; memoryCheck?: Report['memoryCheck'] }

interface Guest {
  name: string;
  ip?: string;
  host: string;
  pause(): Promise<void>;
  resume(): Promise<void>;
  send(cmd: string): Promise<void>;
  migrate(to: string, o: Opts): Promise<Run>;
  destroy(): Promise<void>;
}

/** A guest run by ferry: created with `ferry create`, moved with `ferry migrate`. */
async function ferryGuest(kind: 'linux' | 'pattern', name: string, memoryMiB: number): Promise<Guest> {
  const cfg = await ferryOk(['lab', 'guest', kind, name, '--memory', String(memoryMiB), '--json']);
  const f = path.join(os.tmpdir(), `bench-${name}.json`);
  fs.writeFileSync(f, JSON.stringify(cfg));
  await ferryOk(['-H', 'host1', 'create', f]);
  await waitFor(`${name} ready`, () => { try { return fs.readFileSync(`${LAB}/host1/state/run/${name}/console.log`, 'utf8').includes('ready'); } catch { return false; } });
  const g: Guest = {
    name, host: 'host1', ip: cfg.nics[0]?.ip?.split('/')[0],
    pause: async () => { await ferryOk(['-H', g.host, 'pause', name]); },
    resume: async () => { await ferryOk(['-H', g.host, 'unpause', name]); },
    send: async (cmd) => { await ferryOk(['-H', g.host, 'console', name, '--idle', '1500'], cmd + '\n'); },
    migrate: async (to, o) => {
      // ferryd measures guest-perceived downtime itself, with the same probe the bench
      // runs for the other contenders; a second probe would only load the guest twice.
      const a = ['-H', g.host, 'migrate', name, to, '--json', '--max-downtime', String(o.maxDowntimeMs), '--timeout', String(o.timeoutS)];
      if (o.live) a.push('--live');
      if (o.bandwidthMiBs) a.push('--bandwidth', String(o.bandwidthMiBs));
      if (o.insecure) a.push('--insecure');
      if (o.parallel) a.push('--parallel', String(o.parallel));
      const r = await ferry(a);
      const rep = r.json ?? {};
      if (rep.outcome === 'succeeded') g.host = to;
      return {
        contender: o.insecure ? 'ferry-plain' : o.parallel ? 'ferry-par2' : 'ferry', outcome: rep.outcome ?? 'failed', totalMs: rep.totalMs ?? null, setupMs: rep.setupMs ?? null,
        downtimeMs: rep.downtimeMs ?? null, guestDowntimeMs: rep.guestDowntimeMs ?? null, bytes: rep.bytes ?? null, throughputMBps: rep.throughputMBps ?? null, passes: rep.passes ?? null,
        note: [rep.error?.code, ...(rep.policy ?? []).filter((x: string) => !x.startsWith('auto-converge on') && !x.startsWith('memory check on'))].filter(Boolean).join('; ') || undefined,
        memoryCheck: rep.memoryCheck ?? null,
      };
    },
    destroy: async () => { await ferry(['-H', g.host, 'destroy', name]); await ferry(['-H', g.host, 'delete', name]); },
  };
  return g;
}

/**
 * The engine baseline: the same guest, QEMU argv, TLS certificates, bandwidth and
 * downtime settings, driven directly through QMP by this script. No pre-flight, no
 * persisted phases, no auto-converge, no policy: what QEMU alone does.
 */
async function qmpGuest(kind: 'linux' | 'pattern', name: string, memoryMiB: number): Promise<Guest> {
  const raw = await ferryOk(['lab', 'guest', kind, name, '--memory', String(memoryMiB), '--json']);
  const c: DomainConfig = parseDomainConfig(raw);
  const dir = path.join(LAB, 'bench', name);
  fs.mkdirSync(dir, { recursive: true });
  const tap = `fb${c.uuid.slice(0, 8)}`;
  let host = 'host1';
  let cur: { pid: number; qmp: QmpClient } | undefined;
  const start = async (h: string, incoming: boolean, prealloc = false): Promise<{ pid: number; qmp: QmpClient }> => {
    if (c.nics.length) {
      try { inNs(h, ['ip', 'link', 'del', tap]); } catch { /* none */ }
      inNs(h, ['ip', 'tuntap', 'add', 'dev', tap, 'mode', 'tap']);
      inNs(h, ['ip', 'link', 'set', tap, 'master', 'br0', 'up']);
    }
    const rt = { accel: 'tcg' as const, cpuModel: 'qemu64', machine: 'pc-i440fx-7.2', qmpPath: path.join(dir, `${h}.qmp`), consolePath: path.join(dir, `${h}.con`), taps: [tap], incoming, preallocate: prealloc };
    // QEMU runs inside the host's namespace through `ip netns exec` (which execs it).
    return startQemuWith('ip', ['netns', 'exec', ns(h), 'qemu-system-x86_64', ...domainArgv(c, rt)], { qmpPath: rt.qmpPath, logPath: path.join(dir, `${h}.log`), what: 'bench QEMU' });
  };
  cur = await start('host1', false);
  let conLog = '';
  const con = await connectUnix(path.join(dir, 'host1.con'), 5000);
  con.on('data', (d) => { conLog += d.toString('latin1'); });
  let conSock = con;
  await cur.qmp.execute('cont');
  await waitFor(`${name} ready`, () => conLog.includes('ready'));
  const g: Guest = {
    name, ip: c.nics[0]?.ip?.split('/')[0], host,
    pause: async () => { await cur!.qmp.execute('stop'); },
    resume: async () => { await cur!.qmp.execute('cont'); },
    send: async (cmd) => { conSock.write(cmd + '\n'); await sleep(1500); },
    migrate: async (to, o) => {
      const probe = g.ip ? externalProbe(host, g.ip) : undefined;
      await sleep(300);
      const t0 = Date.now();
      const dst = await start(to, true, !o.live);
      const toAddr = to === 'host1' ? '198.18.0.11' : '198.18.0.12';
      const fromName = host;
      const src = cur!;
      let setupMs: number | null = null;
      let outcome = 'failed';
      let m: any = {};
      try {
        if (!o.insecure) {
          await dst.qmp.execute('object-add', { 'qom-type': 'tls-creds-x509', id: 'tls0', dir: `${LAB}/${to}/tls`, endpoint: 'server', 'verify-peer': true });
          await dst.qmp.execute('object-add', { 'qom-type': 'authz-simple', id: 'authz0', identity: `O=ferry,CN=${fromName}` });
          await dst.qmp.execute('migrate-set-parameters', { 'tls-creds': 'tls0', 'tls-authz': 'authz0' });
          await src.qmp.execute('object-del', { id: 'tls0' }).catch(() => undefined);
          await src.qmp.execute('object-add', { 'qom-type': 'tls-creds-x509', id: 'tls0', dir: `${LAB}/${fromName}/tls`, endpoint: 'client', 'verify-peer': true });
        }
        await dst.qmp.execute('migrate-incoming', { uri: `tcp:${toAddr}:49200` });
        await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': o.bandwidthMiBs ? o.bandwidthMiBs * 1048576 : UNLIMITED_BANDWIDTH, 'downtime-limit': o.maxDowntimeMs, ...(o.insecure ? { 'tls-creds': '' } : { 'tls-creds': 'tls0', 'tls-hostname': to }) });
        if (!o.live) await src.qmp.execute('stop');
        await src.qmp.execute('migrate', { uri: `tcp:${toAddr}:49200` });
        const deadline = t0 + o.timeoutS * 1000;
        for (;;) {
          m = await src.qmp.execute('query-migrate');
          if (setupMs === null && m.ram?.transferred > 0) setupMs = Date.now() - t0;
          if (m.status === 'completed' || m.status === 'failed' || m.status === 'cancelled') break;
          if (Date.now() > deadline) { await src.qmp.execute('migrate_cancel'); outcome = 'not converged (watchdog)'; }
          await sleep(50);
        }
        if (m.status === 'completed') {
          for (let i = 0; i < 20 && !(m['total-time'] > 0); i++) { await sleep(10); m = await src.qmp.execute('query-migrate'); }
          for (;;) { const st = await dst.qmp.execute<{ status: string }>('query-status'); if (st.status !== 'inmigrate') break; await sleep(10); }
          await dst.qmp.execute('cont');
          await dst.qmp.execute('announce-self', { initial: 50, max: 550, rounds: 5, step: 100 }).catch(() => undefined);
          outcome = 'succeeded';
        }
      } finally {
        if (outcome === 'succeeded') {
          await src.qmp.execute('quit').catch(() => undefined);
          await killAndWait(src.pid, 2000);
          try { inNs(fromName, ['ip', 'link', 'del', tap]); } catch { /* gone */ }
          cur = dst; host = to; g.host = to;
          conSock.destroy();
          conSock = await connectUnix(path.join(dir, `${to}.con`), 5000);
          conSock.on('data', () => undefined);
        } else {
          await dst.qmp.execute('quit').catch(() => undefined);
          await killAndWait(dst.pid, 2000);
          try { inNs(to, ['ip', 'link', 'del', tap]); } catch { /* gone */ }
          if (o.live === false) await src.qmp.execute('cont').catch(() => undefined);
        }
      }
      const totalMs = Date.now() - t0;
      const p = probe ? await probe.stop() : null;
      const bytes = m.ram?.transferred ?? null;
      return {
        contender: o.insecure ? 'qmp-plain' : 'qmp', outcome, totalMs: outcome === 'succeeded' ? totalMs : null, setupMs, downtimeMs: m.downtime ?? null, guestDowntimeMs: p?.longestGapMs ?? null,
        bytes, throughputMBps: bytes && m['total-time'] ? +(bytes / 1e6 / (m['total-time'] / 1000)).toFixed(1) : null, passes: m.ram?.['dirty-sync-count'] ?? null,
        note: outcome === 'succeeded' ? undefined : `QEMU status ${m.status}${m['error-desc'] ? `: ${m['error-desc']}` : ''} after ${((Date.now() - t0) / 1000).toFixed(1)} s`,
      };
    },
    destroy: async () => {
      conSock.destroy();
      cur?.qmp.close();
      if (cur) await killAndWait(cur.pid, 0);
      try { inNs(host, ['ip', 'link', 'del', tap]); } catch { /* gone */ }
    },
  };
  return g;
}



// ---------------------------------------------------------------- libvirt

const LV_ADDR: Record<string, string> = { host1: '198.18.0.11', host2: '198.18.0.12' };
const lvUri = (h: string): string => `qemu+tcp://${LV_ADDR[h]}/system`;
let libvirtUp = false;

/** Installs libvirt (without starting any service) and runs one libvirtd per lab host. */
async function ensureLibvirt(): Promise<void> {
  if (libvirtUp) return;
  const have = (p: string): boolean => { try { execFileSync('dpkg', ['-s', p], { stdio: 'ignore' }); return true; } catch { return false; } };
  const pkgs = ['libvirt-daemon-system', 'libvirt-daemon-driver-qemu', 'libvirt-clients'].filter((p) => !have(p));
  if (pkgs.length) {
    say(`installing ${pkgs.join(' ')} (services are not started)`);
    // policy-rc.d 101: Debian's maintainer scripts must not start libvirtd on the real host.
    const rc = '/usr/sbin/policy-rc.d';
    const hadRc = fs.existsSync(rc);
    if (!hadRc) fs.writeFileSync(rc, '#!/bin/sh\nexit 101\n', { mode: 0o755 });
    try {
      execFileSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...pkgs], { stdio: ['ignore', 'ignore', 'inherit'], env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
    } finally {
      if (!hadRc) fs.rmSync(rc, { force: true });
    }
  }
  for (const d of ['/run/libvirt', '/var/lib/libvirt', '/var/log/libvirt', '/var/cache/libvirt']) fs.mkdirSync(d, { recursive: true });
  for (const [i, h] of ['host1', 'host2'].entries()) {
    const c = spawn(path.join(ROOT, 'bench', 'libvirt-host.sh'), [ns(h), LV_ADDR[h], `${LAB}/libvirt/${h}`, `00000000-0000-4000-8000-00000000000${i + 1}`], { detached: true, stdio: 'ignore' });
    c.unref();
  }
  for (const h of ['host1', 'host2']) await waitFor(`libvirtd on ${h}`, () => { try { inNs(h, ['virsh', '-c', lvUri(h), 'version']); return true; } catch { return false; } }, 30000);
  libvirtUp = true;
}

function virsh(h: string, a: string[], timeoutMs = 600000): string {
  return execFileSync('ip', ['netns', 'exec', ns(h), 'virsh', '-c', lvUri(h), ...a], { stdio: ['ignore', 'pipe', 'pipe'], timeout: timeoutMs }).toString();
}

/** libvirt's `virsh migrate --live` between two lab libvirtds, same guest and settings. */
async function libvirtGuest(kind: 'linux' | 'pattern', name: string, memoryMiB: number): Promise<Guest> {
  await ensureLibvirt();
  const raw = await ferryOk(['lab', 'guest', kind, name, '--memory', String(memoryMiB), '--json']);
  const c: DomainConfig = parseDomainConfig(raw);
  const esc = (x: string): string => x.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/'/g, '&apos;');
  const os = c.boot.kind === 'kernel'
    ? `<loader type='rom'>/usr/share/qemu/qboot.rom</loader><kernel>${esc(c.boot.kernel)}</kernel><initrd>${esc(c.boot.initrd ?? '')}</initrd><cmdline>${esc(c.boot.cmdline)}</cmdline>`
    : `<boot dev='fd'/>`;
  const disks = c.disks.map((d) => d.bus === 'floppy'
    ? `<disk type='file' device='floppy'><driver name='qemu' type='raw'/><source file='${esc(d.path)}'/><target dev='fda' bus='fdc'/><readonly/></disk>`
    : `<disk type='file' device='disk'><driver name='qemu' type='${d.format}'/><source file='${esc(d.path)}'/><target dev='vda' bus='virtio'/>${d.readOnly ? '<readonly/>' : ''}</disk>`).join('');
  const nics = c.nics.map((n) => `<interface type='bridge'><source bridge='br0'/><mac address='${n.mac}'/><model type='virtio'/></interface>`).join('');
  const xml = `<domain type='qemu'><name>${name}</name><uuid>${c.uuid}</uuid><memory unit='MiB'>${c.memoryMiB}</memory><vcpu>${c.vcpus}</vcpu>
<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>${os}</os>
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
    s.on('data', (d) => { conLog += d.toString('latin1'); });
    return s;
  };
  let con = await attachCon('host1');
  await waitFor(`${name} ready`, () => conLog.includes('ready'), 60000);
  const g: Guest = {
    name, ip: c.nics[0]?.ip?.split('/')[0], host,
    pause: async () => { virsh(host, ['suspend', name]); },
    resume: async () => { virsh(host, ['resume', name]); },
    send: async (cmd) => { con.write(cmd + '\n'); await sleep(1500); },
    migrate: async (to, o) => {
      const probe = g.ip ? externalProbe(host, g.ip) : undefined;
      await sleep(300);
      const a = ['migrate', name, lvUri(to), '--unsafe', '--persistent', '--undefinesource'];
      // virsh allows --timeout (suspend to finish) only for live migrations.
      if (o.live) a.push('--live', '--timeout', String(o.timeoutS));
      if (o.bandwidthMiBs) a.push('--bandwidth', String(o.bandwidthMiBs));
      const t0 = Date.now();
      let outcome = 'succeeded';
      let note: string | undefined;
      try { virsh(host, a, (o.timeoutS + 120) * 1000); } catch (e) { outcome = 'failed'; note = String((e as { stderr?: Buffer }).stderr ?? e).trim().slice(0, 200); }
      const totalMs = Date.now() - t0;
      const p = probe ? await probe.stop() : null;
      let info = '';
      if (outcome === 'succeeded') {
        info = virsh(to, ['domjobinfo', name, '--completed']);
        con.destroy();
        host = to; g.host = to;
        con = await attachCon(to);
      }
      const num = (label: string): number | null => { const m = new RegExp(`${label}:\\s+([\\d.]+)\\s*(\\S+)?`).exec(info); if (!m) return null; const v = Number(m[1]); const u = m[2] ?? ''; return u.startsWith('GiB') ? v * 2 ** 30 : u.startsWith('MiB') ? v * 2 ** 20 : u.startsWith('KiB') ? v * 1024 : v; };
      const elapsed = num('Time elapsed');
      const bytes = num('Data processed') ?? num('Memory processed');
      if (/suspend/i.test(info) || (o.live && outcome === 'succeeded' && totalMs > o.timeoutS * 1000)) note = `--timeout ${o.timeoutS} s: libvirt suspended the guest to finish`;
      return {
        contender: 'libvirt', outcome, totalMs: outcome === 'succeeded' ? totalMs : null, setupMs: null, downtimeMs: num('Total downtime'), guestDowntimeMs: p?.longestGapMs ?? null,
        bytes: bytes !== null ? Math.round(bytes) : null, throughputMBps: bytes && elapsed ? +(bytes / 1e6 / (elapsed / 1000)).toFixed(1) : null, passes: null,
        note: note ?? (outcome === 'succeeded' ? `virsh migrate took ${totalMs} ms; libvirt's own job time ${elapsed} ms; plain TCP (no TLS)` : undefined),
      };
    },
    destroy: async () => {
      con.destroy();
      try { virsh(host, ['destroy', name]); } catch { /* not running */ }
      try { virsh(host, ['undefine', name]); } catch { /* gone */ }
    },
  };
  return g;
}

function os_tmp(): string { return os.tmpdir(); }

// ---------------------------------------------------------------- scenarios

interface Scenario {
  id: string;
  title: string;
  kind: 'linux' | 'pattern';
  memoryMiB: number;
  workload?: string;
  opts: Opts;
  contenders: ('ferry' | 'qmp' | 'ferry-plain' | 'ferry-par2' | 'libvirt')[];
  reps?: number;
}

const dirty = (mbps: number): string => `while :; do dd if=/dev/zero of=/tmp/dirt bs=1M count=${Math.max(1, Math.round(mbps / 10))} conv=notrunc 2>/dev/null; usleep 100000; done &`;

const SCENARIOS: Scenario[] = SMOKE ? [
  { id: 'smoke-linux-128m-idle', title: 'Linux 128 MiB, idle, live (smoke)', kind: 'linux', memoryMiB: 128, opts: { live: true, maxDowntimeMs: 300, timeoutS: 120 }, contenders: ['ferry', 'qmp'] },
] : [
  { id: 'linux-1g-idle', title: 'Linux 1 GiB, idle, live', kind: 'linux', memoryMiB: 1024, opts: { live: true, maxDowntimeMs: 300, timeoutS: 300 }, contenders: ['ferry', 'qmp', 'libvirt'] },
  { id: 'linux-1g-dirty50', title: 'Linux 1 GiB, dirtying ~50 MB/s, live', kind: 'linux', memoryMiB: 1024, workload: dirty(50), opts: { live: true, maxDowntimeMs: 300, timeoutS: 120 }, contenders: ['ferry', 'qmp', 'libvirt'], reps: 2 },
  { id: 'linux-1g-dirty500', title: 'Linux 1 GiB, dirtying ~500 MB/s (nominal), live', kind: 'linux', memoryMiB: 1024, workload: dirty(500), opts: { live: true, maxDowntimeMs: 300, timeoutS: 40 }, contenders: ['ferry', 'qmp'], reps: 2 },
  { id: 'pattern-1g', title: 'pattern guest, 1 GiB touched, live', kind: 'pattern', memoryMiB: 1024, opts: { live: true, maxDowntimeMs: 300, timeoutS: 30 }, contenders: ['ferry', 'qmp', 'libvirt'], reps: 2 },
  { id: 'nonconv-capped', title: 'Linux 512 MiB dirtying ~200 MB/s over a 32 MiB/s link, live', kind: 'linux', memoryMiB: 512, workload: dirty(200), opts: { live: true, bandwidthMiBs: 32, maxDowntimeMs: 300, timeoutS: 30 }, contenders: ['ferry', 'qmp', 'libvirt'], reps: 2 },
  { id: 'linux-1g-offline', title: 'Linux 1 GiB, offline', kind: 'linux', memoryMiB: 1024, opts: { live: false, maxDowntimeMs: 300, timeoutS: 300 }, contenders: ['ferry', 'qmp', 'libvirt'], reps: 2 },
  { id: 'tls-vs-plain', title: 'pattern guest 512 MiB, offline: TLS vs plain TCP throughput', kind: 'pattern', memoryMiB: 512, opts: { live: false, maxDowntimeMs: 300, timeoutS: 120 }, contenders: ['ferry', 'ferry-par2', 'ferry-plain'], reps: 2 },
];

// ---------------------------------------------------------------- statistics

const METRICS = ['totalMs', 'setupMs', 'downtimeMs', 'guestDowntimeMs', 'bytes', 'throughputMBps'] as const;
function median(xs: number[]): number | null {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}
function summarize(runs: Run[]): Record<string, any> {
  const out: Record<string, any> = {};
  for (const c of [...new Set(runs.map((r) => r.contender))]) {
    const rs = runs.filter((r) => r.contender === c);
    const ok = rs.filter((r) => r.outcome === 'succeeded');
    out[c] = { runs: rs.length, succeeded: ok.length };
    for (const m of METRICS) {
      const xs = ok.map((r) => r[m]).filter((x): x is number => typeof x === 'number');
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
  await ferryOk(['lab', 'up', '--hosts', '2']);
  fs.mkdirSync(OUT, { recursive: true });
  const hostInfo = await ferryOk(['-H', 'host1', 'host', 'info', '--json']);
  const all: { scenario: Scenario; runs: Run[]; summary: Record<string, any> }[] = [];
  try {
    const list = SCENARIOS.filter((s) => !ONLY || new RegExp(ONLY).test(s.id));
    for (const [si, s] of list.entries()) {
      say(`[${si + 1}/${list.length}] ${s.title}`);
      const guests: Record<string, Guest> = {};
      for (const c of s.contenders) {
        const name = `b${si}${c.replace(/[^a-z]/g, '').slice(0, 6)}`;
        guests[c] = c === 'qmp' ? await qmpGuest(s.kind, name, s.memoryMiB) : c === 'libvirt' ? await libvirtGuest(s.kind, name, s.memoryMiB) : (c === 'ferry-plain' || c === 'ferry-par2') && guests.ferry ? guests.ferry : await ferryGuest(s.kind, name, s.memoryMiB);
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
          const to = g.host === 'host1' ? 'host2' : 'host1';
          const run = await g.migrate(to, { ...s.opts, insecure: c.endsWith('-plain'), parallel: c === 'ferry-par2' ? 2 : undefined });
          runs.push(run);
          say(`   ${c.padEnd(12)} ${run.outcome.padEnd(10)} total ${run.totalMs ?? '-'} ms, QEMU downtime ${run.downtimeMs ?? '-'} ms, guest-perceived ${run.guestDowntimeMs ?? '-'} ms, ${run.throughputMBps ?? '-'} MB/s${run.note ? ` (${run.note})` : ''}`);
          await g.pause().catch(() => undefined);
        }
      }
      for (const g of uniq) await g.destroy().catch(() => undefined);
      const summary = summarize(runs);
      all.push({ scenario: s, runs, summary });
      fs.writeFileSync(path.join(OUT, `${s.id}.json`), JSON.stringify({ scenario: s, machine: machine(hostInfo), runs, summary }, null, 2) + '\n');
    }
  } finally {
    await ferry(['lab', 'down']);
  }
  let stream: Record<string, number[]> | undefined;
  if (!SMOKE && (!ONLY || new RegExp(ONLY).test('tls-stream'))) {
    say('TLS and the migration stream alone: 512 MiB of non-zero pages between two QEMUs on loopback');
    stream = await tlsStreamBench(path.join(ROOT, 'images', 'pattern.img'), REPS);
    fs.writeFileSync(path.join(OUT, 'tls-stream.json'), JSON.stringify({ machine: machine(hostInfo), gbps: stream }, null, 2) + '\n');
  }
  // The table covers every scenario with results on disk, so `--only X` refreshes X
  // and keeps the rest of the last full run.
  const merged = SMOKE ? all : SCENARIOS.map((sc) => all.find((a) => a.scenario.id === sc.id) ?? (() => {
    try { const j = JSON.parse(fs.readFileSync(path.join(OUT, `${sc.id}.json`), 'utf8')); return { scenario: sc, runs: j.runs as Run[], summary: j.summary }; } catch { return undefined; }
  })()).filter((x): x is { scenario: Scenario; runs: Run[]; summary: Record<string, any> } => !!x);
  if (!stream && !SMOKE) { try { stream = JSON.parse(fs.readFileSync(path.join(OUT, 'tls-stream.json'), 'utf8')).gbps; } catch { /* none yet */ } }
  const md = render(merged, hostInfo, Date.now() - t0, stream);
  if (SMOKE) {
    // CI: well-formed output, not numbers.
    for (const a of all) for (const c of a.scenario.contenders) {
      const s = a.summary[c];
      if (!s || s.succeeded < 1 || typeof s.totalMs.median !== 'number') throw new Error(`smoke: ${c} produced no successful run in ${a.scenario.id}`);
    }
    process.stdout.write(md);
    return;
  }
  fs.writeFileSync(path.join(ROOT, 'BENCHMARKS.md'), md);
  process.stdout.write(md);
}

function machine(h: any): Record<string, unknown> {
  return { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, memGiB: Math.round(os.totalmem() / 2 ** 30), kernel: os.release(), qemu: h.qemuVersion, accel: h.accel, node: process.version };
}

function fmt(x: number | null | undefined, unit = ''): string {
  return x === null || x === undefined ? '-' : `${Math.round(x)}${unit}`;
}

function render(all: { scenario: Scenario; runs: Run[]; summary: Record<string, any> }[], h: any, ms: number, stream?: Record<string, number[]>): string {
  const m = machine(h);
  const L: string[] = [];
  L.push('# Benchmarks', '');
  L.push(`Written by \`npm run bench\` (${new Date().toISOString().slice(0, 10)}; the last invocation took ${(ms / 60000).toFixed(1)} min). Raw runs: \`bench/results/*.json\`; \`npm run bench -- --only REGEX\` reruns some scenarios and keeps the others' last results.`, '');
  const checked = all.flatMap((a) => a.runs.filter((r) => r.memoryCheck).map((r) => ({ a, r, m: r.memoryCheck! })));
  if (checked.length) {
    const fixed = checked.filter((x) => x.m.repairedBytes > 0);
    const where = [...new Set(fixed.map((x) => x.a.scenario.title))];
    const mib = (b: number): string => (b / 1048576).toFixed(1);
    L.push(`**Memory check.** ${checked.length} ferry runs had the memory check on (README "Memory check": live, TCG, QEMU before 9.0), which is part of their pause: ${fmt(median(checked.map((x) => x.m.ms)))} ms median (${fmt(Math.min(...checked.map((x) => x.m.ms)))}–${fmt(Math.max(...checked.map((x) => x.m.ms)))}). ` +
      (fixed.length
        ? `In ${fixed.length} of them QEMU's copy had arrived with stale RAM, ${mib(Math.min(...fixed.map((x) => x.m.repairedBytes)))}–${mib(Math.max(...fixed.map((x) => x.m.repairedBytes)))} MiB, which ferry rewrote from the source before the guest ran (${where.join('; ')}). The qmp and libvirt contenders run the same QEMU and do not check, so their guests can resume on stale pages unnoticed (not measured here).`
        : 'No run needed a repair.'), '');
  }
  L.push(`**Machine:** ${m.cpus} × ${m.cpuModel}, ${m.memGiB} GiB, Linux ${m.kernel}, QEMU ${m.qemu} under ${String(m.accel).toUpperCase()}, Node ${m.node}. Two lab hosts (network namespaces) on one bridge; every guest runs on the same two cores, so absolute figures are small-machine figures, and only ratios measured side by side mean much.`, '');
  L.push('**Method.** Each scenario runs each contender several times, in alternating order; while one contender runs, the other\'s guest is paused. Cells are median (min–max). *total*: command to guest running on the destination; *setup*: command to the first byte of memory sent; *QEMU downtime*: as QEMU reports it; *guest-perceived*: the longest gap in the guest\'s answers to TCP SYNs sent every 1 ms from the source host\'s side (resolution ~1-2 ms; for ferry, the figure from its own report, measured the same way; for the others, the bench\'s probe); *sent*: bytes on the wire. Contenders: **ferry** (`ferry migrate`: TLS, pre-flight, persisted phases, auto-converge and its convergence policy), **qmp** (the same QEMU argv, certificates, bandwidth and downtime settings, driven directly through QMP by the bench: the engine baseline), **ferry-plain** (`--insecure`), **ferry-par2** (`--parallel 2`: multifd, two TLS channels), **libvirt** (`virsh migrate --live --unsafe --persistent --undefinesource --timeout T` between two libvirtd 9.0 lab hosts, same guest, CPU model and bandwidth; libvirt\'s stream is plain TCP here, and at `--timeout` it suspends the guest to finish).', '');
  L.push('| scenario | contender | ok | total ms | setup ms | QEMU downtime ms | guest-perceived ms | sent MiB | MB/s |', '|---|---|---|---|---|---|---|---|---|');
  for (const a of all) {
    for (const c of a.scenario.contenders) {
      const s = a.summary[c];
      if (!s) continue;
      const cell = (k: string, div = 1): string => s[k].median === null ? '-' : `${fmt(s[k].median / div)} (${fmt(s[k].min / div)}–${fmt(s[k].max / div)})`;
      L.push(`| ${a.scenario.title} | ${c} | ${s.succeeded}/${s.runs} | ${cell('totalMs')} | ${cell('setupMs')} | ${cell('downtimeMs')} | ${cell('guestDowntimeMs')} | ${cell('bytes', 1048576)} | ${cell('throughputMBps')} |`);
    }
  }
  L.push('', '**Ratios** (medians, ferry ÷ baseline):', '');
  for (const a of all) {
    const f = a.summary.ferry; const q = a.summary.qmp ?? a.summary['ferry-plain'];
    if (!f || !q) continue;
    const r = (k: string): string => (f[k].median && q[k].median ? (f[k].median / q[k].median).toFixed(2) : '-');
    L.push(`- ${a.scenario.title} (vs ${a.summary.qmp ? 'qmp' : 'ferry-plain'}): total ${r('totalMs')}, setup ${r('setupMs')}, QEMU downtime ${r('downtimeMs')}, guest-perceived ${r('guestDowntimeMs')}, throughput ${r('throughputMBps')}`);
  }
  if (stream) {
    const med = (k: string): number | null => median(stream[k] ?? []);
    const f = (k: string): string => { const v = med(k); return v === null ? '-' : `${v.toFixed(2)} (${Math.min(...stream[k]).toFixed(2)}–${Math.max(...stream[k]).toFixed(2)})`; };
    L.push('', '**TLS and the stream alone** (Gbit/s, median (min–max); a stopped 512 MiB pattern guest, all pages non-zero, between two QEMUs on loopback, `bench/tls-stream.ts`):', '');
    L.push('| plain TCP | TLS (gnutls default) | TLS AES-128-GCM only | TLS ChaCha20-Poly1305 only | TLS, multifd 2 channels | plain, multifd 2 channels |', '|---|---|---|---|---|---|');
    L.push(`| ${f('plain')} | ${f('tls-default')} | ${f('tls-aes128gcm')} | ${f('tls-chacha20')} | ${f('tls-multifd2')} | ${f('plain-multifd2')} |`);
    const p = med('plain'); const t = med('tls-default'); const c = med('tls-chacha20'); const m2 = med('tls-multifd2');
    if (p && t) {
      L.push('', `TLS costs ${((1 - t / p) * 100).toFixed(0)}% of the plain stream's throughput here (plain ÷ TLS = ${(p / t).toFixed(2)}). ` +
        `The default priority already negotiates AES-GCM${c ? `; ChaCha20 runs at ${(c / t * 100).toFixed(0)}% of it on this CPU (AES-NI), so pinning ChaCha would hurt` : ''}. ` +
        `${m2 ? `Two multifd channels give ${(m2 / t).toFixed(2)}× the single TLS channel on these 2 cores: encryption competes with everything else for the same cores, so multifd pays off only with spare cores. ` : ''}` +
        'Likely cause (read from QEMU 7.2\'s code, not profiled here): QEMU encrypts in its migration thread, gnutls record by record as it queues guest pages, copying each page out of guest RAM, while plain TCP hands the kernel whole iovecs straight from guest RAM; the cipher and TLS version barely matter (also tried: TLS 1.2 and 1.3 with AES-128-GCM only, within noise of the default). What helps: more threads doing it (`ferry migrate --parallel N`, QEMU multifd with TLS). ferry keeps TLS on by default and gnutls\'s default (AES-GCM).');
    }
  }
  const notes = all.flatMap((a) => a.runs.filter((r) => r.note || r.outcome !== 'succeeded').map((r) => `- ${a.scenario.title}, ${r.contender}: ${r.outcome}${r.note ? ` — ${r.note}` : ''}`));
  if (notes.length) L.push('', '**Outcomes and policy decisions:**', '', ...notes);
  L.push('');
  return L.join('\n') + '\n';
}

main().catch(async (e) => {
  process.stderr.write(`bench: ${e instanceof Error ? e.stack : e}\n`);
  await ferry(['lab', 'down']);
  process.exit(1);
});
