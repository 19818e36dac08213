// GET https://ADDR:PORT/PATH with the client certificate in CERTDIR (or none: "-"),
// verifying the server against that directory's CA. Prints the body; exit 0 on HTTP 200,
// 1 on another status, 2 when the connection or handshake failed (message on stderr).
import https from 'node:https';
import fs from 'node:fs';
import path from 'node:path';
const [addr, port, urlPath, certDir, caDir] = process.argv.slice(2);
const ca = fs.readFileSync(path.join(caDir ?? certDir, 'ca-cert.pem'));
const client =
  certDir === '-'
    ? {}
    : { cert: fs.readFileSync(path.join(certDir, 'client-cert.pem')), key: fs.readFileSync(path.join(certDir, 'client-key.pem')) };
const req = https.get({ host: addr, port: Number(port), path: urlPath, ca, ...client, timeout: 10000 }, (res) => {
  let body = '';
  res.on('data', (d) => {
    body += d;
  });
  res.on('end', () => {
    process.stdout.write(body);
    process.exit(res.statusCode === 200 ? 0 : 1);
  });
});
req.on('timeout', () => req.destroy(new Error('timed out')));
req.on('error', (e) => {
  process.stderr.write(String(e.code ?? e.message) + '\n');
  process.exit(2);
});
