/**
 * `ferry lab up --cluster`: one etcd member in each host's namespace, on the host's
 * migration-network address (the lab's management network), with the host's own
 * certificate from the lab's CA: mutual TLS for clients and peers, as
 * `ferry cluster init` configures a real host. Cutting a host's links is then a real
 * partition for etcd and ferryd alike.
 */
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { FerryError } from '../errors.ts';
import { clientUrl, etcdEnv, type EtcdMemberSpec } from '../cluster/etcdconf.ts';
import { CLUSTER_DEFAULTS } from '../daemon/config.ts';

export interface EtcdHost {
  name: string;
  namespace: string;
  migAddress: string;
  configPath: string;
  tlsDir: string;
}

const dirOf = (h: EtcdHost): string => path.dirname(h.configPath);

/** The endpoints every ferryd of the lab is given. */
export const labEndpoints = (hosts: EtcdHost[]): string[] => hosts.map((h) => clientUrl(h.migAddress));

/** Starts (or restarts, from its data directory) host h's etcd member; its pid. */
export function startEtcd(h: EtcdHost, all: EtcdHost[]): number {
  const members: EtcdMemberSpec[] = all.map((x) => ({ name: x.name, address: x.migAddress }));
  const dataDir = path.join(dirOf(h), 'etcd');
  const fresh = !fs.existsSync(path.join(dataDir, 'member'));
  fs.mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  const env = etcdEnv({
    me: { name: h.name, address: h.migAddress },
    members,
    dataDir,
    tlsDir: h.tlsDir,
    token: 'ferry-lab',
    state: fresh ? 'new' : 'existing',
  });
  const out = fs.openSync(path.join(dirOf(h), 'etcd.out'), 'a');
  const child = spawn('ip', ['netns', 'exec', h.namespace, 'etcd'], {
    env: { PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin', ...env },
    detached: true,
    stdio: ['ignore', out, out],
  });
  fs.closeSync(out);
  child.unref();
  // `ip netns exec` execs etcd: the child's pid is etcd's.
  return child.pid!;
}

/** Adds the cluster section to a lab host's ferryd.json (before its ferryd starts). */
export function writeClusterConfig(h: EtcdHost, endpoints: string[]): void {
  const cfg = JSON.parse(fs.readFileSync(h.configPath, 'utf8')) as Record<string, unknown>;
  cfg.cluster = { endpoints, ...CLUSTER_DEFAULTS };
  fs.writeFileSync(h.configPath, JSON.stringify(cfg, null, 2) + '\n');
}

/** Waits until every member answers a health check (from the client station, with the admin certificate). */
export async function waitEtcdHealthy(o: {
  clientNs: string;
  endpoints: string[];
  adminTlsDir: string;
  timeoutMs?: number;
}): Promise<void> {
  const deadline = Date.now() + (o.timeoutMs ?? 30000);
  let last = '';
  while (Date.now() < deadline) {
    try {
      execFileSync(
        'ip',
        [
          'netns',
          'exec',
          o.clientNs,
          'etcdctl',
          `--endpoints=${o.endpoints.join(',')}`,
          `--cacert=${path.join(o.adminTlsDir, 'ca-cert.pem')}`,
          `--cert=${path.join(o.adminTlsDir, 'client-cert.pem')}`,
          `--key=${path.join(o.adminTlsDir, 'client-key.pem')}`,
          '--command-timeout=2s',
          'endpoint',
          'health',
        ],
        { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ETCDCTL_API: '3' } },
      );
      return;
    } catch (e) {
      last = (e as { stderr?: Buffer }).stderr?.toString().trim().split('\n').pop() ?? String(e);
      await new Promise((r) => setTimeout(r, 250));
    }
  }
  throw new FerryError('LAB_FAILED', `the lab's etcd members did not all become healthy: ${last}`);
}
