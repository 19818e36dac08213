import { test } from 'node:test';
import assert from 'node:assert/strict';
import { resolvePeer } from './peer.ts';
import type { OutgoingSide } from './run.ts';
import { knownPeers, type MoveOwnership } from '../host.ts';

/** Only what resolvePeer reads of the source side: its peers (as Host.peers() makes them) and its relocation port. */
const side = (peers: Record<string, string>, live: Record<string, string> | null): OutgoingSide =>
  ({
    host: {
      cfg: { relocation: { port: 8002 } },
      peers: () => knownPeers(peers, live ? ({ liveHosts: () => live } as unknown as MoveOwnership) : null),
    },
  }) as unknown as OutgoingSide;

test('resolvePeer: a live cluster host is a peer by name; a "peers" entry wins; standalone knows only its peers', async () => {
  const live = { host3: '198.18.1.3:8002', host2: '198.18.1.2:8002' };
  assert.deepEqual(await resolvePeer(side({}, live), 'host3'), { name: 'host3', address: '198.18.1.3', port: 8002 });
  assert.deepEqual(await resolvePeer(side({ host2: '198.18.9.2:9000' }, live), 'host2'), {
    name: 'host2',
    address: '198.18.9.2',
    port: 9000,
  });
  assert.deepEqual(await resolvePeer(side({}, null), '198.18.1.3'), { name: undefined, address: '198.18.1.3', port: 8002 });
  await assert.rejects(resolvePeer(side({}, null), 'not:a:host'), (e: Error & { code?: string }) => e.code === 'HOST_UNKNOWN');
});
