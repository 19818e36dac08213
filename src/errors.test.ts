import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { ERRORS, FerryError, asFerryError } from './errors.ts';
import { QmpError, QmpClosedError } from './qmp/client.ts';

test('every error code is documented in README with its exit code', () => {
  const readme = fs.readFileSync(new URL('../README.md', import.meta.url), 'utf8');
  for (const [code, { exit }] of Object.entries(ERRORS)) {
    assert.match(readme, new RegExp(`\\| \`${code}\` \\| ${exit} \\|`), `README documents ${code} (exit ${exit})`);
  }
});

test('asFerryError keeps codes, maps QMP failures and wraps the rest as INTERNAL', () => {
  assert.equal(asFerryError(new FerryError('TIMEOUT', 'x')).code, 'TIMEOUT');
  assert.equal(asFerryError({ code: 'DOMAIN_NOT_FOUND', message: 'm' }).code, 'DOMAIN_NOT_FOUND');
  assert.equal(asFerryError(new QmpError('stop', 'GenericError', 'no')).code, 'QMP_ERROR');
  assert.equal(asFerryError(new QmpClosedError('stop')).code, 'QMP_DISCONNECTED');
  const e = asFerryError(new Error('boom'));
  assert.equal(e.code, 'INTERNAL');
  assert.equal(e.exitCode, 70);
  assert.equal(asFerryError('str').message, 'str');
});
