/**
 * QEMU processes: start one detached (so it outlives ferryd), find it again after a
 * restart (pid + QMP socket, checked against its command line), and end it.
 */
import { spawn, execFile } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import { QmpClient } from '../qmp/client.ts';
import { FerryError } from '../errors.ts';
import { DEFAULT_ENGINE, engineArgs, type Engine } from './argv.ts';
import { confinedCommand, type DomainIdentity, type DeviceNode } from './confine.ts';

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  // A zombie still answers kill(0); it is not alive for our purposes.
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}

/** True if `pid` is a live QEMU started for this uuid (guards against pid reuse). */
export function isOurQemu(pid: number, uuid: string): boolean {
  if (!pidAlive(pid)) return false;
  try {
    const cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    return cmd.some((a) => a.includes('qemu-system')) && cmd.includes(uuid);
  } catch {
    return false;
  }
}

/**
 * QEMU processes whose command line carries `uuid` and every string in `alsoHas` (for
 * example the host's own run directory and "-incoming"): finds one started just before
 * a crash, when its pid was not yet on record.
 */
export function qemuPidsWith(uuid: string, alsoHas: string[] = []): number[] {
  const out: number[] = [];
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const cmd = fs.readFileSync(`/proc/${d}/cmdline`, 'utf8').split('\0');
      if (cmd.some((a) => a.includes('qemu-system')) && cmd.includes(uuid) && alsoHas.every((s) => cmd.some((a) => a.includes(s))))
        out.push(Number(d));
    } catch {
      /* exited while we looked */
    }
  }
  return out.filter(pidAlive);
}

/** The fields of /proc/PID/stat after the command name (field 3 is index 0), or undefined. */
function procStat(pid: number): string[] | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  } catch {
    return undefined;
  }
}

/** CPU seconds used by a process (user + system), from /proc. */
export function cpuSeconds(pid: number): number {
  const f = procStat(pid);
  return f ? (Number(f[11]) + Number(f[12])) / 100 : 0;
}

/**
 * When a process started (clock ticks since boot): with the pid, an identity that a
 * reused pid cannot have. Recorded at spawn; checked before ferryd touches a QEMU's
 * memory as root (Node has no pidfd).
 */
export function processStartTicks(pid: number): number | undefined {
  const f = procStat(pid);
  return f ? Number(f[19]) : undefined;
}

/**
 * Whether the other end of a connected unix socket is held by process `pid`: Node has
 * no SO_PEERCRED, so the kernel's socket diagnostics (`ss -x`) name the peer socket of
 * ours, and `pid`'s descriptors must include it. Resolves false when it cannot tell.
 */
export async function unixPeerIs(sock: net.Socket, pid: number): Promise<boolean> {
  const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) return false;
  let ours: string;
  try {
    ours = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/self/fd/${fd}`))?.[1] ?? '';
  } catch {
    return false;
  }
  if (!ours) return false;
  const out = await new Promise<string>((resolve) =>
    execFile('ss', ['-xn'], { timeout: 5000 }, (err, stdout) => resolve(err ? '' : stdout)),
  );
  // u_str ESTAB 0 0 /run/…/qmp.sock 81234 * 81233: local inode, then the peer's
  const theirs = out
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .find((t) => t.length >= 3 && t[t.length - 1] === ours && t[t.length - 2] === '*')
    ?.at(-3);
  if (!theirs) return false;
  try {
    return fs.readdirSync(`/proc/${pid}/fd`).some((n) => {
      try {
        return fs.readlinkSync(`/proc/${pid}/fd/${n}`) === `socket:[${theirs}]`;
      } catch {
        return false;
      }
    });
  } catch {
    return false;
  }
}

/** A process's real uid, from /proc/PID/status. */
export function processUid(pid: number): number | undefined {
  try {
    return Number(/^Uid:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]);
  } catch {
    return undefined;
  }
}

export interface StartedQemu {
  pid: number;
  qmp: QmpClient;
}

function tail(file: string, bytes = 2000): string {
  try {
    const s = fs.readFileSync(file, 'utf8');
    return s.slice(-bytes).trim();
  } catch {
    return '';
  }
}

/**
 * Spawns QEMU in its own session with output to `logPath`, then waits for its QMP
 * socket. QEMU was started with -S, so the guest has not run yet when this returns.
 */
export interface SpawnAs {
  /** Run as this uid and gid with a private /dev of these nodes (confine.ts); root when absent. */
  confine?: { id: DomainIdentity; devices: DeviceNode[] };
  /** Open descriptors QEMU inherits as fds 3, 4, … (in this order). */
  passFds?: number[];
}

export function startQemu(
  argv: string[],
  opts: { qmpPath: string; logPath: string; timeoutMs?: number; what: string; engine?: Engine } & SpawnAs,
): Promise<StartedQemu> {
  const e = opts.engine ?? DEFAULT_ENGINE;
  return startQemuWith(e.binary, [...engineArgs(e), ...argv], opts);
}

/** As startQemu, with another launcher in front (e.g. `ip netns exec NS qemu-system-x86_64 …`, which execs). */
export async function startQemuWith(
  binary: string,
  argv: string[],
  opts: { qmpPath: string; logPath: string; timeoutMs?: number; what: string } & SpawnAs,
): Promise<StartedQemu> {
  const timeoutMs = opts.timeoutMs ?? 15000;
  try {
    fs.unlinkSync(opts.qmpPath);
  } catch {
    /* not there */
  }
  const logFd = fs.openSync(opts.logPath, 'a', 0o600);
  fs.writeSync(logFd, `${new Date().toISOString()} ${binary} ${argv.join(' ')}\n`);
  // Confined: the launcher (root) builds the private /dev, drops to the uid and execs, so
  // the child's pid is QEMU's own.
  const run = opts.confine ? confinedCommand(binary, argv, opts.confine.id, opts.confine.devices) : { cmd: binary, args: argv };
  const child = spawn(run.cmd, run.args, { detached: true, stdio: ['ignore', logFd, logFd, ...(opts.passFds ?? [])] });
  fs.closeSync(logFd);
  let exited: { code: number | null; signal: string | null } | undefined;
  let spawnError: Error | undefined;
  child.on('exit', (code, signal) => {
    exited = { code, signal };
  });
  child.on('error', (e) => {
    spawnError = e;
  });
  child.unref();
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (spawnError) throw new FerryError('QEMU_START_FAILED', `Cannot start ${opts.what}: ${spawnError.message}`);
    if (exited) {
      throw new FerryError(
        'QEMU_START_FAILED',
        `Cannot start ${opts.what}: QEMU exited (${exited.code ?? exited.signal}): ${tail(opts.logPath, 600).split('\n').slice(1).join(' ').trim() || 'no message'}`,
      );
    }
    if (fs.existsSync(opts.qmpPath)) {
      try {
        const qmp = await QmpClient.connect(opts.qmpPath, 5000);
        return { pid: child.pid!, qmp };
      } catch {
        /* not listening yet */
      }
    }
    if (Date.now() > deadline) {
      try {
        process.kill(child.pid!, 'SIGKILL');
      } catch {
        /* gone */
      }
      throw new FerryError('QEMU_START_FAILED', `Cannot start ${opts.what}: QMP socket did not appear within ${timeoutMs} ms`);
    }
    // Short: QEMU's start-up is on the critical path of every incoming migration.
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Ends a process and waits until it is gone (SIGTERM, then SIGKILL after graceMs). */
export async function killAndWait(pid: number, graceMs = 2000): Promise<void> {
  if (!pidAlive(pid)) return;
  try {
    process.kill(pid, graceMs > 0 ? 'SIGTERM' : 'SIGKILL');
  } catch {
    return;
  }
  const deadline = Date.now() + graceMs;
  while (pidAlive(pid) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
  if (pidAlive(pid)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      return;
    }
    const hard = Date.now() + 5000;
    while (pidAlive(pid) && Date.now() < hard) await new Promise((r) => setTimeout(r, 5));
  }
}

/** Connects to a unix stream socket, or rejects within timeoutMs. */
export function connectUnix(path: string, timeoutMs = 2000): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection({ path });
    const t = setTimeout(() => {
      s.destroy();
      reject(new Error(`connect ${path} timed out`));
    }, timeoutMs);
    s.once('connect', () => {
      clearTimeout(t);
      resolve(s);
    });
    s.once('error', (e) => {
      clearTimeout(t);
      reject(e);
    });
  });
}
