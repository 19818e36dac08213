/**
 * ConsoleFollower against two fake ferryds on unix sockets: it attaches, streams the
 * guest's output, follows a "moved" frame to the next host, keeps keys typed while it
 * follows and sends them there in order, and ends on "stopped", on close(), or with
 * DAEMON_UNREACHABLE when a connection drops without a word.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { consoleFrame, CONSOLE_CONTROL, CONSOLE_DATA } from '../api/protocol.ts';
import type { Target } from '../api/client.ts';
import { ConsoleFollower } from './console.ts';
import { FerryError } from '../errors.ts';

interface Fake {
  path: string;
  target: Target;
  input: () => string;
  attached: Promise<net.Socket>;
  close: () => void;
}

/** A ferryd that answers console.attach for `domain` and hands the test the raw socket. */
async function fakeFerryd(dir: string, name: string, domain: string): Promise<Fake> {
  const p = path.join(dir, `${name}.sock`);
  let input = '';
  let attached!: (s: net.Socket) => void;
  const got = new Promise<net.Socket>((r) => {
    attached = r;
  });
  const server = net.createServer((s) => {
    let buf = '';
    let raw = false;
    s.on('data', (d) => {
      if (raw) {
        input += d.toString();
        return;
      }
      buf += d.toString();
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      const req = JSON.parse(buf.slice(0, nl)) as { id: number; action: string; params: { domain: string } };
      assert.equal(req.action, 'console.attach');
      assert.equal(req.params.domain, domain);
      raw = true;
      input += buf.slice(nl + 1);
      s.write(JSON.stringify({ id: req.id, result: { attached: true } }) + '\n');
      attached(s);
    });
    s.on('error', () => undefined);
  });
  await new Promise<void>((r) => server.listen(p, () => r()));
  return { path: p, target: { kind: 'unix', path: p, label: name }, input: () => input, attached: got, close: () => server.close() };
}

const data = (s: string): Buffer => consoleFrame(CONSOLE_DATA, Buffer.from(s));
const control = (m: object): Buffer => consoleFrame(CONSOLE_CONTROL, Buffer.from(JSON.stringify(m)));
const until = async (what: string, f: () => boolean): Promise<void> => {
  for (let i = 0; i < 200 && !f(); i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(f(), what);
};

test('follows a move: output from both hosts, keys typed while it follows reach the new host in order, ends on "stopped"', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-console-'));
  const a = await fakeFerryd(dir, 'hostA', 'web');
  const b = await fakeFerryd(dir, 'hostB', 'web');
  try {
    let out = '';
    const events: string[] = [];
    const f = new ConsoleFollower(
      { domain: 'web', host: 'hostA', target: a.target },
      {
        replay: 0,
        resolve: (h, t) => {
          events.push(`resolve ${h} ${t}`);
          return b.target;
        },
      },
      {
        attached: (h) => events.push(`attached ${h}`),
        output: (d) => {
          out += d.toString();
        },
        moved: (from, to) => {
          events.push(`moved ${from}→${to}`);
          f.write(Buffer.from('k2'));
          f.write(Buffer.from('k3'));
        },
      },
    );
    f.write(Buffer.from('k0')); // before the first attach: held, then sent first
    const run = f.run();
    const sa = await a.attached;
    sa.write(data('login: '));
    f.write(Buffer.from('k1'));
    await until('hostA got k0 then k1', () => a.input() === 'k0k1');
    sa.end(control({ event: 'moved', host: 'hostB', target: '198.18.0.12:8002' }));
    const sb = await b.attached;
    await until('hostB got the keys typed while following', () => b.input() === 'k2k3');
    sb.write(data('still here'));
    sb.end(control({ event: 'stopped', reason: 'shutdown' }));
    assert.deepEqual(await run, { end: 'stopped', reason: 'shutdown' });
    assert.equal(out, 'login: still here');
    assert.deepEqual(events, ['attached hostA', 'moved hostA→hostB', 'resolve hostB 198.18.0.12:8002', 'attached hostB']);
    assert.equal(f.host, 'hostB');
    assert.equal(f.pendingBytes, 0);
  } finally {
    a.close();
    b.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('close() ends the session (also mid-stream); a connection dropped without a control frame is DAEMON_UNREACHABLE', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-console-'));
  const a = await fakeFerryd(dir, 'hostA', 'db');
  try {
    const f = new ConsoleFollower(
      { domain: 'db', host: 'hostA', target: a.target },
      { replay: 0, resolve: () => a.target },
      { output: () => undefined },
    );
    const run = f.run();
    await a.attached;
    f.close();
    assert.deepEqual(await run, { end: 'closed' });

    const b = await fakeFerryd(dir, 'hostB', 'db');
    try {
      const g = new ConsoleFollower(
        { domain: 'db', host: 'hostB', target: b.target },
        { replay: 0, resolve: () => b.target },
        { output: () => undefined },
      );
      const run2 = g.run();
      (await b.attached).destroy();
      await assert.rejects(run2, (e: unknown) => e instanceof FerryError && e.code === 'DAEMON_UNREACHABLE');
    } finally {
      b.close();
    }
  } finally {
    a.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
