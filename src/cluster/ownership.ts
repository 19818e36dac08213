/**
 * Ownership: one record per domain in etcd names the host that may run it. A host
 * starts or resumes a domain's vCPUs only after a compare-and-swap made (or kept) it
 * the owner; the record's mod revision at that moment is the fencing token, and every
 * later change of the record compares against it, so a host acting on an old view
 * loses the race instead of running a second copy.
 *
 * A live move hands ownership over at its point of no return (migration/incoming/finish.ts):
 *
 *   source                                etcd                               destination
 *     |-- markMoving(job, to) ------------>| moving = {job, to}                    |
 *     |== stream (pre-copy), guest paused on the source ==========================>|
 *     |-- relocation.finish ------------------------------------------------------>|
 *     |                                    |<------------- takeOver(job, from) ----| CAS: owner = destination
 *     |                                    |                                       | (then, and only then, `cont`)
 *     |<----------------------------------------------------------- answer --------|
 *   no answer? the source settles from the record, never from a guess:
 *     |-- reclaim(job) ------------------->| CAS moving = null if still ours → the source resumes
 *     |                                    | owner = destination                → the source retires
 * takeOver and reclaim compare the same revision, so exactly one of them wins.
 */
import type { Etcd3 } from 'etcd3';
import { FerryError } from '../errors.ts';
import { casDelete, casJson, etcdCall, getJson, listJson, type Versioned, listJsonAt } from './etcd.ts';
import { domainKey, DOMAINS, parseOwnerRecord, type OwnerRecord, type OwnerState } from './records.ts';

/** What the owner tells the cluster about a domain it starts. */
export type ClaimFacts = Pick<OwnerRecord, 'name' | 'uuid' | 'config' | 'cpuModel' | 'accel' | 'memoryMiB' | 'restartable'>;

const now = (): string => new Date().toISOString();

export class Ownership {
  constructor(
    private readonly etcd: Etcd3,
    readonly me: string,
    /** This host's current lease (written into what it takes). */
    private readonly lease: () => string = () => '',
    /** The record as this host's watch last saw it (daemon/cluster.ts), if any. */
    private readonly cached: (name: string) => Versioned<OwnerRecord> | undefined = () => undefined,
  ) {}

  /** Whether a lease is gone from etcd (expired or revoked); '' counts as gone. */
  async leaseGone(id: string): Promise<boolean> {
    if (!id) return true;
    const r = await etcdCall('reading a lease', () => this.etcd.leaseClient.leaseTimeToLive({ ID: id, keys: false }));
    return Number(r.TTL) <= 0;
  }

  get(name: string): Promise<Versioned<OwnerRecord> | null> {
    return getJson(this.etcd, domainKey(name), parseOwnerRecord);
  }

  list(onBad?: (key: string, e: FerryError) => void): Promise<Versioned<OwnerRecord>[]> {
    return listJson(this.etcd, DOMAINS, parseOwnerRecord, onBad);
  }

  /** Every record, and the revision etcd read them at. */
  listAt(onBad?: (key: string, e: FerryError) => void): Promise<{ items: Versioned<OwnerRecord>[]; revision: string }> {
    return listJsonAt(this.etcd, DOMAINS, parseOwnerRecord, onBad);
  }

  /**
   * Before this host starts a domain's vCPUs: makes it the owner (a new record), or
   * keeps it the owner (a new generation). Refused if another host owns it or a move
   * is in flight. Returns the fencing token.
   */
  async claim(f: ClaimFacts, note: string): Promise<string> {
    return this.change(f.name, (cur) => {
      if (cur && cur.owner !== this.me) throw this.elsewhere(f.name, cur);
      // A move's mark left behind (the move was abandoned while etcd was away): the domain is
      // not busy here, so no move of it is in flight, and the mark goes.
      return {
        ...f,
        owner: this.me,
        generation: (cur?.generation ?? 0) + 1,
        state: 'running',
        ha: cur?.ha ?? null,
        moving: null,
        lease: this.lease(),
        via: cur?.via ?? 'start',
        note,
        at: now(),
      };
    });
  }

  /** The owner's word that the domain stopped (or runs again); quietly nothing if another host owns it now. */
  async setState(name: string, state: OwnerState, note: string): Promise<string | null> {
    return this.change(name, (cur) =>
      cur && cur.owner === this.me && cur.state !== state ? { ...cur, state, note, at: now() } : undefined,
    );
  }

  /** The definition is gone from its owner: so is the record. */
  async remove(name: string): Promise<void> {
    const cur = await this.get(name);
    if (!cur || cur.value.owner !== this.me) return;
    if (!(await casDelete(this.etcd, cur.key, cur.modRevision)))
      throw new FerryError('CLUSTER_RECORD_CHANGED', `The ownership record of "${name}" changed while it was being removed; retry`);
  }

  /** `ferry ha add|remove`: any host may mark a domain; its owner keeps running it. */
  async setHa(name: string, ha: OwnerRecord['ha']): Promise<Versioned<OwnerRecord>> {
    await this.change(name, (cur) => {
      if (!cur)
        throw new FerryError(
          'DOMAIN_NOT_FOUND',
          `No domain "${name}" in the cluster (a domain has an ownership record once it ran in cluster mode; start it first)`,
        );
      return { ...cur, ha, note: ha ? `HA restart, priority ${ha.priority}` : 'HA restart removed', at: now() };
    });
    return (await this.get(name))!;
  }

  /** Source, before the stream: the record says which job may take the domain, and where to. */
  async markMoving(name: string, job: string, to: string): Promise<string> {
    return this.change(
      name,
      (cur) => {
        if (!cur)
          throw new FerryError('CLUSTER_RECORD_CHANGED', `Domain "${name}" has no ownership record; start it in cluster mode first`);
        if (cur.owner !== this.me) throw this.elsewhere(name, cur);
        // A mark of an earlier job can only be left over: a domain has one move at a time.
        return { ...cur, moving: { job, to }, note: `moving to ${to} (job ${job})`, at: now() };
      },
      this.cached(name),
    );
  }

  /**
   * Destination, at the point of no return: ownership passes here for this job only.
   * 'taken' (now or before: idempotent), or 'refused' (the source reclaimed it, or
   * the record names no such move): then the guest must not run here.
   */
  async takeOver(name: string, job: string, from: string): Promise<'taken' | 'refused'> {
    let verdict: 'taken' | 'refused' = 'refused';
    await this.change(
      name,
      (cur) => {
        if (cur?.owner === this.me && cur.via === `job ${job}`) {
          verdict = 'taken';
          return undefined;
        }
        if (!cur || cur.owner !== from || cur.moving?.job !== job || cur.moving.to !== this.me) {
          verdict = 'refused';
          return undefined;
        }
        verdict = 'taken';
        return {
          ...cur,
          owner: this.me,
          generation: cur.generation + 1,
          state: 'running',
          moving: null,
          lease: this.lease(),
          via: `job ${job}`,
          note: `moved from ${from}`,
          at: now(),
        };
      },
      this.cached(name),
    );
    return verdict;
  }

  /**
   * Source, when the destination's answer is lost or is a refusal: takes the move back
   * if the destination has not taken it. 'kept': the source may resume; 'lost': the
   * destination owns it (it runs there, or will as soon as it reaches etcd).
   */
  async reclaim(name: string, job: string): Promise<'kept' | 'lost'> {
    let verdict: 'kept' | 'lost' = 'kept';
    await this.change(name, (cur) => {
      if (!cur || cur.owner !== this.me) {
        verdict = 'lost';
        return undefined;
      }
      verdict = 'kept';
      return cur.moving ? { ...cur, moving: null, note: `move ${job} taken back`, at: now() } : undefined;
    });
    return verdict;
  }

  /** Destination: a domain it took but could not run goes back to the source (only for that job). */
  async giveBack(name: string, job: string, to: string): Promise<void> {
    await this.change(name, (cur) =>
      cur && cur.owner === this.me && cur.via === `job ${job}`
        ? {
            ...cur,
            owner: to,
            generation: cur.generation + 1,
            lease: '',
            via: `returned ${job}`,
            note: `given back by ${this.me}: it could not run here`,
            at: now(),
          }
        : undefined,
    );
  }

  /** A domain this host has that the cluster has no record of (it predates cluster mode): recorded as this host's. */
  async adopt(f: ClaimFacts, state: OwnerState): Promise<'adopted' | 'exists'> {
    let verdict: 'adopted' | 'exists' = 'exists';
    await this.change(f.name, (cur) => {
      if (cur) {
        verdict = 'exists';
        return undefined;
      }
      verdict = 'adopted';
      return {
        ...f,
        owner: this.me,
        generation: 1,
        state,
        ha: null,
        moving: null,
        lease: this.lease(),
        via: 'adopted',
        note: 'recorded by its host on joining the cluster',
        at: now(),
      };
    });
    return verdict;
  }

  /** The HA manager: gives a dead host's domain to `to` (CAS on the revision it read). False if the record moved on. */
  /**
   * The HA manager gives a dead host's domain to `to`. With `guard`, only if that key
   * (the old owner's heartbeat) is also unchanged: a host that renewed since the manager
   * judged it silent keeps its domain.
   */
  async assign(rec: Versioned<OwnerRecord>, to: string, note: string, guard?: { key: string; modRevision: string }): Promise<boolean> {
    const next: OwnerRecord = {
      ...rec.value,
      owner: to,
      generation: rec.value.generation + 1,
      state: 'restarting',
      moving: null,
      lease: '',
      via: 'ha',
      note,
      at: now(),
    };
    if (!guard) return (await casJson(this.etcd, rec.key, rec.modRevision, next)) !== null;
    const r = await etcdCall(`writing ${rec.key}`, () =>
      this.etcd
        .if(rec.key, 'Mod', '==', rec.modRevision)
        .and(guard.key, 'Mod', '==', guard.modRevision)
        .then(this.etcd.put(rec.key).value(JSON.stringify(next)))
        .commit(),
    );
    return r.succeeded;
  }

  /** Marks a record failed (a restart that could not run), if it is still this host's. */
  async fail(rec: Versioned<OwnerRecord>, note: string): Promise<boolean> {
    return (await casJson(this.etcd, rec.key, rec.modRevision, { ...rec.value, state: 'failed', note, at: now() })) !== null;
  }

  private elsewhere(name: string, cur: OwnerRecord): FerryError {
    return new FerryError(
      'CLUSTER_OWNED_ELSEWHERE',
      `Domain "${name}" belongs to host ${cur.owner} (cluster record, generation ${cur.generation}, ${cur.state}): only its owner may run it`,
      { owner: cur.owner, generation: cur.generation },
    );
  }

  /**
   * Read, decide, compare-and-swap; on a lost race, read and decide again (a few
   * times). `decide` returns the new record, or undefined to change nothing.
   * Returns the new (or unchanged) revision; '' when there is no record.
   */
  private async change(
    name: string,
    decide: (cur: OwnerRecord | null) => OwnerRecord | undefined,
    cached?: Versioned<OwnerRecord>,
  ): Promise<string> {
    for (let i = 0; i < 4; i++) {
      // The hot paths (a move's mark and handover) first try the watch's copy: one round
      // trip instead of two. Only a write is trusted to it (the compare-and-swap checks
      // the revision); a refusal or "nothing to do" is decided again on a fresh read.
      const fromCache = i === 0 && cached !== undefined;
      const cur = fromCache ? cached : await this.get(name);
      let next: OwnerRecord | undefined;
      try {
        next = decide(cur?.value ?? null);
      } catch (e) {
        if (fromCache) continue;
        throw e;
      }
      if (!next) {
        if (fromCache) continue;
        return cur?.modRevision ?? '';
      }
      const rev = await casJson(this.etcd, domainKey(name), cur?.modRevision ?? 0, next);
      if (rev) return rev;
    }
    throw new FerryError('CLUSTER_RECORD_CHANGED', `The ownership record of "${name}" kept changing under ferryd; nothing was done, retry`);
  }
}
