import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseBegin, PROTOCOL_VERSION, vniFor, checkAnswer } from './relocation.ts';
import { parseRequest } from './schema.ts';
import { FerryError } from '../errors.ts';

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
    machine: 'pc-i440fx-10.0',
    networks: { lab: { bridge: 'br0', subnet: '198.18.0.0/24' } },
  },
  domain: {
    config: { name: 'web', memory: 64, boot: { kernel: '/k' }, nics: [{ network: 'lab' }], disks: [{ path: '/d.qcow2', format: 'qcow2' }] },
    fileSizes: { '/k': 1 },
    machine: 'pc-i440fx-10.0',
    cpuModel: 'qemu64',
  },
};
const code = (f: () => unknown): string => {
  try {
    f();
    return 'OK';
  } catch (e) {
    return e instanceof FerryError ? e.code : `not coded: ${e}`;
  }
};

test("a good Begin parses with defaults filled; every NIC gets a home on the source's segment", () => {
  const m = parseBegin(good);
  assert.deepEqual([m.parallel, m.compress, m.insecure, m.postcopy, m.storageNonce, m.copyDisks], [1, 'none', false, false, '', []]);
  assert.equal(parseBegin({ ...good, compress: 'zstd', parallel: 2 }).compress, 'zstd');
  assert.deepEqual(m.homes, [{ host: 'host1', address: '', subnet: '198.18.0.0/24', vni: vniFor(m.config.uuid, 0) }]);
});

test('version first, then shape, then what spans fields', () => {
  assert.equal(
    code(() => parseBegin({ ...good, version: 4, mode: 'teleport' })),
    'MIGRATION_DEST_VERSION',
  );
  assert.equal(
    code(() => parseBegin({ ...good, mode: 'teleport' })),
    'MIGRATION_PROTOCOL',
  );
  assert.match(
    String(
      (() => {
        try {
          parseBegin({ ...good, peer: { ...good.peer, cpuFeatures: 'lm' } });
        } catch (e) {
          return (e as Error).message;
        }
      })(),
    ),
    /peer\.cpuFeatures must be a list of names/,
  );
  assert.equal(
    code(() => parseBegin({ ...good, postcopy: true, parallel: 2 })),
    'MIGRATION_PROTOCOL',
  );
  // Compression is multifd's: never with post-copy; and only the methods ferry knows.
  assert.throws(
    () => parseBegin({ ...good, postcopy: true, compress: 'zstd' }),
    (e: FerryError) => e.code === 'MIGRATION_PROTOCOL' && /postcopy cannot go with compression/.test(e.message),
  );
  assert.equal(
    code(() => parseBegin({ ...good, compress: 'zlib' })),
    'MIGRATION_PROTOCOL',
  );
  // auto is the operator's word to the source, resolved there: never a method on the wire.
  assert.equal(
    code(() => parseBegin({ ...good, compress: 'auto' })),
    'MIGRATION_PROTOCOL',
  );
  assert.equal(
    code(() => parseBegin({ ...good, homes: [] })),
    'MIGRATION_PROTOCOL',
    'one home per NIC',
  );
  const cfg = parseBegin(good).config;
  assert.equal(
    code(() =>
      parseBegin({
        ...good,
        domain: { ...good.domain, config: { ...good.domain.config, uuid: cfg.uuid } },
        homes: [{ host: 'h', address: '198.19.0.1', subnet: 's', vni: vniFor(cfg.uuid, 0) + 1 }],
      }),
    ),
    'MIGRATION_PROTOCOL',
    "another NIC's VNI",
  );
  const copy = (c: unknown): string => code(() => parseBegin({ ...good, domain: { ...good.domain, copyDisks: [c] } }));
  assert.equal(copy({ index: 0, format: 'qcow2', virtualSize: 1 << 20, allocated: 0 }), 'OK');
  assert.equal(copy({ index: 0, format: 'raw', virtualSize: 1 << 20, allocated: 0 }), 'MIGRATION_PROTOCOL', "not the config's format");
  assert.equal(copy({ index: 1, format: 'qcow2', virtualSize: 1 << 20, allocated: 0 }), 'MIGRATION_PROTOCOL', 'no such disk');
});

test('regression (found by fuzzing): a value zod cannot describe is a coded refusal, not a crash', () => {
  const evil: Record<string, unknown> = Object.create(null);
  Object.defineProperty(evil, 'constructor', { value: { name: Object.create(null) }, enumerable: true });
  assert.equal(
    code(() => parseBegin({ ...good, domain: { ...good.domain, storageNonce: evil } })),
    'MIGRATION_PROTOCOL',
  );
  assert.equal(
    code(() => parseRequest({ id: 1, action: 'domain.info', params: { domain: evil } })),
    'API_BAD_REQUEST',
  );
});

test("the destination's answers are checked against their schemas: a bad field is MIGRATION_PROTOCOL naming it, extra fields pass", () => {
  const begun = { jobId: 'j', host: 'host2', dataAddress: '198.19.0.12', dataPort: 49152, checks: ['network lab: ok'], future: 1 };
  assert.equal(checkAnswer('relocation.begin', begun, 'host2').dataPort, 49152);
  assert.equal(
    code(() => checkAnswer('relocation.begin', { ...begun, dataPort: '49152' }, 'host2')),
    'MIGRATION_PROTOCOL',
  );
  assert.equal(
    code(() => checkAnswer('relocation.begin', { ...begun, tunnels: [{ nic: 0, vni: -1, address: 'x' }] }, 'host2')),
    'MIGRATION_PROTOCOL',
  );
  assert.equal(
    code(() => checkAnswer('relocation.prepare', { dataAddress: 'a', dataPort: 0, tlsHostname: 'host2' }, 'host2')),
    'MIGRATION_PROTOCOL',
  );
  assert.equal(
    code(() => checkAnswer('relocation.digest', { bytes: 1, chunkBytes: 1 }, 'host2')),
    'MIGRATION_PROTOCOL',
  );
  assert.equal(
    code(() => checkAnswer('relocation.finish', { phase: 'finished', resumedAt: 'soon', host: 'host2' }, 'host2')),
    'MIGRATION_PROTOCOL',
  );
  assert.equal(
    code(() => checkAnswer('relocation.status', null, 'host2')),
    'MIGRATION_PROTOCOL',
  );
  try {
    checkAnswer('relocation.recover', { dataAddress: '198.19.0.12', dataPort: 70000 }, 'host2');
    assert.fail('accepted a port out of range');
  } catch (e) {
    assert.match((e as Error).message, /host2 answered relocation\.recover with dataPort/);
  }
});
