import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseRequest } from './schema.ts';
import {
  attachmentLength,
  MAX_REPAIR_BYTES,
  ConsoleDeframer,
  consoleDataFrames,
  consoleFrame,
  CONSOLE_CONTROL,
  CONSOLE_FRAME_MAX,
} from './protocol.ts';
import { FerryError } from '../errors.ts';

function code(raw: unknown): string {
  try {
    parseRequest(raw);
    return 'OK';
  } catch (e) {
    assert.ok(e instanceof FerryError);
    return e.code;
  }
}

test('good requests parse', () => {
  assert.deepEqual(parseRequest({ id: 1, action: 'domain.list' }), { id: 1, action: 'domain.list', params: {} });
  const r = parseRequest({ id: 'a', action: 'domain.shutdown', params: { domain: 'web', timeoutS: 5 } });
  assert.ok(r.action === 'domain.shutdown' && r.params.timeoutS === 5, 'params typed by action');
});

test('bad requests get coded errors', () => {
  assert.equal(code(null), 'API_BAD_REQUEST');
  assert.equal(code([1]), 'API_BAD_REQUEST');
  assert.equal(code({ action: 'domain.list' }), 'API_BAD_REQUEST');
  assert.equal(code({ id: 1 }), 'API_BAD_REQUEST');
  assert.equal(code({ id: 1, action: 'domain.explode' }), 'API_UNKNOWN_ACTION');
  assert.equal(code({ id: 1, action: '__proto__' }), 'API_UNKNOWN_ACTION');
  assert.equal(code({ id: 1, action: 'domain.info' }), 'API_BAD_REQUEST');
  assert.equal(code({ id: 1, action: 'domain.info', params: { domain: 3 } }), 'API_BAD_REQUEST');
  assert.equal(code({ id: 1, action: 'domain.info', params: { domain: 'x', extra: 1 } }), 'API_BAD_REQUEST');
  assert.equal(code({ id: 1, action: 'domain.save', params: { domain: 'x', file: 'sub/relative' } }), 'API_BAD_REQUEST');
  assert.equal(code({ id: 1, action: 'domain.shutdown', params: { domain: 'x', timeoutS: -1 } }), 'API_BAD_REQUEST');
  assert.equal(code({ id: 1, action: 'domain.list', params: [] }), 'API_BAD_REQUEST');
  assert.equal(code({ id: 1, action: 'domain.list', junk: true }), 'API_BAD_REQUEST');
});

test('a repair announces its raw bytes; only a sane length of a binary action is skipped after the line', () => {
  const repair = (params: Record<string, unknown>): unknown => ({
    id: 1,
    action: 'relocation.repair',
    params: { jobId: 'j', offset: 0, ...params },
  });
  assert.equal(attachmentLength(repair({ length: 4096 })), 4096);
  assert.equal(attachmentLength(repair({ length: MAX_REPAIR_BYTES })), MAX_REPAIR_BYTES);
  assert.equal(attachmentLength(repair({ length: MAX_REPAIR_BYTES + 1 })), 0);
  assert.equal(attachmentLength(repair({ length: -1 })), 0);
  assert.equal(attachmentLength(repair({ length: '4096' })), 0);
  assert.equal(attachmentLength({ id: 1, action: 'domain.info', params: { length: 4096 } }), 0);
  assert.equal(attachmentLength(null), 0);
  const rep = parseRequest(repair({ length: 4096 }));
  assert.ok(rep.action === 'relocation.repair' && rep.params.length === 4096);
  assert.equal(code(repair({ length: 0 })), 'API_BAD_REQUEST');
  assert.equal(code(repair({ length: 4096, data: 'AAAA' })), 'API_BAD_REQUEST');
  assert.equal(code({ id: 1, action: 'relocation.digest', params: { jobId: 'j', chunks: [0, 1.5] } }), 'API_BAD_REQUEST');
  const dig = parseRequest({ id: 1, action: 'relocation.digest', params: { jobId: 'j', chunks: [0, 7] } });
  assert.deepEqual(dig.action === 'relocation.digest' && dig.params.chunks, [0, 7]);
});

test('console frames: guest bytes that look like a control message stay guest bytes', () => {
  const out: Buffer[] = [];
  const ctl: unknown[] = [];
  const d = new ConsoleDeframer(
    (b) => out.push(Buffer.from(b)),
    (m) => ctl.push(m),
  );
  const forged = Buffer.from('\x1e{"event":"moved","host":"evil","target":"/run/evil.sock"}\n');
  const stream = Buffer.concat([
    consoleDataFrames(forged),
    consoleDataFrames(Buffer.alloc(CONSOLE_FRAME_MAX + 10, 0x41)),
    consoleFrame(CONSOLE_CONTROL, Buffer.from('{"event":"stopped","reason":"destroyed"}')),
  ]);
  for (let i = 0; i < stream.length; i += 7) d.push(stream.subarray(i, i + 7));
  assert.deepEqual(Buffer.concat(out), Buffer.concat([forged, Buffer.alloc(CONSOLE_FRAME_MAX + 10, 0x41)]));
  assert.deepEqual(ctl, [{ event: 'stopped', reason: 'destroyed' }]);
  assert.throws(
    () =>
      new ConsoleDeframer(
        () => undefined,
        () => undefined,
      ).push(Buffer.from([9, 0, 0, 0, 1, 0])),
    (e: unknown) => e instanceof FerryError && e.code === 'API_BAD_REQUEST',
  );
});
