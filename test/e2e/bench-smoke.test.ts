/**
 * The benchmark runner's smoke mode: one small scenario, each contender once, in its
 * own lab. Checks that the output is well formed, not what the numbers are.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { ROOT } from '../helpers.ts';

test('npm run bench -- --smoke writes well-formed results', () => {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-bench-'));
  try {
    const r = spawnSync(process.execPath, ['--import', 'tsx', path.join(ROOT, 'bench', 'run.ts'), '--smoke', '--out', out], {
      cwd: ROOT,
      timeout: 600000,
      encoding: 'utf8',
    });
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /\| scenario \| contender \| ok \| total ms \|/);
    assert.match(r.stdout, /\| Linux 128 MiB, idle, live \(smoke\) \| ferry \| 1\/1 \|/);
    const j = JSON.parse(fs.readFileSync(path.join(out, 'smoke-linux-128m-idle.json'), 'utf8'));
    assert.deepEqual(Object.keys(j.summary).sort(), ['ferry', 'qmp']);
    for (const c of ['ferry', 'qmp']) {
      assert.equal(j.summary[c].succeeded, 1);
      for (const k of ['totalMs', 'downtimeMs', 'guestDowntimeMs', 'bytes'])
        assert.equal(typeof j.summary[c][k].median, 'number', `${c}.${k}`);
    }
    assert.equal(j.runs.length, 2);
  } finally {
    fs.rmSync(out, { recursive: true, force: true });
  }
});
