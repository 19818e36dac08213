/**
 * The cluster's event log (`ferry events`): host down, fenced, restarted, moved...
 * Each host writes what it did; keys sort by time. An event that cannot be written
 * now (no quorum: the usual moment for a "fenced") is kept in memory and written when
 * etcd answers again, with the time it happened.
 */
import { Range, type Etcd3, type Watcher } from 'etcd3';
import { etcdCall, jsonOf, listJson } from './etcd.ts';
import { EVENTS, eventKey, parseClusterEvent, type ClusterEvent } from './records.ts';

/** Events kept: older ones are deleted by whoever writes (a log, not an archive). */
export const EVENTS_KEPT = 5000;

export class EventLog {
  private pending: ClusterEvent[] = [];
  private written = 0;

  constructor(
    private readonly etcd: Etcd3,
    private readonly by: string,
  ) {}

  /** Records an event; never throws (a lost quorum queues it). */
  async add(e: Omit<ClusterEvent, 'at' | 'by'>, atMs = Date.now()): Promise<void> {
    this.pending.push({ ...e, at: new Date(atMs).toISOString(), by: this.by });
    await this.flush();
  }

  private flushing?: Promise<void>;

  /** Writes what is queued, oldest first; stops at the first failure. One flush at a time (each event once). */
  flush(): Promise<void> {
    this.flushing ??= this.drain().finally(() => {
      this.flushing = undefined;
    });
    return this.flushing;
  }

  private async drain(): Promise<void> {
    while (this.pending.length) {
      const e = this.pending[0];
      try {
        await etcdCall('writing an event', () =>
          this.etcd
            .put(eventKey(Date.parse(e.at), this.by))
            .value(JSON.stringify(e))
            .exec(),
        );
      } catch {
        return;
      }
      this.pending.shift();
      if (++this.written % 100 === 0) await this.trim().catch(() => undefined);
    }
  }

  /** The last `limit` events, oldest first. */
  async list(limit: number): Promise<ClusterEvent[]> {
    const all = await listJson(this.etcd, EVENTS, parseClusterEvent);
    return all.slice(-limit).map((v) => v.value);
  }

  /** New events as they are written, until the returned stop is called. */
  async follow(on: (e: ClusterEvent) => void): Promise<() => Promise<void>> {
    const w: Watcher = await etcdCall('watching events', () => this.etcd.watch().prefix(EVENTS).create());
    w.on('put', (kv) => {
      try {
        on(parseClusterEvent(jsonOf(kv.value, kv.key.toString()), kv.key.toString()));
      } catch {
        /* not an event ferry wrote: not shown */
      }
    });
    return () => w.cancel();
  }

  private async trim(): Promise<void> {
    const keys = await etcdCall('counting events', () => this.etcd.getAll().prefix(EVENTS).keys());
    if (keys.length <= EVENTS_KEPT) return;
    const last = keys.sort()[keys.length - EVENTS_KEPT - 1];
    await etcdCall('trimming events', () =>
      this.etcd
        .delete()
        .range(new Range(EVENTS, last + '\0'))
        .exec(),
    );
  }
}
