// Holds one TCP connection to IP:7 (the guest's echo service) and sends a numbered
// line every INTERVAL ms. On stdin end it prints one JSON line: how many lines were
// sent and echoed back in order, and the longest gap between two echoes.
import net from 'node:net';
const [ip, intervalArg] = process.argv.slice(2);
const interval = Number(intervalArg ?? 10);
const sock = net.createConnection({ host: ip, port: 7 });
let sent = 0,
  echoed = 0,
  outOfOrder = 0,
  maxGapMs = 0,
  lastEcho = 0,
  closed = false,
  stopping = false,
  error = null,
  buf = '';
const sentAt = new Map();
sock.setNoDelay(true);
sock.on('connect', () => {
  process.stdout.write('connected\n');
  lastEcho = Date.now();
  const t = setInterval(() => {
    if (closed || stopping) return clearInterval(t);
    sent++;
    sentAt.set(sent, Date.now());
    sock.write(`${sent}\n`);
  }, interval);
});
sock.on('data', (d) => {
  buf += d;
  let i;
  while ((i = buf.indexOf('\n')) >= 0) {
    const n = Number(buf.slice(0, i));
    buf = buf.slice(i + 1);
    if (n !== echoed + 1) outOfOrder++;
    echoed = n;
    const now = Date.now();
    maxGapMs = Math.max(maxGapMs, now - lastEcho);
    lastEcho = now;
  }
});
sock.on('error', (e) => {
  error = e.message;
});
sock.on('close', () => {
  closed = true;
});
process.stdin.resume();
process.stdin.on('end', () => {
  // Stop sending, and give the last lines a moment to come back.
  stopping = true;
  setTimeout(() => {
    const result = { sent, echoed, outOfOrder, maxGapMs, closed, error };
    process.stdout.write(JSON.stringify(result) + '\n');
    sock.destroy();
    process.exit(0);
  }, 500);
});
