/**
 * A fake QMP peer for unit tests (never used outside them): it greets, negotiates
 * capabilities, and hands every other command to `handler`, which may answer and
 * emit events on the socket.
 */
import net from 'node:net';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/** A command as the fake peer hands it on. */
export interface FakeQmpCommand {
  execute: string;
  arguments?: Record<string, unknown>;
  id?: unknown;
}

export async function fakeQmp(
  handler: (msg: FakeQmpCommand, sock: net.Socket) => void,
): Promise<{ path: string; server: net.Server; cleanup: () => void }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qmp-'));
  const p = path.join(dir, 'qmp.sock');
  const server = net.createServer((sock) => {
    sock.on('error', () => undefined); // the client may go first; a late answer is not an error
    sock.write(JSON.stringify({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 } }, capabilities: [] } }) + '\r\n');
    let buf = '';
    sock.on('data', (d) => {
      buf += d.toString();
      let i: number;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        const msg = JSON.parse(line) as FakeQmpCommand;
        if (msg.execute === 'qmp_capabilities') sock.write(JSON.stringify({ return: {}, id: msg.id }) + '\r\n');
        else handler(msg, sock);
      }
    });
  });
  await new Promise<void>((r) => server.listen(p, r));
  return {
    path: p,
    server,
    cleanup: () => {
      server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
