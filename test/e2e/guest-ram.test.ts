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

/** Whether the pages the scan touched map shared frames (the zero page), from /proc/PID/pagemap. */
function kernelSharesZeroPage(pid: number, ram: { base?: number }): boolean {
  const base = (ram as { base: number }).base;
  const fd = fs.openSync(`/proc/${pid}/pagemap`, 'r');
  try {
    const b = Buffer.alloc(8 * 1024);
    fs.readSync(fd, b, 0, b.length, (base / 4096) * 8);
    const frames = new Set<number>();
    let present = 0;
    for (let k = 0; k < 1024; k++) {
      const hi = b.readUInt32LE(k * 8 + 4);
      if (!(hi & 0x80000000)) continue;
      present++;
      frames.add((hi & 0x7fffff) * 2 ** 32 + b.readUInt32LE(k * 8));
    }
    return present > 0 && frames.size < present;
  } finally {
    fs.closeSync(fd);
  }
}

test('untouched and zero-page-mapped guest RAM is skipped; a written page is hashed', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-ram-'));
  const qmpPath = path.join(dir, 'qmp.sock');
  const q = await startQemu(
    [
      '-machine',
      'pc,accel=tcg',
      '-cpu',
      'qemu64',
      '-m',
      '256',
      '-nodefaults',
      '-display',
      'none',
      '-S',
      '-qmp',
      `unix:${qmpPath},server=on,wait=off`,
    ],
    { qmpPath, logPath: path.join(dir, 'qemu.log'), what: 'test QEMU' },
  );
  const bytes = 256 * 1048576;
  try {
    const fresh = await openGuestRam(q.qmp, q.pid, bytes);
    const d0 = await digestRam(fresh);
    assert.equal(d0.hashedChunks, 0, 'a QEMU that never ran has touched nothing');
    // QEMU's own migration scan reads every page to find the zero ones, which maps the
    // (huge) zero page behind each. (A read through /proc/PID/mem is no stand-in: newer
    // kernels allocate real pages for it under THP.)
    await q.qmp.execute('migrate', { uri: `file:${path.join(dir, 'scan.out')}` });
    for (let i = 0; i < 600; i++) {
      const st = (await q.qmp.execute<{ status?: string }>('query-migrate')).status;
      if (st === 'completed') break;
      assert.ok(st !== 'failed' && st !== 'cancelled', `the scan ${st}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    const d1 = await digestRam(fresh);
    fresh.close();
    assert.deepEqual(d1.digests, d0.digests, 'RAM the scan read still hashes as zeros');
    const sharesZero = kernelSharesZeroPage(q.pid, fresh);
    if (sharesZero) assert.equal(d1.hashedChunks, 0, 'pages that only map the zero page are not read');
    // Some kernels (seen: 6.18 with THP "madvise") give a read fault in QEMU's
    // MADV_HUGEPAGE RAM a fresh huge page instead of the huge zero page: nothing is
    // shared, so nothing can be skipped, and every chunk is read (correctly, as zeros).
    else t.diagnostic(`this kernel (${os.release()}) allocates pages on read faults: no zero page to skip; ${d1.hashedChunks} chunks read`);
    const w = await openGuestRam(q.qmp, q.pid, bytes, true);
    const page = Buffer.alloc(4096);
    page[7] = 0x5a;
    w.write(3 * 262144, page);
    w.close();
    const r = await openGuestRam(q.qmp, q.pid, bytes);
    const d2 = await digestRam(r);
    r.close();
    if (sharesZero)
      assert.ok(d2.hashedChunks >= 1 && d2.hashedChunks <= 8, `hashed ${d2.hashedChunks} chunks (a written page, or its 2 MiB huge page)`);
    assert.notDeepEqual(d2.digests.subarray(3 * 32, 4 * 32), d1.digests.subarray(3 * 32, 4 * 32), 'chunk 3 changed');
    assert.deepEqual(d2.digests.subarray(0, 3 * 32), d1.digests.subarray(0, 3 * 32), 'chunks before it did not');
  } finally {
    q.qmp.close();
    await killAndWait(q.pid, 0);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
