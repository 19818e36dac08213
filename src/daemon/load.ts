/**
 * Each running domain's CPU use, averaged over a window, and its dirty rate: what the
 * balancer reads (placement/balance.ts, through the host facts a cluster host
 * publishes). The QEMU process's CPU time (all its threads: vCPUs, I/O, migration) is
 * sampled every few seconds; the average over the last minute keeps one busy second
 * from moving a domain. The dirty rate (QEMU's calc-dirty-rate, one second, one domain
 * at a time, each about once a minute) is what a move of the domain would have to
 * outrun: among equally good moves the balancer takes the one that dirties least.
 */
import { cpuSeconds } from '../qemu/process.ts';
import { measureDirtyRate } from '../qemu/migration.ts';
import type { QmpClient } from '../qmp/client.ts';

export const LOAD_SAMPLE_MS = 5000;
export const LOAD_WINDOW_MS = 60000;
/** A domain measured for less than this (just started or moved here) has no load yet: the balancer does not judge CPU on one sample. */
export const LOAD_MIN_MS = 15000;
/** Each domain's dirty rate is measured about this often, over DIRTY_SAMPLE_MS. */
export const DIRTY_EVERY_MS = 60000;
const DIRTY_SAMPLE_MS = 1000;

export interface Running {
  name: string;
  pid: number;
  /** Its QMP connection, when it is not busy (a move measures its own). */
  qmp?: QmpClient;
}

export class LoadMeter {
  /** Per domain: its pid (a new QEMU starts over) and its samples, oldest first. */
  private readonly seen = new Map<string, { pid: number; samples: { at: number; cpuS: number }[] }>();
  /** Per domain: its last dirty rate (MB/s; null: QEMU would not say) and when it was asked. */
  private readonly dirty = new Map<string, { pid: number; at: number; mbps: number | null }>();
  private timer?: NodeJS.Timeout;
  private measuring = false;

  constructor(private readonly running: () => Running[]) {}

  start(): void {
    this.sample();
    this.timer = setInterval(() => {
      this.sample();
      void this.measureDirty();
    }, LOAD_SAMPLE_MS);
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
  }

  /** The domain measured longest ago (or never), if that is more than DIRTY_EVERY_MS ago: one per tick, so they spread out. */
  private async measureDirty(now = Date.now()): Promise<void> {
    if (this.measuring) return;
    const due = this.running()
      .filter((d) => d.qmp)
      .map((d) => ({ d, last: this.dirty.get(d.name) }))
      .filter(({ d, last }) => !last || last.pid !== d.pid || now - last.at >= DIRTY_EVERY_MS)
      .sort((a, b) => (a.last?.at ?? 0) - (b.last?.at ?? 0))[0];
    if (!due) return;
    this.measuring = true;
    try {
      const bps = await measureDirtyRate(due.d.qmp!, DIRTY_SAMPLE_MS);
      this.dirty.set(due.d.name, { pid: due.d.pid, at: Date.now(), mbps: bps === null ? null : Math.round(bps / 1e5) / 10 });
    } catch {
      // A QEMU that refuses (an old engine, a domain ending): no figure, asked again next minute.
      this.dirty.set(due.d.name, { pid: due.d.pid, at: Date.now(), mbps: null });
    } finally {
      this.measuring = false;
    }
  }

  /** Each running domain's last dirty rate, MB/s (domains not measured yet are left out). */
  dirtyRates(): Record<string, number> {
    const live = new Set(this.running().map((d) => d.name));
    const out: Record<string, number> = {};
    for (const [name, v] of this.dirty) if (live.has(name) && v.mbps !== null) out[name] = v.mbps;
    return out;
  }

  sample(at = Date.now()): void {
    const now = this.running();
    for (const name of this.seen.keys()) if (!now.some((d) => d.name === name)) this.seen.delete(name);
    for (const name of this.dirty.keys()) if (!now.some((d) => d.name === name)) this.dirty.delete(name);
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
