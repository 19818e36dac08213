import { test } from 'node:test';
import assert from 'node:assert/strict';
import type net from 'node:net';
import { QmpClient } from '../qmp/client.ts';
import { fakeQmp } from '../testing/qmp.ts';
import { MigrationWatcher, FINAL_STATUSES } from './migstatus.ts';

const ev = (sock: net.Socket, event: string, data: Record<string, unknown>, seconds: number): void => {
  sock.write(JSON.stringify({ event, data, timestamp: { seconds, microseconds: 250000 } }) + '\r\n');
};

test("follows MIGRATION and MIGRATION_PASS events: status, QEMU's own timestamps, passes, waits", async () => {
  let peer: net.Socket | undefined;
  const f = await fakeQmp((msg, sock) => {
    peer = sock;
    sock.write(JSON.stringify({ return: {}, id: msg.id }) + '\r\n');
  });
  try {
    const q = await QmpClient.connect(f.path);
    await q.execute('migrate'); // lets the fake know the socket
    const w = new MigrationWatcher(q);
    const done = w.until(FINAL_STATUSES, 5000);
    ev(peer!, 'MIGRATION', { status: 'setup' }, 1000);
    ev(peer!, 'MIGRATION', { status: 'active' }, 1001);
    ev(peer!, 'MIGRATION_PASS', { pass: 1 }, 1001);
    ev(peer!, 'MIGRATION_PASS', { pass: 2 }, 1002);
    assert.equal(await w.until(['active']), 'active');
    ev(peer!, 'MIGRATION', { status: 'completed' }, 1003);
    assert.equal(await done, 'completed');
    assert.equal(w.passes, 2);
    assert.equal(w.at.get('active'), 1001250);
    assert.equal(w.final, true);
    // Already there: resolves at once.
    assert.equal(await w.until(['completed', 'failed']), 'completed');
    w.dispose();
    // A wait times out, and one pending when QMP closes rejects.
    const w2 = new MigrationWatcher(q);
    await assert.rejects(w2.until(['completed'], 50), /stayed none/);
    const closing = w2.until(['completed']);
    q.close();
    await assert.rejects(closing, /QMP closed/);
  } finally {
    f.cleanup();
  }
});

test('a watcher made late starts from what query-migrate said, and events still move it on', async () => {
  let peer: net.Socket | undefined;
  const f = await fakeQmp((msg, sock) => {
    peer = sock;
    sock.write(JSON.stringify({ return: {}, id: msg.id }) + '\r\n');
  });
  try {
    const q = await QmpClient.connect(f.path);
    await q.execute('query-migrate');
    // The failure that ended the stream came before this watcher: without observe, until() would wait for ever.
    const late = new MigrationWatcher(q);
    late.observe('failed');
    assert.equal(await late.until([...FINAL_STATUSES, 'postcopy-paused'], 1000), 'failed');
    // An event seen first wins over a later observe (the query's answer may be older).
    const w = new MigrationWatcher(q);
    ev(peer!, 'MIGRATION', { status: 'postcopy-paused' }, 2000);
    assert.equal(await w.until(['postcopy-paused'], 1000), 'postcopy-paused');
    w.observe('postcopy-active');
    assert.equal(w.status, 'postcopy-paused');
    ev(peer!, 'MIGRATION', { status: 'completed' }, 2001);
    assert.equal(await w.until(['completed'], 1000), 'completed');
    late.dispose();
    w.dispose();
    q.close();
  } finally {
    f.cleanup();
  }
});
