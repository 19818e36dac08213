import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { dirtyTrackingUnreliable, chunkBytesFor, digestRam, differingChunks, writeRam } from './memory.ts';

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
    const a = path.join(dir, 'a'), b = path.join(dir, 'b');
    const img = Buffer.alloc(bytes);
    for (let i = 0; i < bytes; i += 4096) img[i] = (i / 4096) & 0xff;
    fs.writeFileSync(a, img);
    img[5 * 262144 + 4096 * 3 + 7] ^= 1; // chunk 5
    img[bytes - 1] ^= 1; // the short last chunk
    fs.writeFileSync(b, img);
    const fa = fs.openSync(a, 'r'), fb = fs.openSync(b, 'r+');
    try {
      const [da, db] = [await digestRam(fa, bytes), await digestRam(fb, bytes)];
      assert.equal(da.chunkBytes, 262144);
      assert.equal(da.digests.length, 13 * 32);
      const diff = differingChunks(da.digests, db.digests);
      assert.deepEqual(diff, [5, 12]);
      const fix = Buffer.alloc(262144);
      for (const c of diff) {
        const len = Math.min(262144, bytes - c * 262144);
        fs.readSync(fa, fix, 0, len, c * 262144);
        writeRam(fb, bytes, c * 262144, fix.subarray(0, len));
      }
      assert.deepEqual(differingChunks(da.digests, (await digestRam(fb, bytes)).digests), []);
      assert.throws(() => writeRam(fb, bytes, 100, Buffer.alloc(4096)), /not page-aligned/);
      assert.throws(() => writeRam(fb, bytes, bytes - 4096, Buffer.alloc(8192)), /inside/);
    } finally {
      fs.closeSync(fa); fs.closeSync(fb);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
