import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { ApiClient } from './client.ts';
import { FerryError } from '../errors.ts';

test("a server's coded refusal reaches a request made after the connection closed, not only one pending at the time", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-client-'));
  const sock = path.join(dir, 'api.sock');
  // As daemon/server.ts refuses a peer: one unsolicited error line, then the end.
  const server = net.createServer((s) =>
    s.end(JSON.stringify({ id: 0, error: { code: 'PEER_NOT_ALLOWED', message: 'not in hostsAllow' } }) + '\n'),
  );
  await new Promise<void>((r) => server.listen(sock, r));
  try {
    const c = await ApiClient.connect({ kind: 'unix', path: sock, label: 'host2' });
    await new Promise<void>((r) => c.socket.once('close', () => r()));
    await assert.rejects(c.request('domain.list'), (e: FerryError) => e.code === 'PEER_NOT_ALLOWED' && /not in hostsAllow/.test(e.message));
    c.close();
    // A connection that simply closed still says so.
    const plain = net.createServer((s) => s.end());
    const sock2 = path.join(dir, 'plain.sock');
    await new Promise<void>((r) => plain.listen(sock2, r));
    const d = await ApiClient.connect({ kind: 'unix', path: sock2, label: 'host3' });
    await new Promise<void>((r) => d.socket.once('close', () => r()));
    await assert.rejects(d.request('domain.list'), (e: FerryError) => e.code === 'DAEMON_UNREACHABLE' && /host3 is closed/.test(e.message));
    d.close();
    plain.close();
  } finally {
    server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
