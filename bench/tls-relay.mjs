/**
 * One side of a study-only relay (bench/tls-stream.ts, case "tls-ferryd-relay"): the
 * question is whether ferryd carrying a plain QEMU stream over its own TLS connection
 * beats QEMU's TLS. Each side runs in its own process, as two ferryds would.
 *   node tls-relay.mjs src CERTDIR UNIX PORT   QEMU → UNIX socket → TLS client → 127.0.0.1:PORT
 *   node tls-relay.mjs dst CERTDIR UNIX PORT   127.0.0.1:PORT → TLS server (client cert required) → UNIX socket → QEMU
 */
import net from 'node:net';
import tls from 'node:tls';
import fs from 'node:fs';

const [mode, dir, unixPath, port] = process.argv.slice(2);
const use = mode === 'src' ? 'client' : 'server';
const creds = {
  ca: fs.readFileSync(`${dir}/ca-cert.pem`),
  cert: fs.readFileSync(`${dir}/${use}-cert.pem`),
  key: fs.readFileSync(`${dir}/${use}-key.pem`),
};
const splice = (a, b) => {
  a.pipe(b);
  b.pipe(a);
  a.on('error', () => b.destroy());
  b.on('error', () => a.destroy());
};
if (mode === 'src') {
  fs.rmSync(unixPath, { force: true });
  net
    .createServer((c) => splice(c, tls.connect({ ...creds, host: '127.0.0.1', port: Number(port), servername: 'hostB' })))
    .listen(unixPath, () => process.send?.('ready'));
} else {
  tls
    .createServer({ ...creds, requestCert: true, rejectUnauthorized: true }, (t) => splice(t, net.connect(unixPath)))
    .listen(Number(port), '127.0.0.1', () => process.send?.('ready'));
}
