/**
 * ferryd's configuration: a JSON file (default /etc/ferry/ferryd.json) plus flags.
 * See README "ferryd configuration" for every key. Validation errors are CONFIG_INVALID.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FerryError } from '../errors.ts';
import { NAME_RE, isValidIpv4Cidr } from '../domain/config.ts';
import { QEMU_BINARY, type Accel, type Engine } from '../qemu/argv.ts';
import { parseHostsAllow } from './access.ts';
import { LEVELS, type Level } from './levels.ts';
import { DEFAULT_UID_RANGE, type UidRange } from './uids.ts';

import type { NetworkConfig } from '../domain/config.ts';
export type { NetworkConfig };

export interface DaemonConfig {
  name: string;
  stateDir: string;
  apiSocket: string;
  relocation: {
    address: string;
    port: number;
    hostsAllow: string[];
    /** Migration data ports, inclusive range; one is used per incoming migration. */
    dataPorts: [number, number];
    /** Accept plain-TCP (--insecure) migration streams. The destination decides; default false. */
    allowInsecure: boolean;
    /**
     * Incoming moves may switch to post-copy: each incoming QEMU gets its own
     * /dev/userfaultfd node (QEMU's destination needs it); false gives it none.
     */
    acceptPostcopy: boolean;
    /** Extend a domain's home segment to this host over VXLAN when its network here is another subnet (daemon/tunnels.ts). */
    tunnels: boolean;
  };
  /** Where domain files may live (README "Storage"). */
  storage: StorageConfig;
  limits: Limits;
  tlsDir: string;
  /** Memory offered to domains, MiB. */
  memoryMiB: number;
  /** Kept free on the host beyond what its domains may touch (MiB). */
  memoryMarginMiB: number;
  /** The lowest log level written to ferryd.log. */
  logLevel: Level;
  networks: Record<string, NetworkConfig>;
  accel: Accel | 'auto';
  cpuModel: string;
  /** The most capable CPU model this host may give a guest (a mixed fleet's older hosts); null: what QEMU and the accelerator can. */
  cpuCeiling: string | null;
  imagesDir: string;
  /** Other hosts by name → ADDRESS[:PORT], like /etc/hosts for `ferry migrate DOM NAME`. */
  peers: Record<string, string>;
  /** The QEMU this host runs domains with (README "Engine"). */
  qemu: Engine;
  /** The uids domains' QEMUs run as, one each (daemon/uids.ts); null: QEMU runs as root, unconfined (qemu.user "root"). */
  qemuUids: UidRange | null;
  /** Prometheus metrics at http://ADDRESS:PORT/metrics (daemon/metrics.ts); null: not served. */
  metrics: { address: string; port: number } | null;
  /** Cluster mode: shared state on etcd (src/cluster/); null: standalone, static peers only. */
  cluster: ClusterConfig | null;
}

/** README "Cluster mode": where etcd is and the timings that make fencing safe (cluster/member.ts). */
export interface ClusterConfig {
  /** etcd client URLs, https only: every call is mutual TLS with this host's certificate. */
  endpoints: string[];
  /** The host's lease: it is down for everyone once this many seconds pass without a renewal. */
  leaseTtlS: number;
  /** A host that could not renew for leaseTtlS − fenceMarginS fences its HA domains. */
  fenceMarginS: number;
  /** The HA manager waits this long after a lease expired before restarting its domains elsewhere. */
  restartDelayS: number;
  /** The certificate ferryd shows etcd (ca-cert.pem, client-cert.pem, client-key.pem); default tlsDir. */
  tlsDir: string;
}

export const CLUSTER_DEFAULTS = { leaseTtlS: 10, fenceMarginS: 3, restartDelayS: 2 } as const;

export interface StorageConfig {
  /** Directories every disk, kernel, initrd and backing file must resolve into. */
  pools: string[];
  /** Block devices a domain may use as disks (by exact path); none by default. */
  blockDevices: string[];
  /** Where `save DOM NAME` writes and `restore NAME` reads. */
  saveDir: string;
  /**
   * This host's own disks: where `migrate --copy-storage` creates the copies of an
   * incoming domain's writable disks (a pool too). Default STATE/disks.
   */
  localDir: string;
}

export interface Limits {
  /** TLS-port connections, in total and per remote address. */
  connections: number;
  connectionsPerAddress: number;
  /** Milliseconds a TLS client has to finish its handshake. */
  handshakeMs: number;
  /** Milliseconds an authenticated TLS client has to send its first request (a peer that never speaks is cut off). */
  firstRequestMs: number;
  /** Incoming migrations begun and not finished, per peer host and in total. */
  incomingPerPeer: number;
  incomingTotal: number;
  /** Outgoing moves at once, in total and to one destination (one migration link); more wait in line (migration/queue.ts). */
  movesOut: number;
  movesPerLink: number;
  /** Seconds a begun or prepared incoming migration may wait for its source's next step. */
  reservationS: number;
  disksPerDomain: number;
  /** ferryd.log is rotated at this size; this many old files are kept. */
  logMaxMiB: number;
  logKeep: number;
}

export const DEFAULT_LIMITS: Limits = {
  connections: 256,
  connectionsPerAddress: 32,
  handshakeMs: 5000,
  firstRequestMs: 10000,
  incomingPerPeer: 4,
  incomingTotal: 8,
  movesOut: 4,
  movesPerLink: 2,
  reservationS: 30,
  disksPerDomain: 16,
  logMaxMiB: 16,
  logKeep: 3,
};

import { DEFAULT_CONFIG_PATH, DEFAULT_RELOCATION_PORT } from '../api/protocol.ts';
export { DEFAULT_CONFIG_PATH, DEFAULT_RELOCATION_PORT };
export const DEFAULT_DATA_PORTS: [number, number] = [49152, 49215];
/** Memory kept back for the host itself when `memory` is not set. */
export const HOST_RESERVE_MIB = 1024;

export const DEFAULT_MEMORY_MARGIN_MIB = 256;

const KEYS = new Set([
  'name',
  'stateDir',
  'apiSocket',
  'relocation',
  'tlsDir',
  'memory',
  'memoryMargin',
  'logLevel',
  'networks',
  'accel',
  'cpuModel',
  'cpuCeiling',
  'imagesDir',
  'peers',
  'qemu',
  'storage',
  'limits',
  'metrics',
  'cluster',
]);

export function defaultMemoryMiB(): number {
  return Math.max(256, Math.floor(os.totalmem() / 1048576) - HOST_RESERVE_MIB);
}

function isObj(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Collects a config's problems, each as "field: why", so that one error names them all. */
type Bad = (field: string, why: string) => void;

export function parseDaemonConfig(raw: unknown, repoRoot: string): DaemonConfig {
  const errs: string[] = [];
  const bad: Bad = (f, why) => {
    errs.push(`${f}: ${why}`);
  };
  if (!isObj(raw)) throw new FerryError('CONFIG_INVALID', 'Invalid ferryd config: it must be a JSON object');
  for (const k of Object.keys(raw)) if (!KEYS.has(k)) bad(k, 'unknown key');
  const top = parseTop(raw, repoRoot, bad);
  const relocation = parseRelocation(raw.relocation, bad);
  const networks = parseNetworks(raw.networks, bad);
  const { qemu, uids } = parseQemu(raw.qemu, bad);
  const storage = parseStorage(raw.storage, { imagesDir: top.imagesDir, stateDir: top.stateDir }, bad);
  const limits = parseLimits(raw.limits, bad);
  const metrics = parseMetrics(raw.metrics, bad);
  const cluster = parseCluster(raw.cluster, top.tlsDir, bad);
  if (errs.length) throw new FerryError('CONFIG_INVALID', `Invalid ferryd config: ${errs.join('; ')}`, { errors: errs });
  return { ...top, metrics, cluster, relocation, storage, limits, networks, qemu, qemuUids: uids };
}

/** The top-level scalars (name, directories, memory, log level, accelerator, CPU model, peers). */
function parseTop(raw: Record<string, unknown>, repoRoot: string, bad: Bad) {
  const name = raw.name ?? os.hostname();
  if (typeof name !== 'string' || !NAME_RE.test(name)) bad('name', `must be a host name, got ${JSON.stringify(name)}`);
  const stateDir = raw.stateDir ?? '/var/lib/ferry';
  if (typeof stateDir !== 'string' || !path.isAbsolute(stateDir)) bad('stateDir', 'must be an absolute path');
  const apiSocket = raw.apiSocket ?? path.join(typeof stateDir === 'string' ? stateDir : '/', 'ferryd.sock');
  if (typeof apiSocket !== 'string' || !path.isAbsolute(apiSocket) || apiSocket.length > 100)
    bad('apiSocket', 'must be an absolute path of at most 100 characters');
  const tlsDir = raw.tlsDir ?? '/etc/ferry/tls';
  if (typeof tlsDir !== 'string' || !path.isAbsolute(tlsDir)) bad('tlsDir', 'must be an absolute path');
  const memory = raw.memory ?? defaultMemoryMiB();
  if (!Number.isInteger(memory) || (memory as number) < 16)
    bad('memory', `must be an integer number of MiB (at least 16), got ${JSON.stringify(memory)}`);
  const logLevel = raw.logLevel ?? 'info';
  if (!LEVELS.includes(logLevel as Level)) bad('logLevel', `must be one of ${LEVELS.join(', ')}, got ${JSON.stringify(logLevel)}`);
  const memoryMargin = raw.memoryMargin ?? DEFAULT_MEMORY_MARGIN_MIB;
  if (!Number.isInteger(memoryMargin) || (memoryMargin as number) < 0)
    bad('memoryMargin', `must be a whole number of MiB, got ${JSON.stringify(memoryMargin)}`);
  const accel = process.env.FERRY_ACCEL ?? raw.accel ?? 'auto';
  if (accel !== 'auto' && accel !== 'kvm' && accel !== 'tcg') bad('accel', `must be "auto", "kvm" or "tcg", got ${JSON.stringify(accel)}`);
  const cpuModel = raw.cpuModel ?? 'qemu64';
  if (typeof cpuModel !== 'string' || !/^[a-zA-Z0-9_.-]+$/.test(cpuModel) || cpuModel === 'host' || cpuModel === 'max')
    bad('cpuModel', 'must be a named QEMU CPU model (not "host" or "max", which cannot migrate)');
  const cpuCeiling = raw.cpuCeiling ?? null;
  if (
    cpuCeiling !== null &&
    (typeof cpuCeiling !== 'string' || !/^[a-zA-Z0-9_.-]+$/.test(cpuCeiling) || ['host', 'max', 'base'].includes(cpuCeiling))
  )
    bad('cpuCeiling', 'must be a named QEMU CPU model (the most capable one this host may give a guest), or null');
  const imagesDir = raw.imagesDir ?? path.join(repoRoot, 'images');
  if (typeof imagesDir !== 'string' || !path.isAbsolute(imagesDir)) bad('imagesDir', 'must be an absolute path');
  const peers = raw.peers ?? {};
  if (!isObj(peers) || Object.entries(peers).some(([k, v]) => !NAME_RE.test(k) || typeof v !== 'string' || !/^[a-zA-Z0-9.:[\]-]+$/.test(v)))
    bad('peers', 'must map host names to ADDRESS[:PORT]');
  return {
    name: name as string,
    stateDir: stateDir as string,
    apiSocket: apiSocket as string,
    tlsDir: tlsDir as string,
    memoryMiB: memory as number,
    memoryMarginMiB: memoryMargin as number,
    logLevel: logLevel as Level,
    accel: accel as Accel | 'auto',
    cpuModel: cpuModel as string,
    cpuCeiling: cpuCeiling as string | null,
    imagesDir: imagesDir as string,
    peers: peers as Record<string, string>,
  };
}

function parseRelocation(rel: unknown = {}, bad: Bad): DaemonConfig['relocation'] {
  if (!isObj(rel)) bad('relocation', 'must be an object');
  const r = isObj(rel) ? rel : {};
  for (const k of Object.keys(r))
    if (!['address', 'port', 'hostsAllow', 'dataPorts', 'allowInsecure', 'acceptPostcopy', 'tunnels'].includes(k))
      bad(`relocation.${k}`, 'unknown key');
  const flag = (k: string, dflt: boolean): boolean => {
    const v = r[k] ?? dflt;
    if (typeof v !== 'boolean') bad(`relocation.${k}`, 'must be true or false');
    return v as boolean;
  };
  const address = r.address ?? '127.0.0.1';
  if (typeof address !== 'string' || address.length === 0) bad('relocation.address', 'must be an address');
  const port = r.port ?? DEFAULT_RELOCATION_PORT;
  if (!Number.isInteger(port) || (port as number) < 1 || (port as number) > 65535)
    bad('relocation.port', `must be a TCP port, got ${JSON.stringify(port)}`);
  const hostsAllow = r.hostsAllow ?? [];
  if (!Array.isArray(hostsAllow) || hostsAllow.some((h) => typeof h !== 'string'))
    bad('relocation.hostsAllow', 'must be a list of NAME or NAME@SUBNET patterns');
  else {
    const hp = parseHostsAllow(hostsAllow as string[]);
    if ('error' in hp) bad('relocation.hostsAllow', hp.error);
  }
  const dataPorts = r.dataPorts ?? DEFAULT_DATA_PORTS;
  if (
    !Array.isArray(dataPorts) ||
    dataPorts.length !== 2 ||
    !dataPorts.every((p) => Number.isInteger(p) && p > 0 && p < 65536) ||
    dataPorts[0] > dataPorts[1]
  )
    bad('relocation.dataPorts', 'must be [first, last] TCP ports');
  return {
    address: address as string,
    port: port as number,
    hostsAllow: hostsAllow as string[],
    dataPorts: dataPorts as [number, number],
    allowInsecure: flag('allowInsecure', false),
    acceptPostcopy: flag('acceptPostcopy', true),
    tunnels: flag('tunnels', true),
  };
}

function parseNetworks(nets: unknown = {}, bad: Bad): Record<string, NetworkConfig> {
  const networks: Record<string, NetworkConfig> = {};
  if (!isObj(nets)) {
    bad('networks', 'must be an object of name → {bridge, subnet}');
    return networks;
  }
  for (const [n, v] of Object.entries(nets)) {
    if (!NAME_RE.test(n)) bad(`networks.${n}`, 'bad network name');
    if (!isObj(v) || typeof v.bridge !== 'string' || !/^[a-zA-Z0-9_.-]{1,15}$/.test(v.bridge)) {
      bad(`networks.${n}.bridge`, 'must be an interface name');
      continue;
    }
    if (typeof v.subnet !== 'string' || !isValidIpv4Cidr(v.subnet) || !v.subnet.includes('/')) {
      bad(`networks.${n}.subnet`, 'must be an IPv4 subnet like 198.18.0.0/24');
      continue;
    }
    if (v.address !== undefined && (typeof v.address !== 'string' || !isValidIpv4Cidr(v.address))) {
      bad(`networks.${n}.address`, 'must be an IPv4 address');
      continue;
    }
    networks[n] = { bridge: v.bridge, subnet: v.subnet, ...(typeof v.address === 'string' ? { address: v.address.split('/')[0] } : {}) };
  }
  return networks;
}

/** The engine (binary, data directories) and whose uids its QEMUs run as (null: root, unconfined). */
function parseQemu(qraw: unknown = {}, bad: Bad): { qemu: Engine; uids: UidRange | null } {
  const qemu: Engine = { binary: QEMU_BINARY, dataDirs: [] };
  let uids: UidRange = DEFAULT_UID_RANGE;
  if (!isObj(qraw)) {
    bad('qemu', 'must be an object {binary?, dataDirs?}');
    return { qemu, uids };
  }
  for (const k of Object.keys(qraw)) if (!['binary', 'dataDirs', 'user', 'uids'].includes(k)) bad(`qemu.${k}`, 'unknown key');
  // One shared QEMU user is gone (every domain has a uid of its own); "root" remains, to run unconfined.
  if (qraw.user !== undefined && qraw.user !== 'root')
    bad(
      'qemu.user',
      `may only be "root" (QEMU unconfined, not recommended); each domain's QEMU otherwise runs as its own uid from qemu.uids`,
    );
  if (qraw.uids !== undefined) {
    const u = qraw.uids;
    const okInt = (v: unknown, lo: number, hi: number): boolean => Number.isInteger(v) && (v as number) >= lo && (v as number) <= hi;
    if (
      !isObj(u) ||
      Object.keys(u).some((k) => k !== 'first' && k !== 'count') ||
      !okInt(u.first, 1000, 0xfffeffff) ||
      !okInt(u.count, 1, 1_000_000) ||
      (u.first as number) + (u.count as number) > 0xffff0000
    )
      bad('qemu.uids', 'must be {"first": UID, "count": N}: a range of unused uids (first ≥ 1000, count 1-1000000, below 4294901760)');
    else uids = { first: u.first as number, count: u.count as number };
  }
  if (qraw.binary !== undefined) {
    if (typeof qraw.binary !== 'string' || !(path.isAbsolute(qraw.binary) || /^[a-zA-Z0-9_.-]+$/.test(qraw.binary)))
      bad('qemu.binary', 'must be an absolute path or a command name');
    else qemu.binary = qraw.binary;
  }
  if (qraw.dataDirs !== undefined) {
    if (!Array.isArray(qraw.dataDirs) || qraw.dataDirs.some((d) => typeof d !== 'string' || !path.isAbsolute(d) || d.includes(',')))
      bad('qemu.dataDirs', 'must be a list of absolute paths');
    else qemu.dataDirs = qraw.dataDirs as string[];
  }
  return { qemu, uids: qraw.user === 'root' ? null : uids };
}

/** Absolute, normalized, no trailing slash ('/' itself is refused for pools). */
const absList = (v: unknown): v is string[] =>
  Array.isArray(v) &&
  v.every((d) => typeof d === 'string' && path.isAbsolute(d) && path.normalize(d) === d && (d === '/' || !d.endsWith('/')));

function parseStorage(st: unknown = {}, dirs: { imagesDir: unknown; stateDir: unknown }, bad: Bad): StorageConfig {
  const stateDir = typeof dirs.stateDir === 'string' ? dirs.stateDir : '/';
  const storage: StorageConfig = {
    pools: [typeof dirs.imagesDir === 'string' ? dirs.imagesDir : '/'],
    blockDevices: [],
    saveDir: path.join(stateDir, 'save'),
    localDir: path.join(stateDir, 'disks'),
  };
  if (!isObj(st)) bad('storage', 'must be an object {pools?, blockDevices?, saveDir?, localDir?}');
  else {
    for (const k of Object.keys(st)) if (!['pools', 'blockDevices', 'saveDir', 'localDir'].includes(k)) bad(`storage.${k}`, 'unknown key');
    if (st.pools !== undefined) {
      if (!absList(st.pools) || st.pools.includes('/'))
        bad('storage.pools', 'must be a list of absolute, normalized directory paths (not /)');
      else storage.pools = st.pools;
    }
    if (st.blockDevices !== undefined) {
      if (!absList(st.blockDevices) || !st.blockDevices.every((d) => d.startsWith('/dev/')))
        bad('storage.blockDevices', 'must be a list of /dev/ paths');
      else storage.blockDevices = st.blockDevices;
    }
    if (st.saveDir !== undefined) {
      if (typeof st.saveDir !== 'string' || !path.isAbsolute(st.saveDir)) bad('storage.saveDir', 'must be an absolute path');
      else storage.saveDir = st.saveDir;
    }
    if (st.localDir !== undefined) {
      if (!absList([st.localDir]) || st.localDir === '/') bad('storage.localDir', 'must be an absolute, normalized directory path (not /)');
      else storage.localDir = st.localDir as string;
    }
  }
  // The local directory is a pool: its disks are domains' disks like any other.
  if (!storage.pools.includes(storage.localDir)) storage.pools = [...storage.pools, storage.localDir];
  return storage;
}

function parseLimits(lim: unknown = {}, bad: Bad): Limits {
  const limits: Limits = { ...DEFAULT_LIMITS };
  if (!isObj(lim)) {
    bad('limits', 'must be an object');
    return limits;
  }
  for (const [k, v] of Object.entries(lim)) {
    if (!(k in DEFAULT_LIMITS)) {
      bad(`limits.${k}`, 'unknown key');
      continue;
    }
    if (!Number.isInteger(v) || (v as number) < 1 || (v as number) > 1_000_000) {
      bad(`limits.${k}`, `must be an integer from 1 to 1000000, got ${JSON.stringify(v)}`);
      continue;
    }
    (limits as unknown as Record<string, number>)[k] = v as number;
  }
  return limits;
}

function parseMetrics(raw: unknown, bad: Bad): DaemonConfig['metrics'] {
  if (raw === undefined || raw === null) return null;
  const mm = typeof raw === 'string' ? /^(\[[0-9a-fA-F:]+\]|[0-9.]+|localhost):(\d{1,5})$/.exec(raw) : null;
  if (!mm || Number(mm[2]) < 1 || Number(mm[2]) > 65535) {
    bad('metrics', 'must be "ADDRESS:PORT" (an IP address or localhost), e.g. "127.0.0.1:9477"');
    return null;
  }
  return { address: mm[1].replace(/^\[|\]$/g, ''), port: Number(mm[2]) };
}

/**
 * The cluster section. The timings must leave the fencing order intact: a host fences
 * at TTL − margin after its last renewal, strictly before its lease can expire, and
 * the margin must cover a renewal's round trip and a slow timer (cluster/member.ts).
 */
function parseCluster(raw: unknown, tlsDir: string, bad: Bad): ClusterConfig | null {
  if (raw === undefined || raw === null) return null;
  if (!isObj(raw)) {
    bad('cluster', 'must be an object {endpoints, leaseTtlS?, fenceMarginS?, restartDelayS?, tlsDir?}');
    return null;
  }
  for (const k of Object.keys(raw))
    if (!['endpoints', 'leaseTtlS', 'fenceMarginS', 'restartDelayS', 'tlsDir'].includes(k)) bad(`cluster.${k}`, 'unknown key');
  const endpoints = raw.endpoints;
  const urlOk = (u: unknown): boolean => typeof u === 'string' && /^https:\/\/(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$/.test(u);
  if (!Array.isArray(endpoints) || endpoints.length === 0 || !endpoints.every(urlOk))
    bad(
      'cluster.endpoints',
      'must be a list of etcd client URLs "https://ADDRESS:PORT" (plain http is refused: etcd is reached over mutual TLS only)',
    );
  const num = (k: 'leaseTtlS' | 'fenceMarginS' | 'restartDelayS', lo: number, hi: number): number => {
    const v = raw[k] ?? CLUSTER_DEFAULTS[k];
    if (typeof v !== 'number' || !Number.isInteger(v) || v < lo || v > hi)
      bad(`cluster.${k}`, `must be a whole number of seconds from ${lo} to ${hi}`);
    return v as number;
  };
  const leaseTtlS = num('leaseTtlS', 4, 300);
  const fenceMarginS = num('fenceMarginS', 1, 150);
  const restartDelayS = num('restartDelayS', 0, 300);
  if (fenceMarginS * 2 > leaseTtlS) bad('cluster.fenceMarginS', `must be at most half of leaseTtlS (${leaseTtlS} s)`);
  const dir = raw.tlsDir ?? tlsDir;
  if (typeof dir !== 'string' || !path.isAbsolute(dir)) bad('cluster.tlsDir', 'must be an absolute path');
  return { endpoints: endpoints as string[], leaseTtlS, fenceMarginS, restartDelayS, tlsDir: dir as string };
}

export function loadDaemonConfig(file: string | undefined, overrides: Record<string, unknown>, repoRoot: string): DaemonConfig {
  let raw: Record<string, unknown> = {};
  const f = file ?? (fs.existsSync(DEFAULT_CONFIG_PATH) ? DEFAULT_CONFIG_PATH : undefined);
  if (f) {
    try {
      raw = JSON.parse(fs.readFileSync(f, 'utf8'));
    } catch (e) {
      throw new FerryError('CONFIG_UNREADABLE', `Cannot read ferryd config ${f}: ${(e as Error).message}`);
    }
  }
  const merged: Record<string, unknown> = { ...raw };
  for (const [k, v] of Object.entries(overrides)) {
    if (v === undefined) continue;
    if (k.startsWith('relocation.')) merged.relocation = { ...((merged.relocation as object) ?? {}), [k.slice(11)]: v };
    else merged[k] = v;
  }
  return parseDaemonConfig(merged, repoRoot);
}
