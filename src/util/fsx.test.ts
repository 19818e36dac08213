import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { StateWriter, writeFileAtomic, FrameSplitter } from './fsx.ts';
import { FerryError } from '../errors.ts';

const tmp = (): string => fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-fsx-'));
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A record path whose directory is a file (so writes fail), and the way to unblock it. */
function blocked(): { dir: string; file: string; unblock: () => void } {
  const dir = tmp();
  const blocker = path.join(dir, 'sub');
  fs.writeFileSync(blocker, 'a file where a directory should be');
  return {
    dir,
    file: path.join(blocker, 'rec.json'),
    unblock: () => {
      fs.rmSync(blocker);
      fs.mkdirSync(blocker);
    },
  };
}

test('a refused write throws STATE_WRITE_FAILED and lands later with the latest value', async () => {
  const { dir: d, file, unblock } = blocked();
  const w = new StateWriter(() => undefined, 50);
  let value = 1;
  assert.throws(
    () => w.write(file, () => ({ value })),
    (e: unknown) => e instanceof FerryError && e.code === 'STATE_WRITE_FAILED' && e.message.startsWith(`Cannot write ${file}`),
  );
  assert.deepEqual(w.pendingFiles, [file]);
  value = 2;
  unblock();
  for (let i = 0; i < 40 && w.pendingFiles.length; i++) await sleep(25);
  assert.deepEqual(w.pendingFiles, []);
  assert.deepEqual(JSON.parse(fs.readFileSync(file, 'utf8')), { value: 2 });
  fs.rmSync(d, { recursive: true });
});

test('writeLater never throws, and drop forgets a pending write', async () => {
  const { dir: d, file, unblock } = blocked();
  const w = new StateWriter(() => undefined, 20);
  assert.equal(
    w.writeLater(file, () => ({ a: 1 })),
    false,
  );
  w.drop(file);
  unblock();
  await sleep(80);
  assert.equal(fs.existsSync(file), false, 'a dropped write is not resurrected');
  assert.equal(
    w.writeLater(file, () => ({ a: 2 })),
    true,
  );
  fs.rmSync(d, { recursive: true });
});

test('a failed atomic write leaves no temp file behind', () => {
  const d = tmp();
  fs.mkdirSync(path.join(d, 'target.json')); // rename over a directory fails
  assert.throws(() => writeFileAtomic(path.join(d, 'target.json'), 'x'));
  assert.deepEqual(fs.readdirSync(d), ['target.json']);
  fs.rmSync(d, { recursive: true });
});

test('FrameSplitter: lines split anywhere (inside a UTF-8 character too), and announced raw bytes in one piece', () => {
  const got: string[] = [];
  const s = new FrameSplitter(
    (l) => {
      got.push(l);
      const m = /^bin (\d+)$/.exec(l);
      return m ? Number(m[1]) : 0;
    },
    (b) => got.push(`<${b.toString('hex')}>`),
    { maxLine: 64 },
  );
  const stream = Buffer.concat([Buffer.from('héllo wörld\nbin 5\n'), Buffer.from([0, 10, 255, 10, 7]), Buffer.from('ünd\n')]);
  for (let i = 0; i < stream.length; i++) s.push(stream.subarray(i, i + 1)); // a byte at a time
  assert.deepEqual(got, ['héllo wörld', 'bin 5', '<000aff0a07>', 'ünd']);
  const whole: string[] = [];
  new FrameSplitter(
    (l) => {
      whole.push(l);
      return l === 'bin 5' ? 5 : 0;
    },
    (b) => whole.push(`<${b.toString('hex')}>`),
  ).push(stream);
  assert.deepEqual(whole, got);
  let over = 0;
  const o = new FrameSplitter(
    () => 0,
    () => undefined,
    { maxLine: 8, onOverflow: () => over++ },
  );
  o.push(Buffer.from('0123456789'));
  assert.equal(over, 1);
});

test('FrameSplitter.REST: after the line that says so, every byte (the rest of this read too) goes to onRest', () => {
  const lines: string[] = [];
  const rest: Buffer[] = [];
  const s = new FrameSplitter(
    (l) => {
      lines.push(l);
      return l === 'upgrade' ? FrameSplitter.REST : 0;
    },
    () => undefined,
    { maxLine: 64, onRest: (b) => rest.push(b) },
  );
  s.push(Buffer.from('a\nupgrade\n\x00\x01raw\nnot a line'));
  s.push(Buffer.from('\nmore'));
  assert.deepEqual(lines, ['a', 'upgrade']);
  assert.equal(Buffer.concat(rest).toString('latin1'), '\x00\x01raw\nnot a line\nmore');
});
