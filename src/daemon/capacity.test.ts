import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freeMiB, explainFree, memAvailableMiB, rssMiB } from './capacity.ts';

test('free memory is the smaller of the offer and what the host really has', () => {
  const c = { offerMiB: 4096, usedMiB: 1024, availableMiB: 8000, untouchedMiB: 900, marginMiB: 256 };
  assert.equal(freeMiB(c), 3072);
  assert.match(explainFree(c), /offers 4096 MiB/);
  // A host whose RAM went elsewhere (page cache is in MemAvailable; other programs are not).
  const tight = { ...c, availableMiB: 2000 };
  assert.equal(freeMiB(tight), 2000 - 900 - 256);
  assert.match(explainFree(tight), /MemAvailable.*900 MiB of it promised.*256 MiB kept/);
});

test('MemAvailable and RSS are read from /proc', () => {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-cap-'));
  try {
    fs.writeFileSync(path.join(d, 'meminfo'), 'MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:    2097152 kB\n');
    assert.equal(memAvailableMiB(path.join(d, 'meminfo')), 2048);
  } finally {
    fs.rmSync(d, { recursive: true, force: true });
  }
  assert.ok(memAvailableMiB() > 0);
  assert.ok(rssMiB(process.pid) > 10, 'this process holds more than 10 MiB');
  assert.equal(rssMiB(2 ** 22 + 12345), 0);
});
