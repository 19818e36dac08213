import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { probeQemu, cpuMissing, cpuModelsHere } from './probe.ts';
import { FerryError } from '../errors.ts';

const scratch = (): string => fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-probe-'));

test('a cpuCeiling caps the models a host gives, and names the features above it; an unknown ceiling is CONFIG_INVALID', async (t) => {
  const dir = scratch();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const f = await probeQemu('qemu64', dir, undefined, { ceiling: 'Opteron_G3' });
  assert.equal(f.ceiling, 'Opteron_G3');
  const here = cpuModelsHere(f);
  assert.ok(here.includes('qemu64') && here.includes('Opteron_G2'), here.join(' '));
  assert.ok(!here.includes('Nehalem') && !here.includes('host') && !here.includes('max'), here.join(' '));
  const miss = cpuMissing(f, 'Nehalem')!;
  // Each feature once, in one spelling (QEMU lists sse4.1 also as sse4-1 and sse4_1).
  assert.ok(miss.includes('sse4.1') && !miss.includes('sse4-1') && !miss.includes('sse4_1'), miss.join(' '));
  assert.deepEqual(cpuMissing(f, 'qemu64'), []);
  assert.equal(cpuMissing(f, 'NoSuchModel'), null);
  const open = await probeQemu('qemu64', dir);
  assert.ok(cpuModelsHere(open).includes('Nehalem'), 'no ceiling: every model TCG can give');
  await assert.rejects(
    probeQemu('qemu64', dir, undefined, { ceiling: 'NoSuchModel' }),
    (e: FerryError) => e.code === 'CONFIG_INVALID' && /cpuCeiling/.test(e.message),
  );
});
