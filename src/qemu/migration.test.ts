import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MigrationQmp, CAPABILITIES, PARAMETERS, uri } from './migration.ts';
import type { QmpClient } from '../qmp/client.ts';
import { FerryError } from '../errors.ts';

/** Records what would be sent to QEMU. */
function recorder(): { q: QmpClient; sent: [string, unknown][] } {
  const sent: [string, unknown][] = [];
  const q = {
    execute: async (cmd: string, args?: unknown) => {
      sent.push([cmd, args]);
      return cmd === 'query-dirty-rate' ? { status: 'measured', 'dirty-rate': 12 } : {};
    },
  } as unknown as QmpClient;
  return { q, sent };
}

test("capabilities and parameters go out in QEMU's spelling, in one command each", async () => {
  const { q, sent } = recorder();
  const src = new MigrationQmp(q, 'source');
  await src.setCapabilities({ events: true, multifd: false, postcopy: true, autoConverge: true });
  await src.setParameters({ maxBandwidth: 1, downtimeLimit: 300, tlsCreds: 'c', tlsHostname: 'host2', multifdChannels: undefined });
  assert.deepEqual(sent, [
    [
      'migrate-set-capabilities',
      {
        capabilities: [
          { capability: 'events', state: true },
          { capability: 'multifd', state: false },
          { capability: 'postcopy-ram', state: true },
          { capability: 'auto-converge', state: true },
        ],
      },
    ],
    ['migrate-set-parameters', { 'max-bandwidth': 1, 'downtime-limit': 300, 'tls-creds': 'c', 'tls-hostname': 'host2' }],
  ]);
});

test('a setting of the other end is a bug, refused before QEMU sees it', async () => {
  const { q, sent } = recorder();
  const dst = new MigrationQmp(q, 'destination');
  const internal = (e: unknown): boolean => e instanceof FerryError && e.code === 'INTERNAL';
  await assert.rejects(dst.setCapabilities({ autoConverge: true }), internal);
  await assert.rejects(dst.setParameters({ downtimeLimit: 1 }), internal);
  assert.throws(() => dst.migrate(uri.tcp('198.19.0.12', 49152)), internal);
  assert.throws(() => new MigrationQmp(q, 'source').incoming(uri.unix('/x')), internal);
  assert.throws(() => new MigrationQmp(q, 'source').addAuthz('a', 'CN=x'), internal);
  assert.deepEqual(sent, []);
  // Every entry of the tables names a side.
  for (const t of [CAPABILITIES, PARAMETERS])
    for (const v of Object.values(t)) assert.ok(['source', 'destination', 'both'].includes(v.side));
});

test('TLS objects, URIs and the commands of each end', async () => {
  const { q, sent } = recorder();
  const src = new MigrationQmp(q, 'source');
  const dst = new MigrationQmp(q, 'destination');
  await src.addTlsCreds('t', '/run/q/tls');
  await dst.addTlsCreds('t', '/run/q/tls');
  await dst.addAuthz('a', 'O=ferry,OU=host,CN=host1');
  await src.migrate(uri.tcp('198.19.0.12', 49152), true);
  await dst.incoming(uri.unix('/run/q/in.sock'));
  assert.equal(await src.dirtyRate(), 12);
  assert.deepEqual(sent.slice(0, 5), [
    ['object-add', { 'qom-type': 'tls-creds-x509', id: 't', dir: '/run/q/tls', endpoint: 'client', 'verify-peer': true }],
    ['object-add', { 'qom-type': 'tls-creds-x509', id: 't', dir: '/run/q/tls', endpoint: 'server', 'verify-peer': true }],
    ['object-add', { 'qom-type': 'authz-simple', id: 'a', identity: 'O=ferry,OU=host,CN=host1' }],
    ['migrate', { uri: 'tcp:198.19.0.12:49152', resume: true }],
    ['migrate-incoming', { uri: 'unix:/run/q/in.sock' }],
  ]);
});

test('a file URI carries only paths QEMU cannot misparse (it splits at commas)', () => {
  assert.equal(uri.file('/var/lib/ferry/run/web/q/save.state', 4096), 'file:/var/lib/ferry/run/web/q/save.state,offset=4096');
  assert.equal(uri.file('/dev/fdset/300', 8192), 'file:/dev/fdset/300,offset=8192');
  for (const bad of ['/x,offset=0', 'relative/path', '/a b', '/x;y', '/tmp/\n'])
    assert.throws(
      () => uri.file(bad, 0),
      (e: unknown) => e instanceof FerryError && e.code === 'INTERNAL',
      bad,
    );
});
