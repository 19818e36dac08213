/**
 * Source phase prepare: tunnels' home ends opened to the destination, its data port
 * proved reachable, the domain marked as leaving, and the destination's one-shot
 * listener opened (relocation.prepare).
 */
import { FerryError } from '../../errors.ts';
import { extendTunnels, probePort } from './peer.ts';
import type { OutgoingRun } from './run.ts';
import { ask } from '../ask.ts';

/** Phase prepare: tunnels, the data port reached, the domain marked as leaving, the destination's one-shot listener open. */
export async function prepare(run: OutgoingRun): Promise<void> {
  const { j, dom, peer, policy, side: s } = run;
  const h = s.host;
  const begun = run.begun!;
  // The destination takes post-copy only where its QEMU can (userfaultfd, its config).
  run.postcopyOn = run.postcopyWanted;
  if (run.postcopyWanted && begun.postcopy !== true) {
    run.postcopyOn = false;
    policy.push(`post-copy not offered: ${peer.name} cannot take it (${String(begun.postcopyWhy ?? 'it did not say why').slice(0, 200)})`);
  }
  if (begun.tunnels?.length) {
    await extendTunnels(run);
    run.mark('tunnelsOpen');
  }
  await probePort(run);
  run.mark('dataPortReached');
  if (run.cancelled) throw new FerryError('MIGRATION_CANCELLED', 'cancelled');
  // Cluster mode: the record names this job and its destination, the only one that may take the domain at Finish.
  await h.ownership?.markMoving(j.domain, j.jobId, peer.name);
  h.apply(dom, { type: 'migrate-out', jobId: j.jobId, at: Date.now() });
  // The data channel's tls-hostname is the name in the peer's certificate (setup),
  // never a name the peer states in a message.
  run.prepared = await ask(run.client, 'relocation.prepare', { jobId: j.jobId }, { timeoutMs: 60000 });
  j.dataPort = run.prepared.dataPort;
  run.mark('prepared');
  s.step(j, { type: 'dest-prepared' });
  h.setBusy(dom, `migrating to ${peer.name}`);
}
