// Runs inside a lab namespace, in its own process: probes IP with ferry's own
// GuestProbe (a TCP SYN every 1 ms; RST or SYN-ACK = a reply) until stdin ends, then
// waits for the guest's first reply after that moment (its answer from the new host:
// the command under test has returned, the guest may still be starting to answer) and
// prints {longestGapMs, replies, sent, durationMs, waitedMs, answeredAfter} as JSON
// (durationMs / sent: the probe's mean spacing, its resolution in that run). Every contender is measured
// by exactly this process, started before the command and stopped after it.
import { GuestProbe } from '../src/migration/guestprobe.ts';

const probe = new GuestProbe(process.argv[2]);
const started = performance.now();
probe.start();
process.stdout.write('probing\n');
process.stdin.resume();
process.stdin.on('end', async () => {
  const t = performance.now();
  const answered = await probe.waitForReplyAfter(t, 10000);
  const r = await probe.stop();
  process.stdout.write(
    JSON.stringify({
      longestGapMs: answered ? r.longestGapMs : null,
      replies: r.replies,
      sent: r.sent,
      durationMs: Math.round(performance.now() - started),
      waitedMs: Math.round(performance.now() - t),
      answeredAfter: answered,
    }) + '\n',
  );
  process.exit(0);
});
