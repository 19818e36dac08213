/**
 * The source's way back, before the point of no return: QEMU's stream cancelled, disk
 * copies forced off, the destination told, the tunnels' home ends retracted, and the
 * guest running here again as it was.
 */
import { MigrationWatcher, FINAL_STATUSES } from '../../qemu/migstatus.ts';
import { MigrationQmp } from '../../qemu/migration.ts';
import type { ApiClient } from '../../api/client.ts';
import type { DomainHandle } from '../host.ts';
import type { SourceJob } from '../jobs.ts';
import { abortMirrors } from '../mirror.ts';
import { ask } from '../ask.ts';
import { retractTunnels } from './peer.ts';
import type { OutgoingSide } from './run.ts';

/** Abandon before the point of no return: the source domain runs again as it was. */
export async function abandon(
  s: OutgoingSide,
  at: { j: SourceJob; dom: DomainHandle },
  client: ApiClient | undefined,
  reason: string,
): Promise<void> {
  const { j, dom } = at;
  const q = dom.qmp;
  if (q) await cancelStream(new MigrationQmp(q, 'source'), q);
  // Disk copies in flight stop here (forced: a dead link must not hang it); the source's disks are untouched.
  if (q && !q.closed) {
    const n = await abortMirrors(q, j.nbd);
    if (n) s.log.info('disk copies cancelled', { jobId: j.jobId, jobs: n });
  }
  if (client)
    await ask(client, 'relocation.abandon', { jobId: j.jobId, reason: reason.slice(0, 500) }, { timeoutMs: 15000 }).catch((e) =>
      s.log.warn('destination did not acknowledge abandon', { jobId: j.jobId, error: String(e) }),
    );
  // The guest stays: its segment no longer floods to the destination.
  await retractTunnels(s, j);
  // Before Finish the destination cannot have taken the domain; the move's mark goes (best effort: a claim clears it too).
  await s.host.ownership
    ?.reclaim(j.domain, j.jobId)
    .catch((e) => s.log.warn('move mark not cleared in the cluster record', { error: String(e) }));
  await resumeSource(s, dom, j.wasRunning);
  s.step(j, { type: 'abandon', reason });
  s.store.prune();
}

/** One query for where QEMU's stream stands (this may run after a restart), then events until it ends. */
async function cancelStream(mq: MigrationQmp, q: NonNullable<DomainHandle['qmp']>): Promise<void> {
  try {
    const watch = new MigrationWatcher(q);
    try {
      const m = await mq.info();
      if (m.status === 'active' || m.status === 'setup' || m.status === 'pre-switchover' || m.status === 'device') {
        await mq.cancel();
        await watch.until(FINAL_STATUSES, 2000).catch(() => undefined);
      }
    } finally {
      watch.dispose();
    }
  } catch {
    /* QEMU gone: resumeSource finds the domain crashed */
  }
}

/**
 * Puts the source domain back as it was: running if it ran, paused if it was paused.
 * A source QEMU that died meanwhile cannot be resumed: the domain crashed here.
 */
export async function resumeSource(s: OutgoingSide, dom: DomainHandle, wasRunning: boolean): Promise<void> {
  const q = dom.qmp;
  if (dom.rec.state.kind === 'migrating-out' && (!q || q.closed)) {
    s.host.cleanupRuntime(dom);
    s.host.apply(dom, { type: 'crash', reason: 'QEMU exited during a migration', at: Date.now() });
    return;
  }
  if (wasRunning && q) {
    const mq = new MigrationQmp(q, 'source');
    const st = await mq.runState().catch(() => undefined);
    if (st && !st.running) await mq.cont();
  }
  if (dom.rec.state.kind === 'migrating-out') s.host.apply(dom, { type: 'migrate-out-abandoned', running: wasRunning, at: Date.now() });
}
