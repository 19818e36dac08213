// Connects to ADDR:PORT over TLS with the certificate in CERTDIR ("none" for no client
// certificate, "plain" for no TLS at all), sends one JSON request line (argv[5], if
// given) and prints every line the server sends until it closes or 5 s pass.
import tls from 'node:tls';
import net from 'node:net';
import fs from 'node:fs';
import path from 'node:path';
const [addr, port, certDir, servername, request] = process.argv.slice(2);
const out = [];
const done = (extra) => {
  process.stdout.write(JSON.stringify({ lines: out, ...extra }) + '\n');
  process.exit(0);
};
let sock;
if (certDir === 'plain') {
  sock = net.createConnection({ host: addr, port: Number(port) }, () => {
    if (request) sock.write(request + '\n');
  });
} else {
  const opts = { host: addr, port: Number(port), rejectUnauthorized: false, servername: servername || undefined };
  if (certDir !== 'none') {
    opts.cert = fs.readFileSync(path.join(certDir, 'client-cert.pem'));
    opts.key = fs.readFileSync(path.join(certDir, 'client-key.pem'));
  }
  sock = tls.connect(opts, () => {
    if (request) sock.write(request + '\n');
  });
}
let buf = '';
sock.on('data', (d) => {
  buf += d;
  let i;
  while ((i = buf.indexOf('\n')) >= 0) {
    const l = buf.slice(0, i);
    buf = buf.slice(i + 1);
    try {
      out.push(JSON.parse(l));
    } catch {
      out.push(l);
    }
    if (request && out.some((o) => o && o.id === 1)) done({});
  }
});
sock.on('error', (e) => done({ error: e.code || e.message }));
sock.on('close', () => done({ closed: true }));
setTimeout(() => done({ timeout: true }), 5000);
