/**
 * `ferry console DOM`: the guest's serial console through its host's ferryd.
 *
 * On a terminal: raw mode, Ctrl-] detaches. Otherwise it is scriptable: stdin goes to
 * the guest, guest output to stdout, and it exits once stdin has ended and the guest
 * has been silent for `idleMs`. The daemon frames what it sends (api/protocol.ts), and
 * ends the stream with a control frame when the domain stops or moves to another host;
 * then the session follows it, to another ferryd's TLS port only (never a unix path).
 * `ConsoleFollower` is that session; `ferry ui` shares it with its browser viewers.
 */
import { ApiClient, type Target } from '../api/client.ts';
import { labHosts } from '../lab/hosts.ts';
import { resolveTarget } from './targets.ts';
import { ConsoleDeframer } from '../api/protocol.ts';
import { NAME_RE } from '../domain/config.ts';
import { FerryError } from '../errors.ts';

export interface ConsoleOpts {
  idleMs: number;
  replay: number;
  maxMs?: number;
}

interface Control {
  event: string;
  reason?: string;
  host?: string;
  target?: string;
}

/** A control frame as ferryd sends it; a redirect names a host and, at most, ADDRESS:PORT. */
export function isControl(m: unknown): m is Control {
  if (typeof m !== 'object' || m === null) return false;
  const c = m as Record<string, unknown>;
  if (c.event === 'stopped') return c.reason === undefined || typeof c.reason === 'string';
  if (c.event !== 'moved' || typeof c.host !== 'string' || !NAME_RE.test(c.host)) return false;
  return c.target === undefined || (typeof c.target === 'string' && /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/.test(c.target));
}

/** Why a follower's run ended: the domain stopped (its reason), or `close()` was called. */
export type FollowEnd = { end: 'stopped'; reason?: string } | { end: 'closed' };

export interface FollowOpts {
  /** Bytes of past output ferryd replays at each attach. */
  replay: number;
  /** Where a domain that moved is now reached: its host name and the address the source knew it by. */
  resolve: (host: string, target: string | undefined) => Target;
  connectTimeoutMs?: number;
}

/**
 * One console session that follows its domain: attach, stream the output, and on a
 * "moved" control frame attach again on the new host. Input written while no connection
 * is raw (before the first attach, or while it follows) waits and goes out in order.
 */
export class ConsoleFollower {
  /** The connection in raw mode (input goes straight to it). */
  private client: ApiClient | undefined;
  /** The connection being set up or in use (what close() closes). */
  private conn: ApiClient | undefined;
  private readonly pending: Buffer[] = [];
  private closed = false;

  private readonly domain: string;
  /** The host the session is attached to (a label: the name the caller knows it by). */
  host: string;
  private target: Target;

  constructor(
    at: { domain: string; host: string; target: Target },
    private readonly o: FollowOpts,
    private readonly on: { attached?: (host: string) => void; output: (b: Buffer) => void; moved?: (from: string, to: string) => void },
  ) {
    this.domain = at.domain;
    this.host = at.host;
    this.target = at.target;
  }

  /** Bytes typed while the session was between connections. */
  get pendingBytes(): number {
    return this.pending.reduce((a, b) => a + b.length, 0);
  }

  write(b: Buffer): void {
    if (this.client) this.client.socket.write(b);
    else this.pending.push(b);
  }

  /** Ends the session (its run resolves `closed`), also while it is following. */
  close(): void {
    this.closed = true;
    this.conn?.close();
  }

  /** Runs until the domain stops or `close()`; a connection lost otherwise is DAEMON_UNREACHABLE. */
  async run(): Promise<FollowEnd> {
    for (;;) {
      if (this.closed) return { end: 'closed' };
      const c = await ApiClient.connect(this.target, this.o.connectTimeoutMs);
      this.conn = c;
      if (this.closed) {
        c.close();
        return { end: 'closed' };
      }
      // Input that arrives before the daemon switched this connection to raw bytes
      // waits in `pending`: sent earlier, it would be read as a JSON request.
      try {
        await c.request('console.attach', { domain: this.domain, replay: this.o.replay });
      } catch (e) {
        if (this.closed) return { end: 'closed' };
        throw e;
      }
      if (this.closed) {
        c.close();
        return { end: 'closed' };
      }
      const rest = c.goRaw();
      this.client = c;
      for (const b of this.pending.splice(0)) c.socket.write(b);
      this.on.attached?.(this.host);
      const control = await new Promise<Control | null>((resolve) => {
        let last: Control | null = null;
        const deframer = new ConsoleDeframer(
          (b) => this.on.output(b),
          (m) => {
            if (isControl(m)) last = m;
          },
        );
        const feed = (d: Buffer): void => {
          try {
            deframer.push(d);
          } catch {
            c.close();
          }
        };
        if (rest.length) feed(rest);
        c.socket.on('data', feed);
        c.socket.on('close', () => resolve(last));
      });
      this.client = undefined;
      this.conn = undefined;
      if (this.closed) return { end: 'closed' };
      if (control?.event === 'moved' && control.host) {
        this.on.moved?.(this.host, control.host);
        this.host = control.host;
        this.target = this.o.resolve(control.host, control.target);
        // The destination may take a moment to settle the domain.
        await new Promise((r) => setTimeout(r, 200));
        continue;
      }
      if (control?.event === 'stopped') return { end: 'stopped', reason: control.reason };
      throw new FerryError('DAEMON_UNREACHABLE', `Console connection to domain "${this.domain}" closed`);
    }
  }
}

/** A lab host name resolves to its local socket from anywhere; otherwise the address the source knew the destination by. */
export const followTarget = (host: string, target: string | undefined): Target =>
  labHosts().some((h) => h.name === host) ? resolveTarget(host) : resolveTarget(target ?? host);

export async function runConsole(hostArg: string | undefined, domain: string, o: ConsoleOpts): Promise<number> {
  const tty = !!process.stdin.isTTY;
  let stdinEnded = false;
  let lastOutput = Date.now();
  let attached = false;
  const t0 = Date.now();
  const session = new ConsoleFollower(
    { domain: domain, host: hostArg ?? 'local', target: resolveTarget(hostArg) },
    { replay: tty ? 4096 : o.replay, resolve: followTarget },
    {
      attached: () => {
        attached = true;
        lastOutput = Date.now();
      },
      output: (b) => {
        lastOutput = Date.now();
        process.stdout.write(b);
      },
      moved: (_from, to) => {
        process.stderr.write(`\r\n[ferry: domain "${domain}" moved to ${to}; following it]\r\n`);
      },
    },
  );
  if (tty) {
    process.stdin.setRawMode(true);
    process.stderr.write(`Connected to domain "${domain}". Escape character is '^]'.\r\n`);
  }
  process.stdin.on('data', (d: Buffer) => {
    if (tty && d.includes(0x1d)) {
      session.close();
      return;
    }
    session.write(d);
  });
  process.stdin.on('end', () => {
    stdinEnded = true;
    lastOutput = Math.max(lastOutput, Date.now());
  });
  // Scripted use ends once stdin has ended, its bytes went out (the first attach) and the
  // guest has been quiet for idleMs; or at maxMs.
  const iv = tty
    ? undefined
    : setInterval(() => {
        const quiet = Date.now() - lastOutput >= o.idleMs;
        if ((attached && stdinEnded && quiet) || (o.maxMs && Date.now() - t0 > o.maxMs)) session.close();
      }, 50);
  try {
    const end = await session.run();
    if (end.end === 'stopped') process.stderr.write(`\r\n[ferry: domain "${domain}" stopped (${end.reason})]\r\n`);
    return 0;
  } finally {
    if (iv) clearInterval(iv);
    if (tty) process.stdin.setRawMode(false);
    process.stdin.pause();
  }
}
