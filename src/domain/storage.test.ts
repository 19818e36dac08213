/**
 * Storage pools and save files on a real filesystem: inside a pool and real passes;
 * outside, through a symlink, a directory, or a device not listed is refused; a peer's
 * path outside the pools is refused before the filesystem is asked anything.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { checkFile, resolveSaveFile, checkedBackingImages, checkDomainFiles } from './storage.ts';
import type { DomainConfig } from './config.ts';
import { FerryError } from '../errors.ts';

const code = (f: () => unknown): string | undefined => {
  try {
    f();
    return 'OK';
  } catch (e) {
    return e instanceof FerryError ? e.code : String(e);
  }
};

test('pool paths: real files inside pass; outside, symlinks, dirs, unlisted devices and missing files do not', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-pool-'));
  try {
    const pool = path.join(dir, 'pool');
    fs.mkdirSync(pool);
    fs.writeFileSync(path.join(pool, 'disk.img'), 'x');
    fs.writeFileSync(path.join(dir, 'outside.img'), 'x');
    fs.symlinkSync(path.join(dir, 'outside.img'), path.join(pool, 'link.img'));
    fs.symlinkSync('/etc/shadow', path.join(pool, 'shadow.img'));
    fs.mkdirSync(path.join(pool, 'sub'));
    const policy = { pools: [pool], blockDevices: ['/dev/null-not-a-block'], saveDir: path.join(dir, 'save') };
    assert.equal(
      code(() => checkFile(path.join(pool, 'disk.img'), policy, 'disk')),
      'OK',
    );
    assert.equal(
      code(() => checkFile(path.join(dir, 'outside.img'), policy, 'disk')),
      'PATH_NOT_ALLOWED',
    );
    assert.equal(
      code(() => checkFile('/etc/shadow', policy, 'disk')),
      'PATH_NOT_ALLOWED',
    );
    assert.equal(
      code(() => checkFile('/dev/sda', policy, 'disk')),
      'PATH_NOT_ALLOWED',
    );
    assert.equal(
      code(() => checkFile(path.join(pool, 'link.img'), policy, 'disk')),
      'PATH_NOT_ALLOWED',
    );
    assert.equal(
      code(() => checkFile(path.join(pool, 'shadow.img'), policy, 'disk')),
      'PATH_NOT_ALLOWED',
    );
    assert.equal(
      code(() => checkFile(path.join(pool, 'sub'), policy, 'disk')),
      'PATH_NOT_ALLOWED',
    );
    assert.equal(
      code(() => checkFile(`${pool}/../outside.img`, policy, 'disk')),
      'PATH_NOT_ALLOWED',
    );
    assert.equal(
      code(() => checkFile(path.join(pool, 'missing.img'), policy, 'disk')),
      'DISK_NOT_FOUND',
    );
    // Outside the pools, a file that does not exist gets the same answer as one that does.
    const a = (() => {
      try {
        checkFile('/etc/hostname', policy, 'f');
      } catch (e) {
        return (e as Error).message.replace('/etc/hostname', 'P');
      }
    })();
    const b = (() => {
      try {
        checkFile('/etc/no-such-file', policy, 'f');
      } catch (e) {
        return (e as Error).message.replace('/etc/no-such-file', 'P');
      }
    })();
    assert.equal(a, b);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('save files: a bare name lives in the save directory; other paths only locally and on request', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-save-'));
  try {
    const policy = { pools: [dir], blockDevices: [], saveDir: path.join(dir, 'save') };
    assert.equal(resolveSaveFile('pat.save', policy, { local: false }), path.join(dir, 'save', 'pat.save'));
    assert.equal(resolveSaveFile(path.join(dir, 'save', 'x'), policy, { local: false }), path.join(dir, 'save', 'x'));
    assert.equal(
      code(() => resolveSaveFile('/etc/cron.d/evil', policy, { local: false })),
      'PATH_NOT_ALLOWED',
    );
    assert.equal(
      code(() => resolveSaveFile('/etc/cron.d/evil', policy, { local: false, anyPath: true })),
      'PATH_NOT_ALLOWED',
    );
    assert.equal(
      code(() => resolveSaveFile('/tmp/x.save', policy, { local: true })),
      'PATH_NOT_ALLOWED',
    );
    assert.equal(resolveSaveFile('/tmp/x.save', policy, { local: true, anyPath: true }), '/tmp/x.save');
    assert.equal(
      code(() => resolveSaveFile('..', policy, { local: true })),
      'PATH_NOT_ALLOWED',
    );
    assert.equal(
      code(() => resolveSaveFile(`${dir}/save/../../x`, policy, { local: false })),
      'PATH_NOT_ALLOWED',
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('qcow2 backing chains: each level is read by qemu-img and checked; a base outside the pools or a base swapped for a symlink is refused', (t) => {
  try {
    execFileSync('qemu-img', ['--version'], { stdio: 'ignore' });
  } catch {
    t.skip('qemu-img is not installed');
    return;
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-chain-'));
  try {
    const pool = path.join(dir, 'pool');
    fs.mkdirSync(pool);
    const img = (file: string, backing?: string): void => {
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ...(backing ? ['-b', backing, '-F', 'qcow2'] : []), file, '1M']);
    };
    const policy = { pools: [pool], blockDevices: [], saveDir: path.join(dir, 'save') };
    img(path.join(pool, 'base.qcow2'));
    img(path.join(pool, 'mid.qcow2'), path.join(pool, 'base.qcow2'));
    img(path.join(pool, 'top.qcow2'), path.join(pool, 'mid.qcow2'));
    assert.deepEqual(checkedBackingImages(path.join(pool, 'top.qcow2'), policy, 'disk'), [
      { path: path.join(pool, 'mid.qcow2'), format: 'qcow2' },
      { path: path.join(pool, 'base.qcow2'), format: 'qcow2' },
    ]);
    const cfg = {
      name: 'd',
      disks: [{ path: path.join(pool, 'evil.qcow2'), format: 'qcow2', readOnly: false }],
      boot: { kind: 'disk' },
    } as unknown as DomainConfig;
    img(path.join(dir, 'outside.qcow2'));
    img(path.join(pool, 'evil.qcow2'), path.join(dir, 'outside.qcow2'));
    assert.equal(
      code(() => checkedBackingImages(path.join(pool, 'evil.qcow2'), policy, 'disk')),
      'PATH_NOT_ALLOWED',
    );
    assert.equal(
      code(() => checkDomainFiles(cfg, policy, 'h')),
      'PATH_NOT_ALLOWED',
    );
    // A start leaves the chain to its spawn (which calls checkedBackingImages where it opens them).
    assert.equal(
      code(() => checkDomainFiles(cfg, policy, 'h', { backing: false })),
      'OK',
    );
    // The base replaced by a symlink after the image was made: refused too.
    fs.rmSync(path.join(pool, 'base.qcow2'));
    fs.symlinkSync(path.join(dir, 'outside.qcow2'), path.join(pool, 'base.qcow2'));
    assert.equal(
      code(() => checkedBackingImages(path.join(pool, 'top.qcow2'), policy, 'disk')),
      'PATH_NOT_ALLOWED',
    );
    assert.equal(
      code(() => checkedBackingImages(path.join(pool, 'nope.qcow2'), policy, 'disk')),
      'CONFIG_INVALID',
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
