/**
 * A trusted but misbehaving peer, for real: a client with host1's own certificate
 * talks to host2's relocation port over TLS and sends what a buggy or compromised
 * source could send: out-of-order, replayed, hijacked, truncated, oversized and random
 * relocation messages. Each gets a coded answer, host2 stays up, and nothing changes
 * on it (no domain, reservation, QEMU, listener or unfinished job). Also the TLS cases
 * not covered elsewhere, against ferryd itself: an expired client certificate, and a
 * destination that presents another host's (valid) certificate.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import fc from 'fast-check';
import {
  ok,
  fails,
  labUp,
  labDown,
  labState,
  inNs,
  ferrydLog,
  domainRecord,
  tlsCall,
  reconfigure,
  createGuest,
  pidAlive,
  ROOT,
} from '../helpers.ts';
import { parseDomainConfig } from '../../src/domain/config.ts';
import { fileSizes } from '../../src/migration/preflight.ts';
import { PROTOCOL_VERSION } from '../../src/migration/phases.ts';
import { issueHostCert } from '../../src/tls/ca.ts';
import { isErrorCode } from '../../src/errors.ts';

const DEST = '198.19.0.12';
let host1Tls = '';
let begin: Record<string, any> = {};

/** Sends steps over one TLS session from host1's namespace; returns the replies. */
function session(
  steps: { line: string; noNewline?: boolean; wait?: boolean; binary?: string }[],
  certDir = host1Tls,
): { replies: any[]; closed: boolean } {
  const f = path.join(os.tmpdir(), `ferry-steps-${process.pid}.json`);
  fs.writeFileSync(f, JSON.stringify(steps));
  const r = inNs(
    'host1',
    ['bash', '-c', `exec ${process.execPath} ${path.join(ROOT, 'test', 'tools', 'tls-session.mjs')} ${DEST} 8002 ${certDir} < ${f}`],
    120000,
  );
  fs.rmSync(f, { force: true });
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout);
}
const req = (id: number, action: string, params: unknown): { line: string } => ({ line: JSON.stringify({ id, action, params }) });
/** A request line followed by raw bytes (a RAM repair). */
const reqBin = (id: number, action: string, params: unknown, data: Buffer): { line: string; binary: string } => ({
  line: JSON.stringify({ id, action, params }),
  binary: data.toString('base64'),
});
const code = (reply: any): string | undefined => reply?.error?.code;

/** host2 holds nothing of any migration, and its ferryd is the same process. */
async function host2Untouched(ferrydPid: number): Promise<void> {
  assert.ok(pidAlive(ferrydPid), 'host2 ferryd still up');
  assert.equal(labState().hosts[1].pid, ferrydPid, 'not restarted');
  const hi = await ok(['-H', 'host2', 'host', 'info', '--json']);
  assert.equal(hi.domains, 0, 'no domain on host2');
  assert.equal(hi.memory.reservedMiB, 0, 'no reservation on host2');
  assert.equal(domainRecord('host2', 'ghost'), undefined);
  const listeners = inNs('host2', ['ss', '-Hltn'])
    .stdout.split('\n')
    .map((l) => Number(/:(\d+)\s/.exec(l)?.[1]))
    .filter((p) => p >= 49152 && p <= 49215);
  assert.deepEqual(listeners, [], 'no migration listener left open on host2');
  const jobs = await ok(['-H', 'host2', 'jobs', '--json']);
  assert.ok(
    jobs.every((j: any) => j.phase === 'abandoned'),
    `unfinished jobs: ${JSON.stringify(jobs.map((j: any) => j.phase))}`,
  );
  const qemus = inNs('host2', ['pgrep', '-f', 'qemu-system']).stdout.trim();
  assert.equal(qemus, '', 'no QEMU on host2');
}

describe('a misbehaving peer and bad certificates (lab)', () => {
  before(async () => {
    await labUp(['--hosts', '3']);
    host1Tls = labState().hosts[0].tlsDir;
    const h1 = await ok(['-H', 'host1', 'host', 'info', '--json']);
    const config = await ok(['lab', 'guest', 'pattern', 'ghost', '--memory', '64', '--json']);
    begin = {
      version: PROTOCOL_VERSION,
      mode: 'live',
      insecure: false,
      parallel: 1,
      peer: {
        name: 'host1',
        version: h1.version,
        qemuVersion: h1.qemuVersion,
        arch: h1.arch,
        accel: h1.accel,
        cpuModel: h1.cpuModel,
        cpuFeatures: h1.cpuFeatures,
        machine: h1.machine,
        networks: h1.networks,
      },
      domain: { config, fileSizes: fileSizes(parseDomainConfig(config)), machine: h1.machine, cpuModel: h1.cpuModel },
    };
  });
  after(async () => {
    await labDown();
  });

  test('out-of-order, replayed and hijacked messages are refused and change nothing', async () => {
    const d = labState().hosts[1].pid;
    const J = crypto.randomUUID();
    const stranger = crypto.randomUUID();
    const r = session([
      req(1, 'relocation.prepare', { jobId: stranger }),
      req(2, 'relocation.finish', { jobId: stranger }),
      req(3, 'relocation.digest', { jobId: stranger }),
      req(4, 'relocation.confirm', { jobId: stranger }),
      req(5, 'relocation.begin', { ...begin, jobId: J }),
      req(6, 'relocation.begin', { ...begin, jobId: J }),
      req(7, 'relocation.finish', { jobId: J }),
      req(8, 'relocation.digest', { jobId: J }),
      req(9, 'relocation.confirm', { jobId: J }),
      req(10, 'relocation.abandon', { jobId: J, reason: 'test' }),
      req(11, 'relocation.abandon', { jobId: J }),
      req(12, 'relocation.prepare', { jobId: J }),
      req(13, 'relocation.begin', { ...begin, jobId: J }),
      reqBin(14, 'relocation.repair', { jobId: stranger, offset: 0, length: 4096 }, Buffer.alloc(4096)),
      reqBin(15, 'relocation.repair', { jobId: J, offset: 0, length: 4096 }, Buffer.alloc(4096)),
      req(16, 'relocation.repair', { jobId: J, offset: 0, length: 0 }),
      // A refused repair's bytes are skipped, not read as requests: the next line is served.
      reqBin(17, 'relocation.repair', { jobId: J, offset: -1, length: 8 }, Buffer.from('{"id":99,"action":"host.info"}\n'.slice(0, 8))),
      req(18, 'relocation.status', { jobId: J }),
    ]);
    const codes = r.replies.map((x) => code(x) ?? (x?.result ? 'ok' : 'none'));
    assert.deepEqual(codes.slice(0, 4), ['JOB_NOT_FOUND', 'JOB_NOT_FOUND', 'JOB_NOT_FOUND', 'JOB_NOT_FOUND'], JSON.stringify(r.replies));
    assert.equal(codes[4], 'ok', `a well-formed Begin passes pre-flight: ${JSON.stringify(r.replies[4])}`);
    assert.ok(r.replies[4].result.dataPort >= 49152);
    assert.equal(codes[5], 'MIGRATION_PROTOCOL', 'a replayed Begin');
    assert.match(r.replies[5].error.message, /already begun/);
    assert.deepEqual(
      codes.slice(6, 9),
      ['MIGRATION_ILLEGAL_PHASE', 'MIGRATION_ILLEGAL_PHASE', 'MIGRATION_ILLEGAL_PHASE'],
      'finish, digest, confirm before prepare',
    );
    assert.equal(r.replies[9].result.phase, 'abandoned');
    assert.equal(r.replies[10].result.phase, 'abandoned', 'abandon is idempotent');
    assert.notEqual(codes[11], 'ok', 'prepare after abandon');
    assert.equal(codes[12], 'MIGRATION_PROTOCOL', 'Begin replayed after abandon');
    assert.equal(codes[13], 'JOB_NOT_FOUND', 'a RAM repair for no job');
    assert.equal(codes[14], 'MIGRATION_FAILED', 'a RAM repair after abandon');
    assert.equal(codes[15], 'API_BAD_REQUEST', 'a RAM repair of no bytes');
    assert.equal(codes[16], 'API_BAD_REQUEST', 'a RAM repair at a negative offset');
    assert.equal(r.replies[17].result.phase, 'abandoned', "the line after a refused repair's bytes is served");
    for (const c of codes) assert.ok(c === 'ok' || isErrorCode(c), `registered code: ${c}`);

    // Another trusted identity cannot act on host1's job: the lab's admin certificate
    // may not relocate at all, and another host (host3) only its own jobs.
    const K = crypto.randomUUID();
    const opened = session([req(1, 'relocation.begin', { ...begin, jobId: K })]);
    assert.ok(opened.replies[0].result, JSON.stringify(opened.replies[0]));
    const hijack = session(
      [req(1, 'relocation.prepare', { jobId: K }), req(2, 'relocation.abandon', { jobId: K })],
      labState().adminTlsDir,
    );
    assert.equal(code(hijack.replies[0]), 'API_FORBIDDEN');
    assert.equal(code(hijack.replies[1]), 'API_FORBIDDEN');
    const other = session([req(1, 'relocation.prepare', { jobId: K })], labState().hosts[2].tlsDir);
    assert.equal(code(other.replies[0]), 'MIGRATION_PROTOCOL');
    assert.match(other.replies[0].error.message, /belongs to host1, not host3/);
    // host1's session that began K closed: host2 abandons K by itself.
    await new Promise((res) => setTimeout(res, 500));
    await host2Untouched(d);
  });

  test('65 Begins on one connection: the per-peer cap answers MIGRATION_DEST_BUSY, and closing frees everything', async () => {
    const d = labState().hosts[1].pid;
    const steps = Array.from({ length: 65 }, (_, i) =>
      req(i + 1, 'relocation.begin', { ...begin, mode: 'definition', jobId: crypto.randomUUID() }),
    );
    const r = session(steps);
    const codes = r.replies.map((x) => code(x) ?? (x?.result ? 'ok' : 'none'));
    assert.deepEqual(codes.slice(0, 4), ['ok', 'ok', 'ok', 'ok'], JSON.stringify(r.replies.slice(0, 5)));
    assert.ok(
      codes.slice(4).every((c) => c === 'MIGRATION_DEST_BUSY'),
      JSON.stringify(codes),
    );
    assert.match(r.replies[4].error.message, /limits\.incomingPerPeer/);
    // The connection closed: host2 abandons the four it took, and takes new ones again.
    await new Promise((res) => setTimeout(res, 500));
    await host2Untouched(d);
    const again = session([req(1, 'relocation.begin', { ...begin, mode: 'definition', jobId: crypto.randomUUID() })]);
    assert.ok(again.replies[0].result, JSON.stringify(again.replies[0]));
    await new Promise((res) => setTimeout(res, 500));
    await host2Untouched(d);
  });

  test('a peer names files outside the pools: refused, and it learns nothing about them', async () => {
    const d = labState().hosts[1].pid;
    const mk = (p: string) => ({
      ...begin,
      jobId: crypto.randomUUID(),
      domain: {
        ...begin.domain,
        config: { ...begin.domain.config, disks: [{ ...begin.domain.config.disks[0], path: p }] },
        fileSizes: { [p]: 1 },
      },
    });
    const r = session([
      req(1, 'relocation.begin', mk('/etc/shadow')),
      req(2, 'relocation.begin', mk('/etc/no-such-file')),
      req(3, 'relocation.begin', mk('/dev/sda')),
    ]);
    for (const x of r.replies) assert.equal(code(x), 'PATH_NOT_ALLOWED', JSON.stringify(x));
    const strip = (x: any, p: string): string => x.error.message.replace(p, 'P');
    assert.equal(
      strip(r.replies[0], '/etc/shadow'),
      strip(r.replies[1], '/etc/no-such-file'),
      'an existing and a missing file get the same answer',
    );
    assert.doesNotMatch(JSON.stringify(r.replies), /bytes/);
    await host2Untouched(d);
  });

  test('truncated and oversized messages: coded answers, the daemon stays up', async () => {
    const d = labState().hosts[1].pid;
    const full = JSON.stringify({ id: 1, action: 'relocation.begin', params: { ...begin, jobId: crypto.randomUUID() } });
    const cut = session([{ line: full.slice(0, Math.floor(full.length / 2)), noNewline: true, wait: false }]);
    assert.deepEqual(cut.replies, [], 'nothing answered for half a message');
    const big = session([
      { line: JSON.stringify({ id: 1, action: 'relocation.begin', params: { ...begin, pad: 'x'.repeat(2 * 1024 * 1024) } }) },
    ]);
    assert.equal(code(big.replies[0]), 'API_BAD_REQUEST');
    assert.match(big.replies[0].error.message, /longer than 1048576 bytes/);
    assert.equal(big.closed, true, 'the connection is closed after an oversized message');
    const bad = session([
      { line: '{"id":1,"action":"relocation.begin",' },
      { line: 'not json at all' },
      req(3, 'relocation.begin', { ...begin, jobId: crypto.randomUUID(), version: 99 }),
      req(4, 'relocation.teleport', {}),
    ]);
    assert.deepEqual(bad.replies.map(code), ['API_BAD_REQUEST', 'API_BAD_REQUEST', 'MIGRATION_DEST_VERSION', 'API_UNKNOWN_ACTION']);
    const hello = session([req(1, 'api.hello', {})]);
    assert.equal(hello.replies[0].result.host, 'host2', 'a fresh session is still served');
    await host2Untouched(d);
  });

  test('600 random relocation messages over one TLS session: every one gets a coded answer', async () => {
    const d = labState().hosts[1].pid;
    const jobIds = [crypto.randomUUID(), crypto.randomUUID()];
    const anything = fc.oneof(
      fc.string(),
      fc.integer(),
      fc.boolean(),
      fc.constant(null),
      fc.constantFrom(...jobIds),
      fc.dictionary(fc.string(), fc.string(), { maxKeys: 3 }),
    );
    const action = fc.constantFrom(
      'relocation.begin',
      'relocation.prepare',
      'relocation.digest',
      'relocation.repair',
      'relocation.finish',
      'relocation.abandon',
      'relocation.confirm',
      'relocation.status',
      'relocation.recover',
      'relocation.lost',
    );
    const jobId = fc.oneof(fc.constantFrom(...jobIds), fc.uuid(), fc.string());
    // Well-typed messages in any order reach the phase checks and beyond (a Begin that
    // passes pre-flight, a Prepare that starts QEMU, a Finish with no stream); near-valid
    // Begins (one field replaced, by something plausible or by anything) reach pre-flight.
    const field = fc.constantFrom('version', 'jobId', 'mode', 'insecure', 'parallel', 'peer', 'domain');
    const plausible = fc.oneof(
      fc.integer({ min: -1, max: 3 }),
      fc.constantFrom('live', 'offline', 'definition', 'teleport'),
      fc.boolean(),
      fc.constantFrom(...jobIds),
      anything,
    );
    const typed = fc.oneof(
      fc.record({
        action: fc.constantFrom('relocation.prepare', 'relocation.digest', 'relocation.confirm', 'relocation.status'),
        params: fc.record({ jobId }),
      }),
      fc.record({ action: fc.constant('relocation.finish'), params: fc.record({ jobId, running: fc.boolean() }) }),
      fc.record({
        action: fc.constant('relocation.repair'),
        params: fc.record({ jobId, offset: fc.integer({ min: -4096, max: 1 << 28 }) }),
        data: fc.uint8Array({ maxLength: 8192 }),
      }),
      fc.record({ action: fc.constant('relocation.abandon'), params: fc.record({ jobId, reason: fc.string() }) }),
      fc.record({ action: fc.constant('relocation.lost'), params: fc.record({ jobId, reason: fc.string() }) }),
      fc.constantFrom(...jobIds).map((j) => ({ action: 'relocation.begin', params: { ...begin, jobId: j } })),
    );
    const msg = fc.oneof(
      { arbitrary: typed, weight: 3 },
      {
        arbitrary: fc
          .tuple(field, plausible, fc.constantFrom(...jobIds))
          .map(([k, v, j]) => ({ action: 'relocation.begin', params: { ...begin, jobId: j, [k]: v } })),
        weight: 2,
      },
      {
        arbitrary: fc.record({
          action,
          params: fc.dictionary(fc.constantFrom('jobId', 'version', 'peer', 'domain', 'mode', 'reason', 'running'), anything, {
            maxKeys: 4,
          }),
        }),
        weight: 1,
      },
    );
    const msgs = fc.sample(msg, { numRuns: 600, seed: 20261126 });
    // A repair's page data goes as raw bytes after its line, as the source sends it.
    const r = session(
      msgs.map((m, i) =>
        'data' in m && m.data instanceof Uint8Array
          ? reqBin(i + 1, m.action, { ...m.params, length: m.data.length }, Buffer.from(m.data))
          : req(i + 1, m.action, m.params),
      ),
    );
    assert.equal(r.replies.length, 600);
    const hist: Record<string, number> = {};
    for (const x of r.replies) {
      const k = x?.error?.code ?? (x ? 'result' : 'no answer');
      hist[k] = (hist[k] ?? 0) + 1;
    }
    process.stderr.write(`random relocation messages over TLS: ${JSON.stringify(hist)}\n`);
    const unanswered = r.replies.filter((x) => x === null).length;
    assert.equal(unanswered, 0, 'every message answered');
    for (const x of r.replies) {
      assert.ok(x.result !== undefined || isErrorCode(x.error?.code), `coded answer: ${JSON.stringify(x).slice(0, 200)}`);
      assert.notEqual(x.error?.code, 'INTERNAL', `no internal error: ${JSON.stringify(x).slice(0, 300)}`);
    }
    // The session is gone: any job it began is abandoned by host2 on its own.
    let settled: unknown;
    for (let i = 0; i < 40; i++) {
      try {
        await host2Untouched(d);
        settled = true;
        break;
      } catch (e) {
        settled = e;
        await new Promise((res) => setTimeout(res, 250));
      }
    }
    if (settled !== true) throw settled;
    assert.doesNotMatch(ferrydLog('host2'), /"internal error"/);
  });

  test('an expired client certificate is refused by ferryd, and logged', async () => {
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-expired-'));
    issueHostCert('host1', { caDir: labState().caDir, outDir: tmp, days: 0 });
    await new Promise((res) => setTimeout(res, 1100)); // a 0-day certificate's notAfter passes
    const r = tlsCall('host1', DEST, tmp, { id: 1, action: 'relocation.status', params: { jobId: crypto.randomUUID() } });
    assert.equal(r.lines[0]?.error?.code, 'TLS_REFUSED', JSON.stringify(r));
    const log = ferrydLog('host2')
      .split('\n')
      .filter((l) => l.includes('CERT_HAS_EXPIRED'));
    assert.ok(log.length > 0, 'the refusal is logged with the reason');
    assert.match(log[log.length - 1], /host1/, 'and with who was refused');
    fs.rmSync(tmp, { recursive: true });
  });

  test("a destination that presents another host's certificate is refused by the source", async () => {
    await createGuest('pattern', 'pat', 'host1', 64);
    const pid = (await ok(['-H', 'host1', 'info', 'pat', '--json'])).pid;
    // host1 is told that "host2" lives at host3's address: a valid lab certificate, the wrong name.
    await reconfigure('host1', (c) => {
      c.peers = { ...c.peers, host2: '198.19.0.13:8002' };
    });
    const r = await fails(['-H', 'host1', 'migrate', 'pat', 'host2', '--live'], 'TLS_REFUSED');
    assert.match(r.json.error.message, /host2/);
    const info = await ok(['-H', 'host1', 'info', 'pat', '--json']);
    assert.equal(info.state, 'running');
    assert.equal(info.pid, pid);
    const hi = await ok(['-H', 'host3', 'host', 'info', '--json']);
    assert.equal(hi.domains, 0, 'nothing reached host3');
    await reconfigure('host1', (c) => {
      c.peers = { ...c.peers, host2: '198.19.0.12:8002' };
    });
  });
});
