import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { dirtyTrackingUnreliable, chunkBytesFor, digestRam, differingChunks, parseGpa2hva, GuestRam } from './memory.ts';

test('only TCG on QEMU before 9.0 has the dirty-tracking bug', () => {
  assert.equal(dirtyTrackingUnreliable('tcg', '7.2.18'), true);
  assert.equal(dirtyTrackingUnreliable('tcg', '8.2.2'), true);
  assert.equal(dirtyTrackingUnreliable('tcg', '9.0.0'), false);
  assert.equal(dirtyTrackingUnreliable('kvm', '7.2.18'), false);
  assert.equal(dirtyTrackingUnreliable('tcg', 'garbage'), true);
});

test('chunks are 256 KiB until there would be more than 8192 of them', () => {
  assert.equal(chunkBytesFor(128 << 20), 256 << 10);
  assert.equal(chunkBytesFor(2048 * 1048576), 256 << 10);
  assert.equal(chunkBytesFor(4096 * 1048576), 512 << 10);
  assert.ok(Math.ceil((64 * 1024 ** 3) / chunkBytesFor(64 * 1024 ** 3)) <= 8192);
});

test('digests find exactly the chunks that differ, and a repair makes them equal', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-mem-'));
  try {
    const bytes = 3 * 1048576 + 4096 * 5; // a last chunk shorter than the others
    const a = path.join(dir, 'a'),
      b = path.join(dir, 'b');
    const img = Buffer.alloc(bytes);
    for (let i = 0; i < bytes; i += 4096) img[i] = (i / 4096) & 0xff;
    fs.writeFileSync(a, img);
    img[5 * 262144 + 4096 * 3 + 7] ^= 1; // chunk 5
    img[bytes - 1] ^= 1; // the short last chunk
    fs.writeFileSync(b, img);
    // A file stands in for /proc/PID/mem: the same reads and writes, at base 0.
    const fa = new GuestRam(fs.openSync(a, 'r'), 0, bytes),
      fb = new GuestRam(fs.openSync(b, 'r+'), 0, bytes);
    try {
      const [da, db] = [await digestRam(fa), await digestRam(fb)];
      assert.equal(da.chunkBytes, 262144);
      assert.equal(da.digests.length, 13 * 32);
      const diff = differingChunks(da.digests, db.digests);
      assert.deepEqual(diff, [5, 12]);
      const fix = Buffer.alloc(262144);
      for (const c of diff) {
        const len = Math.min(262144, bytes - c * 262144);
        assert.equal(await fa.read(fix, len, c * 262144), len);
        fb.write(c * 262144, fix.subarray(0, len));
      }
      assert.deepEqual(differingChunks(da.digests, (await digestRam(fb)).digests), []);
      assert.throws(() => fb.write(100, Buffer.alloc(4096)), /not page-aligned/);
      assert.throws(() => fb.write(bytes - 4096, Buffer.alloc(8192)), /inside/);
      assert.throws(() => fb.write(-4096, Buffer.alloc(4096)), /inside/);
      await assert.rejects(fa.read(fix, 8192, bytes - 4096), /outside/);
    } finally {
      fa.close();
      fb.close();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('only an address in the main RAM block is accepted from gpa2hva', () => {
  assert.equal(parseGpa2hva('Host virtual address for 0x0 (pc.ram) is 0x7ff39be00000\r\n'), 0x7ff39be00000);
  assert.throws(() => parseGpa2hva('Host virtual address for 0x0 (pc.bios) is 0x7ff39be00000'), /unexpected answer/);
  assert.throws(() => parseGpa2hva('No memory is mapped at address 0x0'), /unexpected answer/);
});
