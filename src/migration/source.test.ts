/**
 * Both sides in one process, without root, QEMU or TLS: a Source whose peer connection
 * calls a Destination directly, each on a fake host with a scripted fake QMP peer. Every
 * source phase is passed through, and a failure is injected in each phase before the
 * point of no return (the move is abandoned and the domain runs on as it was) and at it
 * (a lost Finish answer, a destination that gives the guest back).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Source } from './source.ts';
import { Destination } from './dest.ts';
import { JobStore, type SourceJob } from './jobs.ts';
import type { RelocationContext } from './host.ts';
import { FakeHost, incomingQemu, outgoingQemu, quiet, type Handle } from '../testing/fakes.ts';
import { QmpClient } from '../qmp/client.ts';
import { parseDomainConfig, domainConfigToJson } from '../domain/config.ts';
import { FerryError } from '../errors.ts';
import type { ApiClient } from '../api/client.ts';
import type { Report } from '../api/protocol.ts';
import crypto from 'node:crypto';
import { PROTOCOL_VERSION } from './phases.ts';
import { hostArch } from '../qemu/probe.ts';

interface Faults {
  /** The source QEMU reports the stream failed. */
  streamFails?: boolean;
  /** The destination refuses Begin (a domain of that name there). */
  destHasDomain?: boolean;
  /** Finish reaches the destination, its answer is lost once. */
  loseFinishAnswer?: boolean;
  /** The destination QEMU refuses cont (and says it is paused). */
  contFails?: boolean;
  /** The destination QEMU dies at cont. */
  destDies?: boolean;
  /** The guest dirties faster than the link: pre-copy never completes by itself. */
  neverConverges?: boolean;
  /** The destination's answer to Prepare arrives malformed (a data port out of range). */
  badPrepareAnswer?: boolean;
  /** The source QEMU fails the post-copy stream as it completes; the last pages reached the destination, or not. */
  postcopyFails?: 'arrived' | 'short';
  /** What the guest's dirty rate measures, MiB/s. */
  dirtyMiBs?: number;
}

async function rig(f: Faults = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-src-'));
  const kernel = path.join(dir, 'vmlinux');
  fs.writeFileSync(kernel, 'k');
  const inq = await incomingQemu(f.contFails ? { contFails: 'paused' } : f.destDies ? { contFails: 'dies' } : {});
  const outq = await outgoingQemu({
    fail: f.streamFails,
    onSent: () => inq.stream(),
    neverConverges: f.neverConverges,
    onPostcopy: () => inq.postcopy(f.postcopyFails === 'short' ? 'short' : 'completed'),
    postcopyFails: f.postcopyFails !== undefined,
    dirtyMiBs: f.dirtyMiBs,
  });
  const port = 40000 + Math.floor(Math.random() * 20000);
  const h1 = new FakeHost('host1', path.join(dir, 'h1'), outq.path, port);
  const h2 = new FakeHost('host2', path.join(dir, 'h2'), inq.path, port);
  const config = parseDomainConfig({ name: 'web', memory: 256, boot: { kernel } });
  const web: Handle = {
    rec: { config, state: { kind: 'running', pid: 1111, domid: 1, since: Date.now() } },
    qmp: await QmpClient.connect(outq.path, 2000),
  };
  h1.domains.set('web', web);
  if (f.destHasDomain) h2.defineMoved(config);
  const s1 = new JobStore(path.join(dir, 'jobs1'));
  const dest = new Destination(h2, new JobStore(path.join(dir, 'jobs2')), quiet);
  const ctx: RelocationContext = {
    caller: { transport: 'tls', peerName: 'host1', peerDn: 'O=ferry,OU=host,CN=host1', peerAddress: '127.0.0.1' },
    onClose: () => undefined,
  };
  let finishes = 0;
  const calls: string[] = [];
  // The peer connection, in process: each relocation request goes to the Destination.
  const client = {
    async request<T>(action: string, params: Record<string, unknown>, _timeoutMs?: number, attachment?: Buffer): Promise<T> {
      calls.push(action);
      const d = dest as unknown as Record<string, (p: unknown, c: RelocationContext, a?: Buffer) => Promise<unknown>>;
      const method = action.replace('relocation.', '');
      const r = await d[method].call(dest, params, ctx, attachment);
      if (action === 'relocation.prepare' && f.badPrepareAnswer) return { ...(r as object), dataPort: 70000 } as T;
      if (action === 'relocation.finish' && f.loseFinishAnswer && finishes++ === 0)
        throw new FerryError('DAEMON_UNREACHABLE', 'connection reset (the answer to Finish was lost)');
      return r as T;
    },
    peerName: (): string => 'host2',
    close: (): void => undefined,
  };
  class InProcessSource extends Source {
    async connectPeer(): Promise<{ client: ApiClient; peer: { name: string; address: string; port: number } }> {
      return { client: client as unknown as ApiClient, peer: { name: 'host2', address: '127.0.0.1', port: 0 } };
    }
  }
  const source = new InProcessSource(h1, s1, quiet);
  // Every move, whatever its outcome and the phase it ended in, leaves nothing registered:
  // no run (outgoing/run.ts) in the source, no listener on its QEMU's QMP connection.
  const start = async (
    o: {
      live?: boolean;
      verifyMemory?: boolean;
      strategy?: 'auto' | 'precopy' | 'postcopy';
      timeoutS?: number;
      onTimeout?: 'cancel' | 'suspend' | 'postcopy';
      parallel?: number;
    } = {},
  ): Promise<Report> => {
    const listeners = (): number => web.qmp!.listenerCount('event') + web.qmp!.listenerCount('close');
    const before = listeners();
    const rep = await source.start({
      domain: 'web',
      dest: 'host2',
      live: o.live ?? true,
      verifyMemory: o.verifyMemory,
      probeGuest: false,
      strategy: o.strategy,
      timeoutS: o.timeoutS,
      onTimeout: o.onTimeout,
      parallel: o.parallel,
    });
    assert.equal(
      (source as unknown as { runs: Map<string, unknown> }).runs.size,
      0,
      `no run left registered after ${rep.outcome} in ${rep.phase}`,
    );
    // A job left in postcopy is settled by its driver in the background, which listens until it ends.
    for (let i = 0; i < 200 && job().phase === 'postcopy'; i++) await new Promise((res) => setTimeout(res, 10));
    assert.equal(listeners(), before, `no QMP listener left after ${rep.outcome} in ${rep.phase}`);
    return rep;
  };
  const job = (): SourceJob => [...s1.jobs.values()][0] as SourceJob;
  // (perform is entered twice: when Prepare is answered and when the stream starts)
  const phases = (): string[] =>
    job()
      .history.map((x) => x.phase)
      .filter((x, i, a) => x !== a[i - 1]);
  const done = (): void => {
    for (const h of [h1, h2]) for (const d of h.domains.values()) d.qmp?.close();
    inq.cleanup();
    outq.cleanup();
    fs.rmSync(dir, { recursive: true, force: true });
  };
  /**
   * A job as a source ferryd that died in `phase` left it: on disk, the domain here
   * migrating-out (from prepare on), the destination as far as the phase implies.
   */
  const leftAt = async (phase: SourceJob['phase']): Promise<SourceJob> => {
    const t = Date.now();
    const j: SourceJob = {
      role: 'source',
      jobId: crypto.randomUUID(),
      domain: 'web',
      uuid: config.uuid,
      mode: 'live',
      encrypted: true,
      startedAt: t,
      updatedAt: t,
      history: [{ phase: 'begin', at: t }],
      phase: 'begin',
      peer: { name: 'host2', address: '127.0.0.1', port: 0 },
      wasRunning: true,
    };
    s1.save(j);
    const order: SourceJob['phase'][] = ['begin', 'prepare', 'perform', 'switchover', 'finish'];
    const upTo = order.indexOf(phase);
    if (upTo >= 1) {
      await client.request('relocation.begin', {
        version: PROTOCOL_VERSION,
        jobId: j.jobId,
        mode: 'live',
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
        domain: { config: domainConfigToJson(config), fileSizes: {}, machine: 'pc-i440fx-10.0', cpuModel: 'qemu64' },
      });
      h1.apply(web, { type: 'migrate-out', jobId: j.jobId, at: t });
    }
    if (upTo >= 2) await client.request('relocation.prepare', { jobId: j.jobId });
    if (upTo >= 4) {
      inq.stream();
      await client.request('relocation.finish', { jobId: j.jobId, running: true });
    }
    for (const p of order.slice(1, upTo + 1)) s1.advance(j, p, true);
    if (phase === 'confirmed' || phase === 'abandoned') {
      h1.apply(web, { type: 'migrate-out', jobId: j.jobId, at: t });
      s1.advance(j, phase, true);
    }
    calls.length = 0;
    return j;
  };
  /** ferryd restarts: a new Source reloads the jobs from disk and drives each one. */
  const restart = async (): Promise<SourceJob> => {
    const store = new JobStore(path.join(dir, 'jobs1'));
    const again = new InProcessSource(h1, store, quiet);
    const jobs = store.load();
    for (const j of jobs) if (j.role === 'source') await again.drive(j, `source ferryd restarted in phase ${j.phase}`);
    const j = jobs[0] as SourceJob;
    for (let i = 0; i < 200 && j.phase === 'finish'; i++) await new Promise((res) => setTimeout(res, 10)); // driveFinish runs in the background
    return j;
  };
  return { h1, h2, web, start, job, phases, calls, outq, inq, done, leftAt, restart };
}

test('source: begin → prepare → perform → switchover → finish → confirmed; the guest runs on the destination only', async () => {
  const r = await rig();
  try {
    const rep = await r.start();
    assert.equal(rep.outcome, 'succeeded', JSON.stringify(rep.error));
    assert.deepEqual(r.phases(), ['begin', 'prepare', 'perform', 'switchover', 'finish', 'confirmed']);
    assert.deepEqual(r.calls, ['relocation.begin', 'relocation.prepare', 'relocation.finish', 'relocation.confirm']);
    assert.deepEqual(r.h1.retired, ['web'], 'the source copy is retired');
    assert.equal(r.h2.get('web').rec.state.kind, 'running');
    assert.ok(r.outq.seen.includes('migrate'));
    assert.ok(
      rep.policy.some((x) => x.startsWith('plan: precopy')),
      rep.policy.join('\n'),
    );
    assert.ok(
      rep.policy.some((x) => x.startsWith('post-copy offered')),
      'post-copy is offered (the config allows it) though the plan picked pre-copy',
    );
    assert.ok(r.outq.seen.includes('calc-dirty-rate'), 'the dirty rate was measured');
    assert.equal(rep.strategy, 'precopy');
    assert.equal(rep.plan?.pick, 'precopy');
    assert.equal(rep.downtimeMs, 7);
    assert.equal(typeof rep.pauseMs, 'number');
  } finally {
    r.done();
  }
});

test("source: a guest dirtying far faster than the link: auto-converge starts where the plan says, not at QEMU's 20 %", async () => {
  const r = await rig({ dirtyMiBs: 1260 });
  try {
    // Pre-copy only (post-copy would bound the time instead of throttling).
    const rep = await r.start({ strategy: 'precopy' });
    assert.equal(rep.outcome, 'succeeded', JSON.stringify(rep.error));
    assert.equal(r.outq.params['cpu-throttle-initial'], 90, JSON.stringify(r.outq.params));
    assert.ok(
      rep.policy.some((x) => x.startsWith('auto-converge starts at 90 %')),
      rep.policy.join('\n'),
    );
  } finally {
    r.done();
  }
  // A slow dirtier keeps QEMU's start, set afresh (a QEMU keeps parameters from an earlier move).
  const slow = await rig();
  try {
    const rep = await slow.start({ strategy: 'precopy' });
    assert.equal(rep.outcome, 'succeeded', JSON.stringify(rep.error));
    assert.equal(slow.outq.params['cpu-throttle-initial'], 20);
    assert.ok(!rep.policy.some((x) => x.startsWith('auto-converge starts at')));
  } finally {
    slow.done();
  }
});

test('source: without --compress, a large guest whose pages compress moves compressed where pre-copy fits; a fast dirtier keeps post-copy instead', async () => {
  const r = await rig();
  try {
    r.h1.touched = 3 * 1024 ** 3;
    r.h1.ratio = 0.5;
    const rep = await r.start();
    assert.equal(rep.outcome, 'succeeded', JSON.stringify(rep.error));
    assert.ok(
      rep.policy.some((x) =>
        /^compression by default: zstd \(a sample of the guest's pages compresses to 50 %.*pre-copy fits the budget/.test(x),
      ),
      rep.policy.join('\n'),
    );
    assert.equal(r.outq.params['multifd-compression'], 'zstd', JSON.stringify(r.outq.params));
    assert.ok(!rep.policy.some((x) => x.startsWith('post-copy offered')), 'compression rules post-copy out');
  } finally {
    r.done();
  }
  const fast = await rig({ dirtyMiBs: 1260 });
  try {
    fast.h1.touched = 3 * 1024 ** 3;
    fast.h1.ratio = 0.5;
    const rep = await fast.start();
    assert.equal(rep.outcome, 'succeeded', JSON.stringify(rep.error));
    assert.ok(
      rep.policy.some((x) => /^compression by default: none: pre-copy is not predicted to fit/.test(x)),
      rep.policy.join('\n'),
    );
    assert.notEqual(fast.outq.params['multifd-compression'], 'zstd');
    assert.ok(
      rep.policy.some((x) => x.startsWith('post-copy offered')),
      rep.policy.join('\n'),
    );
  } finally {
    fast.done();
  }
  // The default small guest (touched unknown): nothing weighed, nothing said.
  const small = await rig();
  try {
    const rep = await small.start();
    assert.equal(rep.outcome, 'succeeded', JSON.stringify(rep.error));
    assert.ok(!rep.policy.some((x) => x.startsWith('compression by default')), rep.policy.join('\n'));
  } finally {
    small.done();
  }
});

test('source: refused at Begin, nothing changes (abandoned in begin)', async () => {
  const r = await rig({ destHasDomain: true });
  try {
    const rep = await r.start();
    assert.equal(rep.outcome, 'failed');
    assert.equal(rep.error?.code, 'MIGRATION_DEST_EXISTS');
    assert.deepEqual(r.phases(), ['begin', 'abandoned']);
    assert.equal(r.h1.get('web').rec.state.kind, 'running');
    assert.ok(!r.outq.seen.includes('migrate'));
  } finally {
    r.done();
  }
});

test("source: a malformed answer from the destination (Prepare's data port out of range) is MIGRATION_PROTOCOL: abandoned, the guest runs on here", async () => {
  const r = await rig({ badPrepareAnswer: true });
  try {
    const rep = await r.start();
    assert.equal(rep.outcome, 'failed');
    assert.equal(rep.error?.code, 'MIGRATION_PROTOCOL');
    assert.match(rep.error!.message, /answered relocation\.prepare with dataPort/);
    assert.deepEqual(r.phases(), ['begin', 'prepare', 'abandoned']);
    assert.ok(r.calls.includes('relocation.abandon'), 'the destination is told');
    assert.deepEqual(r.h2.discarded, ['web'], 'and undoes its side');
    assert.equal(r.h1.get('web').rec.state.kind, 'running');
    assert.ok(!r.outq.seen.includes('migrate'), 'no stream to a port nobody checked');
  } finally {
    r.done();
  }
});

test('source: the stream fails (abandoned in perform): the destination abandons, the guest runs on here', async () => {
  const r = await rig({ streamFails: true });
  try {
    const rep = await r.start();
    assert.equal(rep.outcome, 'failed');
    assert.equal(rep.error?.code, 'MIGRATION_FAILED');
    assert.match(rep.error!.message, /fake failure/);
    assert.deepEqual(r.phases(), ['begin', 'prepare', 'perform', 'abandoned']);
    assert.ok(r.calls.includes('relocation.abandon'));
    assert.deepEqual(r.h2.discarded, ['web']);
    assert.equal(r.h1.get('web').rec.state.kind, 'running');
    assert.ok(r.outq.running());
  } finally {
    r.done();
  }
});

test('source: guest RAM unreadable during the memory check (abandoned in switchover): the paused guest resumes here', async () => {
  const r = await rig();
  try {
    const rep = await r.start({ verifyMemory: true });
    assert.equal(rep.outcome, 'failed');
    assert.deepEqual(r.phases(), ['begin', 'prepare', 'perform', 'switchover', 'abandoned']);
    assert.ok(!r.calls.includes('relocation.finish'), 'never past the point of no return');
    assert.deepEqual(r.h2.discarded, ['web']);
    assert.equal(r.h1.get('web').rec.state.kind, 'running');
    assert.ok(r.outq.seen.includes('cont') && r.outq.running(), 'the source QEMU was told to run again');
  } finally {
    r.done();
  }
});

test('source: the answer to Finish is lost (finish): the source asks, learns the guest runs there, retires its copy', async () => {
  const r = await rig({ loseFinishAnswer: true });
  try {
    const rep = await r.start();
    assert.equal(rep.outcome, 'succeeded', JSON.stringify(rep.error));
    assert.deepEqual(r.phases(), ['begin', 'prepare', 'perform', 'switchover', 'finish', 'confirmed']);
    assert.ok(r.calls.includes('relocation.status'), 'asked the destination');
    assert.equal(rep.pauseMs, null, 'no pause without the answer that ends it');
    assert.deepEqual(r.h1.retired, ['web']);
  } finally {
    r.done();
  }
});

test('source: the destination cannot resume and gives the guest back (finish → abandoned): it resumes here', async () => {
  const r = await rig({ contFails: true });
  try {
    const rep = await r.start();
    assert.equal(rep.outcome, 'failed');
    assert.match(rep.error!.message, /could not take/);
    assert.deepEqual(r.phases(), ['begin', 'prepare', 'perform', 'switchover', 'finish', 'abandoned']);
    assert.equal(r.h1.get('web').rec.state.kind, 'running');
    assert.ok(r.outq.running());
    assert.deepEqual(r.h2.discarded, ['web']);
  } finally {
    r.done();
  }
});

test('source: the destination QEMU dies as the guest resumes (finish → confirmed): never resumed here, reported as a crash there', async () => {
  const r = await rig({ destDies: true });
  try {
    const rep = await r.start();
    assert.equal(rep.outcome, 'failed');
    assert.match(rep.error!.message, /crashed on host2 as it resumed/);
    assert.deepEqual(r.phases(), ['begin', 'prepare', 'perform', 'switchover', 'finish', 'confirmed']);
    assert.deepEqual(r.h1.retired, ['web'], 'the source copy is not resumed: the guest may have run there');
    assert.ok(!r.outq.seen.includes('cont'));
    assert.equal(r.h2.get('web').rec.state.kind, 'crashed');
  } finally {
    r.done();
  }
});

test('source: a restart before the point of no return abandons from the phase on disk (drive), in every such phase', async () => {
  for (const at of ['begin', 'prepare', 'perform', 'switchover'] as const) {
    const r = await rig();
    try {
      await r.leftAt(at);
      const j = await r.restart();
      assert.equal(j.phase, 'abandoned', at);
      assert.equal(r.h1.get('web').rec.state.kind, 'running', `the guest runs on here (${at})`);
      assert.ok(r.outq.running());
      if (at !== 'begin') {
        assert.ok(r.calls.includes('relocation.abandon'), `the destination was told (${at})`);
        assert.deepEqual(r.h2.discarded, ['web'], `nothing is left on the destination (${at})`);
      }
    } finally {
      r.done();
    }
  }
});

test('source: a restart past the point of no return asks the destination, which runs the guest: the copy here is retired', async () => {
  const r = await rig();
  try {
    await r.leftAt('finish');
    const j = await r.restart();
    assert.equal(j.phase, 'confirmed');
    assert.ok(r.calls.includes('relocation.status'));
    assert.deepEqual(r.h1.retired, ['web']);
    assert.ok(!r.outq.seen.includes('cont'), 'never resumed here');
    assert.equal(r.h2.get('web').rec.state.kind, 'running');
  } finally {
    r.done();
  }
});

test('source: a restart after a settled phase runs the tail it cut: confirmed retires the copy, abandoned resumes it', async () => {
  const c = await rig();
  try {
    await c.leftAt('confirmed');
    await c.restart();
    assert.deepEqual(c.h1.retired, ['web']);
  } finally {
    c.done();
  }
  const a = await rig();
  try {
    await a.leftAt('abandoned');
    await a.restart();
    assert.equal(a.h1.get('web').rec.state.kind, 'running');
    assert.deepEqual(a.h1.retired, []);
  } finally {
    a.done();
  }
});

test("source: post-copy (the plan's pick): switchover → finish → postcopy → confirmed; the copy here lives until the last page is sent", async () => {
  const r = await rig({ neverConverges: true });
  try {
    const rep = await r.start({ strategy: 'postcopy' });
    assert.equal(rep.outcome, 'succeeded', JSON.stringify(rep.error));
    assert.equal(rep.strategy, 'postcopy');
    assert.deepEqual(r.phases(), ['begin', 'prepare', 'perform', 'switchover', 'finish', 'postcopy', 'confirmed']);
    assert.ok(r.outq.seen.includes('migrate-start-postcopy'));
    assert.ok(
      rep.policy.some((x) => x.startsWith('switched to post-copy: the plan')),
      rep.policy.join('\n'),
    );
    assert.equal(typeof rep.postcopy?.windowMs, 'number');
    const tl = rep.timeline ?? {};
    assert.ok(
      tl.destRunning <= tl.postcopyCompleted && tl.postcopyCompleted <= tl.sourceClean,
      `the source retired only after the stream completed: ${JSON.stringify(tl)}`,
    );
    assert.deepEqual(r.h1.retired, ['web']);
    assert.ok(!r.outq.seen.includes('cont'), 'the source copy is never resumed');
    assert.equal(r.h2.get('web').rec.state.kind, 'running');
  } finally {
    r.done();
  }
});

test('source: the source QEMU fails the post-copy stream as it completes, after the last page arrived: the destination says so, and the move succeeded', async () => {
  const r = await rig({ neverConverges: true, postcopyFails: 'arrived' });
  try {
    const rep = await r.start({ strategy: 'postcopy' });
    assert.equal(rep.outcome, 'succeeded', JSON.stringify(rep.error));
    assert.ok(r.calls.includes('relocation.lost'), 'asked the destination what arrived');
    assert.deepEqual(r.phases(), ['begin', 'prepare', 'perform', 'switchover', 'finish', 'postcopy', 'confirmed']);
    assert.deepEqual(r.h1.retired, ['web']);
    assert.ok(!r.outq.seen.includes('cont'), 'the source copy is never resumed');
    assert.equal(r.h2.get('web').rec.state.kind, 'running');
  } finally {
    r.done();
  }
});

test('source: the source QEMU fails the post-copy stream with pages the destination never got: MIGRATION_POSTCOPY_LOST, crashed there, retired here, never resumed, the job settles', async () => {
  const r = await rig({ neverConverges: true, postcopyFails: 'short' });
  try {
    const rep = await r.start({ strategy: 'postcopy' });
    assert.equal(rep.outcome, 'failed');
    assert.equal(rep.error?.code, 'MIGRATION_POSTCOPY_LOST');
    assert.match(rep.error?.message ?? '', /ferry -H host2 start web/);
    const dest = r.h2.get('web').rec.state;
    assert.equal(dest.kind, 'crashed');
    assert.match(dest.kind === 'crashed' ? dest.reason : '', /post-copy lost pages/);
    // The driver settles the job in the background: the stale copy here is retired, never resumed.
    for (let i = 0; i < 200 && r.job().phase !== 'confirmed'; i++) await new Promise((res) => setTimeout(res, 10));
    assert.equal(r.job().phase, 'confirmed');
    assert.equal(r.job().error?.code, 'MIGRATION_POSTCOPY_LOST');
    // The driver used the destination's answer, kept with the job: it did not ask again.
    assert.match(r.job().error?.message ?? '', /stopped and marked crashed there/);
    assert.deepEqual(r.job().postcopy?.lost, { stream: 'postcopy-paused', crashed: true });
    assert.equal(r.calls.filter((c) => c === 'relocation.lost').length, 1, r.calls.join(', '));
    assert.deepEqual(r.h1.retired, ['web']);
    assert.ok(!r.outq.seen.includes('cont'), 'the source copy is never resumed');
  } finally {
    r.done();
  }
});

test('source: a pre-copy that will miss its budget switches to post-copy by itself (auto); with post-copy forbidden it is cancelled at the deadline', async () => {
  const a = await rig({ neverConverges: true });
  try {
    const rep = await a.start({ timeoutS: 2 });
    assert.equal(rep.outcome, 'succeeded', JSON.stringify(rep.error));
    assert.equal(rep.strategy, 'postcopy');
    assert.ok(
      rep.policy.some((x) => /switched to post-copy: (pre-copy would miss the budget|deadline)/.test(x)),
      rep.policy.join('\n'),
    );
  } finally {
    a.done();
  }
  const c = await rig({ neverConverges: true });
  try {
    const rep = await c.start({ timeoutS: 1, strategy: 'precopy', onTimeout: 'cancel' });
    assert.equal(rep.outcome, 'failed');
    assert.equal(rep.error?.code, 'MIGRATION_NOT_CONVERGING');
    assert.ok(!c.outq.seen.includes('migrate-start-postcopy'));
    assert.equal(c.h1.get('web').rec.state.kind, 'running', 'the guest runs on here');
  } finally {
    c.done();
  }
});

test("source: a move after one that offered post-copy may use multifd: the QEMU's earlier post-copy capability is cleared first", async () => {
  const r = await rig({ streamFails: true });
  try {
    const first = await r.start();
    assert.equal(first.error?.code, 'MIGRATION_FAILED');
    assert.ok(first.policy.some((x) => x.startsWith('post-copy offered')));
    const second = await r.start({ parallel: 2 });
    assert.equal(second.error?.code, 'MIGRATION_FAILED', 'the stream itself fails, not the set-up');
    assert.match(second.error!.message, /fake failure/);
    assert.ok(second.policy.includes('multifd: 2 parallel channels'));
  } finally {
    r.done();
  }
});
