/**
 * Who gets in: hostsAllow matches whole certificate names (and, with @CIDR, addresses
 * too); the role table gives a host certificate relocation only; connection caps and
 * rate-limited refusal logs hold.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseHostsAllow, hostsAllowMatch, ConnectionLimiter, RateLimitedLog } from './access.ts';
import { ROLES, mayCall, type Action } from '../api/protocol.ts';
import { ACTIONS } from '../api/schema.ts';

const rules = (p: string[]) => {
  const r = parseHostsAllow(p);
  if ('error' in r) throw new Error(r.error);
  return r.rules;
};

test('hostsAllow: whole names only; @CIDR also pins the address; an address alone admits nobody', () => {
  const r = rules(['host1', 'host[0-9]+@198.18.0.0/24', '^old$']);
  assert.equal(hostsAllowMatch(r, 'host1', '203.0.113.9'), true);
  assert.equal(hostsAllowMatch(r, 'evilhost1x', '198.18.0.5'), false);
  assert.equal(hostsAllowMatch(r, 'host1x', '198.18.0.5'), false);
  assert.equal(hostsAllowMatch(r, 'host7', '198.18.0.17'), true);
  assert.equal(hostsAllowMatch(r, 'host7', '::ffff:198.18.0.17'), true);
  assert.equal(hostsAllowMatch(r, 'host7', '198.18.1.17'), false, 'outside the subnet');
  assert.equal(hostsAllowMatch(r, 'old', '198.18.9.9'), true, 'already-anchored patterns still work');
  assert.equal(hostsAllowMatch(rules(['198.18.0.1']), '198.18.0.123', '198.18.0.123'), false, 'no prefix match on names either');
  assert.equal(hostsAllowMatch(r, undefined, '198.18.0.11'), false);
  assert.equal(hostsAllowMatch(rules(['a@198.18.0.12']), 'a', '198.18.0.12'), true, 'a bare address is /32');
  assert.equal(hostsAllowMatch(rules(['a@198.18.0.12']), 'a', '198.18.0.13'), false);
  assert.ok('error' in parseHostsAllow(['(']));
  assert.ok('error' in parseHostsAllow(['a@198.18.0.0/33']));
  assert.ok('error' in parseHostsAllow(['@198.18.0.0/24']));
});

test('roles: a host certificate (peer) may greet and relocate, nothing else; every action has an entry', () => {
  for (const a of Object.keys(ACTIONS) as Action[]) {
    assert.ok(ROLES[a].length > 0, a);
    assert.equal(mayCall('peer', a), a === 'api.hello' || a.startsWith('relocation.'), `peer → ${a}`);
    assert.equal(mayCall('admin', a), !a.startsWith('relocation.'), `admin → ${a}`);
    assert.equal(mayCall('local', a), !a.startsWith('relocation.'), `local → ${a}`);
  }
});

test('connection limiter: per address and in total; slots come back on release', () => {
  const l = new ConnectionLimiter(3, 2);
  assert.equal(l.take('a'), null);
  assert.equal(l.take('a'), null);
  assert.match(l.take('a') ?? '', /limit 2/);
  assert.equal(l.take('b'), null);
  assert.match(l.take('c') ?? '', /limit 3/);
  l.release('a');
  assert.equal(l.take('c'), null);
  assert.equal(l.open, 3);
});

test('refusal log: a burst per key per window, then a count of what was held back', () => {
  let now = 0;
  const lines: Record<string, unknown>[] = [];
  const log = new RateLimitedLog(
    (f) => lines.push(f),
    3,
    1000,
    () => now,
  );
  for (let i = 0; i < 100; i++) log.log('k', { i });
  log.log('other', { i: -1 });
  assert.equal(lines.length, 4);
  now = 1500;
  log.log('k', { i: 200 });
  assert.equal(lines.at(-1)?.suppressedBefore, 97);
});
