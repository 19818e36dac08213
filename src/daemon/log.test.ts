/** ferryd.log rotates by size and keeps a bounded number of old files; child loggers share the file. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Logger } from './log.ts';

test('the log rotates at its size limit, keeps `keep` old files, and loses no line of the current one', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-log-'));
  try {
    const f = path.join(dir, 'ferryd.log');
    const log = new Logger(f, { base: { host: 'h' }, rotate: { maxBytes: 2000, keep: 2 } });
    const child = log.child({ domain: 'd' });
    for (let i = 0; i < 200; i++) (i % 2 ? child : log).info('line', { i, pad: 'x'.repeat(50) });
    assert.deepEqual(fs.readdirSync(dir).sort(), ['ferryd.log', 'ferryd.log.1', 'ferryd.log.2']);
    for (const n of ['ferryd.log', 'ferryd.log.1', 'ferryd.log.2']) assert.ok(fs.statSync(path.join(dir, n)).size <= 2000, n);
    const last = fs
      .readFileSync(f, 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
    assert.equal(last.at(-1).i, 199);
    assert.equal(last.at(-1).domain, 'd');
    // consecutive: nothing lost between the newest old file and the current one
    const prev = fs
      .readFileSync(`${f}.1`, 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
    assert.equal(prev.at(-1).i + 1, last[0].i);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('lines below the configured level are not written; debug is off by default', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-log-'));
  try {
    const quiet = new Logger(path.join(dir, 'a.log'));
    quiet.debug('qmp event', { event: 'STOP' });
    quiet.info('kept');
    assert.deepEqual(
      fs
        .readFileSync(path.join(dir, 'a.log'), 'utf8')
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l).msg),
      ['kept'],
    );
    const chatty = new Logger(path.join(dir, 'b.log'), { level: 'debug' });
    chatty.child({ domain: 'd' }).debug('qmp event');
    assert.equal(JSON.parse(fs.readFileSync(path.join(dir, 'b.log'), 'utf8')).level, 'debug');
    const terse = new Logger(path.join(dir, 'c.log'), { level: 'warn' });
    terse.info('dropped');
    terse.error('kept');
    assert.deepEqual(
      fs
        .readFileSync(path.join(dir, 'c.log'), 'utf8')
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l).msg),
      ['kept'],
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
