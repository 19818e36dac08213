/**
 * Each running domain's CPU use, averaged over a window: what the balancer reads
 * (placement/balance.ts, through the host facts a cluster host publishes). The QEMU
 * process's CPU time (all its threads: vCPUs, I/O, migration) is sampled every few
 * seconds; the average over the last minute keeps one busy second from moving a domain.
 */
import { cpuSeconds } from '../qemu/process.ts';

export const LOAD_SAMPLE_MS = 5000;
export const LOAD_WINDOW_MS = 60000;
/** A domain measured for less than this (just started or moved here) has no load yet: the balancer does not judge CPU on one sample. */
export const LOAD_MIN_MS = 15000;

export class LoadMeter {
  /** Per domain: its pid (a new QEMU starts over) and its samples, oldest first. */
  private readonly seen = new Map<string, { pid: number; samples: { at: number; cpuS: number }[] }>();
  private timer?: NodeJS.Timeout;

  constructor(private readonly running: () => { name: string; pid: number }[]) {}

  start(): void {
    this.sample();
    this.timer = setInterval(() => this.sample(), LOAD_SAMPLE_MS);
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
  }

  sample(at = Date.now()): void {
    const now = this.running();
    for (const name of this.seen.keys()) if (!now.some((d) => d.name === name)) this.seen.delete(name);
    for (const d of now) {
      let s = this.seen.get(d.name);
      if (!s || s.pid !== d.pid) {
        s = { pid: d.pid, samples: [] };
        this.seen.set(d.name, s);
      }
      s.samples.push({ at, cpuS: cpuSeconds(d.pid) });
      while (s.samples.length > 2 && at - s.samples[1].at >= LOAD_WINDOW_MS) s.samples.shift();
    }
  }

  /** Cores each running domain used over the window; a domain measured for less than LOAD_MIN_MS is left out. */
  averages(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [name, s] of this.seen) {
      const a = s.samples[0],
        b = s.samples[s.samples.length - 1];
      if (b.at - a.at >= LOAD_MIN_MS) out[name] = Math.max(0, Math.round(((b.cpuS - a.cpuS) / ((b.at - a.at) / 1000)) * 1000) / 1000);
    }
    return out;
  }
}
