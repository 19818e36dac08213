/**
 * The automatic balancer (cluster mode, `ferry cluster balance --auto on`): every
 * intervalSeconds each ferryd computes the same recommendation `ferry cluster balance`
 * gives, from the same fleet view (its etcd watches), and runs the moves off itself,
 * with the balancer's priority. No leader is needed: a host moves only its own domains,
 * and a round is skipped while anything moves or waits in any host's line, or any host
 * is in maintenance (placement/balance.ts autoSkip), so two hosts never act on loads
 * that are about to change. A moved domain is held where it went for holdSeconds
 * (cluster/balance.ts), so it cannot ping-pong.
 *
 *   tick (every 5 s) ── mode off, or a round ran < intervalSeconds ago ──▶ nothing
 *        │
 *        ├─ autoSkip(fleet) says why not ──▶ remembered (`cluster balance` shows it)
 *        └─ recommend(threshold, held) ─ its moves from this host ─▶ hold, then start (priority balance)
 */
import { asFerryError } from '../errors.ts';
import { autoSkip } from '../placement/balance.ts';
import { hostView } from '../placement/place.ts';
import type { Migrations } from '../migration/manager.ts';
import type { ClusterAgent } from './cluster.ts';
import type { Logger } from './log.ts';
import type { Placement } from './placement.ts';

const TICK_MS = 5000;

export class AutoBalancer {
  private timer?: NodeJS.Timeout;
  private running = false;
  private lastRound = 0;

  constructor(
    private readonly cluster: ClusterAgent,
    private readonly placement: Placement,
    private readonly mig: Migrations,
    private readonly log: Logger,
  ) {}

  start(): void {
    this.timer = setInterval(() => void this.tick(), TICK_MS);
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
  }

  private async tick(): Promise<void> {
    const s = this.cluster.balanceSettings();
    if (s.mode !== 'auto' || this.running || Date.now() - this.lastRound < s.intervalSeconds * 1000) return;
    this.lastRound = Date.now();
    this.running = true;
    try {
      await this.round(s.threshold / 100);
    } catch (e) {
      const fe = asFerryError(e);
      this.log.warn('automatic balance round failed', { code: fe.code, error: fe.message });
    } finally {
      this.running = false;
    }
  }

  /** One round: this host's share of the recommendation, each move held, then started; waits for them all. */
  private async round(threshold: number): Promise<void> {
    const me = this.cluster.me;
    const f = this.cluster.fleet();
    const skip = autoSkip(
      {
        quorate: f.quorate,
        hosts: f.hosts.map(hostView),
        moving: f.domains.filter((d) => d.moving).map((d) => d.name),
        queued: f.hosts.reduce((n, h) => n + h.moves.filter((m) => m.state === 'queued').length, 0),
      },
      me,
    );
    if (skip) {
      this.log.debug('automatic balance round skipped', { why: skip });
      return;
    }
    const b = this.placement.recommend(threshold, new Set(this.cluster.held().map((h) => h.domain)));
    const mine = b.moves.filter((m) => m.from === me);
    if (!mine.length) return;
    this.log.info('automatic balance: moving', { moves: mine.map((m) => `${m.domain}→${m.to}`) });
    await Promise.all(
      mine.map(async (m) => {
        void this.cluster.events.add({
          type: 'balance-move',
          domain: m.domain,
          host: me,
          detail: `balancer moves ${m.domain} from ${me} to ${m.to}: ${m.why}`,
        });
        try {
          const r = await this.placement.startMove({ domain: m.domain, dest: m.to, live: true, priority: 'balance' }, this.mig);
          if (r.outcome !== 'succeeded') throw new Error(r.error ? `${r.error.code}: ${r.error.message}` : r.outcome);
        } catch (e) {
          const fe = asFerryError(e);
          this.log.warn('automatic balance move failed', { domain: m.domain, to: m.to, code: fe.code, error: fe.message });
          void this.cluster.events.add({
            type: 'balance-failed',
            domain: m.domain,
            host: me,
            detail: `balancer could not move ${m.domain} to ${m.to}: ${fe.message}`,
          });
        }
      }),
    );
  }
}
