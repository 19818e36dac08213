/**
 * Each domain is its own prisoner, on a hardened host: /dev/net/tun and /dev/kvm at
 * 0600 root (restored afterwards), QEMUs with a uid each from the host's range, a
 * private /dev, and nothing of another domain's within reach: not its process
 * (signals, ptrace, memory), not its QMP socket, not its disk. A domain moved away and
 * back gets a uid on each host; a host out of uids refuses with HOST_UIDS_EXHAUSTED and
 * leaves nothing behind.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { spawnSync } from 'node:child_process';
import { ok, fails, labUp, labDown, reconfigure, domainRecord, tmpFile, inNs, guestStatus, waitFor, consoleLog } from '../helpers.ts';

const FIRST = 0x70000000;
const HARDEN = ['/dev/net/tun', '/dev/kvm'];

function uidOf(pid: number): number {
  return Number(/^Uid:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]);
}

/** Runs `cmd` as `uid` (and its gid, no other groups); returns its exit status and stderr. */
function asUid(uid: number, cmd: string[]): { code: number; stderr: string } {
  const r = spawnSync('setpriv', [`--reuid=${uid}`, `--regid=${uid}`, '--clear-groups', '--', ...cmd], { timeout: 10000 });
  return { code: r.status ?? -1, stderr: r.stderr?.toString() ?? '' };
}

describe('confinement: a uid per domain, a private /dev (lab, hardened host)', () => {
  const modes = new Map<string, number>();
  const info: Record<string, any> = {};
  before(async () => {
    for (const d of HARDEN) {
      try {
        modes.set(d, fs.statSync(d).mode & 0o7777);
        fs.chmodSync(d, 0o600);
      } catch {
        /* the host has no such node */
      }
    }
    await labUp(['--hosts', '2']);
    for (const n of ['a', 'b']) {
      const cfg = await ok(['lab', 'guest', 'linux', n, '--data-disk', '8', '--on', 'host1', '--json']);
      await ok(['-H', 'host1', 'create', tmpFile(`${n}.json`, cfg), '--json']);
    }
    for (const n of ['a', 'b']) {
      await waitFor(`${n} ready`, () => consoleLog('host1', n).includes('ferry-linux ready'), 60000);
      info[n] = await ok(['-H', 'host1', 'info', n, '--json']);
    }
  });
  after(async () => {
    await labDown();
    for (const [d, m] of modes) fs.chmodSync(d, m);
  });

  test('with /dev/net/tun at 0600 root, both domains run, each as its own unprivileged uid under seccomp', async () => {
    assert.equal(fs.statSync('/dev/net/tun').mode & 0o777, 0o600);
    const ua = uidOf(info.a.pid);
    const ub = uidOf(info.b.pid);
    assert.ok(ua >= FIRST && ua < FIRST + 4096 && ub >= FIRST && ub < FIRST + 4096, `${ua} ${ub}`);
    assert.notEqual(ua, ub);
    for (const n of ['a', 'b']) {
      assert.match(fs.readFileSync(`/proc/${info[n].pid}/status`, 'utf8'), /^Seccomp:\s+2$/m);
      assert.equal(domainRecord('host1', n).runtime.uid, uidOf(info[n].pid), 'the uid is on record');
      // The guest's network works: its tap was opened through the private /dev.
      assert.equal(guestStatus(info[n].nics[0].ip.split('/')[0]).name, n);
    }
    // QEMU's /dev is its own: only the basic nodes and the tap device, the latter the domain's.
    const devs = fs.readdirSync(`/proc/${info.a.pid}/root/dev`).sort();
    assert.deepEqual(devs, ['fd', 'full', 'net', 'null', 'random', 'urandom', 'zero']);
    const tun = fs.statSync(`/proc/${info.a.pid}/root/dev/net/tun`);
    assert.deepEqual([tun.uid, tun.mode & 0o777], [ua, 0o600]);
  });

  test("one domain's uid can neither signal, trace nor read the other's QEMU, reach its QMP socket, nor open its disk", () => {
    const ua = uidOf(info.a.pid);
    const b = info.b;
    const qmp = domainRecord('host1', 'b').runtime.qmpPath;
    assert.notEqual(asUid(ua, ['kill', '-0', String(b.pid)]).code, 0, 'kill -0');
    assert.match(asUid(ua, ['kill', '-0', String(b.pid)]).stderr, /not permitted/);
    assert.notEqual(asUid(ua, ['dd', `if=/proc/${b.pid}/mem`, 'of=/dev/null', 'bs=4096', 'count=1', 'skip=1']).code, 0, 'its memory');
    const connect = asUid(ua, [
      process.execPath,
      '-e',
      `require('net').connect(${JSON.stringify(qmp)}).on('connect', () => process.exit(0)).on('error', (e) => { console.error(e.code); process.exit(3); })`,
    ]);
    assert.equal(connect.code, 3, 'its QMP socket');
    assert.match(connect.stderr, /EACCES/);
    const disk = domainRecord('host1', 'b').config.disks[0].path;
    const open = asUid(ua, ['dd', `if=${disk}`, 'of=/dev/null', 'bs=512', 'count=1']);
    assert.notEqual(open.code, 0, 'its disk');
    assert.match(open.stderr, /Permission denied/);
    // Nor list or read ferryd's state: records, jobs, b's run directory (a's own it may pass).
    const state = '/var/lib/ferry-lab/host1/state';
    for (const p of [state, `${state}/domains`, `${state}/run`, `${state}/run/b`, `${state}/run/b/q`]) {
      assert.notEqual(asUid(ua, ['ls', p]).code, 0, `ls ${p}`);
    }
    assert.notEqual(asUid(ua, ['cat', `${state}/domains/b.json`]).code, 0, "b's record");
    assert.equal(asUid(ua, ['ls', `${state}/run/a/q`]).code, 0, 'its own QEMU directory');
    // And b still runs, untouched.
    assert.equal(guestStatus(b.nics[0].ip.split('/')[0]).name, 'b');
  });

  test('a domain moved away and back gets a uid on each host, and the old one is free', async () => {
    await ok(['-H', 'host1', 'migrate', 'a', 'host2', '--live', '--copy-storage', '--json']);
    const on2 = await ok(['-H', 'host2', 'info', 'a', '--json']);
    const u2 = uidOf(on2.pid);
    assert.ok(u2 >= FIRST && u2 < FIRST + 4096);
    assert.equal(domainRecord('host2', 'a').runtime.uid, u2);
    await ok(['-H', 'host2', 'migrate', 'a', 'host1', '--live', '--copy-storage', '--delete-source-storage', '--json']);
    const back = await ok(['-H', 'host1', 'info', 'a', '--json']);
    const u1 = uidOf(back.pid);
    assert.ok(u1 >= FIRST && u1 < FIRST + 4096);
    assert.notEqual(u1, uidOf(info.b.pid));
    assert.equal(domainRecord('host1', 'a').runtime.uid, u1);
    info.a = back;
  });

  test('a host out of uids refuses with HOST_UIDS_EXHAUSTED and leaves nothing half-started', async () => {
    const used = [uidOf(info.a.pid), uidOf(info.b.pid)].sort((x, y) => x - y);
    assert.equal(used[1] - used[0], 1, `the two uids are adjacent: ${used}`);
    // A range holding exactly the two uids in use (ferryd keeps them across the restart).
    await reconfigure('host1', (c) => {
      c.qemu = { ...(c.qemu ?? {}), uids: { first: used[0], count: 2 } };
    });
    const cfg = await ok(['lab', 'guest', 'linux', 'c', '--json']);
    const r = await fails(['-H', 'host1', 'create', tmpFile('c.json', cfg)], 'HOST_UIDS_EXHAUSTED', 4);
    assert.match(r.json.error.message, /qemu\.uids/);
    await fails(['-H', 'host1', 'info', 'c'], 'DOMAIN_NOT_FOUND', 3);
    const taps = inNs('host1', ['ip', '-br', 'link'])
      .stdout.split('\n')
      .filter((l) => l.startsWith('ft'));
    assert.equal(taps.length, 2, `only a's and b's taps: ${taps}`);
    await reconfigure('host1', (c) => {
      delete c.qemu.uids;
    });
  });

  test('ferryd refuses a uid range that other users already hold', async () => {
    await assert.rejects(
      reconfigure('host1', (c) => {
        c.qemu = { ...(c.qemu ?? {}), uids: { first: 1000, count: 65536 } };
      }),
      /qemu\.uids/,
    );
    await reconfigure('host1', (c) => {
      delete c.qemu.uids;
    });
  });
});
