/**
 * Helpers for end-to-end tests: run the real CLI, build and tear down the real lab,
 * talk to guests from the lab's client namespace.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const FERRY = path.join(ROOT, 'bin', 'ferry.mjs');

export interface Run {
  code: number;
  stdout: string;
  stderr: string;
  json: any;
}

/** Runs `ferry ARGS` to completion. */
export function ferry(args: string[], opts: { input?: string; timeoutMs?: number; env?: Record<string, string> } = {}): Promise<Run> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [FERRY, ...args], { env: { ...process.env, ...opts.env }, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => {
      stdout += d;
    });
    child.stderr.on('data', (d) => {
      stderr += d;
    });
    const t = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 120000);
    child.on('close', (code) => {
      clearTimeout(t);
      let json: any;
      try {
        json = JSON.parse(stdout);
      } catch {
        json = undefined;
      }
      resolve({ code: code ?? -1, stdout, stderr, json });
    });
    if (opts.input !== undefined) child.stdin.end(opts.input);
    else child.stdin.end();
  });
}

/** Runs ferry and insists on exit 0; returns parsed JSON when --json was given. */
export async function ok(args: string[], opts: Parameters<typeof ferry>[1] = {}): Promise<any> {
  const r = await ferry(args, opts);
  if (r.code !== 0) throw new Error(`ferry ${args.join(' ')} exited ${r.code}: ${r.stderr || r.stdout}`);
  return r.json ?? r.stdout;
}

/** Expects a coded failure: exit code and error code (from --json output). */
export async function fails(args: string[], code: string, exit?: number): Promise<Run> {
  const r = await ferry([...args, '--json']);
  if (r.code === 0) throw new Error(`ferry ${args.join(' ')} succeeded, expected ${code}`);
  if (r.json?.error?.code !== code) throw new Error(`ferry ${args.join(' ')}: expected ${code}, got ${r.stdout || r.stderr}`);
  if (exit !== undefined && r.code !== exit) throw new Error(`ferry ${args.join(' ')}: expected exit ${exit}, got ${r.code}`);
  return r;
}

export function labState(): any {
  return JSON.parse(fs.readFileSync('/var/lib/ferry-lab/lab.json', 'utf8'));
}

export async function labUp(args: string[] = []): Promise<any> {
  await ferry(['lab', 'down']);
  return ok(['lab', 'up', '--json', ...args]);
}

/**
 * Each lab's daemon logs, copied as it goes down: kept (and their ends printed) when the
 * test file fails, removed when it passes. A flake's evidence would otherwise go with the lab.
 */
const labLogs: string[] = [];
const LOG_TAIL_LINES = 60;

export async function labDown(): Promise<void> {
  // FERRY_TEST_KEEP=DIR keeps each host's ferryd and etcd output, passed or failed.
  const keep = process.env.FERRY_TEST_KEEP;
  const dst = keep
    ? path.join(keep, `${path.basename(process.argv[1] ?? 'test')}-${Date.now()}`)
    : fs.mkdtempSync(path.join(os.tmpdir(), `ferry-lab-logs-${path.basename(process.argv[1] ?? 'test')}-`));
  if (!keep) labLogs.push(dst);
  let hosts: { name: string; configPath: string }[] = [];
  try {
    hosts = labState().hosts;
  } catch {
    // no lab: nothing to keep
  }
  for (const h of hosts)
    for (const f of ['ferryd.out', 'etcd.out', 'state/ferryd.log', 'state/watchdog.log']) {
      const src = path.join(path.dirname(h.configPath), f);
      if (fs.existsSync(src)) {
        fs.mkdirSync(dst, { recursive: true });
        fs.copyFileSync(src, path.join(dst, `${h.name}-${path.basename(f)}`));
      }
    }
  const r = await ferry(['lab', 'down', '--json']);
  if (r.code !== 0) throw new Error(`lab down failed: ${r.stderr}`);
}

process.on('exit', (code) => {
  for (const d of labLogs) {
    if (code === 0 || !fs.existsSync(d)) {
      fs.rmSync(d, { recursive: true, force: true });
      continue;
    }
    // The runner shows a test file's stderr: CI's output keeps what its machine does not.
    process.stderr.write(`lab logs kept in ${d}\n`);
    for (const f of fs.readdirSync(d).filter((x) => x.endsWith('ferryd.log'))) {
      const lines = fs.readFileSync(path.join(d, f), 'utf8').trimEnd().split('\n');
      process.stderr.write(
        `--- the last ${Math.min(LOG_TAIL_LINES, lines.length)} lines of ${f}\n${lines.slice(-LOG_TAIL_LINES).join('\n')}\n`,
      );
    }
  }
});

// Every test file's scratch files go when its process ends, passed or failed.
const scratch: string[] = [];
process.on('exit', () => {
  for (const d of scratch) fs.rmSync(d, { recursive: true, force: true });
});

export function tmpFile(name: string, content: unknown): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-test-'));
  scratch.push(dir);
  const p = path.join(dir, name);
  fs.writeFileSync(p, typeof content === 'string' ? content : JSON.stringify(content));
  return p;
}

export async function waitFor<T>(what: string, fn: () => T | Promise<T>, timeoutMs = 30000, everyMs = 100): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v as NonNullable<T>;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${last}` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** Domain `name`'s console log on lab host `host`. */
export function consoleLog(host: string, name: string): string {
  try {
    return fs.readFileSync(`/var/lib/ferry-lab/${host}/state/run/${name}/console.log`, 'utf8');
  } catch {
    return '';
  }
}

/** A shell line for the Linux guest: rewrites 48 MiB of tmpfs in a loop (the bench's and verify-engine's busy guest). */
export const CHURN_48MIB =
  'mount -t tmpfs -o size=64m tmpfs /mnt 2>/dev/null; while :; do dd if=/dev/urandom of=/mnt/blob bs=1M count=48 conv=notrunc 2>/dev/null; done &';

/** Creates a lab guest on a host from `ferry lab guest` and waits for its ready line. */
export async function createGuest(kind: 'linux' | 'pattern', name: string, host: string, memoryMiB?: number): Promise<any> {
  const cfg = await ok(['lab', 'guest', kind, name, '--json', ...(memoryMiB ? ['--memory', String(memoryMiB)] : [])]);
  const f = tmpFile(`${name}.json`, cfg);
  await ok(['-H', host, 'create', f, '--json']);
  await waitFor(
    `${name} ready`,
    () => consoleLog(host, name).includes(kind === 'linux' ? 'ferry-linux ready' : 'ferry-pattern ready'),
    60000,
  );
  if (kind === 'linux') await new Promise((r) => setTimeout(r, 300));
  return cfg;
}

/** Runs a command in a lab namespace. */
export function inNs(ns: string, cmd: string[], timeoutMs = 20000): { code: number; stdout: string; stderr: string } {
  const r = spawnSync('ip', ['netns', 'exec', `ferry-${ns}`, ...cmd], { timeout: timeoutMs });
  return { code: r.status ?? -1, stdout: r.stdout?.toString() ?? '', stderr: r.stderr?.toString() ?? '' };
}

/** GET / on a guest's HTTP status endpoint, from the client namespace. */
export function guestStatus(ip: string): { uptime: number; bootId: string; counter: number; name: string } {
  const r = inNs('client', [process.execPath, path.join(ROOT, 'test', 'tools', 'http-get.mjs'), ip]);
  if (r.code !== 0) throw new Error(`GET http://${ip}/ failed: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

/** Starts a held-open TCP echo client in the client namespace (see tools/echo-client.mjs). */
export function echoClient(ip: string, intervalMs = 10): { child: ChildProcess; stats: () => Promise<any>; lines: string[] } {
  const child = spawn(
    'ip',
    ['netns', 'exec', 'ferry-client', process.execPath, path.join(ROOT, 'test', 'tools', 'echo-client.mjs'), ip, String(intervalMs)],
    { stdio: ['pipe', 'pipe', 'pipe'] },
  );
  const lines: string[] = [];
  let buf = '';
  child.stdout!.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      lines.push(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
  });
  return {
    child,
    lines,
    stats: () =>
      new Promise((resolve, reject) => {
        child.once('close', () => {
          const last = lines.filter((l) => l.startsWith('{')).pop();
          if (!last) reject(new Error('echo client printed no result'));
          else resolve(JSON.parse(last));
        });
        child.stdin!.end();
      }),
  };
}

/**
 * Ends an echo client and asserts the connection lost nothing: still open, no error,
 * nothing out of order, every line sent came back. Returns its stats for more checks.
 */
export async function echoWhole(echo: ReturnType<typeof echoClient>): Promise<any> {
  const st = await echo.stats();
  assert.equal(st.closed, false, 'the connection stayed open');
  assert.equal(st.error, null);
  assert.equal(st.outOfOrder, 0);
  assert.equal(st.echoed, st.sent, 'every line sent on the connection came back (TCP lost nothing)');
  return st;
}

export function domainRecord(host: string, name: string): any {
  try {
    return JSON.parse(fs.readFileSync(`/var/lib/ferry-lab/${host}/state/domains/${name}.json`, 'utf8'));
  } catch {
    return undefined;
  }
}

/** The same liveness test ferryd uses (a zombie is not alive). */
export { pidAlive } from '../src/qemu/process.ts';

/** Rewrites a lab host's ferryd.json with `patch` (undefined deletes a key) and restarts its ferryd. */
export async function reconfigure(host: string, patch: (cfg: any) => void): Promise<void> {
  const file = `/var/lib/ferry-lab/${host}/ferryd.json`;
  const cfg = JSON.parse(fs.readFileSync(file, 'utf8'));
  patch(cfg);
  fs.writeFileSync(file, JSON.stringify(cfg, null, 2));
  await ok(['lab', 'restart', host]);
}

/** Runs test/tools/tls-call.mjs inside a lab namespace. */
export function tlsCall(ns: string, addr: string, certDir: string, request?: unknown, servername = ''): any {
  const r = inNs(ns, [
    process.execPath,
    path.join(ROOT, 'test', 'tools', 'tls-call.mjs'),
    addr,
    '8002',
    certDir,
    servername,
    ...(request ? [JSON.stringify(request)] : []),
  ]);
  return JSON.parse(r.stdout);
}

export function ferrydLog(host: string): string {
  try {
    return fs.readFileSync(`/var/lib/ferry-lab/${host}/state/ferryd.log`, 'utf8');
  } catch {
    return '';
  }
}

/** A pattern guest still runs on `host`, in the same QEMU, with its memory consistent. */
export async function patternIntact(host: string, name: string, pid: number): Promise<void> {
  const info = await ok(['-H', host, 'info', name, '--json']);
  assert.equal(info.state, 'running');
  assert.equal(info.pid, pid, `same QEMU on ${host}`);
  await ok(['lab', 'verify', name]);
}

/** `host` holds nothing of domain `name`: no definition, reservation, memory, QEMU or tap. */
export async function hostClean(host: string, name: string): Promise<void> {
  assert.equal(domainRecord(host, name), undefined, `no definition on ${host}`);
  const hi = await ok(['-H', host, 'host', 'info', '--json']);
  assert.equal(hi.memory.reservedMiB, 0, `no reservation on ${host}`);
  assert.equal(hi.memory.usedMiB, 0, `no memory used on ${host}`);
  const pids = spawnSync('ip', ['netns', 'pids', `ferry-${host}`])
    .stdout.toString()
    .split('\n')
    .map(Number)
    .filter(Boolean);
  const qemus = pids.filter((p) => {
    try {
      return fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').includes('qemu-system');
    } catch {
      return false;
    }
  });
  assert.deepEqual(qemus, [], `no QEMU on ${host}`);
  const taps = inNs(host, ['ip', '-br', 'link'])
    .stdout.split('\n')
    .filter((l) => l.startsWith('ft'));
  assert.deepEqual(taps, [], `no tap left on ${host}`);
}

/** The metrics page from the client, over HTTPS with the lab's admin certificate (metrics.ts). */
export const scrape = (addr: string): string => {
  const r = inNs('client', [
    process.execPath,
    path.join(ROOT, 'test', 'tools', 'https-get.mjs'),
    addr,
    '9477',
    '/metrics',
    labState().adminTlsDir,
  ]);
  assert.equal(r.code, 0, r.stderr);
  return r.stdout;
};
/** The sample of `name` whose labels include all of `series`' (in any order); 0 if none. */
export const metricValue = (text: string, series: string): number => {
  const [, name, want] = /^([a-z_]+)\{(.*)\}$/.exec(series)!;
  const pairs = want.split(',');
  const line = text.split('\n').find((l) => l.startsWith(`${name}{`) && pairs.every((p) => l.slice(0, l.lastIndexOf(' ')).includes(p)));
  return line ? Number(line.split(' ').pop()) : 0;
};

/** Starts `ferry ui` with ARGS; resolves with the process and the address it printed. */
export function startUi(args: string[]): Promise<{ child: ChildProcess; url: string }> {
  const child = spawn(process.execPath, [FERRY, 'ui', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  return new Promise((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d) => {
      out += d;
      const m = /ferry ui: (\S+)/.exec(out);
      if (m) resolve({ child, url: m[1] });
    });
    child.once('exit', (c) => reject(new Error(`ferry ui exited ${c}`)));
  });
}
