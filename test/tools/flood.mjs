// Opens N TCP connections to ADDR:PORT and holds them idle (no TLS hello), reopening any
// the server closes, until stdin ends; then prints {opened, refusedOrClosed} and exits.
//   node flood.mjs ADDR PORT N
import net from 'node:net';
const [addr, port, n] = process.argv.slice(2);
let opened = 0,
  closed = 0,
  stopping = false;
const socks = new Set();
function one() {
  if (stopping) return;
  const s = net.createConnection({ host: addr, port: Number(port) });
  socks.add(s);
  s.on('connect', () => {
    opened++;
  });
  s.on('error', () => undefined);
  s.on('close', () => {
    socks.delete(s);
    closed++;
    if (!stopping) setTimeout(one, 20);
  });
}
for (let i = 0; i < Number(n); i++) one();
process.stdin.on('data', () => undefined);
process.stdin.on('end', () => {
  stopping = true;
  for (const s of socks) s.destroy();
  process.stdout.write(JSON.stringify({ opened, closed }) + '\n');
  process.exit(0);
});
