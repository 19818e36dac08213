/**
 * Guest-perceived downtime: measured from outside the guest during a migration.
 *
 * A TCP connection attempt goes to the guest's IP every `intervalMs` (default 1 ms).
 * Whatever the guest's kernel answers, SYN-ACK (open port) or RST (closed port), is a
 * reply; an attempt with no answer within `attemptTimeoutMs` is dropped. The figure is
 * the longest gap between two consecutive replies: what the guest's clients saw.
 *
 * Resolution: the interval plus the host's timer jitter (about 1-2 ms), however long
 * the pause. Attempts are abandoned after 200 ms, well before the kernel's first SYN
 * retransmission (1 s), so a reply is always the answer to a SYN sent just before it;
 * and attempts keep going out during a pause, so the first one after the guest runs
 * again is answered at once (an earlier version capped attempts in flight and so
 * measured any pause over ~256 ms in whole seconds). `waitForReplyAfter` lets a caller
 * wait for the guest's first answer from its new host before it stops the probe.
 */
import net from 'node:net';

export interface ProbeResult {
  longestGapMs: number;
  replies: number;
  sent: number;
  intervalMs: number;
  target: string;
  /** When the longest gap began, relative to the probe's start. */
  gapStartMs: number | null;
}

export class GuestProbe {
  private timer?: NodeJS.Timeout;
  private replies: number[] = [];
  private sent = 0;
  private inflight = new Set<net.Socket>();
  private t0 = 0;
  private waiters: { after: number; resolve: (ok: boolean) => void }[] = [];

  constructor(
    readonly ip: string,
    readonly port = 9,
    readonly intervalMs = 1,
    readonly attemptTimeoutMs = 200,
  ) {}

  start(): void {
    this.t0 = performance.now();
    this.timer = setInterval(() => this.fire(), this.intervalMs);
  }

  private fire(): void {
    // A bound that only a broken network stack reaches: one attempt per interval, each
    // gone after attemptTimeoutMs.
    if (this.inflight.size > 4 * Math.ceil(this.attemptTimeoutMs / this.intervalMs)) return;
    this.sent++;
    const s = net.createConnection({ host: this.ip, port: this.port });
    this.inflight.add(s);
    const t = setTimeout(() => done(false), this.attemptTimeoutMs);
    const done = (replied: boolean): void => {
      if (!this.inflight.delete(s)) return;
      clearTimeout(t);
      s.destroy();
      if (!replied) return;
      const now = performance.now();
      this.replies.push(now);
      for (const w of [...this.waiters])
        if (now > w.after) {
          this.waiters = this.waiters.filter((x) => x !== w);
          w.resolve(true);
        }
    };
    s.once('connect', () => done(true));
    s.once('error', (e: NodeJS.ErrnoException) => done(e.code === 'ECONNREFUSED' || e.code === 'ECONNRESET'));
  }

  /** Resolves true once a reply arrives after time `t` (performance.now()), or false after timeoutMs. */
  waitForReplyAfter(t: number, timeoutMs: number): Promise<boolean> {
    if (this.replies.length && this.replies[this.replies.length - 1] > t) return Promise.resolve(true);
    return new Promise((resolve) => {
      const w = { after: t, resolve };
      this.waiters.push(w);
      setTimeout(() => {
        if (this.waiters.includes(w)) {
          this.waiters = this.waiters.filter((x) => x !== w);
          resolve(false);
        }
      }, timeoutMs);
    });
  }

  /** performance.now() of the first reply after `t`, or null if none came yet. */
  firstReplyAfter(t: number): number | null {
    let best: number | null = null;
    for (const r of this.replies) if (r > t && (best === null || r < best)) best = r;
    return best;
  }

  /** Stops probing (after waiting `settleMs` for late replies) and reports. */
  async stop(settleMs = 20): Promise<ProbeResult> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    if (settleMs > 0) await new Promise((r) => setTimeout(r, settleMs));
    for (const s of this.inflight) s.destroy();
    this.inflight.clear();
    for (const w of this.waiters) w.resolve(false);
    this.waiters = [];
    const r = [...this.replies].sort((a, b) => a - b);
    let longest = 0;
    let gapStart: number | null = null;
    for (let i = 1; i < r.length; i++) {
      if (r[i] - r[i - 1] > longest) {
        longest = r[i] - r[i - 1];
        gapStart = r[i - 1] - this.t0;
      }
    }
    return {
      longestGapMs: Math.round(longest * 10) / 10,
      replies: r.length,
      sent: this.sent,
      intervalMs: this.intervalMs,
      target: `${this.ip}:${this.port}`,
      gapStartMs: gapStart === null ? null : Math.round(gapStart),
    };
  }
}

/** The first NIC's IPv4 address, if the domain's config names one. */
export function guestIp(nics: { ip?: string }[]): string | undefined {
  return nics.find((n) => n.ip)?.ip?.split('/')[0];
}
