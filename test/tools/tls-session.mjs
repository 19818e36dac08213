// One TLS session with a ferryd, as a (possibly misbehaving) peer: connects to ADDR:PORT
// with the client certificate in CERTDIR, then reads a JSON list of steps from stdin and
// sends them in order. Each step is {line, noNewline?, wait?, binary?}: `line` is sent as
// is (it need not be JSON), then `binary` (base64) as raw bytes; unless wait is false,
// the next reply line is awaited (3 s at most).
// Prints {replies: [...], closed: bool} where a reply is parsed JSON, a raw string, or
// null when none came.
import tls from 'node:tls';
import fs from 'node:fs';
import path from 'node:path';
const [addr, port, certDir] = process.argv.slice(2);
const steps = JSON.parse(fs.readFileSync(0, 'utf8'));
const sock = tls.connect({
  host: addr,
  port: Number(port),
  rejectUnauthorized: false,
  cert: fs.readFileSync(path.join(certDir, 'client-cert.pem')),
  key: fs.readFileSync(path.join(certDir, 'client-key.pem')),
});
const queue = [];
let waiter = null;
let closed = false;
let buf = '';
sock.on('data', (d) => {
  buf += d;
  let i;
  while ((i = buf.indexOf('\n')) >= 0) {
    const l = buf.slice(0, i);
    buf = buf.slice(i + 1);
    let v;
    try {
      v = JSON.parse(l);
    } catch {
      v = l;
    }
    if (waiter) {
      const w = waiter;
      waiter = null;
      w(v);
    } else queue.push(v);
  }
});
const onGone = () => {
  closed = true;
  if (waiter) {
    const w = waiter;
    waiter = null;
    w(null);
  }
};
sock.on('close', onGone);
sock.on('error', onGone);
const next = () =>
  queue.length
    ? Promise.resolve(queue.shift())
    : closed
      ? Promise.resolve(null)
      : new Promise((r) => {
          waiter = r;
          setTimeout(() => {
            if (waiter === r) {
              waiter = null;
              r(null);
            }
          }, 3000);
        });
sock.once('secureConnect', async () => {
  const replies = [];
  for (const s of steps) {
    if (closed) break;
    sock.write(s.noNewline ? s.line : s.line + '\n');
    if (s.binary) sock.write(Buffer.from(s.binary, 'base64'));
    if (s.wait !== false) replies.push(await next());
  }
  await new Promise((r) => setTimeout(r, 200));
  process.stdout.write(JSON.stringify({ replies, closed }) + '\n');
  sock.destroy();
  process.exit(0);
});
