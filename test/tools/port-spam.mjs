// Connects to every port FIRST..LAST of ADDR in a loop and writes garbage (a fake QEMU
// migration header) into whatever accepts, until stdin ends; prints {attempts, accepted}.
//   node port-spam.mjs ADDR FIRST LAST
import net from 'node:net';
const [addr, first, last] = process.argv.slice(2).map((x, i) => (i === 0 ? x : Number(x)));
let attempts = 0,
  accepted = 0,
  stopping = false;
const junk = Buffer.concat([Buffer.from('QEVM\0\0\0\x03'), Buffer.alloc(4096, 0x5a)]);
function sweep() {
  if (stopping) return;
  let left = last - first + 1;
  for (let p = first; p <= last; p++) {
    attempts++;
    const s = net.createConnection({ host: addr, port: p });
    s.setTimeout(300, () => s.destroy());
    s.on('connect', () => {
      accepted++;
      s.write(junk);
      setTimeout(() => s.destroy(), 200);
    });
    s.on('error', () => undefined);
    s.on('close', () => {
      if (--left === 0) setTimeout(sweep, 2);
    });
  }
}
sweep();
process.stdin.on('data', () => undefined);
process.stdin.on('end', () => {
  stopping = true;
  process.stdout.write(JSON.stringify({ attempts, accepted }) + '\n');
  process.exit(0);
});
