/**
 * ferry-watchdog: the fencing of last resort. A process of its own (ferryd starts it,
 * detached), so that a ferryd that hangs, is killed or is restarting still cannot let
 * an HA domain run past the moment its lease may expire (cluster/member.ts has the
 * timings). ferryd feeds it over a unix socket, one JSON line at every renewal:
 *
 *   {"deadline": MONO_MS, "targets": [{"pid": 1234, "start": "567890"}, ...]}
 *
 * deadline is on CLOCK_MONOTONIC (shared by every process of the machine); targets
 * are the QEMUs of the HA domains this host owns, each with its start time in clock
 * ticks (/proc/PID/stat), so a recycled pid is never killed. Once the deadline passes
 * without a newer feed, it SIGKILLs every target and forgets them. A restarted ferryd
 * connects to the same socket and goes on feeding it. It exits after a while with no
 * targets and no ferryd connected.
 *
 *   node watchdog.js SOCKET LOGFILE
 */
import fs from 'node:fs';
import net from 'node:net';

interface Target {
  pid: number;
  start: string;
}
interface Feed {
  deadline: number;
  targets: Target[];
}

const monoMs = (): number => Number(process.hrtime.bigint() / 1000000n);

/** The start time of a process in clock ticks (field 22 of /proc/PID/stat), or null if it is gone. */
export function startTicks(pid: number): string | null {
  try {
    const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return st.slice(st.lastIndexOf(')') + 2).split(' ')[19] ?? null;
  } catch {
    return null;
  }
}

/** A feed line, or null if it is not one (ignored: only ferryd, root, can reach the socket). */
export function parseFeed(line: string): Feed | null {
  try {
    const v = JSON.parse(line) as Partial<Feed>;
    if (typeof v.deadline !== 'number' || !Array.isArray(v.targets)) return null;
    const targets = v.targets.filter((t): t is Target => Number.isInteger(t?.pid) && t.pid > 1 && typeof t.start === 'string');
    return { deadline: v.deadline, targets };
  } catch {
    return null;
  }
}

/**
 * One watchdog per state directory: SOCKET.pid, created exclusively. A second one
 * started in a race exits at once; a pid file left by a dead one is taken over.
 * Returns false if another live watchdog holds it.
 */
function claimPidFile(pidFile: string): boolean {
  for (let i = 0; i < 2; i++) {
    try {
      fs.writeFileSync(pidFile, String(process.pid), { flag: 'wx' });
      return true;
    } catch {
      const old = Number(fs.readFileSync(pidFile, 'utf8').trim() || 0);
      let alive = false;
      try {
        alive = old > 1 && fs.readFileSync(`/proc/${old}/cmdline`, 'utf8').includes('watchdog');
      } catch {
        /* gone */
      }
      if (alive) return false;
      fs.rmSync(pidFile, { force: true });
    }
  }
  return false;
}

function main(): void {
  const [sock, logFile] = process.argv.slice(2);
  if (!sock || !logFile) {
    process.stderr.write('usage: watchdog SOCKET LOGFILE\n');
    process.exit(2);
  }
  const log = (msg: string): void => fs.appendFileSync(logFile, `${new Date().toISOString()} ${msg}\n`);
  const pidFile = `${sock}.pid`;
  if (!claimPidFile(pidFile)) process.exit(0);
  let feed: Feed = { deadline: Infinity, targets: [] };
  let clients = 0;
  let idleSince = monoMs();
  fs.rmSync(sock, { force: true });
  const server = net.createServer((c) => {
    clients++;
    let buf = '';
    c.on('data', (d) => {
      buf += d.toString();
      let i: number;
      while ((i = buf.indexOf('\n')) >= 0) {
        const f = parseFeed(buf.slice(0, i));
        buf = buf.slice(i + 1);
        if (f) feed = f;
      }
    });
    c.on('close', () => {
      clients--;
      idleSince = monoMs();
    });
    c.on('error', () => undefined);
  });
  server.listen(sock, () => {
    fs.chmodSync(sock, 0o600);
    log(`watchdog ${process.pid} listening on ${sock}`);
  });
  setInterval(() => {
    if (feed.targets.length && monoMs() >= feed.deadline) {
      for (const t of feed.targets) {
        if (startTicks(t.pid) !== t.start) continue;
        try {
          process.kill(t.pid, 'SIGKILL');
          log(`fenced: killed QEMU pid ${t.pid} (no lease renewal from ferryd before the deadline)`);
        } catch (e) {
          log(`could not kill pid ${t.pid}: ${String(e)}`);
        }
      }
      feed = { deadline: Infinity, targets: [] };
    }
    if (!feed.targets.length && clients === 0 && monoMs() - idleSince > 60000) {
      log('watchdog exiting: no targets and no ferryd for 60 s');
      server.close();
      fs.rmSync(sock, { force: true });
      fs.rmSync(pidFile, { force: true });
      process.exit(0);
    }
  }, 100);
}

if (process.argv[1] && /watchdog\.(js|ts)$/.test(process.argv[1])) main();
