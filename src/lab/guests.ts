/**
 * Ready domain configs for the lab's test guests, with a free lab IP.
 * IPs come from 198.18.0.100-199 and are recorded per guest name in the lab
 * directory, so printing a config twice gives the same address.
 */
import fs from 'node:fs';
import path from 'node:path';
import { FerryError, asFerryError } from '../errors.ts';
import { createImage } from '../domain/storage.ts';
import { parseDomainConfig, domainConfigToJson, NAME_RE } from '../domain/config.ts';
import { writeJsonAtomic } from '../util/fsx.ts';
import { requireLab, IMAGES_DIR, SEGMENTS, GUEST_IP_RANGE, type LabState } from './lab.ts';

function usedIps(s: LabState): Map<string, string> {
  const used = new Map<string, string>();
  for (const h of s.hosts) {
    const dir = path.join(h.stateDir, 'domains');
    let files: string[];
    try {
      files = fs.readdirSync(dir);
    } catch {
      continue;
    }
    for (const f of files) {
      try {
        const rec = JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8'));
        for (const n of rec.config.nics ?? []) if (n.ip) used.set(String(n.ip).split('/')[0], rec.config.name);
      } catch {
        /* partial file */
      }
    }
  }
  return used;
}

export function allocateIp(s: LabState, name: string, segment = 0): string {
  const file = path.join(s.dir, 'ips.json');
  let alloc: Record<string, string> = {};
  try {
    alloc = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch {
    /* first */
  }
  const key = segment === 0 ? name : `${name}@${segment}`;
  if (alloc[key]) return alloc[key];
  const used = usedIps(s);
  const taken = new Set([...Object.values(alloc), ...used.keys()]);
  for (let i = GUEST_IP_RANGE[0]; i <= GUEST_IP_RANGE[1]; i++) {
    const ip = `${SEGMENTS[segment]}.${i}`;
    if (!taken.has(ip)) {
      alloc[key] = ip;
      writeJsonAtomic(file, alloc);
      return ip;
    }
  }
  throw new FerryError('LAB_FAILED', 'No free lab IP left in 198.18.0.100-199');
}

function needImage(f: string): string {
  const p = path.join(IMAGES_DIR, f);
  if (!fs.existsSync(p)) throw new FerryError('IMAGES_MISSING', `Guest image ${p} is missing: run \`ferry lab images\``);
  return p;
}

export const FILL_KINDS = ['mixed', 'random', 'text'] as const;

/** A dense guest's load (guest/linux/fill): MiB of RAM filled, of which kind, and MiB/s rewritten after. */
export interface GuestLoad {
  fillMiB: number;
  fillKind?: string;
  dirtyMiBs?: number;
}

/** The kernel command line's words for a dense guest; CLI_USAGE when they do not fit the guest. */
function loadArgs(memoryMiB: number, load?: GuestLoad): string {
  if (!load) return '';
  const { fillMiB, fillKind = 'mixed', dirtyMiBs = 0 } = load;
  // The kernel, its page tables and the busybox userland take about 64 MiB besides.
  if (!Number.isInteger(fillMiB) || fillMiB < 1 || fillMiB + dirtyMiBs + 64 > memoryMiB)
    throw new FerryError(
      'CLI_USAGE',
      `--fill must be a whole number of MiB from 1, leaving 64 MiB of the guest's ${memoryMiB} MiB free besides the dirtied region (give --memory ${fillMiB + dirtyMiBs + 64} or more)`,
    );
  if (!(FILL_KINDS as readonly string[]).includes(fillKind))
    throw new FerryError('CLI_USAGE', `--fill-kind must be ${FILL_KINDS.join(', ')}, got "${fillKind}"`);
  if (!Number.isInteger(dirtyMiBs) || dirtyMiBs < 0 || dirtyMiBs > 4096)
    throw new FerryError('CLI_USAGE', '--dirty-rate must be a whole number of MiB/s from 0 to 4096');
  return ` ferry.fill=${fillMiB} ferry.fillkind=${fillKind} ferry.dirty=${dirtyMiBs}`;
}

/**
 * A Linux guest. `dataDisk`: a fresh qcow2 of that many MiB in `host`'s own disk
 * directory (storage.localDir: not shared, so moving it needs --copy-storage), which
 * the guest sees as /dev/vda. `load`: a dense guest (its RAM filled, then dirtied).
 */
export function linuxGuestConfig(
  name: string,
  memoryMiB = 128,
  dataDisk?: { mib: number; host: string },
  load?: GuestLoad,
): Record<string, unknown> {
  if (!NAME_RE.test(name)) throw new FerryError('CLI_USAGE', `Bad guest name "${name}"`);
  const extra = loadArgs(memoryMiB, load);
  const s = requireLab();
  const disks: Record<string, unknown>[] = [];
  if (dataDisk) {
    if (!Number.isInteger(dataDisk.mib) || dataDisk.mib < 1 || dataDisk.mib > 65536)
      throw new FerryError('CLI_USAGE', '--data-disk must be an integer number of MiB from 1 to 65536');
    const h = s.hosts.find((x) => x.name === dataDisk.host);
    if (!h) throw new FerryError('HOST_UNKNOWN', `No lab host "${dataDisk.host}" (hosts: ${s.hosts.map((x) => x.name).join(', ')})`);
    const file = path.join(path.dirname(h.configPath), 'disks', `${name}-data.qcow2`);
    if (fs.existsSync(file)) throw new FerryError('LAB_FAILED', `${file} exists already: delete it, or pick another guest name`);
    try {
      createImage(file, 'qcow2', dataDisk.mib * 1048576);
    } catch (e) {
      throw new FerryError('LAB_FAILED', asFerryError(e).message);
    }
    disks.push({ path: file, format: 'qcow2', bus: 'virtio' });
  }
  const ip = allocateIp(s, name);
  return domainConfigToJson(
    parseDomainConfig({
      name,
      memory: memoryMiB,
      vcpus: 1,
      boot: {
        kernel: needImage('vmlinux'),
        initrd: needImage('initrd.img'),
        cmdline: `console=ttyS0 ipv6.disable=1 quiet panic=-1 ferry.name=${name} ferry.ip=${ip}/24${extra}`,
      },
      disks,
      nics: [{ network: 'lab', ip: `${ip}/24` }],
    }),
  );
}

export function patternGuestConfig(name: string, memoryMiB = 64): Record<string, unknown> {
  if (!NAME_RE.test(name)) throw new FerryError('CLI_USAGE', `Bad guest name "${name}"`);
  if (memoryMiB < 32) throw new FerryError('CLI_USAGE', 'The pattern guest needs at least 32 MiB');
  return domainConfigToJson(
    parseDomainConfig({
      name,
      memory: memoryMiB,
      vcpus: 1,
      boot: { disk: 0 },
      disks: [{ path: needImage('pattern.img'), format: 'raw', readOnly: true, bus: 'floppy' }],
    }),
  );
}
