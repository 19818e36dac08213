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
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import { Destination } from './dest.ts';
import { JobStore, type DestJob } from './jobs.ts';
import { PROTOCOL_VERSION } from './phases.ts';
import type { MigrationHost, DomainHandle, RelocationContext } from './ports.ts';
import { QmpClient } from '../qmp/client.ts';
import { fakeQmp } from '../qmp/fake.ts';
import { parseDomainConfig, domainConfigToJson, type DomainConfig } from '../domain/config.ts';
import { transition, type DomainEvent, type DomainState } from '../domain/state.ts';
import { hostArch } from '../qemu/probe.ts';
import { FerryError } from '../errors.ts';

/** A scripted incoming QEMU: answers what Destination asks; `stream()` plays the source's copy. */
async function incomingQemu(o: { contFails?: 'paused' | 'unknown' } = {}) {
  let sock: net.Socket | undefined;
  let running = false;
  let contTried = false;
  const send = (obj: unknown): void => { sock?.write(JSON.stringify(obj) + '\r\n'); };
  const event = (name: string, data?: unknown): void => send({ event: name, data, timestamp: { seconds: Math.floor(Date.now() / 1000), microseconds: 0 } });
  const seen: string[] = [];
  const fake = await fakeQmp((msg, s) => {
    sock = s;
    seen.push(msg.execute);
    const ok = (ret: unknown = {}): void => send({ return: ret, id: msg.id });
    switch (msg.execute) {
      case 'migrate-incoming': ok(); event('MIGRATION', { status: 'setup' }); break;
      case 'query-status':
        // 'unknown': after a failed cont, QEMU cannot even say whether it runs.
        if (o.contFails === 'unknown' && contTried) send({ error: { class: 'GenericError', desc: 'busy' }, id: msg.id });
        else ok({ status: running ? 'running' : 'paused', running });
        break;
      case 'cont':
        contTried = true;
        if (o.contFails) { send({ error: { class: 'GenericError', desc: 'Failed to get "write" lock' }, id: msg.id }); break; }
        running = true; ok(); event('RESUME'); break;
      default: ok();
    }
  });
  return {
    path: fake.path, seen, cleanup: fake.cleanup,
    stream: (): void => { event('MIGRATION', { status: 'active' }); event('MIGRATION', { status: 'completed' }); },
  };
}

type Handle = DomainHandle & { rec: { config: DomainConfig; state: DomainState }; qmp?: QmpClient; busy?: string };

class FakeHost extends EventEmitter implements MigrationHost {
  readonly domains = new Map<string, Handle>();
  readonly reservations = new Map<string, number>();
  readonly discarded: string[] = [];
  readonly qemu = { version: '10.0.2', machine: 'pc-i440fx-10.0', cpuModel: 'qemu64', cpuFeatures: ['lm'], cpuUnavailable: [], accel: 'tcg' as const, machines: ['pc-i440fx-10.0'] };
  readonly accel = { accel: 'tcg' as const };
  readonly cfg;
  constructor(readonly runDir: string, readonly qmpPath: string, port: number) {
    super();
    this.cfg = { name: 'host2', stateDir: runDir, tlsDir: runDir, relocation: { address: '127.0.0.1', port: 0, dataPorts: [port, port + 3] as [number, number], allowInsecure: false }, peers: {}, networks: {}, limits: { incomingPerPeer: 4, incomingTotal: 8, reservationS: 30 } };
  }
  get(name: string): Handle { const d = this.domains.get(name); if (!d) throw new FerryError('DOMAIN_NOT_FOUND', name); return d; }
  find(name: string): Handle | undefined { return this.domains.get(name); }
  domainNames(): string[] { return [...this.domains.keys()]; }
  domainUuids(): string[] { return [...this.domains.values()].map((d) => d.rec.config.uuid); }
  memoryFacts(): { freeMiB: number; freeWhy: string } { return { freeMiB: 4096 - [...this.reservations.values()].reduce((a, b) => a + b, 0), freeWhy: 'a fake host' }; }
  checkPaths(): void { /* the fake pools hold everything */ }
  apply(d: DomainHandle, e: DomainEvent): void { (d as Handle).rec.state = transition(d.rec.state, e); }
  setBusy(d: DomainHandle, why: string | undefined): void { (d as Handle).busy = why; }
  reserve(jobId: string, _domain: string, memoryMiB: number): void { this.reservations.set(jobId, memoryMiB); }
  release(jobId: string): void { this.reservations.delete(jobId); }
  async startIncoming(config: DomainConfig, jobId: string, _o: unknown, onDefined: (pid: number) => void): Promise<DomainHandle> {
    const d: Handle = { rec: { config, state: { kind: 'defined' } }, busy: 'incoming migration' };
    this.domains.set(config.name, d);
    d.qmp = await QmpClient.connect(this.qmpPath, 2000);
    onDefined(424242);
    this.apply(d, { type: 'incoming', pid: 424242, domid: 1, jobId, at: Date.now() });
    return d;
  }
  defineMoved(config: DomainConfig): void { this.domains.set(config.name, { rec: { config, state: { kind: 'defined' } } }); }
  async discardIncoming(d: DomainHandle): Promise<void> { d.qmp?.close(); this.discarded.push(d.rec.config.name); this.domains.delete(d.rec.config.name); }
  async retireMigrated(): Promise<void> { throw new Error('not on a destination'); }
  cleanupRuntime(d: DomainHandle): void { d.qmp?.close(); }
  forget(name: string): void { this.domains.delete(name); }
  removeTaps(): void { /* no taps */ }
  qemuDirOf(): string { return this.runDir; }
  qemuTlsDir(): string { return this.runDir; }
  withRam<T>(): Promise<T> { throw new Error('no RAM in a fake'); }
  ramDigests(): never { throw new Error('no RAM in a fake'); }
  ramChunkDigests(): never { throw new Error('no RAM in a fake'); }
}

const quiet = { debug: () => undefined, info: () => undefined, warn: () => undefined, error: () => undefined };

async function rig(o: { contFails?: 'paused' | 'unknown' } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-dest-'));
  const kernel = path.join(dir, 'vmlinux');
  fs.writeFileSync(kernel, 'k');
  const qemu = await incomingQemu(o);
  const host = new FakeHost(dir, qemu.path, 40000 + Math.floor(Math.random() * 20000));
  const store = new JobStore(path.join(dir, 'jobs'));
  const dest = new Destination(host, store, quiet);
  const closers: (() => void)[] = [];
  const ctx: RelocationContext = { caller: { transport: 'tls', peerName: 'host1', peerDn: 'O=ferry,OU=host,CN=host1', peerAddress: '127.0.0.1' }, onClose: (f) => { closers.push(f); } };
  const config = parseDomainConfig({ name: 'web', memory: 256, boot: { kernel } });
  const jobId = crypto.randomUUID();
  const begin = (mode: 'live' | 'definition' = 'live'): Promise<unknown> => dest.begin({
    version: PROTOCOL_VERSION, jobId, mode, insecure: false, parallel: 1,
    peer: { name: 'host1', version: 'test', qemuVersion: '10.0.2', arch: hostArch(), accel: 'tcg', cpuModel: 'qemu64', cpuFeatures: ['lm'], machine: 'pc-i440fx-10.0', networks: {} },
    domain: { config: domainConfigToJson(config), fileSizes: {}, machine: 'pc-i440fx-10.0', cpuModel: 'qemu64' },
  }, ctx);
  const phase = (): string => (store.jobs.get(jobId) as DestJob | undefined)?.phase ?? 'none';
  const onDisk = (): string => JSON.parse(fs.readFileSync(path.join(dir, 'jobs', `${jobId}.json`), 'utf8')).phase;
  const done = (): void => { for (const d of host.domains.values()) d.qmp?.close(); qemu.cleanup(); fs.rmSync(dir, { recursive: true, force: true }); };
  return { dest, host, store, ctx, jobId, begin, phase, onDisk, qemu, closers, done };
}

const code = async (p: Promise<unknown>): Promise<string> => { try { await p; return 'OK'; } catch (e) { return e instanceof FerryError ? e.code : String(e); } };

test('destination: begun → prepared → finishing → finished → confirmed, each phase on disk', async () => {
  const r = await rig();
  try {
    await r.begin();
    assert.equal(r.phase(), 'begun');
    assert.equal(r.onDisk(), 'begun');
    assert.equal(r.host.reservations.size, 1, 'memory reserved at Begin');
    assert.equal(await code(r.dest.finish({ jobId: r.jobId }, r.ctx)), 'MIGRATION_ILLEGAL_PHASE', 'no Finish before Prepare');
    const prep = await r.dest.prepare({ jobId: r.jobId }, r.ctx) as { dataPort: number };
    assert.equal(r.phase(), 'prepared');
    assert.ok(prep.dataPort >= r.host.cfg.relocation.dataPorts[0]);
    assert.ok(r.qemu.seen.includes('migrate-incoming'));
    // Finish before any stream arrived is out of order, and changes nothing.
    assert.equal(await code(r.dest.finish({ jobId: r.jobId }, r.ctx)), 'MIGRATION_PROTOCOL');
    assert.equal(r.phase(), 'prepared');
    r.qemu.stream();
    const fin = await r.dest.finish({ jobId: r.jobId }, r.ctx) as { phase: string; resumedAt: number };
    assert.equal(fin.phase, 'finished');
    assert.ok(fin.resumedAt > 0);
    assert.ok(r.qemu.seen.includes('cont'));
    assert.deepEqual(r.host.get('web').rec.state.kind, 'running');
    assert.equal(r.host.reservations.size, 0, 'the reservation became the domain');
    assert.equal(await code(r.dest.abandon({ jobId: r.jobId }, r.ctx)), 'MIGRATION_ILLEGAL_PHASE', 'no abandon past the point of no return');
    r.dest.confirm({ jobId: r.jobId }, r.ctx);
    assert.equal(r.phase(), 'confirmed');
    assert.deepEqual(r.dest.status({ jobId: r.jobId }, r.ctx), { phase: 'confirmed', domain: 'web' });
  } finally { r.done(); }
});

test('destination: an abandon in begun and in prepared undoes everything', async () => {
  for (const at of ['begun', 'prepared'] as const) {
    const r = await rig();
    try {
      await r.begin();
      if (at === 'prepared') await r.dest.prepare({ jobId: r.jobId }, r.ctx);
      assert.equal(r.phase(), at);
      const a = await r.dest.abandon({ jobId: r.jobId, reason: 'test' }, r.ctx) as { phase: string };
      assert.equal(a.phase, 'abandoned');
      assert.equal(r.onDisk(), 'abandoned');
      assert.deepEqual(r.host.discarded, ['web'], `the incoming domain is gone (${at})`);
      assert.equal(r.host.reservations.size, 0);
      // Idempotent, and Finish afterwards says so in words the source acts on.
      assert.deepEqual(await r.dest.abandon({ jobId: r.jobId }, r.ctx), { phase: 'abandoned' });
      const fin = await r.dest.finish({ jobId: r.jobId }, r.ctx).catch((e: FerryError) => e);
      assert.ok(fin instanceof FerryError && fin.details?.abandoned === true);
    } finally { r.done(); }
  }
});

test('destination: the source\'s control connection closing before Finish abandons', async () => {
  const r = await rig();
  try {
    await r.begin();
    await r.dest.prepare({ jobId: r.jobId }, r.ctx);
    for (const f of r.closers) f();
    for (let i = 0; i < 100 && r.phase() !== 'abandoned'; i++) await new Promise((res) => setTimeout(res, 10));
    assert.equal(r.phase(), 'abandoned');
  } finally { r.done(); }
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
  } finally { paused.done(); }
  const unknown = await rig({ contFails: 'unknown' });
  try {
    await unknown.begin();
    await unknown.dest.prepare({ jobId: unknown.jobId }, unknown.ctx);
    unknown.qemu.stream();
    const e = await unknown.dest.finish({ jobId: unknown.jobId }, unknown.ctx).catch((x: FerryError) => x);
    assert.ok(e instanceof FerryError && !e.details?.abandoned, 'no word that it never ran');
    assert.equal(unknown.phase(), 'finishing', 'the source keeps asking; nothing runs twice');
    assert.deepEqual(unknown.host.discarded, []);
  } finally { unknown.done(); }
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
  } finally { r.done(); }
});
