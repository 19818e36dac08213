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

/**
 * An engine whose first `times` starts are a fake QEMU that shakes hands over QMP and
 * then exits without answering (what a probe once met at a ferryd restart); later
 * starts are the real QEMU.
 */
function droppingEngine(dir: string, times: number): { binary: string; dataDirs: string[] } {
  fs.mkdirSync(dir, { recursive: true });
  const fake = path.join(dir, 'fake-qemu.mjs');
  fs.writeFileSync(
    fake,
    `import net from 'node:net';
const spec = process.argv[process.argv.indexOf('-qmp') + 1];
const sock = spec.slice('unix:'.length).split(',')[0];
net.createServer((c) => {
  c.write(JSON.stringify({ QMP: { version: { qemu: { major: 10, minor: 0, micro: 0 }, package: '' }, capabilities: [] } }) + '\\n');
  c.on('data', (d) => {
    const m = JSON.parse(String(d).trim().split('\\n')[0]);
    if (m.execute === 'qmp_capabilities') return void c.write(JSON.stringify({ return: {}, id: m.id }) + '\\n');
    process.stderr.write('fake-qemu: dropping QMP before answering\\n');
    process.exit(1);
  });
}).listen(sock);
`,
  );
  const counter = path.join(dir, 'starts');
  const wrapper = path.join(dir, 'qemu-wrapper');
  fs.writeFileSync(
    wrapper,
    `#!/bin/sh
n=$(cat ${counter} 2>/dev/null || echo 0); echo $((n + 1)) > ${counter}
if [ "$n" -lt ${times} ]; then exec ${process.execPath} ${fake} "$@"; fi
exec qemu-system-x86_64 "$@"
`,
    { mode: 0o755 },
  );
  return { binary: wrapper, dataDirs: [] };
}

test('a probe whose QEMU drops QMP before answering is tried once more, saying what QEMU wrote; twice is QEMU_START_FAILED', async (t) => {
  const dir = scratch();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const warned: string[] = [];
  const f = await probeQemu('qemu64', path.join(dir, 'run1'), droppingEngine(path.join(dir, 'once'), 1), { warn: (m) => warned.push(m) });
  assert.equal(f.cpuUnavailable.length, 0);
  assert.ok(f.models.qemu64, 'the second try is the real QEMU');
  assert.equal(warned.length, 1);
  assert.match(warned[0], /closed its QMP connection before answering \(fake-qemu: dropping QMP before answering\); probing again/);

  const always = droppingEngine(path.join(dir, 'always'), 2);
  await assert.rejects(
    probeQemu('qemu64', path.join(dir, 'run2'), always),
    (e: FerryError) => e.code === 'QEMU_START_FAILED' && /twice: fake-qemu: dropping QMP before answering\./.test(e.message),
  );
  assert.equal(fs.readFileSync(path.join(dir, 'always', 'starts'), 'utf8').trim(), '2', 'two tries, no more');
});
