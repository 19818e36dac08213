/**
 * `ferry console DOM`: the guest's serial console through its host's ferryd.
 *
 * On a terminal: raw mode, Ctrl-] detaches. Otherwise it is scriptable: stdin goes to
 * the guest, guest output to stdout, and it exits once stdin has ended and the guest
 * has been silent for `idleMs`. The daemon ends the stream with a \x1e-prefixed JSON
 * line when the domain stops, or moves to another host; then the session follows it.
 */
import { ApiClient, resolveTarget, labHosts, type Target } from '../api/client.ts';
import { CONSOLE_CONTROL } from '../api/protocol.ts';
import { FerryError } from '../errors.ts';

export interface ConsoleOpts { idleMs: number; replay: number; maxMs?: number }

interface Control { event: string; reason?: string; host?: string; target?: string }

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
      if (rest) process.stdout.write(rest);
      for (const b of pendingInput.splice(0)) write(b);
      let ctrlBuf = '';
      const ended = new Promise<Control | null>((resolve) => {
        c.socket.on('data', (d: Buffer) => {
          lastOutput = Date.now();
          const s = d.toString('latin1');
          const i = s.indexOf(CONSOLE_CONTROL);
          if (i < 0 && !ctrlBuf) { process.stdout.write(d); return; }
          if (i >= 0 && !ctrlBuf) { process.stdout.write(Buffer.from(s.slice(0, i), 'latin1')); ctrlBuf = s.slice(i + 1); } else ctrlBuf += s;
        });
        c.socket.on('close', () => {
          if (!ctrlBuf) return resolve(null);
          try { resolve(JSON.parse(ctrlBuf.trim()) as Control); } catch { resolve(null); }
        });
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
