/**
 * Hostile input, property-based (fast-check): the domain config parser, the API
 * request parser, the relocation Begin parser, and a live API server fed random
 * lines. Every case must end in a value or a coded FerryError — never another
 * exception — and the server must stay up and keep answering.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { FerryError, isErrorCode } from './errors.ts';
import { parseDomainConfig } from './domain/config.ts';
import { parseRequest, ACTIONS } from './api/schema.ts';
import { parseBegin, checkAnswer, RELOCATION_ANSWERS, type RelocationAction } from './api/relocation.ts';
import { PROTOCOL_VERSION } from './migration/phases.ts';
import { ApiServer } from './daemon/server.ts';
import { Logger } from './daemon/log.ts';

const RUNS = Number(process.env.FERRY_FUZZ_RUNS ?? 3000);

function coded(f: () => unknown, allowed: string[]): void {
  try {
    f();
  } catch (e) {
    assert.ok(e instanceof FerryError, `not a FerryError: ${e}`);
    assert.ok(allowed.includes(e.code), `unexpected code ${e.code}: ${e.message}`);
  }
}

// JSON-ish values biased towards the shapes the parsers look at.
const key = fc.constantFrom(
  'name',
  'uuid',
  'memory',
  'vcpus',
  'boot',
  'disks',
  'nics',
  'serial',
  'kernel',
  'initrd',
  'cmdline',
  'disk',
  'path',
  'format',
  'readOnly',
  'bus',
  'network',
  'mac',
  'ip',
  '__proto__',
  'constructor',
  'x',
);
const leaf = fc.oneof(
  fc.string(),
  fc.integer(),
  fc.double(),
  fc.boolean(),
  fc.constant(null),
  fc.constantFrom('/img/vmlinux', 'web', 'raw', 'qcow2', 'floppy', '52:54:00:12:34:56', '198.18.0.5/24', 'lab', ''),
);
const value = fc.letrec((tie) => ({
  v: fc.oneof({ depthSize: 'small' }, leaf, fc.array(tie('v'), { maxLength: 4 }), fc.dictionary(key, tie('v'), { maxKeys: 6 })),
})).v;

test(`domain config parser: ${RUNS} random configs end in a config or CONFIG_INVALID`, () => {
  fc.assert(
    fc.property(value, (v) => coded(() => parseDomainConfig(v), ['CONFIG_INVALID'])),
    { numRuns: RUNS },
  );
  // near-valid configs with one field replaced by anything
  const base = { name: 'web', memory: 64, boot: { kernel: '/k' }, nics: [{ network: 'lab' }] };
  fc.assert(
    fc.property(fc.constantFrom('name', 'memory', 'vcpus', 'boot', 'disks', 'nics', 'uuid', 'serial'), value, (k, v) =>
      coded(() => parseDomainConfig({ ...base, [k]: v }), ['CONFIG_INVALID']),
    ),
    { numRuns: RUNS },
  );
});

test(`API request parser: ${RUNS} random requests end in a request or a coded error`, () => {
  const actions = fc.constantFrom(...Object.keys(ACTIONS), 'nope', '__proto__', 'toString');
  const req = fc.record(
    {
      id: fc.oneof(fc.integer(), fc.string(), value),
      action: fc.oneof(actions, value),
      params: fc.oneof(fc.dictionary(fc.constantFrom('domain', 'file', 'timeoutS', 'config', 'jobId', 'x'), value), value),
    },
    { requiredKeys: [] },
  );
  fc.assert(
    fc.property(req, (r) => coded(() => parseRequest(r), ['API_BAD_REQUEST', 'API_UNKNOWN_ACTION'])),
    { numRuns: RUNS },
  );
});

test(`relocation Begin parser: ${RUNS} random messages end in a message, MIGRATION_PROTOCOL or (another protocol version) MIGRATION_DEST_VERSION`, () => {
  const good = {
    version: PROTOCOL_VERSION,
    jobId: '00000000-0000-4000-8000-000000000001',
    mode: 'live',
    peer: {
      name: 'host1',
      version: '0.1.0',
      qemuVersion: '10.0.2',
      arch: 'x86_64',
      accel: 'tcg',
      cpuModel: 'qemu64',
      cpuFeatures: ['lm'],
      machine: 'pc-i440fx-7.2',
      networks: { lab: { bridge: 'br0', subnet: '198.18.0.0/24' } },
    },
    domain: {
      config: { name: 'web', memory: 64, boot: { kernel: '/k' } },
      fileSizes: { '/k': 1 },
      machine: 'pc-i440fx-7.2',
      cpuModel: 'qemu64',
    },
  };
  assert.equal(parseBegin(good).config.name, 'web');
  fc.assert(
    fc.property(fc.constantFrom('jobId', 'mode', 'peer', 'domain', 'parallel'), value, (k, v) =>
      coded(() => parseBegin({ ...good, [k]: v }), ['MIGRATION_PROTOCOL']),
    ),
    { numRuns: RUNS },
  );
  fc.assert(
    fc.property(fc.constantFrom('name', 'version', 'qemuVersion', 'arch', 'cpuFeatures', 'networks', 'machine'), value, (k, v) =>
      coded(() => parseBegin({ ...good, peer: { ...good.peer, [k]: v } }), ['MIGRATION_PROTOCOL']),
    ),
    { numRuns: RUNS },
  );
  fc.assert(
    fc.property(value, (v) => coded(() => parseBegin(v as Record<string, unknown>), ['MIGRATION_PROTOCOL', 'MIGRATION_DEST_VERSION'])),
    { numRuns: RUNS },
  );
  fc.assert(
    fc.property(value, (v) => coded(() => parseBegin({ ...good, version: v }), ['MIGRATION_DEST_VERSION'])),
    { numRuns: RUNS },
  );
  // The payload's deeper fields (api/relocation.ts's schemas): the domain's facts, the tunnels' homes, the disks to copy.
  fc.assert(
    fc.property(fc.constantFrom('fileSizes', 'storageNonce', 'machine', 'cpuModel', 'copyDisks', 'config'), value, (k, v) =>
      coded(() => parseBegin({ ...good, domain: { ...good.domain, [k]: v } }), ['MIGRATION_PROTOCOL']),
    ),
    { numRuns: RUNS },
  );
  const home = fc.record(
    {
      host: fc.oneof(fc.string(), value),
      address: fc.oneof(fc.constantFrom('198.19.0.11', '999.1.1.1'), value),
      subnet: fc.oneof(fc.string(), value),
      vni: fc.oneof(fc.integer(), value),
      ip: value,
    },
    { requiredKeys: [] },
  );
  fc.assert(
    fc.property(fc.oneof(value, fc.array(home, { maxLength: 3 })), (h) =>
      coded(() => parseBegin({ ...good, homes: h }), ['MIGRATION_PROTOCOL']),
    ),
    { numRuns: RUNS },
  );
  const disk = fc.record(
    {
      index: fc.oneof(fc.integer({ min: -1, max: 2 }), value),
      format: fc.oneof(fc.constantFrom('raw', 'qcow2'), value),
      virtualSize: fc.oneof(fc.integer(), value),
      allocated: fc.oneof(fc.integer(), value),
      backing: value,
    },
    { requiredKeys: [] },
  );
  fc.assert(
    fc.property(fc.array(disk, { maxLength: 3 }), (d) =>
      coded(
        () =>
          parseBegin({
            ...good,
            domain: { ...good.domain, config: { ...good.domain.config, disks: [{ path: '/d', format: 'raw' }] }, copyDisks: d },
          }),
        ['MIGRATION_PROTOCOL'],
      ),
    ),
    { numRuns: RUNS },
  );
});

test('a live API server answers every random line with a result or a coded error, and stays up', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-fuzz-'));
  const sock = path.join(dir, 'api.sock');
  let handled = 0;
  const server = new ApiServer(new Logger(path.join(dir, 'log')), async (req) => {
    handled++;
    return { echo: req.action };
  });
  await server.listenUnix(sock);
  try {
    const lines = fc
      .sample(
        fc.oneof(
          fc.string({ maxLength: 200 }),
          value.map((v) => JSON.stringify(v) ?? 'null'),
          fc
            .record({
              id: fc.integer(),
              action: fc.constantFrom('domain.list', 'host.info', 'domain.info', 'bogus'),
              params: fc.dictionary(fc.constantFrom('domain', 'x'), value),
            })
            .map((r) => JSON.stringify(r)),
        ),
        Math.min(RUNS, 2000),
      )
      .map((l) => l.replace(/\n/g, ' '));
    const c = net.createConnection({ path: sock });
    await new Promise((r) => c.once('connect', r));
    let buf = '';
    const replies: { error?: { code: unknown }; result?: unknown }[] = [];
    c.on('data', (d) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        replies.push(JSON.parse(buf.slice(0, i)));
        buf = buf.slice(i + 1);
      }
    });
    const nonEmpty = lines.filter((l) => l.trim().length > 0);
    c.write(lines.join('\n') + '\n');
    const deadline = Date.now() + 20000;
    while (replies.length < nonEmpty.length && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.equal(replies.length, nonEmpty.length, 'one reply per non-empty line');
    for (const r of replies) {
      if (r.error) assert.ok(isErrorCode(r.error.code), JSON.stringify(r));
      else assert.ok('result' in r, JSON.stringify(r));
    }
    assert.ok(handled < replies.length, 'most random lines never reach a handler');
    // still alive: a good request on a new connection
    const c2 = net.createConnection({ path: sock });
    const answer = await new Promise<string>((resolve) => {
      c2.on('data', (d) => resolve(d.toString()));
      c2.write('{"id":7,"action":"domain.list"}\n');
    });
    assert.deepEqual(JSON.parse(answer), { id: 7, result: { echo: 'domain.list' } });
    c.destroy();
    c2.destroy();
  } finally {
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test(`relocation answers: ${RUNS} random answers to each action end in an answer or MIGRATION_PROTOCOL`, () => {
  const actions = Object.keys(RELOCATION_ANSWERS) as RelocationAction[];
  fc.assert(
    fc.property(fc.constantFrom(...actions), value, (a, v) => coded(() => checkAnswer(a, v, 'host2'), ['MIGRATION_PROTOCOL'])),
    { numRuns: RUNS },
  );
  // A good answer with one field replaced by anything: the answer, or a coded refusal.
  const good = { dataAddress: '198.19.0.12', dataPort: 49152, tlsHostname: 'host2', nbd: { address: '198.19.0.12', port: 49153 } };
  fc.assert(
    fc.property(fc.constantFrom('dataAddress', 'dataPort', 'tlsHostname', 'nbd'), value, (k, v) =>
      coded(() => checkAnswer('relocation.prepare', { ...good, [k]: v }, 'host2'), ['MIGRATION_PROTOCOL']),
    ),
    { numRuns: RUNS },
  );
});
