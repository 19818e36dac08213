/**
 * `ferry console DOM`: the guest's serial console through its host's ferryd.
 *
 * On a terminal: raw mode, Ctrl-] detaches. Otherwise it is scriptable: stdin goes to
 * the guest, guest output to stdout, and it exits once stdin has ended and the guest
 * has been silent for `idleMs`. The daemon frames what it sends (api/protocol.ts), and
 * ends the stream with a control frame when the domain stops or moves to another host;
 * then the session follows it, to another ferryd's TLS port only (never a unix path).
 */
import { ApiClient, resolveTarget, labHosts, type Target } from '../api/client.ts';
import { ConsoleDeframer } from '../api/protocol.ts';
import { NAME_RE } from '../domain/config.ts';
import { FerryError } from '../errors.ts';

export interface ConsoleOpts { idleMs: number; replay: number; maxMs?: number }

interface Control { event: string; reason?: string; host?: string; target?: string }

/** A control frame as ferryd sends it; a redirect names a host and, at most, ADDRESS:PORT. */
export function isControl(m: unknown): m is Control {
  if (typeof m !== 'object' || m === null) return false;
  const c = m as Record<string, unknown>;
  if (c.event === 'stopped') return c.reason === undefined || typeof c.reason === 'string';
  if (c.event !== 'moved' || typeof c.host !== 'string' || !NAME_RE.test(c.host)) return false;
  return c.target === undefined || (typeof c.target === 'string' && /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/.test(c.target));
}

export async function runConsole(hostArg: string | undefined, domain: string, o: ConsoleOpts): Promise<number> {
  const tty = !!process.stdin.isTTY;
  let target: Target = resolveTarget(hostArg);
  let stdinEnded = false;
  let lastOutput = Date.now();
  const pendingInput: Buffer[] = [];
  let current: ApiClient | undefined;
  const t0 = Date.now();

  const write = (b: Buffer): void => { current?.socket.write(b); };
  if (tty) {
    process.stdin.setRawMode(true);
    process.stderr.write(`Connected to domain "${domain}". Escape character is '^]'.\r\n`);
  }
  let detach: () => void = () => undefined;
  const detached = new Promise<void>((r) => { detach = r; });
  process.stdin.on('data', (d: Buffer) => {
    if (tty && d.includes(0x1d)) { detach(); return; }
    if (current) write(d); else pendingInput.push(d);
  });
  process.stdin.on('end', () => { stdinEnded = true; lastOutput = Math.max(lastOutput, Date.now()); });

  try {
    for (;;) {
      const c = await ApiClient.connect(target);
      // Input that arrives before the daemon switched this connection to raw bytes
      // waits in pendingInput: sent earlier, it would be read as a JSON request.
      current = undefined;
      await c.request('console.attach', { domain, replay: tty ? 4096 : o.replay });
      lastOutput = Date.now();
      const rest = c.goRaw();
      current = c;
      for (const b of pendingInput.splice(0)) write(b);
      let control: Control | null = null;
      const ended = new Promise<Control | null>((resolve) => {
        const deframer = new ConsoleDeframer((b) => process.stdout.write(b), (m) => { if (isControl(m)) control = m; });
        const feed = (d: Buffer): void => {
          lastOutput = Date.now();
          try { deframer.push(d); } catch { c.close(); }
        };
        if (rest.length) feed(rest);
        c.socket.on('data', feed);
        c.socket.on('close', () => resolve(control));
      });
      const idle = new Promise<'idle'>((resolve) => {
        if (tty) return;
        const iv = setInterval(() => {
          const quiet = Date.now() - lastOutput >= o.idleMs;
          if ((stdinEnded && quiet) || (o.maxMs && Date.now() - t0 > o.maxMs)) { clearInterval(iv); resolve('idle'); }
        }, 50);
        c.socket.once('close', () => clearInterval(iv));
      });
      const what = await Promise.race([ended, idle, detached.then(() => 'detached' as const)]);
      if (what === 'idle' || what === 'detached') { c.close(); return 0; }
      if (what && what.event === 'moved' && what.host) {
        process.stderr.write(`\r\n[ferry: domain "${domain}" moved to ${what.host}; following it]\r\n`);
        // A lab host name resolves to its local socket from anywhere; otherwise use the
        // address the source knew the destination by.
        target = labHosts().some((h) => h.name === what.host) ? resolveTarget(what.host) : resolveTarget(what.target ?? what.host);
        // The destination may take a moment to settle the domain.
        await new Promise((r) => setTimeout(r, 200));
        continue;
      }
      if (what && what.event === 'stopped') {
        process.stderr.write(`\r\n[ferry: domain "${domain}" stopped (${what.reason})]\r\n`);
        return 0;
      }
      throw new FerryError('DAEMON_UNREACHABLE', `Console connection to domain "${domain}" closed`);
    }
  } finally {
    if (tty) process.stdin.setRawMode(false);
    process.stdin.pause();
  }
}
