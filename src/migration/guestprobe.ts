/**
 * Guest-perceived downtime: measured from outside the guest during a migration.
 *
 * From the source host's side of the L2 segment, a TCP connection attempt goes to the
 * guest's IP every `intervalMs` (default 1 ms). Whatever the guest's kernel answers,
 * SYN-ACK (open port) or RST (closed port), is a reply; a probe that gets neither
 * within its timeout is lost. The figure is the longest gap between two consecutive
 * replies while the migration runs: what the guest's clients saw. Its resolution is
 * the probe interval plus the host's timer jitter (about 1-2 ms).
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

  constructor(readonly ip: string, readonly port = 9, readonly intervalMs = 1, readonly maxInflight = 256) {}

  start(): void {
    this.t0 = performance.now();
    this.timer = setInterval(() => this.fire(), this.intervalMs);
  }

  private fire(): void {
    if (this.inflight.size >= this.maxInflight) return;
    this.sent++;
    const s = net.createConnection({ host: this.ip, port: this.port });
    this.inflight.add(s);
    const done = (replied: boolean): void => {
      if (!this.inflight.delete(s)) return;
      if (replied) this.replies.push(performance.now());
      s.destroy();
    };
    s.setTimeout(2000, () => done(false));
    s.once('connect', () => done(true));
    s.once('error', (e: NodeJS.ErrnoException) => done(e.code === 'ECONNREFUSED' || e.code === 'ECONNRESET'));
  }

  /** Resolves once a reply arrives after time `t` (performance.now()), or after timeoutMs. */
  async waitForReplyAfter(t: number, timeoutMs: number): Promise<boolean> {
    const deadline = performance.now() + timeoutMs;
    while (performance.now() < deadline) {
      if (this.replies.length && this.replies[this.replies.length - 1] > t) return true;
      await new Promise((r) => setTimeout(r, 5));
    }
    return false;
  }

  /** Stops probing (after waiting `settleMs` for late replies) and reports. */
  async stop(settleMs = 50): Promise<ProbeResult> {
    if (this.timer) clearInterval(this.timer);
    await new Promise((r) => setTimeout(r, settleMs));
    for (const s of this.inflight) s.destroy();
    this.inflight.clear();
    const r = [...this.replies].sort((a, b) => a - b);
    let longest = 0;
    let gapStart: number | null = null;
    for (let i = 1; i < r.length; i++) {
      if (r[i] - r[i - 1] > longest) { longest = r[i] - r[i - 1]; gapStart = r[i - 1] - this.t0; }
    }
    return { longestGapMs: Math.round(longest * 10) / 10, replies: r.length, sent: this.sent, intervalMs: this.intervalMs, target: `${this.ip}:${this.port}`, gapStartMs: gapStart === null ? null : Math.round(gapStart) };
  }
}

/** The first NIC's IPv4 address, if the domain's config names one. */
export function guestIp(nics: { ip?: string }[]): string | undefined {
  return nics.find((n) => n.ip)?.ip?.split('/')[0];
}
