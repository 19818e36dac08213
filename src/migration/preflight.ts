/**
 * Pre-flight on the destination: every check runs before anything is reserved or
 * moved, and each refusal names its fix. `checkOffer` is pure (unit-tested); the ARP
 * probe and the file checks touch the host.
 */
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { execFile } from 'node:child_process';
import { FerryError } from '../errors.ts';
import type { DomainConfig, NetworkConfig } from '../domain/config.ts';
import { domainPaths } from '../domain/config.ts';
import type { TunnelHome } from './host.ts';
import { checkProtocolVersion } from '../api/relocation.ts';

/** VXLAN's port: the tunnels that carry a domain's segment (daemon/tunnels.ts) use it on the migration addresses. */
export const VXLAN_UDP_PORT = 4789;

/** The addresses of the hosts in ferryd.json's "peers" (ADDRESS[:PORT] → ADDRESS). */
export function peerAddresses(peers: Record<string, string>): string[] {
  return Object.values(peers).map((a) => a.replace(/:\d+$/, ''));
}

/** The Begin's facts of the source, and the protocol's shared helpers: api/relocation.ts. */
export { vniFor, isIpv4 } from '../api/relocation.ts';
export type { SourceFacts } from '../api/relocation.ts';
import type { SourceFacts } from '../api/relocation.ts';

export interface DestFacts {
  name: string;
  qemuVersion: string;
  arch: string;
  accel: string;
  /** The domain's CPU model, and the features of it this host cannot give (null: its QEMU knows no such model). */
  cpuFor: string;
  cpuMissing: string[] | null;
  cpuCeiling?: string | null;
  machines: string[];
  networks: Record<string, NetworkConfig>;
  freeMiB: number;
  /** Which limit binds the free memory, in words (daemon/capacity.ts). */
  freeWhy?: string;
  domainNames: string[];
  domainUuids: string[];
}

/** Compares dotted version numbers numerically: <0, 0, >0. An unreadable part counts as 0. */
export function compareVersions(a: string, b: string): number {
  const pa = a.split('.').map((x) => Number.parseInt(x, 10) || 0);
  const pb = b.split('.').map((x) => Number.parseInt(x, 10) || 0);
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const d = (pa[i] ?? 0) - (pb[i] ?? 0);
    if (d !== 0) return d;
  }
  return 0;
}

/** Size of each file the domain needs, as the source sees it (shared storage check). */
export type FileSizes = Record<string, number>;

export function fileSizes(c: DomainConfig): FileSizes {
  const out: FileSizes = {};
  for (const p of domainPaths(c)) {
    try {
      out[p] = fs.statSync(p).size;
    } catch {
      out[p] = -1;
    }
  }
  return out;
}

/**
 * The checks that need only facts. `running` is false for a shut-off domain, which
 * moves as its definition and needs no memory or CPU on the destination yet.
 */
export function checkOffer(offer: { version: number; src: SourceFacts }, dst: DestFacts, c: DomainConfig, running: boolean): void {
  const { version, src } = offer;
  const who = `Cannot migrate domain "${c.name}"`;
  checkProtocolVersion(version, dst.name);
  if (src.name === dst.name) throw new FerryError('MIGRATION_SAME_HOST', `${who}: the destination is the source host ${src.name}`);
  if (dst.domainNames.includes(c.name))
    throw new FerryError('MIGRATION_DEST_EXISTS', `${who}: ${dst.name} already has a domain named "${c.name}"; delete it there first`);
  if (dst.domainUuids.includes(c.uuid))
    throw new FerryError('MIGRATION_DEST_EXISTS', `${who}: ${dst.name} already has a domain with uuid ${c.uuid}`);
  if (src.arch !== dst.arch) throw new FerryError('MIGRATION_DEST_ARCH', `${who}: ${dst.name} is ${dst.arch}, the source is ${src.arch}`);
  if (running) {
    if (src.accel !== dst.accel)
      throw new FerryError(
        'MIGRATION_DEST_ARCH',
        `${who}: ${dst.name} runs domains under ${dst.accel}, the source under ${src.accel}; set the same accelerator on both (FERRY_ACCEL or "accel" in ferryd.json)`,
      );
    // QEMU migrates to the same or a newer version only, under the source's versioned
    // machine type (which the domain keeps for its life, wherever it moves).
    if (compareVersions(dst.qemuVersion, src.qemuVersion) < 0)
      throw new FerryError(
        'MIGRATION_DEST_ENGINE',
        `${who}: ${dst.name} runs QEMU ${dst.qemuVersion}, older than the source's ${src.qemuVersion}; QEMU migrates only to the same or a newer version. Upgrade QEMU on ${dst.name} (README "Engine")`,
        { source: src.qemuVersion, destination: dst.qemuVersion },
      );
    if (!dst.machines.includes(src.machine))
      throw new FerryError(
        'MIGRATION_DEST_ENGINE',
        `${who}: ${dst.name}'s QEMU ${dst.qemuVersion} lacks machine type ${src.machine} (the source runs QEMU ${src.qemuVersion}); install a QEMU that has it`,
        { machine: src.machine },
      );
    // The domain's own CPU model (fixed when it started), against what this host can give:
    // its QEMU, its accelerator and its cpuCeiling (qemu/probe.ts cpuMissing).
    if (dst.cpuMissing === null)
      throw new FerryError(
        'MIGRATION_DEST_CPU',
        `${who}: it runs with CPU model ${dst.cpuFor}, which ${dst.name}'s QEMU ${dst.qemuVersion} does not know`,
        { model: dst.cpuFor, missing: [] },
      );
    if (dst.cpuMissing.length)
      throw new FerryError(
        'MIGRATION_DEST_CPU',
        `${who}: it runs with CPU model ${dst.cpuFor}, and ${dst.name} cannot give ${dst.cpuMissing.slice(0, 8).join(', ')}${dst.cpuMissing.length > 8 ? ` and ${dst.cpuMissing.length - 8} more` : ''} (${dst.accel}${dst.cpuCeiling ? `, cpuCeiling ${dst.cpuCeiling}` : ''}); pick a host that can (\`ferry migrate ${c.name}\` picks one), or give the domain a model every host can run (\`ferry cluster cpu\`)`,
        { model: dst.cpuFor, missing: dst.cpuMissing },
      );
    if (dst.freeMiB < c.memoryMiB)
      throw new FerryError(
        'MIGRATION_DEST_NO_MEMORY',
        `${who}: ${dst.name} has ${dst.freeMiB} MiB free, needs ${c.memoryMiB} MiB${dst.freeWhy ? ` (it ${dst.freeWhy})` : ''}`,
        { freeMiB: dst.freeMiB, needMiB: c.memoryMiB },
      );
  }
  for (const n of c.nics) {
    const d = dst.networks[n.network];
    if (!d)
      throw new FerryError(
        'MIGRATION_DEST_NETWORK',
        `${who}: ${dst.name} has no network "${n.network}"; add it to "networks" in its ferryd.json`,
      );
  }
}

/**
 * Which NICs need their home segment carried here (daemon/tunnels.ts): those whose
 * network is another subnet on this host than where the NIC lives. `homes` comes from
 * the source, one per NIC (its own segment, or the home of a tunnel it holds). A NIC
 * that comes back to its home subnet needs none. Without tunnels (relocation.tunnels
 * false) another subnet is refused, as before.
 */
export function tunnelsNeeded(
  c: DomainConfig,
  homes: TunnelHome[],
  dst: { name: string; networks: Record<string, NetworkConfig>; tunnels: boolean; address: string },
  srcName: string,
): Map<number, TunnelHome> {
  const need = new Map<number, TunnelHome>();
  c.nics.forEach((n, i) => {
    const d = dst.networks[n.network];
    const home = homes[i];
    if (!d || !home || home.subnet === d.subnet) return;
    if (!dst.tunnels)
      throw new FerryError(
        'MIGRATION_DEST_L2',
        `Cannot migrate domain "${c.name}": network "${n.network}" is ${d.subnet} on ${dst.name} but the domain's segment is ${home.subnet}${home.host === srcName ? '' : ` (carried from ${home.host})`}: not the same L2 segment, and ${dst.name} does not extend segments (relocation.tunnels is false). Turn tunnels on there, or move it to a host on ${home.subnet}`,
        { network: n.network, subnet: d.subnet, home: home.subnet },
      );
    if (home.host === dst.name || home.address === dst.address)
      throw new FerryError(
        'MIGRATION_PROTOCOL',
        `relocation.begin: NIC ${i}'s home is ${dst.name} itself, yet its subnet ${home.subnet} is not ${d.subnet}`,
      );
    need.set(i, home);
  });
  return need;
}

export function checkFiles(c: DomainConfig, sizes: FileSizes, dstName: string): void {
  for (const p of domainPaths(c)) {
    let st: fs.Stats;
    try {
      st = fs.statSync(p);
    } catch {
      throw new FerryError(
        'MIGRATION_DEST_DISK',
        `Cannot migrate domain "${c.name}": ${p} does not exist on ${dstName}; disks and boot files must be on shared storage at the same path`,
      );
    }
    const disk = c.disks.find((d) => d.path === p);
    // A writable disk changes size as the guest writes; only read-only files must match.
    if ((!disk || disk.readOnly) && sizes[p] !== undefined && sizes[p] >= 0 && sizes[p] !== st.size) {
      throw new FerryError(
        'MIGRATION_DEST_DISK',
        `Cannot migrate domain "${c.name}": ${p} is ${st.size} bytes on ${dstName} but ${sizes[p]} on the source; it is not the same shared file`,
      );
    }
  }
}

/**
 * Shared-storage proof. A writable disk that merely exists at the same path on the
 * destination may be a local copy: the guest would then write to two diverging disks.
 * So the source writes a marker with a fresh nonce beside each writable disk, and the
 * destination must read that very nonce back from the same directory. (Read-only
 * files are compared by size: a copy of those is harmless.)
 */
export const markerName = (jobId: string): string => `.ferry-shared-${jobId}`;

function writableDiskDirs(c: DomainConfig): string[] {
  return [...new Set(c.disks.filter((d) => !d.readOnly).map((d) => path.dirname(d.path)))];
}

/** Source side: writes the markers; returns the nonce and a function that removes them. */
export function writeStorageMarkers(c: DomainConfig, jobId: string): { nonce: string; remove: () => void } {
  const nonce = crypto.randomBytes(16).toString('hex');
  const written: string[] = [];
  const remove = (): void => {
    for (const f of written) fs.rmSync(f, { force: true });
  };
  for (const dir of writableDiskDirs(c)) {
    const f = path.join(dir, markerName(jobId));
    try {
      fs.writeFileSync(f, nonce, { flag: 'wx', mode: 0o600 });
      written.push(f);
    } catch (e) {
      remove();
      throw new FerryError(
        'MIGRATION_DEST_STORAGE',
        `Cannot migrate domain "${c.name}": cannot write the shared-storage marker ${f} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}); ferry proves that a writable disk is shared by writing a marker beside it, so its directory must be writable by ferryd`,
      );
    }
  }
  return { nonce, remove };
}

/** Destination side: every writable disk's directory must hold the source's marker. */
export function checkStorageMarkers(c: DomainConfig, marker: { jobId: string; nonce: string }, dstName: string, srcName: string): void {
  const { jobId, nonce } = marker;
  for (const dir of writableDiskDirs(c)) {
    const f = path.join(dir, markerName(jobId));
    let seen: string;
    try {
      const fd = fs.openSync(f, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
      try {
        if (!fs.fstatSync(fd).isFile()) throw new Error('not a regular file');
        const buf = Buffer.alloc(64);
        seen = buf.subarray(0, fs.readSync(fd, buf, 0, 64, 0)).toString('utf8');
      } finally {
        fs.closeSync(fd);
      }
    } catch {
      seen = '';
    }
    if (!nonce || seen !== nonce) {
      const disks = c.disks
        .filter((d) => !d.readOnly && path.dirname(d.path) === dir)
        .map((d) => d.path)
        .join(', ');
      throw new FerryError(
        'MIGRATION_DEST_STORAGE',
        `Cannot migrate domain "${c.name}": its writable disk ${disks} is not on storage that ${srcName} and ${dstName} share (${dstName} ${seen ? 'found another marker' : 'does not see the marker'} ${srcName} wrote beside it), so the guest would go on with a different disk. Put writable disks on shared storage (NFS, a cluster filesystem, a SAN) at the same path on both hosts, or move them along with the domain (--copy-storage)`,
        { dir },
      );
    }
  }
}

/** ARP-probes `target` out of `bridge`; true on a reply within timeoutMs. */
export function arpProbe(bridge: string, target: string, timeoutMs = 2000, fromNowhere = false): Promise<boolean> {
  // fromNowhere: a bridge without an address of its own (a tunnel's away end) asks as
  // 0.0.0.0 (duplicate address detection), so no host address leaks onto the guest's
  // segment; busybox then exits 1 when someone answered.
  return new Promise((resolve) => {
    execFile(
      'busybox',
      [
        'arping',
        ...(fromNowhere ? ['-D'] : []),
        '-f',
        '-c',
        '3',
        '-w',
        String(Math.max(1, Math.ceil(timeoutMs / 1000))),
        '-I',
        bridge,
        target,
      ],
      { timeout: timeoutMs + 1000 },
      (err) => resolve(fromNowhere ? (err as { code?: unknown } | null)?.code === 1 : !err),
    );
  });
}

/**
 * What an L2 check probes: the guest's own address only where it runs, and either the
 * NICs on a local segment or those carried through a tunnel (their away bridge and home).
 */
export interface L2Probe {
  guestRunning: boolean;
  on: 'segments' | 'tunnels';
  tunnels?: Map<number, { bridge: string; home: TunnelHome }>;
}

/**
 * The real L2 check: from the destination's bridge for each network, ARP for an
 * address that lives on the source's segment (the domain's own IP, else the source
 * host's address there). No answer means the bridge is not on the same segment.
 */
export async function checkL2(
  c: DomainConfig,
  src: SourceFacts,
  dst: { networks: Record<string, NetworkConfig>; host: string },
  how: L2Probe,
): Promise<string[]> {
  const { networks: dstNetworks, host: dstName } = dst;
  const { guestRunning, on: which, tunnels = new Map() } = how;
  const notes: string[] = [];
  for (const [i, n] of c.nics.entries()) {
    const t = tunnels.get(i);
    if ((which === 'tunnels') !== !!t) continue;
    if (t) {
      // Through the tunnel: the guest (or nothing) must answer on the away bridge.
      // The guest where it runs on its segment (the source is its home); else the home
      // host itself: the home end does not relay between away hosts (no hairpin, so a
      // guest never hears its own broadcasts back), so the guest, still on another away
      // host, cannot answer through it yet.
      const targets = [guestRunning && t.home.host === src.name ? n.ip?.split('/')[0] : undefined, t.home.ip].filter(
        (x): x is string => !!x,
      );
      if (!targets.length) {
        notes.push(`network ${n.network}: tunnel to ${t.home.host} not probed (no address known on its segment)`);
        continue;
      }
      let seen = '';
      for (const target of targets)
        if (await arpProbe(t.bridge, target, 3000, true)) {
          seen = target;
          break;
        }
      if (!seen)
        throw new FerryError(
          'MIGRATION_DEST_L2',
          `Cannot migrate domain "${c.name}": through the tunnel from ${dstName} to ${t.home.host} (VNI ${t.home.vni}), ${targets.join(' and ')} did not answer ARP; check that UDP ${VXLAN_UDP_PORT} passes between their migration addresses and that the MTU there is at least 1550`,
        );
      notes.push(`network ${n.network}: ${seen} answered ARP through the tunnel to ${t.home.host}`);
      continue;
    }
    const d = dstNetworks[n.network];
    // The running guest's own address is the best proof. The source host's address on
    // the network is the fallback (a guest too busy to answer in time, or no IP known):
    // it is meaningful only where hosts answer ARP on the asked interface alone
    // (net.ipv4.conf.all.arp_ignore=1, as the lab sets; README "Migration").
    const guestIp = guestRunning ? n.ip?.split('/')[0] : undefined;
    const targets = [guestIp, src.networks[n.network]?.address].filter((x): x is string => !!x);
    if (targets.length === 0) {
      notes.push(`network ${n.network}: nothing to probe (no IP known)`);
      continue;
    }
    let seen = false;
    for (const t of targets)
      if (await arpProbe(d.bridge, t)) {
        seen = true;
        notes.push(`network ${n.network}: ${t} answered ARP on ${d.bridge}`);
        break;
      }
    if (!seen)
      throw new FerryError(
        'MIGRATION_DEST_L2',
        `Cannot migrate domain "${c.name}": from ${dstName}'s bridge ${d.bridge}, ${targets.join(' and ')} did not answer ARP; network "${n.network}" there is not the same L2 segment as on ${src.name}`,
      );
  }
  return notes;
}
