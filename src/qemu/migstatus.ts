/**
 * A QEMU's migration status, followed through its MIGRATION and MIGRATION_PASS events
 * (the `events` migration capability) instead of polling query-migrate. Create it
 * before the command that starts a migration, so no event is missed; QEMU timestamps
 * each event itself, so the times here are QEMU's, not when ferryd got round to them.
 *
 * Statuses (qapi/migration.json): none, setup, active, postcopy-*, cancelling,
 * cancelled, failed, pre-switchover, device, wait-unplug, completed, colo.
 */
import type { QmpClient, QmpEvent } from '../qmp/client.ts';

/** Statuses after which nothing more happens to this migration. */
export const FINAL_STATUSES = ['completed', 'failed', 'cancelled'] as const;

/** The parts of QMP's query-migrate answer (MigrationInfo) that ferry reads. */
export interface MigrateInfo {
  status?: string;
  'error-desc'?: string;
  'total-time'?: number;
  downtime?: number;
  'cpu-throttle-percentage'?: number;
  ram?: {
    total?: number;
    remaining?: number;
    transferred?: number;
    mbps?: number;
    'dirty-pages-rate'?: number;
    'dirty-sync-count'?: number;
    'page-size'?: number;
  };
}

export function qmpEventMs(e: QmpEvent): number {
  return e.timestamp ? e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000 : Date.now();
}

export class MigrationWatcher {
  status = 'none';
  /** Epoch ms (QEMU's clock) at which each status was first entered. */
  readonly at = new Map<string, number>();
  /** Passes over RAM so far (MIGRATION_PASS). */
  passes = 0;
  private waiters: { want: Set<string>; resolve: (s: string) => void; reject: (e: Error) => void; timer?: NodeJS.Timeout }[] = [];
  private readonly onEvent = (e: QmpEvent): void => {
    if (e.event === 'MIGRATION_PASS') {
      this.passes = Number(e.data?.pass ?? this.passes + 1);
      return;
    }
    if (e.event !== 'MIGRATION') return;
    const s = String(e.data?.status ?? '');
    this.status = s;
    if (!this.at.has(s)) this.at.set(s, qmpEventMs(e));
    for (const w of [...this.waiters]) if (w.want.has(s)) this.settle(w, null, s);
  };
  private readonly onClose = (): void => {
    for (const w of [...this.waiters]) this.settle(w, new Error('QEMU exited (QMP closed) during the migration'));
  };

  constructor(private readonly qmp: QmpClient) {
    qmp.on('event', this.onEvent);
    qmp.once('close', this.onClose);
  }

  private settle(w: (typeof this.waiters)[number], err: Error | null, s?: string): void {
    this.waiters = this.waiters.filter((x) => x !== w);
    if (w.timer) clearTimeout(w.timer);
    if (err) w.reject(err);
    else w.resolve(s!);
  }

  /**
   * Resolves with the status once it is one of `want` (at once if it already is);
   * rejects when QMP closes, or after timeoutMs (0: never).
   */
  until(want: readonly string[], timeoutMs = 0): Promise<string> {
    if (want.includes(this.status)) return Promise.resolve(this.status);
    if (this.qmp.closed) return Promise.reject(new Error('QEMU exited (QMP closed) during the migration'));
    return new Promise((resolve, reject) => {
      const w: (typeof this.waiters)[number] = { want: new Set(want), resolve, reject };
      if (timeoutMs > 0)
        w.timer = setTimeout(
          () => this.settle(w, new Error(`migration status stayed ${this.status} for ${timeoutMs} ms (waiting for ${want.join('/')})`)),
          timeoutMs,
        );
      this.waiters.push(w);
    });
  }

  /** Like `until`, but only a status entered from now on counts (after a command that changes it). */
  next(want: readonly string[], timeoutMs = 0): Promise<string> {
    if (this.qmp.closed) return Promise.reject(new Error('QEMU exited (QMP closed) during the migration'));
    return new Promise((resolve, reject) => {
      const w: (typeof this.waiters)[number] = { want: new Set(want), resolve, reject };
      if (timeoutMs > 0)
        w.timer = setTimeout(
          () => this.settle(w, new Error(`migration status stayed ${this.status} for ${timeoutMs} ms (waiting for ${want.join('/')})`)),
          timeoutMs,
        );
      this.waiters.push(w);
    });
  }

  /**
   * A watcher made after the migration started (a driver after a restart or a failure)
   * learns where it stands from query-migrate: until an event says otherwise, `until`
   * answers from that status instead of waiting for an event that already came.
   */
  observe(status: string | undefined): void {
    if (status && this.status === 'none') this.status = status;
  }

  get final(): boolean {
    return (FINAL_STATUSES as readonly string[]).includes(this.status);
  }

  /** Stops listening; pending waits reject. */
  dispose(): void {
    this.qmp.off('event', this.onEvent);
    this.qmp.off('close', this.onClose);
    for (const w of [...this.waiters]) this.settle(w, new Error('migration watch ended'));
  }
}
