/**
 * Membership: this host's lease in etcd, its published facts, and when it must fence.
 *
 * A renewal is two calls to one etcd member: the lease's keep-alive, then a write of the
 * host's heartbeat key (/ferry/alive/NAME, under the lease). It counts only when both
 * are answered. The timings (README "Cluster mode: fencing"), with TTL the lease's time
 * to live and M the fence margin, all measured from T, the moment this host *sent* its
 * last renewal that counted (etcd renewed the lease, and committed the heartbeat, no
 * earlier than T):
 *
 *   T + TTL − M       ferryd stops the vCPUs of its HA domains, then kills their QEMUs
 *   T + TTL − M/2     the watchdog (a separate process, fed T at every renewal) kills
 *                     whatever HA QEMU is left, even if ferryd hangs or died
 *   ≥ T + TTL         etcd expires the lease (never earlier: it renewed at or after T;
 *                     a leader change only extends leases)
 *   expiry + delay    the HA manager restarts the domains elsewhere (cluster/ha.ts), or
 *   H + TTL + delay   sooner, with H when the manager first knew of the last heartbeat
 *                     (H ≥ its commit ≥ T): etcd's new leader renews every lease for a
 *                     whole TTL, so a host that dies with etcd's leader keeps its lease
 *                     longer, but not its heartbeat
 *
 * So another host starts a domain at least M/2 + delay after the last moment this
 * host could have run it, on clocks that agree on the length of a second (both sides
 * measure intervals on their monotonic clocks; no wall clock is compared).
 *
 *   state      event        → next
 *   joining    granted        member     (a lease: fresh, or the one before a restart, still alive)
 *   member     renewed        member     (T moves on)
 *   member     overdue        fenced     (T + TTL − M passed: HA domains fenced)
 *   member     expired        joining    (etcd says the lease is gone: fence now, then join again)
 *   fenced     renewed        member     (the lease survived; the fenced domains may restart here)
 *   fenced     expired        joining
 *   any        stop           stopped
 */
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import type { Etcd3 } from 'etcd3';
import { FerryError } from '../errors.ts';
import { clusterError, etcdCall } from './etcd.ts';
import { aliveKey, hostKey, type HostFacts } from './records.ts';

export type MemberState =
  | { kind: 'joining' }
  | { kind: 'member'; lease: string; renewedAt: number }
  | { kind: 'fenced'; lease: string; renewedAt: number }
  | { kind: 'stopped' };

export type MemberEvent =
  | { type: 'granted'; lease: string; at: number }
  | { type: 'renewed'; at: number }
  | { type: 'overdue' }
  | { type: 'expired' }
  | { type: 'stop' };

/** The one transition function of membership; an event that does not apply leaves the state as it is. */
export function memberStep(s: MemberState, e: MemberEvent): MemberState {
  if (e.type === 'stop') return { kind: 'stopped' };
  switch (s.kind) {
    case 'stopped':
      return s;
    case 'joining':
      return e.type === 'granted' ? { kind: 'member', lease: e.lease, renewedAt: e.at } : s;
    case 'member':
    case 'fenced':
      if (e.type === 'renewed') return { kind: 'member', lease: s.lease, renewedAt: Math.max(s.renewedAt, e.at) };
      if (e.type === 'expired') return { kind: 'joining' };
      if (e.type === 'overdue') return s.kind === 'member' ? { kind: 'fenced', lease: s.lease, renewedAt: s.renewedAt } : s;
      return s;
    default: {
      const never: never = s;
      return never;
    }
  }
}

/** One member's keep-alive answer, at most: a dead member costs this much of a renewal. */
const KEEPALIVE_MS = 800;

/** Milliseconds on CLOCK_MONOTONIC, the same clock in every process of the machine (the watchdog's too). */
export const monoMs = (): number => Number(process.hrtime.bigint() / 1000000n);

export interface MembershipOptions {
  etcd: Etcd3;
  /**
   * One client per etcd member, for the lease: a renewal tries the member that answered
   * last, then the others, so one dead member never costs a renewal (the pool's random
   * pick would, a third of the time, and three misses in a row are a fence).
   */
  members: Etcd3[];
  name: string;
  ttlS: number;
  marginS: number;
  /** Where the lease id is kept, so a restarted ferryd renews the same lease. */
  leaseFile: string;
  facts: () => Omit<HostFacts, 'since'>;
  log: { info: (m: string, d?: Record<string, unknown>) => void; warn: (m: string, d?: Record<string, unknown>) => void };
}

/**
 * Events: 'joined' ({lease, resumed}) when this host (again) has a lease; 'fence'
 * ({why}) when its HA domains must stop now; 'renewed' ({renewedAt}) after each
 * renewal (the watchdog's feed); 'beat' ({revision, at}) after each heartbeat written;
 * 'state' on every change.
 */
export class Membership extends EventEmitter {
  private s: MemberState = { kind: 'joining' };
  private timer?: NodeJS.Timeout;
  private since = new Date().toISOString();
  private busy = false;
  /** The member that answered the last lease call. */
  private good = 0;

  constructor(private readonly o: MembershipOptions) {
    super();
  }

  get state(): MemberState {
    return this.s;
  }

  /** The lease is renewed in time: this host may start, resume and move domains. */
  quorate(): boolean {
    return this.s.kind === 'member' && monoMs() < this.fenceAt();
  }

  /** When this host fences, on the monotonic clock (Infinity without a lease). */
  fenceAt(): number {
    return this.s.kind === 'member' || this.s.kind === 'fenced' ? this.s.renewedAt + (this.o.ttlS - this.o.marginS) * 1000 : Infinity;
  }

  /** When the watchdog fences if ferryd has not (half the margin later). */
  watchdogAt(): number {
    return this.s.kind === 'member' || this.s.kind === 'fenced' ? this.s.renewedAt + (this.o.ttlS - this.o.marginS / 2) * 1000 : Infinity;
  }

  start(): void {
    const every = Math.min(1000, (this.o.ttlS * 1000) / 8);
    let last = 0;
    const tick = (): void => {
      if (this.s.kind === 'stopped') return;
      if (this.s.kind === 'member' && monoMs() >= this.fenceAt()) {
        this.step({ type: 'overdue' });
        this.emit('fence', {
          why: `no lease renewal for ${this.o.ttlS - this.o.marginS} s (lease TTL ${this.o.ttlS} s − margin ${this.o.marginS} s)`,
        });
      }
      // Renew every TTL/4: three tries fit before the fence.
      if (!this.busy && monoMs() - last >= (this.o.ttlS * 1000) / 4) {
        last = monoMs();
        this.busy = true;
        void this.round().finally(() => {
          this.busy = false;
        });
      }
    };
    this.timer = setInterval(tick, every);
    tick();
  }

  async stop(revoke: boolean): Promise<void> {
    clearInterval(this.timer);
    const s = this.s;
    this.step({ type: 'stop' });
    if (revoke && (s.kind === 'member' || s.kind === 'fenced'))
      await this.onAnyMember('revoking the lease', (c) => c.leaseClient.leaseRevoke({ ID: s.lease })).catch(() => undefined);
  }

  /** Publishes the host's facts again (its capacity or maintenance changed). Quiet when etcd is away. */
  async publish(): Promise<void> {
    const s = this.s;
    if (s.kind !== 'member') return;
    const facts: HostFacts = { ...this.o.facts(), since: this.since };
    await etcdCall('publishing host facts', () =>
      this.o.etcd.put(hostKey(this.o.name)).value(JSON.stringify(facts)).lease(s.lease).exec(),
    ).catch((e) => this.o.log.warn('could not publish host facts', { error: String(e) }));
  }

  private step(e: MemberEvent): void {
    const before = this.s.kind;
    this.s = memberStep(this.s, e);
    if (this.s.kind !== before) this.emit('state', { from: before, to: this.s.kind });
  }

  /** One round: join if there is no lease, else renew it. */
  private async round(): Promise<void> {
    try {
      if (this.s.kind === 'joining') await this.join();
      else if (this.s.kind === 'member' || this.s.kind === 'fenced') await this.renew(this.s.lease);
    } catch (e) {
      const fe = clusterError('a lease renewal', e);
      this.o.log.warn('etcd not reached for the lease', { code: fe.code, error: fe.message, state: this.s.kind });
    }
  }

  /** A lease call on the member that answered last, else on each other in turn; the last failure if none answers. */
  private async onAnyMember<T>(what: string, f: (c: Etcd3) => Promise<T>): Promise<T> {
    const n = this.o.members.length;
    let last: unknown;
    for (let k = 0; k < n; k++) {
      const i = (this.good + k) % n;
      try {
        const v = await etcdCall(what, () => f(this.o.members[i]));
        this.good = i;
        return v;
      } catch (e) {
        last = e;
      }
    }
    throw last;
  }

  private async join(): Promise<void> {
    const t0 = monoMs();
    // The lease of the ferryd before a restart, if etcd still has it: the host never left.
    let lease: string | undefined;
    let resumed = false;
    try {
      const old = fs.readFileSync(this.o.leaseFile, 'utf8').trim();
      if (/^[0-9]+$/.test(old)) {
        const ttl = await this.onAnyMember('reading the old lease', (c) => c.leaseClient.leaseTimeToLive({ ID: old, keys: false }));
        if (Number(ttl.TTL) > 0) {
          await this.renewRaw(old);
          lease = old;
          resumed = true;
        }
      }
    } catch (e) {
      if (e instanceof FerryError) throw e;
      /* no lease file */
    }
    if (!lease) {
      const g = await this.onAnyMember('granting a lease', (c) => c.leaseClient.leaseGrant({ TTL: this.o.ttlS, ID: 0 }));
      lease = String(g.ID);
      this.since = new Date().toISOString();
      fs.writeFileSync(this.o.leaseFile, lease + '\n');
      // A lease counts once its heartbeat is written (a resumed one wrote it in renewRaw).
      const fresh = lease;
      await this.onAnyMember('writing the heartbeat', (c) => this.beat(c, fresh));
    }
    this.step({ type: 'granted', lease, at: t0 });
    await this.publish();
    this.o.log.info(resumed ? 'cluster lease resumed' : 'cluster lease granted', { lease, ttlS: this.o.ttlS });
    this.emit('joined', { lease, resumed });
    this.emit('renewed', { renewedAt: t0 });
  }

  private async renew(lease: string): Promise<void> {
    const t0 = monoMs();
    const ttl = await this.renewRaw(lease);
    if (this.s.kind === 'stopped') return;
    if (ttl <= 0) {
      // etcd expired the lease: everyone has seen this host go. Fence now (if not yet), then join anew.
      this.o.log.warn('cluster lease expired; fencing and joining again', { lease });
      if (this.s.kind === 'member') this.emit('fence', { why: 'the lease expired' });
      this.step({ type: 'expired' });
      fs.rmSync(this.o.leaseFile, { force: true });
      return;
    }
    const was = this.s.kind;
    this.step({ type: 'renewed', at: t0 });
    this.emit('renewed', { renewedAt: t0 });
    if (was === 'fenced') this.emit('joined', { lease, resumed: true });
  }

  /** One renewal (keep-alive, then heartbeat), on the first member that answers both; the lease's remaining TTL (0: gone). */
  private renewRaw(lease: string): Promise<number> {
    return this.onAnyMember('a lease renewal', async (c) => {
      const ttl = await this.keepAliveOn(c, lease);
      if (ttl > 0) await this.beat(c, lease);
      return ttl;
    });
  }

  private beats = 0;

  /**
   * The heartbeat: a write under the lease, bounded like a keep-alive. Its revision is
   * what the HA manager watches (a new one at every renewal), since a lease's own expiry
   * can come a whole TTL late after an etcd leader change.
   */
  private async beat(c: Etcd3, lease: string): Promise<void> {
    this.beats++;
    let t: NodeJS.Timeout | undefined;
    try {
      const r = await Promise.race([
        c.put(aliveKey(this.o.name)).value(String(this.beats)).lease(lease).exec(),
        new Promise<never>((_, reject) => {
          t = setTimeout(() => reject(new FerryError('CLUSTER_NO_QUORUM', 'heartbeat: no answer in time')), KEEPALIVE_MS);
        }),
      ]);
      // Its revision, and a time after its commit: every write with a lower revision was committed before then (cluster/ha.ts).
      this.emit('beat', { revision: r.header.revision, at: monoMs() });
    } finally {
      clearTimeout(t);
    }
  }

  /** One keep-alive on a stream of its own, bounded by KEEPALIVE_MS (three members fit in one renewal period). */
  private async keepAliveOn(c: Etcd3, lease: string): Promise<number> {
    const stream = await c.leaseClient.leaseKeepAlive();
    try {
      return await new Promise<number>((resolve, reject) => {
        const t = setTimeout(() => reject(new FerryError('CLUSTER_NO_QUORUM', 'lease keep-alive: no answer in time')), KEEPALIVE_MS);
        stream.on('data', (r: { TTL: string }) => {
          clearTimeout(t);
          resolve(Number(r.TTL));
        });
        stream.on('error', (e: Error) => {
          clearTimeout(t);
          reject(e);
        });
        stream.write({ ID: lease });
      });
    } finally {
      stream.end();
    }
  }
}
