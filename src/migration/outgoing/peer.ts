/**
 * The source's dealings with other hosts outside the message sequence: finding and
 * dialling a peer, proving its data port is reachable, the tunnels' home ends (here or
 * at a home host), and letting go of a domain that now runs elsewhere.
 */
import net from 'node:net';
import dns from 'node:dns/promises';
import { FerryError } from '../../errors.ts';
import { ApiClient } from '../../api/client.ts';
import type { DomainConfig } from '../../domain/config.ts';
import type { DomainHandle } from '../host.ts';
import type { SourceJob } from '../jobs.ts';
import { isIpv4 } from '../preflight.ts';
import type { OutgoingRun, OutgoingSide, Peer } from './run.ts';
import { ask } from '../ask.ts';

/** DEST is a peer name (ferryd.json "peers", or a live host of the cluster), NAME, ADDRESS or ADDRESS:PORT. */
export async function resolvePeer(s: OutgoingSide, dest: string): Promise<{ name?: string; address: string; port: number }> {
  const mapped = s.host.peers()[dest];
  const spec = mapped ?? dest;
  const m = /^(\[[^\]]+\]|[^:]+)(?::(\d+))?$/.exec(spec);
  if (!m) throw new FerryError('HOST_UNKNOWN', `Cannot parse destination "${dest}": use NAME, ADDRESS or ADDRESS:PORT`);
  const port = m[2] ? Number(m[2]) : s.host.cfg.relocation.port;
  let address = m[1].replace(/^\[|\]$/g, '');
  if (net.isIP(address) === 0) {
    try {
      address = (await dns.lookup(address)).address;
    } catch {
      throw new FerryError(
        'HOST_UNKNOWN',
        `Cannot resolve destination "${dest}": not a known peer (ferryd.json "peers") nor a resolvable name`,
      );
    }
  }
  return { name: mapped ? dest : net.isIP(m[1]) ? undefined : m[1], address, port };
}

/**
 * Opens the control channel. The peer's name is the CN of the certificate it proved
 * it holds (checked against the cluster CA and the name or address dialled), so no
 * hello round trip is needed; a refusal by the peer arrives as the first request's error.
 */
export async function dialPeer(s: OutgoingSide, dest: string): Promise<{ client: ApiClient; peer: Peer }> {
  const r = await resolvePeer(s, dest);
  const client = await ApiClient.connect(
    { kind: 'tls', host: r.address, port: r.port, tlsDir: s.host.cfg.tlsDir, label: dest, servername: r.name },
    5000,
  );
  const name = client.peerName();
  if (!name) {
    client.close();
    throw new FerryError('TLS_REFUSED', `${dest} presented a certificate without a host name (CN)`);
  }
  return { client, peer: { name, address: r.address, port: r.port } };
}

/** A new control connection to the job's peer (the run's is gone: a restart, a lost answer). */
export async function redial(s: OutgoingSide, j: SourceJob): Promise<ApiClient> {
  return (await s.connect(`${j.peer.address}:${j.peer.port}`)).client;
}

/** A firewall that drops the data port makes connect hang: give up in 3 s and name the range. */
export function probePort(run: OutgoingRun): Promise<void> {
  const { address, port } = { address: run.begun!.dataAddress, port: run.begun!.dataPort };
  const h = run.side.host;
  const [a, b] = h.cfg.relocation.dataPorts;
  return new Promise((resolve, reject) => {
    const sock = net.createConnection({ host: address, port });
    const fail = (why: string): void => {
      sock.destroy();
      reject(
        new FerryError(
          'MIGRATION_DEST_PORT',
          `Cannot migrate domain "${run.p.domain}": ${run.peer.name}'s migration data port ${address}:${port} is not reachable from ${h.cfg.name} (${why}); open TCP ${a}-${b} on ${run.peer.name} to ${h.cfg.name} (see README "Firewalls")`,
          { port, range: [a, b] },
        ),
      );
    };
    const t = setTimeout(() => fail('no answer within 3 s'), 3000);
    sock.once('connect', () => {
      clearTimeout(t);
      sock.destroy();
      resolve();
    });
    sock.once('error', (e) => {
      clearTimeout(t);
      fail((e as NodeJS.ErrnoException).code ?? e.message);
    });
  });
}

/**
 * Before the stream: each NIC the destination carries through a tunnel gets the
 * destination listed at its home end (here, or at the home host of a tunnel this
 * host holds), so the destination's ARP probe at Prepare reaches the segment.
 */
export async function extendTunnels(run: OutgoingRun): Promise<void> {
  const { j, side: s } = run;
  const c = run.dom.rec.config;
  j.tunnels = [];
  for (const t of run.begun?.tunnels ?? []) {
    const home = Number.isInteger(t.nic) ? run.homes[t.nic] : undefined;
    if (!home || t.vni !== home.vni || !isIpv4(t.address))
      throw new FerryError(
        'MIGRATION_PROTOCOL',
        `${j.peer.name} asked for a tunnel that does not match domain "${c.name}" (NIC ${String(t.nic).slice(0, 8)}, VNI ${String(t.vni).slice(0, 12)})`,
      );
    // Listed before it is made: an abandon retracts it whatever happens next.
    j.tunnels.push({ nic: t.nic, home: home.host, remote: t.address });
    s.store.saveLater(j);
    await tunnelAt(s, home.host, { op: 'extend', uuid: c.uuid, nic: t.nic, remote: t.address, config: c });
    run.policy.push(
      `network ${c.nics[t.nic].network}: segment ${home.subnet} carried to ${j.peer.name} through a VXLAN tunnel (VNI ${home.vni}) from ${home.host}`,
    );
  }
}

/** The move will not happen: the home ends stop flooding to the destination this move listed there. */
export async function retractTunnels(s: OutgoingSide, j: SourceJob): Promise<void> {
  for (const t of j.tunnels ?? []) {
    await tunnelAt(s, t.home, { op: 'retract', uuid: j.uuid, nic: t.nic, remote: t.remote }).catch((e) =>
      s.log.warn('tunnel not retracted', { jobId: j.jobId, home: t.home, error: String(e) }),
    );
  }
}

/** A change of a home end: which NIC of which domain floods to which remote (config: for extend). */
interface HomeChange {
  op: 'extend' | 'retract';
  uuid: string;
  nic: number;
  remote: string;
  config?: DomainConfig;
}

/** A home end's change: here if this host is the home, else asked of the home host (relocation.tunnel). */
async function tunnelAt(s: OutgoingSide, home: string, ch: HomeChange): Promise<void> {
  const h = s.host;
  if (home === h.cfg.name) {
    if (ch.op === 'extend') h.extendHome(ch.config!, ch.nic, ch.remote);
    else h.retractHome(ch.uuid, ch.nic, ch.remote);
    return;
  }
  const { client } = await s.connect(home);
  try {
    await ask(client, 'relocation.tunnel', { op: ch.op, uuid: ch.uuid, nic: ch.nic, remote: ch.remote }, { timeoutMs: 10000 });
  } finally {
    client.close();
  }
}

/** The guest runs on the destination: the source QEMU ends, and an away end here goes (its home stops flooding here). */
export async function retire(s: OutgoingSide, dom: DomainHandle, j: SourceJob): Promise<void> {
  await s.host.retireMigrated(dom, j.peer);
  await leaveTunnels(s, j.uuid, j.domain);
}

/** The domain no longer runs here (moved on, or stopped): its away ends go, and their homes stop flooding here. */
export async function leaveTunnels(s: OutgoingSide, uuid: string, domain: string): Promise<void> {
  for (const t of s.host.closeAway(uuid)) {
    await tunnelAt(s, t.home.host, { op: 'retract', uuid, nic: t.nic, remote: s.host.cfg.relocation.address }).catch((e) =>
      s.log.warn('tunnel home end not told; it keeps flooding here until told', { domain, home: t.home.host, error: String(e) }),
    );
  }
}
