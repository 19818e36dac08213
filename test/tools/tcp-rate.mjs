// A TCP rate meter for the lab's shaped links (run in two namespaces):
//   tcp-rate.mjs serve ADDR PORT       prints "ready", then, when the sender closes, one JSON
//                                      line: bytes received and ms from the first byte to the end
//   tcp-rate.mjs send ADDR PORT MIB    sends MIB mebibytes as fast as TCP lets it, then closes
import net from 'node:net';
const [mode, addr, portArg, mibArg] = process.argv.slice(2);
const port = Number(portArg);
if (mode === 'serve') {
  const srv = net.createServer((sock) => {
    let bytes = 0;
    let first = 0;
    sock.on('data', (d) => {
      if (!first) first = performance.now();
      bytes += d.length;
    });
    sock.on('end', () => {
      process.stdout.write(JSON.stringify({ bytes, ms: performance.now() - first }) + '\n');
      sock.end();
      srv.close();
    });
  });
  srv.listen(port, addr, () => process.stdout.write('ready\n'));
} else if (mode === 'send') {
  const chunk = Buffer.alloc(1 << 20, 0x5a);
  let left = Number(mibArg);
  const sock = net.createConnection({ host: addr, port }, () => {
    const pump = () => {
      while (left > 0) {
        left--;
        if (!sock.write(chunk)) return sock.once('drain', pump);
      }
      sock.end();
    };
    pump();
  });
  sock.on('error', (e) => {
    process.stderr.write(String(e) + '\n');
    process.exit(1);
  });
} else {
  process.stderr.write('usage: tcp-rate.mjs serve ADDR PORT | send ADDR PORT MIB\n');
  process.exit(2);
}
