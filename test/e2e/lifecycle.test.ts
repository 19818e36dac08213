/**
 * Domain lifecycle with real QEMU guests on a real lab host: create, console, pause,
 * resume, shutdown, destroy, save/restore (checked by the memory-pattern checker),
 * and coded errors for bad input that change nothing.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  ferry,
  ok,
  fails,
  labUp,
  labDown,
  labState,
  createGuest,
  guestStatus,
  consoleLog,
  tmpFile,
  waitFor,
  pidAlive,
} from '../helpers.ts';

describe('domain lifecycle (lab, real QEMU)', () => {
  before(async () => {
    await labUp(['--hosts', '1', '--host-memory', '1024']);
  });
  after(async () => {
    await labDown();
  });

  test('a Linux guest boots, answers on its console and on the network', async () => {
    const cfg = await createGuest('linux', 'web', 'host1');
    const list = await ok(['-H', 'host1', 'list', '--json']);
    assert.equal(list.length, 1);
    assert.equal(list[0].name, 'web');
    assert.equal(list[0].state, 'running');
    assert.equal(list[0].memoryMiB, 128);
    const human = await ok(['-H', 'host1', 'list']);
    assert.match(human, /^Name\s+ID\s+Mem\s+VCPUs\s+State\s+Time\(s\)/);
    assert.match(human, /\nweb\s+\d+\s+128\s+1\s+running\s+[\d.]+/);
    const out = await ok(['-H', 'host1', 'console', 'web', '--idle', '2500', '--max', '20000'], { input: 'uname -r\n' });
    assert.match(out, /\d+\.\d+\.\d+-\d+-amd64/);
    const ip = cfg.nics[0].ip.split('/')[0];
    const st = guestStatus(ip);
    assert.equal(st.name, 'web');
    assert.match(st.bootId, /^[0-9a-f-]{36}$/);
    const info = await ok(['-H', 'host1', 'info', 'web', '--json']);
    assert.equal(info.nics[0].mac, cfg.nics[0].mac);
    assert.equal(info.nics[0].ip, cfg.nics[0].ip);
    assert.equal(info.accel, 'tcg');
    assert.ok(pidAlive(info.pid));
  });

  test('pause stops the guest, unpause resumes it', async () => {
    await ok(['-H', 'host1', 'pause', 'web']);
    assert.equal((await ok(['-H', 'host1', 'info', 'web', '--json'])).state, 'paused');
    const before = fs.statSync(`/var/lib/ferry-lab/host1/state/run/web/console.log`).size;
    await fails(['-H', 'host1', 'pause', 'web'], 'DOMAIN_BAD_STATE', 3);
    await ok(['-H', 'host1', 'unpause', 'web']);
    assert.equal((await ok(['-H', 'host1', 'info', 'web', '--json'])).state, 'running');
    await ok(['-H', 'host1', 'console', 'web', '--idle', '2500', '--max', '20000'], { input: 'echo alive-$((6*7))\n' });
    assert.ok(fs.statSync(`/var/lib/ferry-lab/host1/state/run/web/console.log`).size > before);
    assert.match(consoleLog('host1', 'web'), /alive-42/);
  });

  test('shutdown powers the guest off through ACPI; start brings it back; destroy stops at once', async () => {
    const pid = (await ok(['-H', 'host1', 'info', 'web', '--json'])).pid;
    const r = await ok(['-H', 'host1', 'shutdown', 'web', '--timeout', '30', '--json']);
    assert.equal(r.state, 'shutoff');
    assert.equal(pidAlive(pid), false);
    const info = await ok(['-H', 'host1', 'info', 'web', '--json']);
    assert.equal(info.stateDetail.reason, 'shutdown');
    await fails(['-H', 'host1', 'unpause', 'web'], 'DOMAIN_BAD_STATE', 3);
    await ok(['-H', 'host1', 'start', 'web']);
    const pid2 = (await ok(['-H', 'host1', 'info', 'web', '--json'])).pid;
    assert.notEqual(pid2, pid);
    await ok(['-H', 'host1', 'destroy', 'web']);
    assert.equal(pidAlive(pid2), false);
    assert.equal((await ok(['-H', 'host1', 'info', 'web', '--json'])).stateDetail.reason, 'destroyed');
    await ok(['-H', 'host1', 'delete', 'web']);
    await fails(['-H', 'host1', 'info', 'web'], 'DOMAIN_NOT_FOUND', 3);
  });

  test("save and restore keep the pattern guest's memory intact", async () => {
    await createGuest('pattern', 'pat', 'host1', 96);
    await ok(['lab', 'verify', 'pat']);
    // A bare name lives in the host's save directory.
    const s = await ok(['-H', 'host1', 'save', 'pat', 'pat.save', '--json']);
    const file = s.file as string;
    assert.equal(path.dirname(file), path.join(path.dirname(labState().hosts[0].stateDir), 'save'));
    assert.ok(s.bytes > 1024 * 1024);
    // The default where QEMU has it: a mapped-ram file (ferry's header, then QEMU's pages).
    assert.equal(s.format, 'mapped-ram', s.why);
    assert.equal(typeof s.directIo, 'boolean');
    assert.equal(fs.readFileSync(file).subarray(0, 13).toString(), 'FERRY-SAVE-2\n');
    assert.equal((fs.statSync(file).mode & 0o777).toString(8), '600');
    assert.equal(fs.statSync(file).uid, 0, "the file is root's again, not the domain's uid's");
    assert.equal((await ok(['-H', 'host1', 'info', 'pat', '--json'])).stateDetail.reason, 'saved');
    const r = await ok(['-H', 'host1', 'restore', file, '--json']);
    assert.equal(r.state, 'running');
    assert.equal(r.format, 'mapped-ram');
    const v = await ok(['lab', 'verify', 'pat', '--json']);
    assert.equal(v.ok, true);
    assert.ok(v.pages > 20000);
    // the pattern keeps counting after the restore
    const before = consoleLog('host1', 'pat').length;
    await waitFor('pattern progress', () => consoleLog('host1', 'pat').length > before, 10000);
    // --stream: QEMU's migration stream (any QEMU restores it). It also proves that the
    // QEMU restored from mapped-ram was left able to migrate as a stream again.
    const st = await ok(['-H', 'host1', 'save', 'pat', 'pat-stream.save', '--stream', '--json']);
    assert.equal(st.format, 'stream');
    assert.match(st.why, /--stream/);
    assert.equal(fs.readFileSync(st.file).subarray(0, 13).toString(), 'FERRY-SAVE-1\n');
    const r2 = await ok(['-H', 'host1', 'restore', st.file, '--json']);
    assert.equal(r2.format, 'stream');
    assert.equal((await ok(['lab', 'verify', 'pat', '--json'])).ok, true);
    fs.rmSync(st.file, { force: true });
    await fails(['-H', 'host1', 'restore', file], 'DOMAIN_EXISTS', 3);
    // Outside the save directory: refused, unless the local root socket says --any-path.
    await fails(['-H', 'host1', 'restore', '/etc/hostname'], 'PATH_NOT_ALLOWED', 7);
    await fails(['-H', 'host1', 'restore', '/etc/hostname', '--any-path'], 'SAVE_FAILED', 5);
    await fails(['-H', 'host1', 'save', 'pat', '/etc/cron.d/ferry-evil'], 'PATH_NOT_ALLOWED', 7);
    assert.equal(fs.existsSync('/etc/cron.d/ferry-evil'), false);
    // A symlink planted at FILE.partial is never followed.
    const target = path.join(os.tmpdir(), `ferry-victim-${process.pid}`);
    fs.writeFileSync(target, 'keep');
    fs.symlinkSync(target, `${file.replace(/pat\.save$/, 'again.save')}.partial`);
    await fails(['-H', 'host1', 'save', 'pat', 'again.save'], 'SAVE_FAILED', 5);
    assert.equal(fs.readFileSync(target, 'utf8'), 'keep');
    assert.equal((await ok(['-H', 'host1', 'info', 'pat', '--json'])).state, 'running', 'a refused save leaves the domain running');
    fs.rmSync(target, { force: true });
    await ok(['-H', 'host1', 'destroy', 'pat']);
    fs.rmSync(file, { force: true });
  });

  test('bad input gets coded errors and changes nothing', async () => {
    const before = await ok(['-H', 'host1', 'list', '--json']);
    await fails(['-H', 'host1', 'create', tmpFile('bad.json', { name: 'x', memory: 'lots', boot: {} })], 'CONFIG_INVALID', 2);
    await fails(['-H', 'host1', 'create', tmpFile('bad.json', '{not json')], 'CONFIG_UNREADABLE', 2);
    await fails(['-H', 'host1', 'create', '/nonexistent/cfg.json'], 'CONFIG_UNREADABLE', 2);
    const big = await ok(['lab', 'guest', 'pattern', 'big', '--memory', '2048', '--json']);
    const r = await fails(['-H', 'host1', 'create', tmpFile('big.json', big)], 'HOST_NO_MEMORY', 4);
    assert.match(r.json.error.message, /host1 has \d+ MiB free, needs 2048 MiB/);
    const nonet = await ok(['lab', 'guest', 'pattern', 'nonet', '--json']);
    nonet.nics = [{ network: 'nowhere' }];
    await fails(['-H', 'host1', 'create', tmpFile('nonet.json', nonet)], 'NETWORK_NOT_FOUND', 4);
    const nodisk = await ok(['lab', 'guest', 'pattern', 'nodisk', '--json']);
    nodisk.disks[0].path = path.join(labState().poolDir, 'nonexistent.img');
    await fails(['-H', 'host1', 'create', tmpFile('nodisk.json', nodisk)], 'DISK_NOT_FOUND', 4);
    nodisk.disks[0].path = '/nonexistent/disk.img';
    await fails(['-H', 'host1', 'create', tmpFile('nodisk.json', nodisk)], 'PATH_NOT_ALLOWED', 7);
    const dup = await ok(['lab', 'guest', 'pattern', 'pat', '--json']);
    await fails(['-H', 'host1', 'create', tmpFile('dup.json', dup)], 'DOMAIN_EXISTS', 3);
    await fails(['-H', 'host1', 'pause', 'nosuch'], 'DOMAIN_NOT_FOUND', 3);
    await fails(['-H', 'host1', 'shutdown', 'pat', '--timeout', 'soon'], 'CLI_USAGE', 2);
    await fails(['-H', 'host1', 'frobnicate'], 'CLI_USAGE', 2);
    await fails(['-H', 'nosuchhost.invalid:99999', 'list'], 'HOST_UNKNOWN', 3);
    await fails(['lab', 'guest', 'windows', 'w'], 'CLI_USAGE', 2);
    const after = await ok(['-H', 'host1', 'list', '--json']);
    assert.deepEqual(
      after.map((d: any) => [d.name, d.state]),
      before.map((d: any) => [d.name, d.state]),
    );
    const plain = await ferry(['-H', 'host1', 'pause', 'nosuch']);
    assert.equal(plain.code, 3);
    assert.match(plain.stderr, /^ferry: DOMAIN_NOT_FOUND: No domain "nosuch" on host host1/);
  });
});
