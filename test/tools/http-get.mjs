// GET http://IP/ with a 5 s timeout; prints the body. Runs inside a lab namespace.
import http from 'node:http';
const ip = process.argv[2];
const req = http.get({ host: ip, port: 80, path: '/', timeout: 5000 }, (res) => {
  let body = '';
  res.on('data', (d) => {
    body += d;
  });
  res.on('end', () => {
    process.stdout.write(body);
    process.exit(res.statusCode === 200 ? 0 : 1);
  });
});
req.on('timeout', () => {
  req.destroy(new Error('timeout'));
});
req.on('error', (e) => {
  process.stderr.write(String(e.message) + '\n');
  process.exit(1);
});
