/**
 * Moves across L2 segments (daemon/tunnels.ts), for real in the lab: host3's "lab"
 * network is another segment and subnet (198.18.1.0/24), and a Linux guest of
 * 198.18.0.0/24 moves there live with its segment carried through a VXLAN over the
 * migration network, while the lab client holds a TCP connection to it.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  ok,
  fails,
  ferry,
  labUp,
  labDown,
  createGuest,
  guestStatus,
  echoClient,
  waitFor,
  reconfigure,
  tlsCall,
  labState,
  echoWhole,
} from '../helpers.ts';

const links = (host: string): string[] =>
  execFileSync('ip', ['-n', `ferry-${host}`, '-br', 'link'])
    .toString()
    .split('\n')
    .map((l) => l.split(/[\s@]/)[0])
    .filter((n) => /^f[xb][0-9a-f]{6}$/.test(n));
/** ferry's VXLAN firewall table on a host: its peer set and how many packets it dropped, or null when absent. */
const vxlanFirewall = (host: string): { peers: string[]; dropped: number } | null => {
  let j: any;
  try {
    j = JSON.parse(
      execFileSync('ip', ['netns', 'exec', `ferry-${host}`, 'nft', '-j', 'list', 'table', 'inet', 'ferry_vxlan'], {
        stdio: ['ignore', 'pipe', 'ignore'],
      }).toString(),
    );
  } catch {
    return null;
  }
  const items = j.nftables as any[];
  const set = items.find((x) => x.set)?.set;
  const rule = items.find((x) => x.rule && JSON.stringify(x.rule.expr).includes('@peers'))?.rule;
  const counter = rule?.expr.find((e: any) => e.counter)?.counter;
  return { peers: (set?.elem ?? []).map(String), dropped: counter?.packets ?? -1 };
};
const tunnels = async (host: string): Promise<any[]> => ok(['-H', host, 'net', 'tunnels', '--json']);
const masterOf = (host: string, dev: string): string => {
  const j = JSON.parse(execFileSync('ip', ['-n', `ferry-${host}`, '-j', 'link', 'show', dev]).toString());
  return j[0].master;
};

async function move(dom: string, from: string, to: string): Promise<any> {
  const r = await ferry(['-H', from, 'migrate', dom, to, '--live', '--json']);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.equal(r.json.outcome, 'succeeded');
  return r.json;
}

describe("moves across segments: the guest's segment follows it through a tunnel (lab)", () => {
  let ip = '';
  let bootId = '';
  let uuid = '';
  before(async () => {
    await labUp(['--hosts', '3', '--segments', '2', '--host-memory', '1024']);
    const cfg = await createGuest('linux', 'web', 'host1');
    ip = cfg.nics[0].ip.split('/')[0];
    uuid = cfg.uuid;
    bootId = guestStatus(ip).bootId;
  });
  after(async () => {
    await labDown();
  });

  test('live to a host on another subnet: the TCP connection loses nothing, same IP and boot; a ferryd restart on either end keeps it reachable', async () => {
    assert.equal((await ok(['-H', 'host3', 'host', 'info', '--json'])).networks.lab.subnet, '198.18.1.0/24');
    const echo = echoClient(ip, 10);
    await waitFor('echo connected', () => echo.lines.includes('connected'), 10000);
    await new Promise((r) => setTimeout(r, 500));
    const rep = await move('web', 'host1', 'host3');
    assert.ok(
      rep.policy.some((p: string) => /segment 198\.18\.0\.0\/24 carried to host3 through a VXLAN tunnel .* from host1/.test(p)),
      JSON.stringify(rep.policy),
    );
    assert.equal(typeof rep.timeline.tunnelsOpen, 'number');
    assert.equal(typeof rep.networkHandoverMs, 'number', JSON.stringify(rep));
    assert.equal(rep.warnings, undefined);

    // Both ends, as the CLI and host info list them.
    const [home] = await tunnels('host1');
    const [away] = await tunnels('host3');
    assert.deepEqual([home.domain, home.end, home.bridge, home.remotes], ['web', 'home', 'br0', ['198.19.0.13']]);
    assert.deepEqual(
      [away.domain, away.end, away.remotes, away.home.host, away.home.subnet],
      ['web', 'away', ['198.19.0.11'], 'host1', '198.18.0.0/24'],
    );
    assert.equal(home.vni, away.vni);
    assert.deepEqual(
      (await ok(['-H', 'host3', 'host', 'info', '--json'])).tunnels.map((t: any) => t.device),
      [away.device],
    );
    // The guest's tap hangs on the away bridge, which holds nothing but it and the tunnel:
    // the guest cannot be reaching its segment any other way.
    const ports = execFileSync('ip', ['-n', 'ferry-host3', '-br', 'link', 'show', 'master', away.bridge])
      .toString()
      .trim()
      .split('\n')
      .map((l) => l.split(/[\s@]/)[0]);
    assert.equal(ports.length, 2, ports.join(' '));
    assert.ok(ports.includes(away.device));
    const tap = ports.find((p) => p !== away.device)!;
    assert.equal(masterOf('host3', tap), away.bridge);

    // ferryd restarts on both ends while the tunnel carries the connection.
    await ok(['lab', 'restart', 'host3']);
    await ok(['lab', 'restart', 'host1']);
    assert.equal((await tunnels('host3')).length, 1, 'the away end was adopted');
    assert.equal((await tunnels('host1')).length, 1, 'the home end was adopted');
    await new Promise((r) => setTimeout(r, 500));
    const st = await echoWhole(echo);
    assert.ok(st.sent > 50, `${st.sent} lines sent`);
    const g = guestStatus(ip);
    assert.equal(g.bootId, bootId, 'same boot');
  });

  test("the tunnel port admits only the tunnel's peers: a VXLAN frame from another address on the migration network is dropped", () => {
    const fw3 = vxlanFirewall('host3');
    assert.deepEqual(fw3?.peers, ['198.19.0.11']);
    assert.deepEqual(vxlanFirewall('host1')?.peers, ['198.19.0.13']);
    const before = fw3!.dropped;
    // The lab client also sits on the migration network (198.19.0.2): it is no peer.
    const send =
      "const s = require('dgram').createSocket('udp4'); const f = Buffer.alloc(64); f[0] = 8; s.send(f, 4789, '198.19.0.13', () => s.send(f, 4789, '198.19.0.13', () => s.close()));";
    execFileSync('ip', ['netns', 'exec', 'ferry-client', process.execPath, '-e', send]);
    assert.ok(vxlanFirewall('host3')!.dropped >= before + 2, JSON.stringify(vxlanFirewall('host3')));
  });

  test('back to its home segment: the tunnel is gone from both hosts', async () => {
    const echo = echoClient(ip, 10);
    await waitFor('echo connected', () => echo.lines.includes('connected'), 10000);
    await move('web', 'host3', 'host1');
    assert.deepEqual(await tunnels('host1'), []);
    assert.deepEqual(await tunnels('host3'), []);
    assert.deepEqual(links('host1'), []);
    assert.deepEqual(links('host3'), []);
    assert.equal(vxlanFirewall('host1'), null, 'the firewall went with the last tunnel');
    assert.equal(vxlanFirewall('host3'), null);
    await echoWhole(echo);
    assert.equal(guestStatus(ip).bootId, bootId);
  });

  test('moving on between two away hosts: the tunnel follows, the old host lets go; a stop takes it down everywhere', async () => {
    // host2's "lab" network moves to segment 2 as well.
    await reconfigure('host2', (c) => {
      c.networks.lab = { bridge: 'br1', subnet: '198.18.1.0/24', address: '198.18.1.12' };
    });
    await move('web', 'host1', 'host3');
    // Only a host the tunnel reaches may change its home end: host2 is not one yet.
    const h2 = labState().hosts[1];
    const r = tlsCall('host2', '198.19.0.11', h2.tlsDir, {
      id: 1,
      action: 'relocation.tunnel',
      params: { op: 'extend', uuid, nic: 0, remote: '198.19.0.12' },
    });
    assert.equal(r.lines[0].error.code, 'API_FORBIDDEN', JSON.stringify(r));
    // host3 is one, but may extend it only to a peer of host1's, not to any address.
    const h3 = labState().hosts[2];
    const r3 = tlsCall('host3', '198.19.0.11', h3.tlsDir, {
      id: 1,
      action: 'relocation.tunnel',
      params: { op: 'extend', uuid, nic: 0, remote: '198.19.0.99' },
    });
    assert.equal(r3.lines[0].error.code, 'API_FORBIDDEN', JSON.stringify(r3));
    assert.deepEqual((await tunnels('host1'))[0].remotes, ['198.19.0.13'], 'unchanged');

    const echo = echoClient(ip, 10);
    await waitFor('echo connected', () => echo.lines.includes('connected'), 10000);
    await move('web', 'host3', 'host2');
    const [home] = await tunnels('host1');
    assert.deepEqual(home.remotes, ['198.19.0.12'], 'the home end floods to host2 alone');
    assert.deepEqual(await tunnels('host3'), []);
    assert.deepEqual(links('host3'), []);
    assert.equal((await tunnels('host2'))[0].end, 'away');
    await echoWhole(echo);
    assert.equal(guestStatus(ip).bootId, bootId);

    await ok(['-H', 'host2', 'destroy', 'web']);
    await waitFor('tunnels gone', async () => (await tunnels('host1')).length === 0 && (await tunnels('host2')).length === 0, 10000);
    assert.deepEqual(links('host1'), []);
    assert.deepEqual(links('host2'), []);
  });

  test('a host with tunnels off refuses another subnet, naming the setting', async () => {
    await ok(['-H', 'host2', 'start', 'web']);
    // On host2 now (segment 2), web lives on its local segment: host1 is the other subnet.
    await reconfigure('host1', (c) => {
      c.relocation.tunnels = false;
    });
    const r = await fails(['-H', 'host2', 'migrate', 'web', 'host1', '--live', '--json'], 'MIGRATION_DEST_L2');
    assert.match(r.json.error.message, /relocation\.tunnels is false/);
    assert.equal((await ok(['-H', 'host2', 'info', 'web', '--json'])).state, 'running');
    assert.deepEqual(await tunnels('host1'), []);
    assert.deepEqual(await tunnels('host2'), []);
  });
});
