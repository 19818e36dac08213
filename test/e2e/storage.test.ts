/**
 * `migrate --copy-storage`, for real in the lab: a Linux guest with a qcow2 data disk in
 * host1's own disk directory (storage.localDir, shared with nobody) moves live with its
 * disk mirrored over NBD and TLS while a writer keeps writing; a dead link mid-mirror
 * leaves the source running on its own disk and nothing half-made on the destination.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { ferry, ok, fails, labUp, labDown, waitFor, inNs, domainRecord, labState, FERRY } from '../helpers.ts';

/**
 * Runs a shell command in guest `name` over SSH (`ferry lab ssh`, which finds its host)
 * and returns what it printed: it returns when the command ends, however long reading
 * 64 MiB under TCG takes (the serial console could only tell by a silence).
 */
async function inGuest(name: string, cmd: string): Promise<string> {
  const r = await ferry(['lab', 'ssh', name, '--', cmd], { timeoutMs: 150000 });
  assert.equal(r.code, 0, r.stderr);
  return r.stdout;
}

const MD5_64MIB = 'dd if=/dev/vda bs=1M count=64 2>/dev/null | md5sum';
const md5Of = (out: string): string => {
  const m = /^([0-9a-f]{32})\s+-/m.exec(out);
  assert.ok(m, `no md5 in: ${out.slice(-300)}`);
  return m[1];
};
const disksDir = (host: string): string => path.join(path.dirname(labState().hosts.find((h: any) => h.name === host).configPath), 'disks');
const files = (host: string): string[] => {
  try {
    return fs.readdirSync(disksDir(host)).sort();
  } catch {
    return [];
  }
};

describe('moving a domain with a local disk (--copy-storage, lab)', () => {
  let sum = '';
  before(async () => {
    await labUp(['--hosts', '2', '--host-memory', '1024']);
    const cfg = await ok(['lab', 'guest', 'linux', 'db', '--data-disk', '256', '--json']);
    assert.equal(cfg.disks[0].path, path.join(disksDir('host1'), 'db-data.qcow2'));
    const f = path.join(labState().dir, 'db.json');
    fs.writeFileSync(f, JSON.stringify(cfg));
    await ok(['-H', 'host1', 'create', f]);
    await waitFor(
      'db ready',
      () => fs.readFileSync(`/var/lib/ferry-lab/host1/state/run/db/console.log`, 'utf8').includes('ferry-linux ready'),
      60000,
    );
    // 64 MiB of random data at the start of /dev/vda, and its sum as the guest reads it.
    sum = md5Of(await inGuest('db', `dd if=/dev/urandom of=/dev/vda bs=1M count=64 conv=fsync 2>/dev/null; ${MD5_64MIB}`));
  });
  after(async () => {
    await labDown();
  });

  test('without --copy-storage a local disk is refused with the storage code, and nothing changes', async () => {
    const pid = (await ok(['-H', 'host1', 'info', 'db', '--json'])).pid;
    const r = await fails(['-H', 'host1', 'migrate', 'db', 'host2', '--live', '--json'], 'MIGRATION_DEST_STORAGE');
    assert.match(r.json.error.message, /own storage \(storage\.localDir\).*--copy-storage/);
    assert.equal((await ok(['-H', 'host1', 'info', 'db', '--json'])).pid, pid);
    assert.equal(domainRecord('host2', 'db'), undefined);
    assert.deepEqual(files('host2'), []);
  });

  test('the link dies mid-mirror: the source keeps running on its disk, nothing half-made stays on the destination', async () => {
    const { pid, memoryMiB } = await ok(['-H', 'host1', 'info', 'db', '--json']);
    // Capped at 4 MiB/s, so the 64 MiB copy is still under way when host2's data ports go dark.
    const child = spawn(
      process.execPath,
      [FERRY, '-H', 'host1', 'migrate', 'db', 'host2', '--live', '--copy-storage', '--bandwidth', '4', '--timeout', '12', '--json'],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
    });
    const done = new Promise<number>((r) => child.on('close', (c) => r(c ?? -1)));
    try {
      await waitFor(
        'the mirror under way',
        async () => {
          const j = await ok(['-H', 'host1', 'job', 'db', '--json']).catch(() => null);
          return j?.progress?.stage?.startsWith('copying disks') && j.progress.disk?.copied > 4 * 1048576;
        },
        20000,
        200,
      );
      assert.deepEqual(files('host2'), ['db.disk0.qcow2'], 'the copy is being made on host2');
      // The waiting QEMU and the move's reservation are the same memory, counted once.
      const mem = (await ok(['-H', 'host2', 'host', 'info', '--json'])).memory;
      assert.deepEqual([mem.usedMiB, mem.reservedMiB], [memoryMiB, memoryMiB], JSON.stringify(mem));
      assert.equal(inNs('host2', ['iptables', '-I', 'INPUT', '-p', 'tcp', '--dport', '49152:49215', '-j', 'DROP']).code, 0);
      const code = await done;
      const rep = JSON.parse(out);
      assert.notEqual(code, 0);
      assert.equal(rep.outcome, 'failed');
      assert.equal(rep.error.code, 'TIMEOUT', JSON.stringify(rep.error));
    } finally {
      inNs('host2', ['iptables', '-D', 'INPUT', '-p', 'tcp', '--dport', '49152:49215', '-j', 'DROP']);
      child.kill();
    }
    const info = await ok(['-H', 'host1', 'info', 'db', '--json']);
    assert.equal(info.state, 'running');
    assert.equal(info.pid, pid, 'the same QEMU, never paused for good');
    assert.equal(domainRecord('host2', 'db'), undefined, 'no definition on host2');
    assert.deepEqual(files('host2'), [], 'the half-made copy is gone');
    assert.equal(md5Of(await inGuest('db', MD5_64MIB)), sum, 'the source disk is intact');
  });

  test('a qcow2 overlay over a shared backing file: the guest starts (its chain passed as descriptors) and only the top is copied', async () => {
    const pool = labState().poolDir;
    const base = path.join(pool, 'base.qcow2');
    const top = path.join(disksDir('host1'), 'ov-data.qcow2');
    const run = (cmd: string, args: string[]): void => {
      const r = spawnSync(cmd, args, { encoding: 'utf8' });
      assert.equal(r.status, 0, r.stderr);
    };
    run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '128M']);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 32M', base]);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    const cfg = await ok(['lab', 'guest', 'linux', 'ov', '--json']);
    cfg.disks = [{ path: top, format: 'qcow2', bus: 'virtio' }];
    const f = path.join(labState().dir, 'ov.json');
    fs.writeFileSync(f, JSON.stringify(cfg));
    await ok(['-H', 'host1', 'create', f]);
    await waitFor(
      'ov ready',
      () => fs.readFileSync('/var/lib/ferry-lab/host1/state/run/ov/console.log', 'utf8').includes('ferry-linux ready'),
      60000,
    );
    // 16 MiB of the guest's own over the base's 32 MiB pattern: the first 64 MiB mix both layers.
    const before = md5Of(await inGuest('ov', `dd if=/dev/urandom of=/dev/vda bs=1M seek=16 count=16 conv=fsync 2>/dev/null; ${MD5_64MIB}`));
    const rep = await ok(['-H', 'host1', 'migrate', 'ov', 'host2', '--live', '--copy-storage', '--json']);
    assert.equal(rep.outcome, 'succeeded', JSON.stringify(rep.error));
    assert.ok(
      rep.policy.some((p: string) => /disk0 \(128 MiB, .* sync top over its shared backing file\)/.test(p)),
      JSON.stringify(rep.policy),
    );
    const copy = path.join(disksDir('host2'), 'ov.disk0.qcow2');
    const info = JSON.parse(spawnSync('qemu-img', ['info', '-U', '--output=json', copy], { encoding: 'utf8' }).stdout);
    assert.equal(info['backing-filename'], base, 'the copy sits on the same shared base');
    assert.ok(info['actual-size'] < 48 * 1048576, `only the top was copied (${info['actual-size']} bytes on disk)`);
    assert.equal(md5Of(await inGuest('ov', MD5_64MIB)), before, 'the guest reads the same 64 MiB on host2');
    await ok(['-H', 'host2', 'destroy', 'ov']);
    await ok(['-H', 'host2', 'delete', 'ov']);
    for (const x of [copy, top, base]) fs.rmSync(x, { force: true });
  });

  test('live with a writer running: the data arrives whole, the source copy is kept; back with --delete-source-storage', async () => {
    // A writer that never stops, past the checked region (from 128 MiB on).
    // (Detached from the SSH session, which then ends at once.)
    await inGuest(
      'db',
      '(i=0; while :; do dd if=/dev/urandom of=/dev/vda bs=64k count=16 seek=$((2048 + i % 64 * 16)) conv=notrunc 2>/dev/null; i=$((i+1)); echo $i > /run/writes; done) </dev/null >/dev/null 2>&1 &',
    );
    await waitFor('the writer writing', async () => /^[1-9]/.test(await inGuest('db', 'cat /run/writes 2>/dev/null || true')), 20000, 500);
    const rep = await ok(['-H', 'host1', 'migrate', 'db', 'host2', '--live', '--copy-storage', '--json']);
    assert.equal(rep.outcome, 'succeeded');
    assert.deepEqual(rep.storage.disks, [
      { index: 0, from: path.join(disksDir('host1'), 'db-data.qcow2'), to: path.join(disksDir('host2'), 'db.disk0.qcow2') },
    ]);
    assert.equal(rep.storage.sourceKept, true);
    assert.ok(rep.storage.copiedBytes >= 64 * 1048576, `${rep.storage.copiedBytes} bytes copied`);
    for (const k of ['disksInSync', 'disksCompleted']) assert.equal(typeof rep.timeline[k], 'number', k);
    assert.ok(rep.policy.some((p: string) => /post-copy not offered: the disk copies/.test(p)));
    const info = await ok(['-H', 'host2', 'info', 'db', '--json']);
    assert.equal(info.config.disks[0].path, path.join(disksDir('host2'), 'db.disk0.qcow2'), 'the domain runs on its copy');
    assert.ok(fs.existsSync(path.join(disksDir('host1'), 'db-data.qcow2')), 'the source copy is kept');
    const out = await inGuest('db', `echo "writes=$(cat /run/writes)"; ${MD5_64MIB}; echo "writes=$(cat /run/writes)"`);
    assert.equal(md5Of(out), sum, 'the 64 MiB region arrived bit for bit');
    const writes = [...out.matchAll(/^writes=(\d+)/gm)].map((m) => Number(m[1]));
    assert.equal(writes.length, 2, out.slice(-300));
    assert.ok(writes[0] > 0 && writes[1] > writes[0], `the writer kept writing on host2 (${writes.join(' → ')})`);

    const back = await ok(['-H', 'host2', 'migrate', 'db', 'host1', '--live', '--copy-storage', '--delete-source-storage', '--json']);
    assert.equal(back.outcome, 'succeeded');
    assert.equal(back.storage.sourceKept, false);
    assert.deepEqual(files('host2'), [], "host2's copy deleted at the end of the move");
    assert.ok(files('host1').includes('db.disk0.qcow2'));
    assert.equal(md5Of(await inGuest('db', MD5_64MIB)), sum);
  });
});
