/**
 * The plain-TCP data gate on loopback, with real sockets: a connection from another
 * address is closed and never reaches the target; the source's is relayed both ways;
 * once every channel is in, the port is closed to everyone.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { DataGate } from './gate.ts';

function connect(port: number, localAddress: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection({ host: '127.0.0.1', port, localAddress });
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
}
const closed = (s: net.Socket): Promise<void> =>
  new Promise((r) => {
    if (s.destroyed) r();
    else s.once('close', () => r());
  });

test('the gate relays only the source, once, and closes everything else before QEMU sees it', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-gate-'));
  const sock = path.join(dir, 'incoming.sock');
  const seen: Buffer[] = [];
  let targetConnections = 0;
  // Stands in for QEMU's unix listener: echoes, and records what reaches it.
  const target = net.createServer((c) => {
    targetConnections++;
    c.on('data', (d) => {
      seen.push(d);
      c.write(d);
    });
  });
  await new Promise<void>((r) => target.listen(sock, r));
  const warnings: Record<string, unknown>[] = [];
  const port = await new Promise<number>((r) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => r(p));
    });
  });
  const gate = new DataGate({
    address: '127.0.0.1',
    port,
    allowFrom: '127.0.0.1',
    target: sock,
    channels: 1,
    log: { warn: (_m, f) => warnings.push(f ?? {}) },
  });
  try {
    await gate.open();
    const outsider = await connect(port, '127.0.0.2');
    outsider.on('error', () => undefined);
    outsider.write('QEVM junk');
    await closed(outsider);
    assert.equal(targetConnections, 0, 'the outsider never reached the target');
    assert.deepEqual(
      warnings.map((w) => w.from),
      ['127.0.0.2'],
    );

    const source = await connect(port, '127.0.0.1');
    const echoed = new Promise<string>((r) => source.once('data', (d) => r(d.toString())));
    source.write('vmstate');
    assert.equal(await echoed, 'vmstate', 'relayed both ways');
    assert.equal(Buffer.concat(seen).toString(), 'vmstate');
    // One channel: the port is closed now, to the source's address too.
    await assert.rejects(connect(port, '127.0.0.1'), /ECONNREFUSED/);
    gate.close();
    await closed(source);
    assert.equal(targetConnections, 1);
  } finally {
    gate.close();
    target.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
