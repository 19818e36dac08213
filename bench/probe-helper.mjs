// Runs inside a lab namespace: probes IP with TCP SYNs every 1 ms (RST or SYN-ACK =
// a reply) until stdin ends, then prints {longestGapMs, replies, sent} as JSON.
import net from 'node:net';
const ip = process.argv[2];
const replies = [];
let sent = 0;
const inflight = new Set();
const t = setInterval(() => {
  if (inflight.size > 256) return;
  sent++;
  const s = net.createConnection({ host: ip, port: 9 });
  inflight.add(s);
  const done = (ok) => { if (!inflight.delete(s)) return; if (ok) replies.push(performance.now()); s.destroy(); };
  s.setTimeout(2000, () => done(false));
  s.once('connect', () => done(true));
  s.once('error', (e) => done(e.code === 'ECONNREFUSED' || e.code === 'ECONNRESET'));
}, 1);
process.stdout.write('probing\n');
process.stdin.resume();
process.stdin.on('end', () => {
  clearInterval(t);
  setTimeout(() => {
    let longest = 0;
    for (let i = 1; i < replies.length; i++) longest = Math.max(longest, replies[i] - replies[i - 1]);
    process.stdout.write(JSON.stringify({ longestGapMs: Math.round(longest * 10) / 10, replies: replies.length, sent }) + '\n');
    process.exit(0);
  }, 50);
});
