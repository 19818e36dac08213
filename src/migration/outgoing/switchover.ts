/**
 * Source phase switchover, the guest paused here and its RAM there: each disk copy ends
 * as a point-in-time copy, and the memory check runs. Still before the point of no
 * return: both guests are paused, so a mismatch abandons like any other failure and
 * the domain resumes here.
 */
import type { OutgoingRun } from './run.ts';

export async function switchover(run: OutgoingRun): Promise<void> {
  const { p, policy, mode, side: s } = run;
  const h = s.host;
  const mirror = run.mirror;
  if (mirror) {
    const tc = performance.now();
    await mirror.complete();
    if (run.stats.storage) run.stats.storage.copyMs += Math.round(performance.now() - tc);
    run.mark('disksCompleted');
  }
  const unreliable = run.engineLoses;
  if (run.inPostcopy) {
    if (p.verifyMemory || unreliable)
      policy.push("memory check skipped: in post-copy the destination's RAM is complete only after its guest runs");
  } else if (p.verifyMemory ?? (mode === 'live' && unreliable)) {
    const how = 'guest RAM is compared by SHA-256 on both hosts before the destination runs, and what differs is rewritten from the source';
    policy.push(
      p.verifyMemory
        ? `memory check requested: ${how}`
        : `memory check on: QEMU ${h.qemu.version} under TCG can lose dirty pages in a live migration (fixed in QEMU 9.0), so ${how}`,
    );
    run.stats.memoryCheck = await s.memcheck.verify(run.j, run.client, { dom: run.dom, mode, unreliable });
  } else if (mode === 'live' && unreliable) {
    policy.push(
      `memory check skipped (--no-verify-memory) although QEMU ${h.qemu.version} under TCG can lose dirty pages in a live migration`,
    );
  }
}
