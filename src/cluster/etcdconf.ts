/**
 * One etcd member's configuration, as the environment Debian's etcd-server reads
 * (/etc/default/etcd, ETCD_* variables): mutual TLS for clients and peers with the
 * host's certificate from ferry's CA, on the host's own address. `ferry cluster init`
 * writes it for a real host; `ferry lab up --cluster` starts each lab host's member
 * with it. etcd then accepts no client and no peer without a certificate of the CA.
 */
import path from 'node:path';
import { FerryError } from '../errors.ts';

export const ETCD_CLIENT_PORT = 2379;
export const ETCD_PEER_PORT = 2380;

export interface EtcdMemberSpec {
  name: string;
  /** The address this member listens on and is reached at (IPv4). */
  address: string;
}

export interface EtcdConfOptions {
  me: EtcdMemberSpec;
  members: EtcdMemberSpec[];
  dataDir: string;
  /** A ferry host TLS directory: ca-cert.pem, server-cert.pem, server-key.pem (its certificate names the address). */
  tlsDir: string;
  /** Distinguishes this cluster's members from another's on the same network. */
  token: string;
  /** new: the first start of a new cluster; existing: a member added to a running one. */
  state: 'new' | 'existing';
  /** Defaults 2379 and 2380 (the tests use free ones). */
  clientPort?: number;
  peerPort?: number;
}

const IPV4 = /^(25[0-5]|2[0-4]\d|1?\d?\d)(\.(25[0-5]|2[0-4]\d|1?\d?\d)){3}$/;
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export const clientUrl = (address: string, port = ETCD_CLIENT_PORT): string => `https://${address}:${port}`;
const peerUrl = (address: string, port = ETCD_PEER_PORT): string => `https://${address}:${port}`;

/** The member's ETCD_* environment; CLI_USAGE for a bad name, address or member list. */
export function etcdEnv(o: EtcdConfOptions): Record<string, string> {
  for (const m of [o.me, ...o.members]) {
    if (!NAME.test(m.name)) throw new FerryError('CLI_USAGE', `Bad etcd member name "${m.name}"`);
    if (!IPV4.test(m.address)) throw new FerryError('CLI_USAGE', `Bad etcd member address "${m.address}" (an IPv4 address)`);
  }
  if (!o.members.some((m) => m.name === o.me.name && m.address === o.me.address))
    throw new FerryError('CLI_USAGE', `The member list must include this member (${o.me.name}=${o.me.address})`);
  if (new Set(o.members.map((m) => m.name)).size !== o.members.length) throw new FerryError('CLI_USAGE', 'Member names must be unique');
  const f = (n: string): string => path.join(o.tlsDir, n);
  const [cp, pp] = [o.clientPort ?? ETCD_CLIENT_PORT, o.peerPort ?? ETCD_PEER_PORT];
  return {
    ETCD_NAME: o.me.name,
    ETCD_DATA_DIR: o.dataDir,
    ETCD_LISTEN_CLIENT_URLS: clientUrl(o.me.address, cp),
    ETCD_ADVERTISE_CLIENT_URLS: clientUrl(o.me.address, cp),
    ETCD_LISTEN_PEER_URLS: peerUrl(o.me.address, pp),
    ETCD_INITIAL_ADVERTISE_PEER_URLS: peerUrl(o.me.address, pp),
    ETCD_INITIAL_CLUSTER: o.members.map((m) => `${m.name}=${peerUrl(m.address, pp)}`).join(','),
    ETCD_INITIAL_CLUSTER_STATE: o.state,
    ETCD_INITIAL_CLUSTER_TOKEN: o.token,
    // Clients (ferryd, ferry) and peers alike show a certificate of ferry's CA.
    ETCD_CLIENT_CERT_AUTH: 'true',
    ETCD_TRUSTED_CA_FILE: f('ca-cert.pem'),
    ETCD_CERT_FILE: f('server-cert.pem'),
    ETCD_KEY_FILE: f('server-key.pem'),
    ETCD_PEER_CLIENT_CERT_AUTH: 'true',
    ETCD_PEER_TRUSTED_CA_FILE: f('ca-cert.pem'),
    ETCD_PEER_CERT_FILE: f('server-cert.pem'),
    ETCD_PEER_KEY_FILE: f('server-key.pem'),
    // A leader is missed after 1 s (etcd's default, for one network): well inside the lease TTL.
    ETCD_HEARTBEAT_INTERVAL: '100',
    ETCD_ELECTION_TIMEOUT: '1000',
    // Pre-vote (etcd 3.4's default is off): a member cut off from the others asks before it
    // campaigns, so its term stays where it was. Without it, a host whose link comes back
    // brings a higher term, deposes the healthy leader and leaves the cluster leaderless for
    // seconds; another host's lease then lapsed and fenced its HA domains (seen in CI).
    ETCD_PRE_VOTE: 'true',
    // ferry's clients ping every 2 s (cluster/etcd.ts), so a watch on a member cut off is
    // moved to another within seconds. etcd's default minimum (5 s) answers such pings
    // with GOAWAY "too many pings", and the client backs off to 8 s: a stalled watch then
    // held an HA restart for many seconds (18 s seen in the lab).
    ETCD_GRPC_KEEPALIVE_MIN_TIME: '1s',
    // The event log and records are small; history older than an hour is compacted away.
    ETCD_AUTO_COMPACTION_MODE: 'periodic',
    ETCD_AUTO_COMPACTION_RETENTION: '1',
    ETCD_LOGGER: 'zap',
    ETCD_LOG_OUTPUTS: 'stderr',
  };
}

/** The environment file Debian's etcd-server reads (/etc/default/etcd). */
export function etcdEnvFile(env: Record<string, string>): string {
  return (
    '# etcd member for a ferry cluster (written by `ferry cluster init`)\n' +
    Object.entries(env)
      .map(([k, v]) => `${k}="${v}"`)
      .join('\n') +
    '\n'
  );
}
