import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseRequest } from './protocol.ts';
import { FerryError } from '../errors.ts';

function code(raw: unknown): string {
  try { parseRequest(raw); return 'OK'; } catch (e) { assert.ok(e instanceof FerryError); return e.code; }
}

test('good requests parse', () => {
  assert.deepEqual(parseRequest({ id: 1, action: 'domain.list' }), { id: 1, action: 'domain.list', params: {} });
  assert.equal(parseRequest({ id: 'a', action: 'domain.shutdown', params: { domain: 'web', timeoutS: 5 } }).params.timeoutS, 5);
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
  assert.equal(code({ id: 1, action: 'domain.save', params: { domain: 'x', file: 'relative' } }), 'API_BAD_REQUEST');
  assert.equal(code({ id: 1, action: 'domain.shutdown', params: { domain: 'x', timeoutS: -1 } }), 'API_BAD_REQUEST');
  assert.equal(code({ id: 1, action: 'domain.list', params: [] }), 'API_BAD_REQUEST');
  assert.equal(code({ id: 1, action: 'domain.list', junk: true }), 'API_BAD_REQUEST');
});
