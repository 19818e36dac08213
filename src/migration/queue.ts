/**
 * The fleet's move policy on the source: at most `outgoing` moves leave this host at
 * once, at most `perLink` to one destination (one migration link); the rest wait here,
 * in order of priority (an evacuation before an operator's move before the balancer's),
 * first come first served within one. Ten moves asked at once queue instead of
 * failing, and each waiting move has an ETA: `ferry jobs` and the dashboard show both.
 * A waiting move has no job yet (nothing is reserved anywhere): cancelling it only
 * takes it out of the line.
 *
 * The destination keeps its own limits on what it takes in (limits.incomingTotal and
 * incomingPerPeer, incoming/begin.ts). A move it refuses for them (MIGRATION_DEST_BUSY,
 * before anything is reserved) goes back in line, keeping its place, and is tried again
 * after a pause (Slot.backOff): the source cannot see the other sources' moves, so it
 * asks again rather than counting.
 */
import { FerryError } from '../errors.ts';
import { PRIORITIES, type MovePriority, type QueueView } from '../api/protocol.ts';

export { PRIORITIES, type MovePriority, type QueueView };

interface Entry {
  domain: string;
  dest: string;
  live: boolean;
  priority: MovePriority;
  memoryMiB: number;
  seq: number;
  since: number;
  started?: number;
  /** Backed off: not before this time, and why (the destination's limits). */
  notBefore?: number;
  blockedBy?: string;
  wake?: () => void;
  fail?: (e: Error) => void;
}

/** Before any move finished here: a move's fixed cost and its rate, to predict the next. */
const DEFAULT_SETUP_MS = 1500;
const DEFAULT_RATE_MIBS = 200;

/** A move's slot: call it to give the slot back; backOff puts the move back in line for a while, in its place. */
export type Slot = (() => void) & { backOff: (ms: number, why: string) => Promise<void> };

export class MoveQueue {
  private readonly entries: Entry[] = [];
  private seq = 0;
  /** Observed: MiB/s of the moves that finished here lately (the ETA's rate). */
  private rates: number[] = [];
  private wakeTimer?: NodeJS.Timeout;

  constructor(
    private readonly limits: () => { outgoing: number; perLink: number },
    /** The line changed (a move joined, started, finished or was withdrawn): the host republishes it for the dashboard. */
    private readonly changed: () => void = () => undefined,
  ) {}

  /**
   * Waits for a slot for DOMAIN's move to DEST; returns its release. A domain already in
   * line or moving is refused (MIGRATION_IN_PROGRESS).
   */
  async enter(m: { domain: string; dest: string; live: boolean; priority: MovePriority; memoryMiB: number }): Promise<Slot> {
    if (this.entries.some((e) => e.domain === m.domain))
      throw new FerryError('MIGRATION_IN_PROGRESS', `Domain "${m.domain}" already has a move queued or running`);
    const e: Entry = { ...m, seq: this.seq++, since: Date.now() };
    this.entries.push(e);
    this.changed();
    await this.ready(e);
    let done = false;
    const release = (): void => {
      if (done) return;
      done = true;
      const i = this.entries.indexOf(e);
      if (i >= 0) this.entries.splice(i, 1); // not when withdrawn while backed off
      this.pump();
      this.changed();
    };
    const backOff = async (ms: number, why: string): Promise<void> => {
      if (done) return;
      e.started = undefined;
      e.notBefore = Date.now() + ms;
      e.blockedBy = why;
      const back = this.ready(e);
      this.pump();
      this.changed();
      await back;
    };
    return Object.assign(release, { backOff });
  }

  /** Resolves when the pump starts e (rejects when it is withdrawn). */
  private ready(e: Entry): Promise<void> {
    const p = new Promise<void>((resolve, reject) => {
      e.wake = resolve;
      e.fail = reject;
    });
    this.pump();
    return p;
  }

  /** Takes a waiting move out of the line (`ferry job abort`): true if it was waiting. */
  withdraw(domain: string): boolean {
    const e = this.entries.find((x) => x.domain === domain && x.started === undefined);
    if (!e) return false;
    this.entries.splice(this.entries.indexOf(e), 1);
    e.fail?.(new FerryError('MIGRATION_CANCELLED', `The queued move of "${domain}" to ${e.dest} was withdrawn before it started`));
    this.pump();
    this.changed();
    return true;
  }

  /** A finished move's rate, for the next ETAs. */
  observed(memoryMiB: number, ms: number): void {
    if (ms <= 0) return;
    this.rates.push(memoryMiB / (ms / 1000));
    if (this.rates.length > 8) this.rates.shift();
  }

  private order(): Entry[] {
    const rank = (p: MovePriority): number => PRIORITIES.indexOf(p);
    return this.entries.filter((e) => e.started === undefined).sort((a, b) => rank(a.priority) - rank(b.priority) || a.seq - b.seq);
  }

  /** Starts every waiting move that has a slot, best first; one whose link is full does not hold up the others. */
  private pump(): void {
    const lim = this.limits();
    const now = Date.now();
    for (const e of this.order()) {
      if (e.notBefore !== undefined && e.notBefore > now) continue;
      const running = this.entries.filter((x) => x.started !== undefined);
      if (running.length >= lim.outgoing) break;
      if (running.filter((x) => x.dest === e.dest).length >= lim.perLink) continue;
      e.started = now;
      e.notBefore = e.blockedBy = undefined;
      e.wake?.();
    }
    // A backed-off move's turn comes by time, not by another move's end.
    clearTimeout(this.wakeTimer);
    const next = Math.min(...this.order().map((e) => e.notBefore ?? Infinity));
    if (next !== Infinity) {
      this.wakeTimer = setTimeout(() => this.pump(), Math.max(0, next - now));
      this.wakeTimer.unref();
    }
  }

  /** A move's predicted time: the recent rate, or a default before any move finished here. */
  private expectMs(memoryMiB: number): number {
    const rate = this.rates.length ? this.rates.reduce((a, b) => a + b, 0) / this.rates.length : DEFAULT_RATE_MIBS;
    return DEFAULT_SETUP_MS + (memoryMiB / Math.max(1, rate)) * 1000;
  }

  /**
   * Every move in line or running, with its ETA: the schedule the pump will follow,
   * simulated with each move's predicted time (running ones: what is left of it).
   */
  views(now = Date.now()): QueueView[] {
    const lim = this.limits();
    const running = this.entries.filter((x) => x.started !== undefined);
    const slots = running.map((r) => ({ dest: r.dest, freeAt: Math.max(0, this.expectMs(r.memoryMiB) - (now - r.started!)) }));
    const out: QueueView[] = running.map((r, i) => ({
      domain: r.domain,
      dest: r.dest,
      priority: r.priority,
      memoryMiB: r.memoryMiB,
      live: r.live,
      state: 'running',
      position: null,
      since: new Date(r.since).toISOString(),
      waitingFor: null,
      etaMs: Math.round(slots[i].freeAt),
    }));
    this.order().forEach((e, i) => {
      // Simulated: it starts when a slot is free and its link has room (a backed-off one: not before its pause ends).
      let t = Math.max(0, (e.notBefore ?? 0) - now);
      for (;;) {
        const busy = slots.filter((s) => s.freeAt > t);
        if (busy.length < lim.outgoing && busy.filter((s) => s.dest === e.dest).length < lim.perLink) break;
        t = Math.min(...busy.map((s) => s.freeAt));
      }
      const end = t + this.expectMs(e.memoryMiB);
      slots.push({ dest: e.dest, freeAt: end });
      const link = running.filter((r) => r.dest === e.dest).length >= lim.perLink;
      const blocked = e.notBefore !== undefined && e.notBefore > now ? e.blockedBy : undefined;
      out.push({
        domain: e.domain,
        dest: e.dest,
        priority: e.priority,
        memoryMiB: e.memoryMiB,
        live: e.live,
        state: 'queued',
        position: i + 1,
        since: new Date(e.since).toISOString(),
        waitingFor: blocked
          ? blocked
          : link
            ? `the link to ${e.dest} (${lim.perLink} at a time, limits.movesPerLink)`
            : `a slot (${lim.outgoing} moves out at a time, limits.movesOut)`,
        etaMs: Math.round(end),
      });
    });
    return out;
  }
}
