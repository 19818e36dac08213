/**
 * Reading a real QEMU's guest RAM the way the memory check does (no lab needed, root):
 * never-touched RAM, and RAM that QEMU's migration scan has read (which maps the
 * kernel's zero page behind it), both hash as zero without being read; a page written
 * afterwards is found and hashed, and its chunk's digest changes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startQemu, killAndWait } from '../../src/qemu/process.ts';
import { openGuestRam, digestRam } from '../../src/qemu/memory.ts';

test('untouched and zero-page-mapped guest RAM is skipped; a written page is hashed', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-ram-'));
  const qmpPath = path.join(dir, 'qmp.sock');
  const q = await startQemu(['-machine', 'pc,accel=tcg', '-cpu', 'qemu64', '-m', '256', '-nodefaults', '-display', 'none', '-S', '-qmp', `unix:${qmpPath},server=on,wait=off`], { qmpPath, logPath: path.join(dir, 'qemu.log'), what: 'test QEMU' });
  const bytes = 256 * 1048576;
  try {
    const fresh = await openGuestRam(q.qmp, q.pid, bytes);
    const d0 = await digestRam(fresh);
    assert.equal(d0.hashedChunks, 0, 'a QEMU that never ran has touched nothing');
    const buf = Buffer.alloc(1 << 20);
    for (let o = 0; o < bytes; o += buf.length) assert.equal(await fresh.read(buf, buf.length, o), buf.length);
    const d1 = await digestRam(fresh);
    fresh.close();
    assert.equal(d1.hashedChunks, 0, 'pages that only map the zero page are not read');
    assert.deepEqual(d1.digests, d0.digests);
    const w = await openGuestRam(q.qmp, q.pid, bytes, true);
    const page = Buffer.alloc(4096);
    page[7] = 0x5a;
    w.write(3 * 262144, page);
    w.close();
    const r = await openGuestRam(q.qmp, q.pid, bytes);
    const d2 = await digestRam(r);
    r.close();
    assert.ok(d2.hashedChunks >= 1 && d2.hashedChunks <= 8, `hashed ${d2.hashedChunks} chunks (a written page, or its 2 MiB huge page)`);
    assert.notDeepEqual(d2.digests.subarray(3 * 32, 4 * 32), d1.digests.subarray(3 * 32, 4 * 32), 'chunk 3 changed');
    assert.deepEqual(d2.digests.subarray(0, 3 * 32), d1.digests.subarray(0, 3 * 32), 'chunks before it did not');
  } finally {
    q.qmp.close();
    await killAndWait(q.pid, 0);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
