/**
 * `ferry lab`: a cluster of real hosts on one machine.
 *
 *   ferry-switch ── sw0 (L2 segment 1, 198.18.0.0/24) ──┬── up0 ─ br0 [ferry-host1 198.18.0.11] ─ taps of host1's domains
 *                 │                                     ├── up0 ─ br0 [ferry-host2 198.18.0.12] ─ taps ...
 *                 │                                     └── eth0 [ferry-client 198.18.0.2]
 *                 ├ sw1 (segment 2, 198.18.1.0/24, with --segments 2) ── up1 ─ br1 of every host, eth1 of the client
 *                 └ swm (migration network, 198.19.0.0/24) ── mig0 of every host (198.19.0.1N), ethm of the client (.2)
 *
 * The migration network is apart from the guests' segments: each ferryd's relocation
 * port and data ports listen on its mig0 address only, and an nftables rule in every
 * host drops anything for that network arriving from elsewhere (a guest routing
 * through its host's bridge address). The client stands for the operators' station:
 * it is on both, and holds the lab's admin certificate.
 *
 * Every host runs its own ferryd with its own state dir, config and certificate from
 * the lab's CA. With --segments 2 the last host's "lab" network is bridged to segment
 * 2 instead: a destination whose network is another L2 segment and subnet, which a
 * guest reaches through the VXLAN ferry builds over the migration network (MTU 1550).
 * Everything the lab makes is named ferry-* (namespaces) or lives inside them, and
 * its files live under the lab directory, so `lab down` can find all of it, even
 * after a crash.
 */
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { FerryError } from '../errors.ts';
import { writeJsonAtomic } from '../util/fsx.ts';
import { REPO_ROOT } from '../util/paths.ts';
import { caInit, issueHostCert } from '../tls/ca.ts';
import { pidAlive, killAndWait } from '../qemu/process.ts';
import { ApiClient } from '../api/client.ts';
import { LAB_STATE_FILE } from './hosts.ts';
import { labEndpoints, startEtcd, waitEtcdHealthy, writeClusterConfig } from './etcd.ts';

export const LAB_DIR = process.env.FERRY_LAB_DIR ?? path.dirname(LAB_STATE_FILE);
export const NS_PREFIX = 'ferry-';
export const SEGMENTS = ['198.18.0', '198.18.1'] as const;
export const CLIENT_ADDR = (seg: number): string => `${SEGMENTS[seg]}.2`;
export const HOST_ADDR = (seg: number, i: number): string => `${SEGMENTS[seg]}.${10 + i}`;
export const GUEST_IP_RANGE = [100, 199] as const;
/** The migration network (relocation and data ports), apart from every guest segment. */
export const MIG_NET = '198.19.0';
export const MIG_ADDR = (i: number): string => `${MIG_NET}.${10 + i}`;
export const CLIENT_MIG_ADDR = `${MIG_NET}.2`;
export const MIG_MTU = 1550;

/** Drops traffic for the migration network that arrives on any other interface (but lo: a host's traffic to itself). */
const MIG_FIREWALL = `table inet ferry-lab {
  chain input {
    type filter hook input priority 0; policy accept;
    iifname != { "mig0", "lo" } ip daddr ${MIG_NET}.0/24 drop
  }
}
`;

export interface LabHost {
  name: string;
  namespace: string;
  /** On the guests' segment (L2 probes, pings). */
  address: string;
  /** On the migration network: ferryd's relocation and data ports. */
  migAddress: string;
  apiSocket: string;
  stateDir: string;
  configPath: string;
  tlsDir: string;
  pid: number;
  segment: number;
  /** --cluster: this host's etcd member. */
  etcdPid?: number;
}

export interface LabState {
  createdAt: string;
  dir: string;
  segments: number;
  hostMemoryMiB: number | null;
  hosts: LabHost[];
  client: { namespace: string; address: string; migAddress: string };
  caDir: string;
  adminTlsDir: string;
  /** The hosts' shared storage pool (every host's storage.pools has it). */
  poolDir: string;
  /** --cluster: etcd's client URLs (one member per host); null: standalone hosts. */
  cluster?: { endpoints: string[] } | null;
  /** --link-rate: every host's migration link shaped to this many bits/s; null: unshaped veths. */
  link?: { rateBitsPerS: number } | null;
}

/** tc's rate spelling ("1gbit", "500mbit", "100kbit") in bits/s, or null if it is not one. */
export function parseLinkRate(v: string): number | null {
  const m = /^(\d+(?:\.\d+)?)(k|m|g)bit$/i.exec(v);
  if (!m) return null;
  return Math.round(Number(m[1]) * { k: 1e3, m: 1e6, g: 1e9 }[m[2].toLowerCase() as 'k' | 'm' | 'g']);
}

function sh(cmd: string, args: string[], opts: { ignore?: boolean } = {}): string {
  try {
    return execFileSync(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] }).toString();
  } catch (e) {
    if (opts.ignore) return '';
    const err = e as { stderr?: Buffer; message: string };
    throw new FerryError('LAB_FAILED', `${cmd} ${args.join(' ')}: ${err.stderr?.toString().trim() || err.message}`);
  }
}

const ipns = (ns: string, ...args: string[]): string => sh('ip', ['-n', ns, ...args]);

export function labNamespaces(): string[] {
  return sh('ip', ['netns', 'list'], { ignore: true })
    .split('\n')
    .map((l) => l.split(' ')[0])
    .filter((n) => n.startsWith(NS_PREFIX));
}

export function readLab(): LabState | undefined {
  try {
    return JSON.parse(fs.readFileSync(LAB_STATE_FILE, 'utf8')) as LabState;
  } catch {
    return undefined;
  }
}

export function requireLab(): LabState {
  const s = readLab();
  if (!s) throw new FerryError('LAB_NOT_UP', 'The lab is not up: run `ferry lab up` first');
  return s;
}

/** Node and the ferry entry points, so lab daemons run the same code as the CLI. */
const repoRoot = REPO_ROOT;
export const FERRYD_BIN = path.join(repoRoot, 'bin', 'ferryd.mjs');
export const FERRY_BIN = path.join(repoRoot, 'bin', 'ferry.mjs');
export const IMAGES_DIR = process.env.FERRY_IMAGES_DIR ?? path.join(repoRoot, 'images');

function addVeth(nsA: string, a: string, nsB: string, b: string): void {
  sh('ip', ['link', 'add', a, 'netns', nsA, 'type', 'veth', 'peer', 'name', b, 'netns', nsB]);
}

function makeBridge(ns: string, br: string, mac: string): void {
  ipns(ns, 'link', 'add', br, 'type', 'bridge', 'forward_delay', '0', 'stp_state', '0');
  // A bridge without a MAC of its own takes the lowest of its ports', so every tap that
  // comes or goes could change the host's address on the segment and leave its peers'
  // ARP caches pointing nowhere for seconds. Pin it.
  ipns(ns, 'link', 'set', br, 'address', mac);
  // Stale forwarding entries black-hole a migrated MAC: keep ageing short as well as flushing.
  ipns(ns, 'link', 'set', br, 'type', 'bridge', 'ageing_time', '3000');
  ipns(ns, 'link', 'set', br, 'up');
}

export interface UpOptions {
  hosts: number;
  segments: number;
  hostMemoryMiB?: number;
  /** Give each host's state directory a tmpfs of this size, so that it can be filled (fault injection). */
  stateMiB?: number;
  /** Hosts accept plain-TCP migration streams (relocation.allowInsecure): the bench's plain contender. */
  allowInsecure?: boolean;
  /** Cluster mode: an etcd member in every host (at least 3) and every ferryd's cluster section. */
  cluster?: boolean;
  /** Host name → its "cpuCeiling" (a mixed fleet's older CPUs, on one machine). */
  cpuCeiling?: Record<string, string>;
  /** Every host's limits.movesOut: outgoing moves at once (more wait in line). */
  movesOut?: number;
  /** Every host's limits.incomingTotal: incoming moves at once (more are refused busy, and their sources wait). */
  movesIn?: number;
  /** Every host's limits.reservationS: how long an incoming move waits for its source's next step. */
  reservationS?: number;
  /** Shape every host's migration link (mig0) to this rate, both ways: tc's spelling, as "1gbit" or "500mbit". */
  linkRate?: string;
  progress?: (msg: string) => void;
}

/** The options of `ferry lab up`, each refused with CLI_USAGE; a lab already up is LAB_FAILED. */
function checkUp(o: UpOptions): void {
  if (!Number.isInteger(o.hosts) || o.hosts < 1 || o.hosts > 16) throw new FerryError('CLI_USAGE', `--hosts must be 1..16, got ${o.hosts}`);
  if (o.segments !== 1 && o.segments !== 2) throw new FerryError('CLI_USAGE', `--segments must be 1 or 2, got ${o.segments}`);
  if (o.cluster && o.hosts < 3)
    throw new FerryError(
      'CLI_USAGE',
      `--cluster needs at least 3 hosts (etcd keeps a quorum through one host's loss only from 3), got ${o.hosts}`,
    );
  if (o.hostMemoryMiB !== undefined && (!Number.isInteger(o.hostMemoryMiB) || o.hostMemoryMiB < 16))
    throw new FerryError('CLI_USAGE', '--host-memory must be an integer number of MiB (at least 16)');
  for (const h of Object.keys(o.cpuCeiling ?? {}))
    if (!/^host([1-9]|1[0-6])$/.test(h) || Number(h.slice(4)) > o.hosts)
      throw new FerryError('CLI_USAGE', `--cpu-ceiling names ${h}, which is not one of the lab's hosts (host1..host${o.hosts})`);
  if (o.movesOut !== undefined && (!Number.isInteger(o.movesOut) || o.movesOut < 1 || o.movesOut > 64))
    throw new FerryError('CLI_USAGE', '--moves-out must be a whole number from 1 to 64');
  if (o.movesIn !== undefined && (!Number.isInteger(o.movesIn) || o.movesIn < 1 || o.movesIn > 64))
    throw new FerryError('CLI_USAGE', '--moves-in must be a whole number from 1 to 64');
  if (o.reservationS !== undefined && (!Number.isInteger(o.reservationS) || o.reservationS < 5 || o.reservationS > 3600))
    throw new FerryError('CLI_USAGE', '--reservation must be a whole number of seconds from 5 to 3600');
  if (o.linkRate !== undefined) {
    const r = parseLinkRate(o.linkRate);
    if (r === null || r < 1e6 || r > 100e9)
      throw new FerryError('CLI_USAGE', `--link-rate must be a rate from 1mbit to 100gbit, as 1gbit or 500mbit, got "${o.linkRate}"`);
  }
  if (o.stateMiB !== undefined && (!Number.isInteger(o.stateMiB) || o.stateMiB < 4 || o.stateMiB > 4096))
    throw new FerryError('CLI_USAGE', '--state-size must be an integer number of MiB from 4 to 4096');
  if (readLab() || labNamespaces().length)
    throw new FerryError('LAB_FAILED', 'A lab is already up (or left over): run `ferry lab down` first');
}

/**
 * A host's migration link as a real one of `bits`/s, both ways: a token bucket (tc tbf)
 * on the host's mig0 for what it sends and on the switch's end for what it receives, as
 * a NIC of that speed would. The bucket holds 4 ms of the rate (at least 64 KiB), enough
 * for TCP to fill the link without letting bursts run at the veth's speed for long.
 * (No added delay: netem, tc's delay, is not in every kernel, this lab machine's included.)
 */
function shapeLink(host: { ns: string; dev: string }, sw: { ns: string; dev: string }, bits: number): void {
  const burst = Math.max(65536, Math.round((bits / 8) * 0.004));
  for (const end of [host, sw])
    sh('ip', [
      'netns',
      'exec',
      end.ns,
      'tc',
      'qdisc',
      'add',
      'dev',
      end.dev,
      'root',
      'tbf',
      'rate',
      `${bits}bit`,
      'burst',
      String(burst),
      'latency',
      '100ms',
    ]);
}

/** The switch namespace (one bridge per segment and the migration network's) and the client station on all of them. */
function makeSwitch(segments: number): { sw: string; client: string } {
  const sw = `${NS_PREFIX}switch`;
  const client = `${NS_PREFIX}client`;
  for (const ns of [sw, client]) sh('ip', ['netns', 'add', ns]);
  for (let seg = 0; seg < segments; seg++) makeBridge(sw, `sw${seg}`, `02:fe:00:${seg}0:00:01`);
  for (let seg = 0; seg < segments; seg++) {
    addVeth(sw, `cls${seg}`, client, `eth${seg}`);
    ipns(sw, 'link', 'set', `cls${seg}`, 'master', `sw${seg}`, 'up');
    ipns(client, 'addr', 'add', `${CLIENT_ADDR(seg)}/24`, 'dev', `eth${seg}`);
    ipns(client, 'link', 'set', `eth${seg}`, 'up');
  }
  makeBridge(sw, 'swm', '02:fe:00:f0:00:01');
  addVeth(sw, 'clsm', client, 'ethm');
  ipns(sw, 'link', 'set', 'clsm', 'mtu', String(MIG_MTU), 'master', 'swm', 'up');
  ipns(client, 'link', 'set', 'ethm', 'mtu', String(MIG_MTU));
  ipns(client, 'addr', 'add', `${CLIENT_MIG_ADDR}/24`, 'dev', 'ethm');
  ipns(client, 'link', 'set', 'ethm', 'up');
  ipns(client, 'link', 'set', 'lo', 'up');
  return { sw, client };
}

/** Host i: its namespace, bridges on the segments, migration link and firewall, certificate and ferryd.json (ferryd not started yet). */
function makeHost(i: number, at: { o: UpOptions; sw: string; caDir: string; poolDir: string }): LabHost {
  const { o, sw, caDir, poolDir } = at;
  const name = `host${i}`;
  const ns = `${NS_PREFIX}${name}`;
  sh('ip', ['netns', 'add', ns]);
  ipns(ns, 'link', 'set', 'lo', 'up');
  // Answer ARP only for addresses of the interface asked, as a careful operator
  // configures a host on several segments (ferry's L2 probe relies on it).
  sh('ip', ['netns', 'exec', ns, 'sysctl', '-q', '-w', 'net.ipv4.conf.all.arp_ignore=1', 'net.ipv4.conf.all.arp_announce=2']);
  for (let seg = 0; seg < o.segments; seg++) {
    addVeth(sw, `h${i}s${seg}`, ns, `up${seg}`);
    ipns(sw, 'link', 'set', `h${i}s${seg}`, 'master', `sw${seg}`, 'up');
    makeBridge(ns, `br${seg}`, `02:fe:00:${seg}0:${i.toString(16).padStart(2, '0')}:01`);
    ipns(ns, 'link', 'set', `up${seg}`, 'master', `br${seg}`, 'up');
    ipns(ns, 'addr', 'add', `${HOST_ADDR(seg, i)}/24`, 'dev', `br${seg}`);
  }
  addVeth(sw, `h${i}m`, ns, 'mig0');
  // 1550 bytes on the migration network, so a VXLAN that carries a guest's segment
  // (daemon/tunnels.ts, 50 bytes of headers) passes its 1500-byte frames whole.
  ipns(sw, 'link', 'set', `h${i}m`, 'mtu', String(MIG_MTU), 'master', 'swm', 'up');
  ipns(ns, 'addr', 'add', `${MIG_ADDR(i)}/24`, 'dev', 'mig0');
  ipns(ns, 'link', 'set', 'mig0', 'mtu', String(MIG_MTU), 'up');
  if (o.linkRate) shapeLink({ ns, dev: 'mig0' }, { ns: sw, dev: `h${i}m` }, parseLinkRate(o.linkRate)!);
  execFileSync('ip', ['netns', 'exec', ns, 'nft', '-f', '-'], { input: MIG_FIREWALL, stdio: ['pipe', 'ignore', 'pipe'] });
  const segment = o.segments === 2 && i === o.hosts && o.hosts > 1 ? 1 : 0;
  const dir = path.join(LAB_DIR, name);
  const tlsDir = path.join(dir, 'tls');
  issueHostCert(name, { caDir, outDir: tlsDir, ips: [MIG_ADDR(i)] });
  const cfg = {
    name,
    stateDir: path.join(dir, 'state'),
    apiSocket: path.join(dir, 'ferryd.sock'),
    tlsDir,
    // On the migration network only; whole names, and hosts only from its addresses.
    relocation: {
      address: MIG_ADDR(i),
      port: 8002,
      hostsAllow: [`host[0-9]+@${MIG_NET}.0/24`],
      dataPorts: [49152, 49215],
      ...(o.allowInsecure ? { allowInsecure: true } : {}),
    },
    // The shared pool (as NFS would be), and a directory of the host's own (local disks, --copy-storage).
    storage: { pools: [IMAGES_DIR, poolDir], saveDir: path.join(dir, 'save'), localDir: path.join(dir, 'disks') },
    networks: {
      lab: { bridge: `br${segment}`, subnet: `${SEGMENTS[segment]}.0/24`, address: HOST_ADDR(segment, i) },
      ...(o.segments === 2 ? { lab2: { bridge: 'br1', subnet: `${SEGMENTS[1]}.0/24`, address: HOST_ADDR(1, i) } } : {}),
    },
    imagesDir: IMAGES_DIR,
    peers: Object.fromEntries(Array.from({ length: o.hosts }, (_, k) => [`host${k + 1}`, `${MIG_ADDR(k + 1)}:8002`])),
    // Prometheus metrics on the migration network, where the client (the operators' station) scrapes them.
    metrics: `${MIG_ADDR(i)}:9477`,
    ...(o.hostMemoryMiB ? { memory: o.hostMemoryMiB } : {}),
    ...(o.cpuCeiling?.[name] ? { cpuCeiling: o.cpuCeiling[name] } : {}),
    ...(o.movesOut || o.movesIn || o.reservationS
      ? {
          limits: {
            ...(o.movesOut ? { movesOut: o.movesOut } : {}),
            ...(o.movesIn ? { incomingTotal: o.movesIn } : {}),
            ...(o.reservationS ? { reservationS: o.reservationS } : {}),
          },
        }
      : {}),
  };
  fs.mkdirSync(dir, { recursive: true, mode: 0o711 });
  fs.chmodSync(dir, 0o711);
  if (o.stateMiB) {
    fs.mkdirSync(cfg.stateDir, { mode: 0o700 });
    sh('mount', ['-t', 'tmpfs', '-o', `size=${o.stateMiB}m,mode=0700`, `ferry-lab-${name}`, cfg.stateDir]);
  }
  writeJsonAtomic(path.join(dir, 'ferryd.json'), cfg);
  return {
    name,
    namespace: ns,
    address: HOST_ADDR(0, i),
    migAddress: MIG_ADDR(i),
    apiSocket: cfg.apiSocket,
    stateDir: cfg.stateDir,
    configPath: path.join(dir, 'ferryd.json'),
    tlsDir,
    pid: 0,
    segment,
  };
}

export async function labUp(o: UpOptions): Promise<LabState> {
  checkUp(o);
  const say = o.progress ?? (() => undefined);
  // 0711: the hosts' QEMU user may pass through to its own directories, nothing more.
  fs.mkdirSync(LAB_DIR, { recursive: true, mode: 0o711 });
  fs.chmodSync(LAB_DIR, 0o711);
  try {
    say('namespaces and switch');
    const { sw, client } = makeSwitch(o.segments);

    say('certificates');
    const caDir = path.join(LAB_DIR, 'ca');
    caInit(caDir, { name: 'ferry lab CA', force: true });
    const adminTlsDir = path.join(LAB_DIR, 'admin-tls');
    issueHostCert('admin', { caDir, outDir: adminTlsDir, role: 'admin' });
    // Shared storage of the lab: every host sees it at the same path (as NFS would be).
    const poolDir = path.join(LAB_DIR, 'pool');
    fs.mkdirSync(poolDir, { recursive: true, mode: 0o700 });

    const hosts: LabHost[] = [];
    for (let i = 1; i <= o.hosts; i++) {
      say(`host${i}: namespace, bridges, ferryd`);
      hosts.push(makeHost(i, { o, sw, caDir, poolDir }));
    }
    const state: LabState = {
      createdAt: new Date().toISOString(),
      dir: LAB_DIR,
      segments: o.segments,
      hostMemoryMiB: o.hostMemoryMiB ?? null,
      hosts,
      client: { namespace: client, address: CLIENT_ADDR(0), migAddress: CLIENT_MIG_ADDR },
      caDir,
      adminTlsDir,
      poolDir,
      cluster: null,
      link: o.linkRate ? { rateBitsPerS: parseLinkRate(o.linkRate)! } : null,
    };
    writeJsonAtomic(LAB_STATE_FILE, state);
    if (o.cluster) {
      say('etcd: one member per host, mutual TLS');
      const endpoints = labEndpoints(hosts);
      for (const h of hosts) {
        writeClusterConfig(h, endpoints);
        h.etcdPid = startEtcd(h, hosts);
      }
      state.cluster = { endpoints };
      writeJsonAtomic(LAB_STATE_FILE, state);
      await waitEtcdHealthy({ clientNs: client, endpoints, adminTlsDir });
    }
    await Promise.all(
      hosts.map(async (h) => {
        h.pid = await startFerryd(h);
      }),
    );
    writeJsonAtomic(LAB_STATE_FILE, state);
    flushBridges(state);
    return state;
  } catch (e) {
    await labDown();
    throw e;
  }
}

/** Starts a host's ferryd in its namespace and waits until its API answers. */
export async function startFerryd(h: LabHost): Promise<number> {
  const out = fs.openSync(path.join(path.dirname(h.configPath), 'ferryd.out'), 'a');
  const child = spawn('ip', ['netns', 'exec', h.namespace, process.execPath, FERRYD_BIN, '--config', h.configPath], {
    detached: true,
    stdio: ['ignore', out, out],
  });
  fs.closeSync(out);
  child.unref();
  let exitCode: number | null = null;
  child.on('exit', (c) => {
    exitCode = c ?? -1;
  });
  const deadline = Date.now() + 60000; // start-up probes can be starved for a while on a loaded 2-core host
  while (Date.now() < deadline) {
    if (exitCode !== null) {
      const tail = fs
        .readFileSync(path.join(path.dirname(h.configPath), 'ferryd.out'), 'utf8')
        .trim()
        .split('\n')
        .slice(-3)
        .join(' | ');
      throw new FerryError('LAB_FAILED', `ferryd on ${h.name} exited (${exitCode}): ${tail}`);
    }
    try {
      const c = await ApiClient.connect({ kind: 'unix', path: h.apiSocket, label: h.name }, 1000);
      await c.request('api.hello', {}, 2000);
      c.close();
      // `ip netns exec` execs node, so the child's pid is ferryd's.
      return child.pid!;
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  throw new FerryError('LAB_FAILED', `ferryd on ${h.name} did not answer within 30 s`);
}

export async function restartFerryd(name: string): Promise<LabHost> {
  const s = requireLab();
  const h = s.hosts.find((x) => x.name === name);
  if (!h) throw new FerryError('HOST_UNKNOWN', `No lab host "${name}" (hosts: ${s.hosts.map((x) => x.name).join(', ')})`);
  if (h.pid && isFerryd(h.pid)) await killAndWait(h.pid, 3000);
  h.pid = await startFerryd(h);
  writeJsonAtomic(LAB_STATE_FILE, s);
  return h;
}

/** Starts a lab host's etcd member again (after a test killed it), from its data directory. */
export function restartEtcd(name: string): LabHost {
  const s = requireLab();
  const h = s.hosts.find((x) => x.name === name);
  if (!h) throw new FerryError('HOST_UNKNOWN', `No lab host "${name}" (hosts: ${s.hosts.map((x) => x.name).join(', ')})`);
  if (!s.cluster) throw new FerryError('CLI_USAGE', 'The lab runs standalone hosts (`ferry lab up --cluster` for etcd)');
  if (h.etcdPid && pidAlive(h.etcdPid)) throw new FerryError('CLI_USAGE', `etcd on ${name} runs (pid ${h.etcdPid})`);
  h.etcdPid = startEtcd(h, s.hosts);
  writeJsonAtomic(LAB_STATE_FILE, s);
  return h;
}

/**
 * Cuts (or restores) every link of a lab host: its ports on the switch, for each
 * guest segment and the migration network. To everyone else the host is gone; it
 * still runs, with its domains, its ferryd and its etcd member: a real partition.
 */
export function labLink(name: string, up: boolean): { host: string; links: string[]; up: boolean } {
  const s = requireLab();
  const i = s.hosts.findIndex((x) => x.name === name);
  if (i < 0) throw new FerryError('HOST_UNKNOWN', `No lab host "${name}" (hosts: ${s.hosts.map((x) => x.name).join(', ')})`);
  const n = i + 1;
  const links = [...Array.from({ length: s.segments }, (_, seg) => `h${n}s${seg}`), `h${n}m`];
  for (const l of links) sh('ip', ['-n', `${NS_PREFIX}switch`, 'link', 'set', l, up ? 'up' : 'down']);
  if (up) flushBridges(s);
  return { host: name, links, up };
}

/** A lab host's etcd member (cluster labs) is alive: its pid runs etcd. */
export function isEtcd(pid: number | undefined): boolean {
  if (!pid || !pidAlive(pid)) return false;
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('etcd');
  } catch {
    return false;
  }
}

export function isFerryd(pid: number): boolean {
  if (!pidAlive(pid)) return false;
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('ferryd');
  } catch {
    return false;
  }
}

/** Forgets every learned MAC on the lab's bridges (stale entries black-hole traffic). */
export function flushBridges(s: LabState): void {
  for (let seg = 0; seg < s.segments; seg++)
    sh('bridge', ['-n', `${NS_PREFIX}switch`, 'fdb', 'flush', 'dev', `sw${seg}`, 'dynamic'], { ignore: true });
  for (const h of s.hosts)
    for (let seg = 0; seg < s.segments; seg++)
      sh('bridge', ['-n', h.namespace, 'fdb', 'flush', 'dev', `br${seg}`, 'dynamic'], { ignore: true });
}

/**
 * Removes everything the lab made: ferryds and QEMUs in lab namespaces (by pid, and
 * only those), the namespaces (which takes their veths, bridges and taps along) and
 * the lab directory. Idempotent; works without lab.json after a crash.
 */
export async function labDown(): Promise<{ namespaces: string[]; processes: number[] }> {
  const nss = labNamespaces();
  const pids = new Set<number>();
  for (const ns of nss)
    for (const p of sh('ip', ['netns', 'pids', ns], { ignore: true })
      .split('\n')
      .map(Number)
      .filter((n) => n > 0))
      pids.add(p);
  const s = readLab();
  for (const h of s?.hosts ?? []) if (h.pid && isFerryd(h.pid)) pids.add(h.pid);
  // Daemons first, so that none of them sees its QEMUs die and writes crash records.
  const list = [...pids];
  const isD = (p: number): boolean => isFerryd(p);
  await Promise.all(list.filter(isD).map((p) => killAndWait(p, 2000)));
  await Promise.all(list.filter((p) => !isD(p)).map((p) => killAndWait(p, 0)));
  for (const ns of nss) sh('ip', ['netns', 'del', ns], { ignore: true });
  // State directories may be tmpfs mounts (lab up --state-size); deepest first.
  const mounts = fs
    .readFileSync('/proc/self/mounts', 'utf8')
    .split('\n')
    .map((l) => l.split(' ')[1])
    .filter((m) => m && (m === LAB_DIR || m.startsWith(LAB_DIR + '/')));
  for (const m of mounts.sort((a, b) => b.length - a.length)) sh('umount', ['-l', m], { ignore: true });
  fs.rmSync(LAB_DIR, { recursive: true, force: true });
  if (path.dirname(LAB_STATE_FILE) !== LAB_DIR) fs.rmSync(LAB_STATE_FILE, { force: true });
  return { namespaces: nss, processes: list };
}

/** Namespace of a lab name: host1, client, switch (or already ferry-host1). */
export function labNamespace(s: LabState, name: string): string {
  const n = name.startsWith(NS_PREFIX) ? name.slice(NS_PREFIX.length) : name;
  if (n === 'client' || n === 'switch' || s.hosts.some((h) => h.name === n)) return `${NS_PREFIX}${n}`;
  throw new FerryError(
    'HOST_UNKNOWN',
    `No lab namespace "${name}" (have: ${['client', 'switch', ...s.hosts.map((h) => h.name)].join(', ')})`,
  );
}
