// Runs inside a lab namespace: probes IP with ferry's own GuestProbe (a TCP SYN every
// 1 ms; RST or SYN-ACK = a reply) until stdin ends, then prints
// {longestGapMs, replies, sent} as JSON. The other contenders are measured with
// exactly the code ferry uses for its own report.
import { GuestProbe } from '../src/migration/guestprobe.ts';

const probe = new GuestProbe(process.argv[2]);
probe.start();
process.stdout.write('probing\n');
process.stdin.resume();
process.stdin.on('end', async () => {
  const r = await probe.stop();
  process.stdout.write(JSON.stringify({ longestGapMs: r.longestGapMs, replies: r.replies, sent: r.sent }) + '\n');
  process.exit(0);
});
