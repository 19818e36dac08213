/** A process's identity beside its pid: start time and owner, from /proc. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync, spawn } from 'node:child_process';
import { processStartTicks, processUid } from './process.ts';

test('start ticks are stable for a process and differ for a later one; the uid is the real one', async () => {
  const mine = processStartTicks(process.pid);
  assert.ok(Number.isInteger(mine) && mine! > 0);
  assert.equal(processStartTicks(process.pid), mine);
  assert.equal(processUid(process.pid), process.getuid!());
  spawnSync('sleep', ['0.05']); // let the clock tick (100 Hz) past this process's start
  const child = spawn('sleep', ['5']);
  try {
    const theirs = processStartTicks(child.pid!);
    assert.ok(theirs! > mine!, `${theirs} > ${mine}`);
  } finally {
    child.kill();
  }
  assert.equal(processStartTicks(2 ** 22 + 1), undefined);
  assert.equal(processUid(2 ** 22 + 1), undefined);
});

test('unixPeerIs names the process holding the other end of a unix socket', async () => {
  const { default: net } = await import('node:net');
  const { default: fs } = await import('node:fs');
  const { default: os } = await import('node:os');
  const { default: path } = await import('node:path');
  const { unixPeerIs } = await import('./process.ts');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-peer-'));
  const p = path.join(dir, 's.sock');
  const held: import('node:net').Socket[] = [];
  const srv = net.createServer((s) => held.push(s));
  await new Promise<void>((r) => srv.listen(p, r));
  const c = net.createConnection({ path: p });
  await new Promise<void>((r) => c.once('connect', () => r()));
  const other = spawn('sleep', ['5']);
  try {
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(await unixPeerIs(c, process.pid), true, 'this process accepted it');
    assert.equal(await unixPeerIs(c, other.pid!), false, 'another process holds no end of it');
  } finally {
    other.kill();
    c.destroy();
    for (const s of held) s.destroy();
    srv.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
