/**
 * Source phase confirm: the stream's figures, this host let go of the domain (QEMU
 * ended, definition forgotten, tunnels' away ends closed, source disks deleted if the
 * operator asked), the guest-perceived gap measured, and the destination told.
 */
import fs from 'node:fs';
import { FerryError } from '../../errors.ts';
import type { Report } from '../jobs.ts';
import { guestIp } from '../guestprobe.ts';
import { retire } from './peer.ts';
import { streamStats } from './progress.ts';
import type { OutgoingRun, Resolution } from './run.ts';
import { ask } from '../ask.ts';

export async function confirm(run: OutgoingRun): Promise<Report> {
  const { j, p, peer, stats, policy, side: s } = run;
  const h = s.host;
  const fin = run.fin!;
  Object.assign(stats, await streamStats(s, j, run.q!, stats.passes ?? 0));
  const sourceDisks = stats.storage?.disks.map((d) => d.from) ?? [];
  await retire(s, run.dom, j);
  if (p.deleteSourceStorage && sourceDisks.length) {
    // The guest runs there on its copies; the operator asked for these to go.
    for (const f of sourceDisks) fs.rmSync(f, { force: true });
    policy.push(`--delete-source-storage: ${sourceDisks.join(', ')} deleted on ${h.cfg.name}`);
  } else if (sourceDisks.length) {
    policy.push(
      `the source's disks stay on ${h.cfg.name} (${sourceDisks.join(', ')}) until you delete them; the guest runs on its copies on ${peer.name}`,
    );
  }
  run.mark('sourceClean');
  if (fin.crashed)
    throw new FerryError(
      'MIGRATION_FAILED',
      `Domain "${p.domain}" crashed on ${peer.name} as it resumed there (its QEMU exited). It may have run there, so the copy on ${h.cfg.name} was not resumed: the domain is defined on ${peer.name}, crashed; \`ferry -H ${peer.name} start ${p.domain}\` boots it afresh`,
    );
  // totalMs ends here: the guest runs on the destination and the source is clean. The
  // mark's own figure, so the two never differ by the millisecond between two clocks read.
  stats.totalMs = run.timeline.sourceClean;
  await guestGap(run, fin);
  ask(run.client, 'relocation.confirm', { jobId: j.jobId }, { timeoutMs: 10000 }).catch(() => undefined);
  const r = run.report('succeeded', {
    ...stats,
    pauseMs: run.stopAt !== null && fin.answeredAt !== undefined && fin.resumedAt ? Math.round(fin.answeredAt - run.stopAt) : null,
  });
  j.report = r;
  s.store.saveLater(j);
  s.store.prune();
  h.emit('migration.done', { domain: p.domain, report: r });
  return r;
}

/**
 * The guest-perceived gap ends with the guest's first answer from its new host; the
 * network handover, from the destination's word that the guest resumed to that answer.
 */
async function guestGap(run: OutgoingRun, fin: Resolution): Promise<void> {
  const probe = run.probe;
  if (!probe) return;
  const { stats } = run;
  const h = run.side.host;
  const resumedAt = fin.answeredAt ?? performance.now();
  const answered = await probe.waitForReplyAfter(Math.max(resumedAt, performance.now() - 1), 10000);
  const first = probe.firstReplyAfter(resumedAt);
  stats.networkHandoverMs = first !== null ? Math.round(first - resumedAt) : null;
  const ip = guestIp(run.dom.rec.config.nics);
  if (!answered && first === null)
    stats.warnings = [
      ...(stats.warnings ?? []),
      `the guest did not answer at ${ip} from ${h.cfg.name}'s side of its segment within 10 s of resuming on ${run.peer.name}: its network may not have followed it (check the segment, the bridge and the guest)`,
    ];
  const g = await probe.stop();
  run.probe = undefined;
  stats.guestDowntimeMs = g.replies > 1 ? g.longestGapMs : null;
  stats.guestProbe =
    g.replies > 1
      ? `TCP SYN to ${g.target} every ${g.intervalMs} ms from ${h.cfg.name}: ${g.replies}/${g.sent} answered`
      : `no answers from ${g.target}`;
}
