/** The parts of cluster/ that need no etcd: placement of a restart, the watchdog's feed, etcd's member configuration. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { placeRestart } from './ha.ts';
import { parseFeed } from './watchdog.ts';
import { etcdEnv } from './etcdconf.ts';
import { KEEPALIVE_MS } from './etcd.ts';
import { FerryError } from '../errors.ts';
import type { HostFacts, OwnerRecord } from './records.ts';
import type { Rule } from '../placement/rules.ts';

const host = (name: string, over: Partial<HostFacts> = {}): HostFacts => ({
  name,
  ferry: '0.2.0',
  engine: '10.0.2',
  accel: 'tcg',
  cpuModel: 'qemu64',
  cpuModels: ['qemu64', 'Nehalem'],
  cpuCeiling: null,
  memoryMiB: 4096,
  freeMiB: 2048,
  cores: 2,
  load: {},
  maintenance: false,
  moves: [],
  dirty: {},
  networks: [],
  relocation: 'x:8002',
  since: '',
  ...over,
});
const rec = (over: Partial<OwnerRecord> = {}): OwnerRecord => ({
  name: 'd',
  uuid: 'u',
  owner: 'dead',
  generation: 4,
  state: 'running',
  ha: { priority: 0 },
  config: {},
  cpuModel: 'qemu64',
  accel: 'tcg',
  memoryMiB: 1024,
  restartable: { ok: true, why: '' },
  moving: null,
  lease: '',
  via: 'start',
  note: '',
  at: '',
  ...over,
});

const none: Rule[] = [];
const at = (placed: [string, number][] = [], where: [string, string][] = [], rules = none) => ({
  placed: new Map(placed),
  where: new Map(where),
  rules,
});

test('placeRestart: the compatible live host with the most free memory, counting what this round placed', () => {
  const hosts = [host('dead'), host('a', { freeMiB: 1500 }), host('b', { freeMiB: 3000 }), host('c', { maintenance: true, freeMiB: 9000 })];
  assert.deepEqual(placeRestart(rec(), hosts, at()), { host: 'b', broke: [] });
  assert.deepEqual(placeRestart(rec(), hosts, at([['b', 2500]])), { host: 'a', broke: [] });
  const full = placeRestart(rec({ memoryMiB: 4000 }), hosts, at());
  assert.ok('why' in full && /a has 1500 MiB free/.test(full.why) && /c is in maintenance/.test(full.why), JSON.stringify(full));
  // A CPU model the host cannot give (its QEMU, accelerator or ceiling): never there.
  const cpu = placeRestart(rec({ cpuModel: 'EPYC' }), [host('a')], at());
  assert.ok('why' in cpu && /a cannot give CPU model EPYC/.test(cpu.why), JSON.stringify(cpu));
  assert.deepEqual(placeRestart(rec({ cpuModel: 'Nehalem' }), [host('a', { cpuModels: ['qemu64'] }), host('b', { freeMiB: 1100 })], at()), {
    host: 'b',
    broke: [],
  });
  assert.deepEqual(placeRestart(rec({ restartable: { ok: false, why: 'local disk' } }), hosts, at()), { why: 'local disk' });
  assert.deepEqual(placeRestart(rec(), [host('dead')], at()), { why: 'no other live host in the cluster' });
  // A NIC's network must exist on the new host: a restart there could not attach it.
  const nic = rec({ config: { nics: [{ network: 'lan' }] } });
  assert.deepEqual(placeRestart(nic, [host('a'), host('b', { networks: ['lan'] })], at()), { host: 'b', broke: [] });
  assert.match((placeRestart(nic, [host('a')], at()) as { why: string }).why, /a lacks network lan/);
});

test('placeRestart honours the rules: never a hard one; a soft one only when nothing else is left, and says so', () => {
  const hosts = [host('dead'), host('a', { freeMiB: 3000 }), host('b', { freeMiB: 1500 })];
  const apart: Rule = { name: 'spread', kind: 'keep-apart', domains: ['d', 'e'], hosts: [] };
  // e runs on a, the roomier host: d goes to b.
  assert.deepEqual(placeRestart(rec(), hosts, at([], [['e', 'a']], [apart])), { host: 'b', broke: [] });
  // With b full too, d stays down rather than break keep-apart.
  const stuck = placeRestart(rec(), hosts, at([['b', 1000]], [['e', 'a']], [apart]));
  assert.ok('why' in stuck && /keep-apart rule "spread": e runs on a/.test(stuck.why), JSON.stringify(stuck));
  // avoid-hosts is soft: with a the only host left, d restarts there and the break is named.
  const avoid: Rule = { name: 'not-a', kind: 'avoid-hosts', domains: ['d'], hosts: ['a'] };
  assert.deepEqual(placeRestart(rec(), hosts, at([], [], [avoid])), { host: 'b', broke: [] });
  const soft = placeRestart(rec(), hosts, at([['b', 1000]], [], [avoid]));
  assert.ok('host' in soft && soft.host === 'a' && /avoid-hosts rule "not-a"/.test(soft.broke.join()), JSON.stringify(soft));
});

test("the watchdog's feed: only well-formed lines, only plausible pids", () => {
  assert.deepEqual(parseFeed('{"deadline": 5, "targets": [{"pid": 42, "start": "7"}, {"pid": 1, "start": "1"}, {"pid": "x"}]}'), {
    deadline: 5,
    targets: [{ pid: 42, start: '7' }],
  });
  assert.equal(parseFeed('not json'), null);
  assert.equal(parseFeed('{"targets": []}'), null);
});

test("etcd's member configuration: mutual TLS both ways, this member in the list, bad names refused", () => {
  const env = etcdEnv({
    me: { name: 'h1', address: '10.0.0.1' },
    members: [
      { name: 'h1', address: '10.0.0.1' },
      { name: 'h2', address: '10.0.0.2' },
    ],
    dataDir: '/d',
    tlsDir: '/t',
    token: 'x',
    state: 'new',
  });
  assert.equal(env.ETCD_CLIENT_CERT_AUTH, 'true');
  assert.equal(env.ETCD_PEER_CLIENT_CERT_AUTH, 'true');
  assert.equal(env.ETCD_LISTEN_CLIENT_URLS, 'https://10.0.0.1:2379');
  assert.equal(env.ETCD_INITIAL_CLUSTER, 'h1=https://10.0.0.1:2380,h2=https://10.0.0.2:2380');
  assert.equal(env.ETCD_TRUSTED_CA_FILE, '/t/ca-cert.pem');
  // etcd lets ferry's clients ping as often as they do (else it closes their connections).
  assert.match(env.ETCD_GRPC_KEEPALIVE_MIN_TIME, /^\d+s$/);
  assert.ok(parseInt(env.ETCD_GRPC_KEEPALIVE_MIN_TIME) * 1000 <= KEEPALIVE_MS, env.ETCD_GRPC_KEEPALIVE_MIN_TIME);
  // A member coming back from a partition does not depose the leader (cluster.test.ts shows the term holds).
  assert.equal(env.ETCD_PRE_VOTE, 'true');
  const bad = (o: Partial<Parameters<typeof etcdEnv>[0]>): string => {
    try {
      etcdEnv({
        me: { name: 'h1', address: '10.0.0.1' },
        members: [{ name: 'h1', address: '10.0.0.1' }],
        dataDir: '/d',
        tlsDir: '/t',
        token: 'x',
        state: 'new',
        ...o,
      });
      return 'ok';
    } catch (e) {
      return (e as FerryError).code;
    }
  };
  assert.equal(bad({ members: [{ name: 'h2', address: '10.0.0.2' }] }), 'CLI_USAGE');
  assert.equal(bad({ me: { name: 'h 1', address: '10.0.0.1' } }), 'CLI_USAGE');
  assert.equal(bad({ me: { name: 'h1', address: '10.0.0.300' } }), 'CLI_USAGE');
});
