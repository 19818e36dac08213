/**
 * The destination side, driven through every phase without root, QEMU or a network:
 * a fake host (MigrationHost) and a scripted fake QMP peer stand in for them.
 * The lab tests (test/e2e) run the same code against real QEMUs.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Destination } from './dest.ts';
import { JobStore, type DestJob } from './jobs.ts';
import { PROTOCOL_VERSION } from './phases.ts';
import type { RelocationContext } from './host.ts';
import { FakeHost, incomingQemu, quiet } from '../testing/fakes.ts';
import { parseDomainConfig, domainConfigToJson } from '../domain/config.ts';
import { hostArch } from '../qemu/probe.ts';
import { FerryError } from '../errors.ts';

async function rig(o: { contFails?: 'paused' | 'unknown' | 'dies' } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-dest-'));
  const kernel = path.join(dir, 'vmlinux');
  fs.writeFileSync(kernel, 'k');
  const qemu = await incomingQemu(o);
  const host = new FakeHost('host2', dir, qemu.path, 40000 + Math.floor(Math.random() * 20000));
  const store = new JobStore(path.join(dir, 'jobs'));
  const dest = new Destination(host, store, quiet);
  const closers: (() => void)[] = [];
  const ctx: RelocationContext = {
    caller: { transport: 'tls', peerName: 'host1', peerDn: 'O=ferry,OU=host,CN=host1', peerAddress: '127.0.0.1' },
    onClose: (f) => {
      closers.push(f);
    },
  };
  const config = parseDomainConfig({ name: 'web', memory: 256, boot: { kernel } });
  const jobId = crypto.randomUUID();
  /** Begin from host1; `extra` overrides fields of the message (and `config` the domain's). */
  const begin = (
    mode: 'live' | 'offline' | 'definition' = 'live',
    extra: Record<string, unknown> = {},
    cfg: Record<string, unknown> = domainConfigToJson(config),
  ) =>
    dest.begin(
      {
        version: PROTOCOL_VERSION,
        jobId,
        mode,
        insecure: false,
        parallel: 1,
        peer: {
          name: 'host1',
          version: 'test',
          qemuVersion: '10.0.2',
          arch: hostArch(),
          accel: 'tcg',
          cpuModel: 'qemu64',
          cpuFeatures: ['lm'],
          machine: 'pc-i440fx-10.0',
          networks: {},
        },
        domain: { config: cfg, fileSizes: {}, machine: 'pc-i440fx-10.0', cpuModel: 'qemu64' },
        ...extra,
      },
      ctx,
    );
  const phase = (): string => (store.jobs.get(jobId) as DestJob | undefined)?.phase ?? 'none';
  const onDisk = (): string => JSON.parse(fs.readFileSync(path.join(dir, 'jobs', `${jobId}.json`), 'utf8')).phase;
  const done = (): void => {
    for (const d of host.domains.values()) d.qmp?.close();
    qemu.cleanup();
    fs.rmSync(dir, { recursive: true, force: true });
  };
  return { dest, host, store, ctx, jobId, begin, phase, onDisk, qemu, closers, done, held: () => held(dest) };
}

/** The incoming runs a Destination still holds (incoming/run.ts): none once every job settled. */
const held = (d: Destination): number => (d as unknown as { runs: Map<string, unknown> }).runs.size;

const code = async (p: Promise<unknown>): Promise<string> => {
  try {
    await p;
    return 'OK';
  } catch (e) {
    return e instanceof FerryError ? e.code : String(e);
  }
};

test('destination: begun → prepared → finishing → finished → confirmed, each phase on disk', async () => {
  const r = await rig();
  try {
    await r.begin();
    assert.equal(r.phase(), 'begun');
    assert.equal(r.onDisk(), 'begun');
    assert.equal(r.host.reservations.size, 1, 'memory reserved at Begin');
    assert.equal(await code(r.dest.finish({ jobId: r.jobId }, r.ctx)), 'MIGRATION_ILLEGAL_PHASE', 'no Finish before Prepare');
    const prep = (await r.dest.prepare({ jobId: r.jobId }, r.ctx)) as { dataPort: number };
    assert.equal(r.phase(), 'prepared');
    assert.ok(prep.dataPort >= r.host.cfg.relocation.dataPorts[0]);
    assert.ok(r.qemu.seen.includes('migrate-incoming'));
    // Finish before any stream arrived is out of order, and changes nothing.
    assert.equal(await code(r.dest.finish({ jobId: r.jobId }, r.ctx)), 'MIGRATION_PROTOCOL');
    assert.equal(r.phase(), 'prepared');
    r.qemu.stream();
    const fin = (await r.dest.finish({ jobId: r.jobId }, r.ctx)) as { phase: string; resumedAt: number };
    assert.equal(fin.phase, 'finished');
    assert.ok(fin.resumedAt > 0);
    assert.ok(r.qemu.seen.includes('cont'));
    assert.deepEqual(r.host.get('web').rec.state.kind, 'running');
    assert.equal(r.host.reservations.size, 0, 'the reservation became the domain');
    assert.equal(
      await code(r.dest.abandon({ jobId: r.jobId }, r.ctx)),
      'MIGRATION_ILLEGAL_PHASE',
      'no abandon past the point of no return',
    );
    r.dest.confirm({ jobId: r.jobId }, r.ctx);
    assert.equal(r.phase(), 'confirmed');
    assert.deepEqual(r.dest.status({ jobId: r.jobId }, r.ctx), { phase: 'confirmed', domain: 'web' });
    assert.equal(r.held(), 0, 'nothing held once confirmed');
  } finally {
    r.done();
  }
});

test('destination: an abandon in begun and in prepared undoes everything', async () => {
  for (const at of ['begun', 'prepared'] as const) {
    const r = await rig();
    try {
      await r.begin();
      if (at === 'prepared') await r.dest.prepare({ jobId: r.jobId }, r.ctx);
      assert.equal(r.phase(), at);
      const a = (await r.dest.abandon({ jobId: r.jobId, reason: 'test' }, r.ctx)) as { phase: string };
      assert.equal(a.phase, 'abandoned');
      assert.equal(r.onDisk(), 'abandoned');
      assert.deepEqual(r.host.discarded, ['web'], `the incoming domain is gone (${at})`);
      assert.equal(r.host.reservations.size, 0);
      // Idempotent, and Finish afterwards says so in words the source acts on.
      assert.deepEqual(await r.dest.abandon({ jobId: r.jobId }, r.ctx), { phase: 'abandoned' });
      const fin = await r.dest.finish({ jobId: r.jobId }, r.ctx).catch((e: FerryError) => e);
      assert.ok(fin instanceof FerryError && fin.details?.abandoned === true);
      assert.equal(r.held(), 0, `nothing held after an abandon in ${at}`);
    } finally {
      r.done();
    }
  }
});

test("destination: the source's control connection closing before Finish abandons", async () => {
  const r = await rig();
  try {
    await r.begin();
    await r.dest.prepare({ jobId: r.jobId }, r.ctx);
    for (const f of r.closers) f();
    for (let i = 0; i < 100 && r.phase() !== 'abandoned'; i++) await new Promise((res) => setTimeout(res, 10));
    assert.equal(r.phase(), 'abandoned');
    assert.equal(r.held(), 0, 'nothing held after the connection closed');
  } finally {
    r.done();
  }
});

test('destination: QEMU refusing cont gives the guest back only if it says it is not running', async () => {
  const paused = await rig({ contFails: 'paused' });
  try {
    await paused.begin();
    await paused.dest.prepare({ jobId: paused.jobId }, paused.ctx);
    paused.qemu.stream();
    const e = await paused.dest.finish({ jobId: paused.jobId }, paused.ctx).catch((x: FerryError) => x);
    assert.ok(e instanceof FerryError && e.details?.abandoned === true, 'the source may resume its copy');
    assert.match(e.message, /never ran there/);
    assert.equal(paused.phase(), 'abandoned');
    assert.deepEqual(paused.host.discarded, ['web']);
    assert.deepEqual(paused.dest.status({ jobId: paused.jobId }, paused.ctx), { phase: 'abandoned', domain: 'web' });
    assert.equal(paused.held(), 0, 'nothing held after the guest went back');
  } finally {
    paused.done();
  }
  const unknown = await rig({ contFails: 'unknown' });
  try {
    await unknown.begin();
    await unknown.dest.prepare({ jobId: unknown.jobId }, unknown.ctx);
    unknown.qemu.stream();
    const e = await unknown.dest.finish({ jobId: unknown.jobId }, unknown.ctx).catch((x: FerryError) => x);
    assert.ok(e instanceof FerryError && !e.details?.abandoned, 'no word that it never ran');
    assert.equal(unknown.phase(), 'finishing', 'the source keeps asking; nothing runs twice');
    assert.deepEqual(unknown.host.discarded, []);
    assert.equal(unknown.held(), 0, 'stuck in finishing: the record is all that stays');
  } finally {
    unknown.done();
  }
});

test('destination: QEMU dying as the guest resumes is a crash here, past the point of no return (the source must not resume)', async () => {
  const r = await rig({ contFails: 'dies' });
  try {
    await r.begin();
    await r.dest.prepare({ jobId: r.jobId }, r.ctx);
    r.qemu.stream();
    const fin = (await r.dest.finish({ jobId: r.jobId }, r.ctx)) as { phase: string; crashed?: boolean };
    assert.equal(fin.phase, 'finished', 'the handover happened');
    assert.equal(fin.crashed, true);
    assert.equal(r.host.get('web').rec.state.kind, 'crashed');
    assert.equal(r.host.reservations.size, 0);
    assert.deepEqual(r.dest.status({ jobId: r.jobId }, r.ctx), { phase: 'finished', domain: 'web' });
    assert.equal(r.held(), 0, 'nothing held after a crash on arrival');
  } finally {
    r.done();
  }
});

test('destination: a shut-off domain moves as its definition: begun → finished without a QEMU', async () => {
  const r = await rig();
  try {
    await r.begin('definition');
    assert.equal(r.host.reservations.size, 0, 'no memory for a definition');
    await r.dest.finish({ jobId: r.jobId }, r.ctx);
    assert.equal(r.phase(), 'finished');
    assert.equal(r.host.get('web').rec.state.kind, 'defined');
    assert.deepEqual(r.qemu.seen, [], 'no QEMU was asked anything');
    assert.equal(r.held(), 0, 'nothing held after a definition moved');
  } finally {
    r.done();
  }
});

/** A ferryd restart: a new Destination on the same host reloads the jobs from disk and drives each one. */
async function restartDest(r: Awaited<ReturnType<typeof rig>>): Promise<{ dest: Destination; job: () => DestJob }> {
  const store = new JobStore(path.join(r.host.runDir, 'jobs'));
  const dest = new Destination(r.host, store, quiet);
  for (const j of store.load()) if (j.role === 'destination') await dest.drive(j, 'ferryd restarted');
  return { dest, job: () => store.jobs.get(r.jobId) as DestJob };
}

test('destination: a restart in begun or prepared abandons from the phase on disk (drive)', async () => {
  for (const at of ['begun', 'prepared'] as const) {
    const r = await rig();
    try {
      await r.begin();
      if (at === 'prepared') await r.dest.prepare({ jobId: r.jobId }, r.ctx);
      const after = await restartDest(r);
      assert.equal(after.job().phase, 'abandoned', at);
      assert.equal(r.onDisk(), 'abandoned');
      assert.match(after.job().error?.message ?? '', new RegExp(`ferryd restarted in phase ${at}`));
      assert.deepEqual(r.host.discarded, ['web'], `the incoming domain is gone (${at})`);
      assert.equal(r.host.reservations.size, 0);
      assert.equal(held(after.dest), 0, `nothing held after a restart in ${at}`);
    } finally {
      r.done();
    }
  }
});

test('destination: a restart in finishing rolls forward (the source never resumes its copy), then confirms', async () => {
  const r = await rig();
  try {
    await r.begin();
    await r.dest.prepare({ jobId: r.jobId }, r.ctx);
    r.qemu.stream();
    // The old process died right after persisting the point of no return, before cont.
    r.store.advance(r.store.jobs.get(r.jobId) as DestJob, 'finishing', true);
    const after = await restartDest(r);
    assert.ok(r.qemu.seen.includes('cont'), 'the guest was resumed here');
    assert.equal(r.host.get('web').rec.state.kind, 'running');
    assert.deepEqual(
      after
        .job()
        .history.map((h) => h.phase)
        .slice(-3),
      ['finishing', 'finished', 'confirmed'],
    );
    assert.equal(r.onDisk(), 'confirmed');
    assert.equal(r.host.reservations.size, 0);
    assert.equal(held(after.dest), 0, 'nothing held after rolling forward');
  } finally {
    r.done();
  }
});

test('destination: a restart in finished confirms without the source; a settled job is left alone', async () => {
  const r = await rig();
  try {
    await r.begin();
    await r.dest.prepare({ jobId: r.jobId }, r.ctx);
    r.qemu.stream();
    await r.dest.finish({ jobId: r.jobId }, r.ctx);
    const after = await restartDest(r);
    assert.equal(after.job().phase, 'confirmed');
    assert.equal(r.host.get('web').rec.state.kind, 'running', 'the guest runs on, untouched');
    const n = after.job().history.length;
    const again = await restartDest(r);
    assert.equal(again.job().history.length, n, 'a confirmed job is not driven again');
    assert.equal(held(after.dest) + held(again.dest) + r.held(), 0, 'nothing held by any of the three processes');
  } finally {
    r.done();
  }
});

test('destination: Begin offering post-copy sets it up for the stream; recover is refused where there is nothing to recover', async () => {
  const r = await rig();
  try {
    const code0 = await code(
      r.begin('offline', { jobId: crypto.randomUUID(), postcopy: true }, { name: 'other', memory: 64, boot: { kernel: '/nonexistent' } }),
    );
    assert.equal(code0, 'MIGRATION_PROTOCOL', 'post-copy only for a live move');
    // A live Begin with post-copy: the answer says the destination takes it.
    const { dest, ctx, jobId } = r;
    const b = await r.begin('live', { postcopy: true });
    assert.equal(b.postcopy, true);
    await dest.prepare({ jobId }, ctx);
    assert.ok(r.qemu.seen.includes('migrate-set-capabilities'));
    // Not finished yet: nothing to recover.
    assert.equal(await code(dest.recover({ jobId }, ctx)), 'MIGRATION_ILLEGAL_PHASE');
    await dest.abandon({ jobId }, ctx);
    assert.equal(r.held(), 0, 'nothing held after the abandon');
  } finally {
    r.done();
  }
});

test('destination: --copy-storage places each copy in storage.localDir, refuses without room, and deletes what it made on abandon', async () => {
  const r = await rig();
  try {
    const disk = path.join(r.host.runDir, 'src-disk.qcow2');
    const cfg = {
      ...domainConfigToJson(
        parseDomainConfig({
          name: 'web',
          memory: 256,
          boot: { kernel: path.join(r.host.runDir, 'vmlinux') },
          disks: [{ path: disk, format: 'qcow2' }],
        }),
      ),
    };
    const copy = (allocated: number) => ({
      domain: {
        config: cfg,
        fileSizes: {},
        machine: 'pc-i440fx-10.0',
        cpuModel: 'qemu64',
        copyDisks: [{ index: 0, format: 'qcow2', virtualSize: 256 << 20, allocated }],
      },
    });
    // 2 GiB allocated against the fake's 1 GiB free: refused before anything is made.
    assert.equal(await code(r.begin('live', copy(2 * 2 ** 30), cfg)), 'MIGRATION_DEST_STORAGE');
    assert.deepEqual(r.host.createdDisks, []);
    assert.equal(r.phase(), 'none');
    // A disk that is not writable, or listed twice, is a malformed Begin.
    const twice = copy(1 << 20);
    (twice.domain.copyDisks as unknown[]).push(twice.domain.copyDisks[0]);
    assert.equal(await code(r.begin('live', twice, cfg)), 'MIGRATION_PROTOCOL');
    // A shut-off domain has no QEMU to mirror from.
    assert.equal(await code(r.begin('definition', copy(1 << 20), cfg)), 'MIGRATION_DEST_STORAGE');
    const ans = (await r.begin('live', copy(64 << 20), cfg)) as { copyDisks: { index: number; path: string }[] };
    const placed = path.join(r.host.cfg.storage.localDir, 'web.disk0.qcow2');
    assert.deepEqual(ans.copyDisks, [{ index: 0, path: placed }]);
    assert.deepEqual(r.host.createdDisks, [placed]);
    assert.equal(r.host.get('web').rec.config.disks[0].path, placed, 'the incoming domain runs on the copy');
    const job = r.store.jobs.get(r.jobId) as DestJob;
    assert.deepEqual(job.createdDisks, [placed], 'on record, for an abandon after a restart');
    fs.writeFileSync(placed, 'half a copy');
    await r.dest.abandon({ jobId: r.jobId }, r.ctx);
    assert.equal(r.phase(), 'abandoned');
    assert.equal(fs.existsSync(placed), false, 'the half-made copy is gone');
    assert.equal(r.held(), 0, 'nothing held after refusals and an abandon');
  } finally {
    r.done();
  }
});

test('destination: a Begin naming a tunnel home at an address that is neither the source nor a peer is refused, nothing held', async () => {
  const r = await rig();
  try {
    (r.host.cfg as { networks: Record<string, unknown> }).networks = { lab: { bridge: 'br-lab', subnet: '198.18.1.0/24' } };
    const kernel = path.join(r.host.cfg.stateDir, 'vmlinux');
    const cfg = domainConfigToJson(
      parseDomainConfig({ name: 'web', memory: 256, boot: { kernel }, nics: [{ network: 'lab', ip: '198.18.0.50/24' }] }),
    );
    const uuid = (cfg as { uuid: string }).uuid;
    const { vniFor } = await import('./preflight.ts');
    const home = (address: string) => ({ homes: [{ host: 'host9', address, subnet: '198.18.0.0/24', vni: vniFor(uuid, 0) }] });
    for (const outside of ['203.0.113.7', '198.19.0.99']) {
      const e = await r.begin('live', home(outside), cfg).then(
        () => undefined,
        (x: unknown) => x as FerryError,
      );
      assert.equal(e?.code, 'MIGRATION_PROTOCOL', `home ${outside}`);
      assert.match(e!.message, /neither the source nor a peer/);
      assert.equal(r.host.reservations.size, 0, 'nothing reserved');
      assert.equal(r.phase(), 'none', 'no job kept');
      assert.equal(r.held(), 0, 'no run kept');
    }
  } finally {
    r.done();
  }
});

test('destination: a peer offer whose domain asks for a uid is refused as MIGRATION_PROTOCOL, nothing held', async () => {
  const r = await rig();
  try {
    const kernel = path.join(r.host.cfg.stateDir, 'vmlinux');
    const cfg = { ...domainConfigToJson(parseDomainConfig({ name: 'web', memory: 256, boot: { kernel } })), uid: 0 };
    const e = await r.begin('live', {}, cfg).then(
      () => undefined,
      (x: unknown) => x as FerryError,
    );
    assert.equal(e?.code, 'MIGRATION_PROTOCOL');
    assert.match(e!.message, /uid: unknown field/);
    assert.equal(r.host.reservations.size, 0);
    assert.equal(r.phase(), 'none');
    assert.equal(r.held(), 0);
  } finally {
    r.done();
  }
});
