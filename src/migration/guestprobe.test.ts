import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { GuestProbe, guestIp } from './guestprobe.ts';

test('the probe counts SYN-ACK and RST as replies and reports the longest gap', async () => {
  const server = net.createServer((s) => s.destroy());
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  const p = new GuestProbe('127.0.0.1', port, 2);
  p.start();
  await new Promise((r) => setTimeout(r, 150));
  // The listener goes away: the port now answers RST, which still counts as the
  // "guest" replying, so no gap opens.
  await new Promise<void>((r) => server.close(() => r()));
  await new Promise((r) => setTimeout(r, 150));
  const res = await p.stop();
  assert.ok(res.sent > 50, `sent ${res.sent}`);
  assert.ok(res.replies >= res.sent * 0.9, `replies ${res.replies} of ${res.sent}`);
  assert.ok(res.longestGapMs > 0 && res.longestGapMs < 100, `gap ${res.longestGapMs} ms`);
  assert.equal(res.target, `127.0.0.1:${port}`);
});

test('guestIp takes the first NIC address without its prefix', () => {
  assert.equal(guestIp([{}, { ip: '198.18.0.5/24' }]), '198.18.0.5');
  assert.equal(guestIp([]), undefined);
});
