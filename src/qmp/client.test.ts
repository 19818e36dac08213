import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { QmpClient, QmpError, QmpClosedError, type QmpEvent } from './client.ts';
import { fakeQmp, type FakeQmpCommand } from '../testing/qmp.ts';

test('greeting, capabilities and a command matched by id', async () => {
  const f = await fakeQmp((msg, sock) => {
    if (msg.execute === 'query-status') sock.write(JSON.stringify({ return: { status: 'running', running: true }, id: msg.id }) + '\r\n');
  });
  try {
    const c = await QmpClient.connect(f.path);
    assert.deepEqual((c.greeting as { version: { qemu: { major: number } } }).version.qemu.major, 7);
    const st = await c.execute<{ status: string }>('query-status');
    assert.equal(st.status, 'running');
    c.close();
  } finally {
    f.cleanup();
  }
});

test('replies out of order are matched to their own ids', async () => {
  const held: FakeQmpCommand[] = [];
  const f = await fakeQmp((msg, sock) => {
    held.push(msg);
    if (held.length === 2) {
      // answer the second first, in one write split over two chunks
      const a =
        JSON.stringify({ return: 'second', id: held[1].id }) + '\r\n' + JSON.stringify({ return: 'first', id: held[0].id }) + '\r\n';
      sock.write(a.slice(0, 10));
      setTimeout(() => sock.write(a.slice(10)), 5);
    }
  });
  try {
    const c = await QmpClient.connect(f.path);
    const [r1, r2] = await Promise.all([c.execute('a'), c.execute('b')]);
    assert.equal(r1, 'first');
    assert.equal(r2, 'second');
    c.close();
  } finally {
    f.cleanup();
  }
});

test('errors become QmpError with class and description', async () => {
  const f = await fakeQmp((msg, sock) => {
    sock.write(JSON.stringify({ error: { class: 'CommandNotFound', desc: 'The command nope has not been found' }, id: msg.id }) + '\r\n');
  });
  try {
    const c = await QmpClient.connect(f.path);
    await assert.rejects(
      c.execute('nope'),
      (e: unknown) => e instanceof QmpError && e.qmpClass === 'CommandNotFound' && /nope/.test(e.desc),
    );
    c.close();
  } finally {
    f.cleanup();
  }
});

test('events are emitted and can be awaited, interleaved with replies', async () => {
  const f = await fakeQmp((msg, sock) => {
    sock.write(JSON.stringify({ event: 'STOP', timestamp: { seconds: 1, microseconds: 2 } }) + '\r\n');
    sock.write(JSON.stringify({ return: {}, id: msg.id }) + '\r\n');
    sock.write(JSON.stringify({ event: 'RESUME', data: { x: 1 } }) + '\r\n');
  });
  try {
    const c = await QmpClient.connect(f.path);
    const seen: string[] = [];
    c.on('event', (e: QmpEvent) => seen.push(e.event));
    const resume = c.waitEvent('RESUME', 1000);
    await c.execute('stop');
    const ev = await resume;
    assert.deepEqual(ev.data, { x: 1 });
    assert.deepEqual(seen, ['STOP', 'RESUME']);
    c.close();
  } finally {
    f.cleanup();
  }
});

test('close rejects pending commands and waiters', async () => {
  let peer: net.Socket | undefined;
  const f = await fakeQmp((_msg, sock) => {
    peer = sock;
  });
  try {
    const c = await QmpClient.connect(f.path);
    const p = c.execute('query-status');
    const w = c.waitEvent('SHUTDOWN', 5000);
    await new Promise((r) => setTimeout(r, 20));
    peer!.destroy();
    await assert.rejects(p, QmpClosedError);
    await assert.rejects(w, QmpClosedError);
    assert.equal(c.closed, true);
    await assert.rejects(c.execute('x'), QmpClosedError);
  } finally {
    f.cleanup();
  }
});

test('garbage lines are reported, not fatal', async () => {
  const f = await fakeQmp((msg, sock) => {
    sock.write('this is not json\r\n');
    sock.write(JSON.stringify({ return: 42, id: msg.id }) + '\r\n');
  });
  try {
    const c = await QmpClient.connect(f.path);
    const bad: string[] = [];
    c.on('protocol-error', (l: string) => bad.push(l));
    assert.equal(await c.execute('x'), 42);
    assert.deepEqual(bad, ['this is not json']);
    c.close();
  } finally {
    f.cleanup();
  }
});
