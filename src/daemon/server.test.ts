/**
 * The API server's TLS port against clients that hold a slot without using it: one
 * that never starts the handshake and one that authenticates and then never speaks
 * are both cut off; a client that asks at once is served. Real TLS on loopback,
 * certificates from a throwaway CA (openssl), no root.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { ApiServer } from './server.ts';
import { Logger } from './log.ts';
import { caInit, issueHostCert } from '../tls/ca.ts';

test('TLS port: a silent connection is closed before and after the handshake; a request is answered', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-server-'));
  const ca = path.join(dir, 'ca');
  caInit(ca, { name: 'test CA' });
  const hostTls = path.join(dir, 'host');
  const adminTls = path.join(dir, 'admin');
  issueHostCert('h1', { caDir: ca, outDir: hostTls, ips: ['127.0.0.1'] });
  issueHostCert('ops', { caDir: ca, outDir: adminTls, role: 'admin' });
  const log = new Logger(path.join(dir, 'ferryd.log'));
  const server = new ApiServer(log, async (req) => ({ echo: req.action }));
  const port = 20000 + Math.floor(Math.random() * 20000);
  try {
    assert.equal(
      await server.listenTls({
        address: '127.0.0.1',
        port,
        tlsDir: hostTls,
        hostsAllow: [],
        limits: { connections: 8, connectionsPerAddress: 8, handshakeMs: 400, firstRequestMs: 400 },
      }),
      true,
    );
    const closedWithin = (s: net.Socket, ms: number): Promise<number> =>
      new Promise((resolve, reject) => {
        const t0 = Date.now();
        const t = setTimeout(() => reject(new Error(`still open after ${ms} ms`)), ms);
        s.on('error', () => undefined);
        s.once('close', () => {
          clearTimeout(t);
          resolve(Date.now() - t0);
        });
      });
    // 1. A TCP connection that never says a word of TLS.
    const raw = net.connect(port, '127.0.0.1');
    assert.ok((await closedWithin(raw, 3000)) >= 300);
    // 2. A TLS client with a valid admin certificate that never sends a request.
    const opts = {
      host: '127.0.0.1',
      port,
      ca: fs.readFileSync(path.join(adminTls, 'ca-cert.pem')),
      cert: fs.readFileSync(path.join(adminTls, 'client-cert.pem')),
      key: fs.readFileSync(path.join(adminTls, 'client-key.pem')),
      servername: 'h1',
    };
    const mute = tls.connect(opts);
    await new Promise<void>((r) => mute.once('secureConnect', () => r()));
    assert.ok((await closedWithin(mute, 3000)) >= 300);
    // 3. One that asks at once is served (and may then stay connected).
    const talker = tls.connect(opts);
    const reply = await new Promise<string>((resolve) => {
      talker.once('secureConnect', () => talker.write(JSON.stringify({ id: 1, action: 'domain.list', params: {} }) + '\n'));
      talker.on('data', (d) => resolve(d.toString()));
    });
    assert.deepEqual(JSON.parse(reply), { id: 1, result: { echo: 'domain.list' } });
    await new Promise((r) => setTimeout(r, 700));
    assert.equal(talker.destroyed, false, 'a connection that has asked is not cut off as silent');
    talker.destroy();
    assert.match(fs.readFileSync(path.join(dir, 'ferryd.log'), 'utf8'), /no request within 400 ms/);
  } finally {
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
