/**
 * Domain configuration: parsing and validation. Pure: no I/O except what the caller
 * passes in. Every problem becomes a CONFIG_INVALID error naming the field.
 *
 * Example (JSON):
 *   { "name": "web", "memory": 256, "vcpus": 1,
 *     "boot": { "kernel": "/img/vmlinux", "initrd": "/img/initrd.img", "cmdline": "console=ttyS0" },
 *     "disks": [ { "path": "/img/data.qcow2", "format": "qcow2", "readOnly": false } ],
 *     "nics": [ { "network": "lab", "mac": "52:54:00:12:34:56", "ip": "198.18.0.50/24" } ],
 *     "serial": true,
 *     "postcopy": true }          // false: a live move never switches to post-copy
 */
import crypto from 'node:crypto';
import { FerryError } from '../errors.ts';

export type DiskFormat = 'raw' | 'qcow2';
/**
 * virtio (default) for real guests; floppy for the pattern guest's boot sector, whose
 * firmware driver leaves no DMA rings in guest RAM (SeaBIOS's virtio-blk does, and QEMU
 * writes into them on stop/cont); ide for old guests (never read-only in QEMU).
 */
export type DiskBus = 'virtio' | 'ide' | 'floppy';
/** A host's network that domains' NICs join by name (ferryd.json "networks"). */
export interface NetworkConfig {
  /** Bridge that domain taps join. */
  bridge: string;
  /** The L2 segment's IPv4 subnet, e.g. 198.18.0.0/24. */
  subnet: string;
  /** This host's own address on that segment, if any: used for ARP reachability probes. */
  address?: string;
}

export interface DiskConfig {
  path: string;
  format: DiskFormat;
  readOnly: boolean;
  bus: DiskBus;
}
export interface NicConfig {
  network: string;
  mac: string;
  ip?: string;
}
export type BootConfig = { kind: 'kernel'; kernel: string; initrd?: string; cmdline: string } | { kind: 'disk'; disk: number };

export interface DomainConfig {
  name: string;
  uuid: string;
  memoryMiB: number;
  vcpus: number;
  boot: BootConfig;
  disks: DiskConfig[];
  nics: NicConfig[];
  /** The serial console is always present; this only records the choice for `info`. */
  serial: boolean;
  /**
   * May a live move switch to post-copy (migration/plan.ts)? During post-copy the guest's
   * memory lives on two hosts, and losing either loses the guest: false forbids it.
   */
  postcopy: boolean;
  /**
   * The CPU model the guest sees: a named QEMU model, or "cluster" (the cluster's
   * baseline, computed when it starts: placement/cpu.ts). Absent: the host's "cpuModel".
   * Fixed at start for the domain's life, wherever it moves.
   */
  cpu?: string;
}

export const NAME_RE = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$/;
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const MAC_RE = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;
const IPV4_CIDR_RE = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(\/(\d{1,2}))?$/;
export const MAX_MEMORY_MIB = 1024 * 1024;
export const MAX_VCPUS = 64;
const KNOWN_KEYS = new Set(['name', 'uuid', 'memory', 'vcpus', 'boot', 'disks', 'nics', 'serial', 'postcopy', 'cpu']);

/** A stable, locally administered MAC from the uuid and NIC index, with QEMU's 52:54:00 prefix. */
export function stableMac(uuid: string, index: number): string {
  const h = crypto.createHash('sha256').update(`${uuid}/${index}`).digest();
  return ['52', '54', '00', h[0], h[1], h[2]].map((b) => (typeof b === 'number' ? b.toString(16).padStart(2, '0') : b)).join(':');
}

export function isValidIpv4Cidr(s: string): boolean {
  const m = IPV4_CIDR_RE.exec(s);
  if (!m) return false;
  for (let i = 1; i <= 4; i++) if (Number(m[i]) > 255) return false;
  return m[6] === undefined || Number(m[6]) <= 32;
}

/** Collects a config's problems, each as "field: why", so that one error names them all. */
type Bad = (field: string, why: string) => void;

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * Validates raw input (parsed JSON) and returns a complete config: uuid and MACs are
 * filled in when absent, so the stored config is stable from then on.
 */
export function parseDomainConfig(raw: unknown): DomainConfig {
  const errs: string[] = [];
  const bad: Bad = (field, why) => {
    errs.push(`${field}: ${why}`);
  };
  if (!isPlainObject(raw))
    throw new FerryError('CONFIG_INVALID', 'Invalid domain config: it must be a JSON object', { errors: ['(root): not an object'] });
  for (const k of Object.keys(raw)) if (!KNOWN_KEYS.has(k)) bad(k, 'unknown field');

  const name = raw.name;
  if (typeof name !== 'string' || !NAME_RE.test(name))
    bad('name', `must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit, got ${JSON.stringify(name)}`);

  let uuid = raw.uuid;
  if (uuid === undefined) uuid = crypto.randomUUID();
  else if (typeof uuid !== 'string' || !UUID_RE.test(uuid.toLowerCase()))
    bad('uuid', `must be a UUID like 6f1c…-…, got ${JSON.stringify(uuid)}`);
  if (typeof uuid === 'string') uuid = uuid.toLowerCase();

  const memory = raw.memory;
  if (!Number.isInteger(memory) || (memory as number) < 16 || (memory as number) > MAX_MEMORY_MIB)
    bad('memory', `must be an integer number of MiB from 16 to ${MAX_MEMORY_MIB}, got ${JSON.stringify(memory)}`);

  const vcpus = raw.vcpus ?? 1;
  if (!Number.isInteger(vcpus) || (vcpus as number) < 1 || (vcpus as number) > MAX_VCPUS)
    bad('vcpus', `must be an integer from 1 to ${MAX_VCPUS}, got ${JSON.stringify(vcpus)}`);

  const disks = parseDisks(raw.disks, bad);

  const boot = parseBoot(raw.boot, disks.length, bad);

  if (disks.filter((d) => d.bus === 'floppy').length > 1) bad('disks', 'at most one floppy');

  const nics = parseNics(raw.nics, typeof uuid === 'string' ? uuid : undefined, bad);

  if (raw.serial !== undefined && typeof raw.serial !== 'boolean') bad('serial', 'must be true or false');
  if (raw.postcopy !== undefined && typeof raw.postcopy !== 'boolean') bad('postcopy', 'must be true or false');
  if (
    raw.cpu !== undefined &&
    (typeof raw.cpu !== 'string' || !/^[a-zA-Z0-9_.-]{1,64}$/.test(raw.cpu) || ['host', 'max', 'base'].includes(raw.cpu))
  )
    bad(
      'cpu',
      `must be "cluster" (the cluster's baseline) or a named QEMU CPU model (not host, max or base, which cannot migrate), got ${JSON.stringify(raw.cpu)}`,
    );

  if (errs.length > 0) {
    const who = typeof name === 'string' && NAME_RE.test(name) ? ` "${name}"` : '';
    throw new FerryError('CONFIG_INVALID', `Invalid domain config${who}: ${errs.join('; ')}`, { errors: errs });
  }
  return {
    name: name as string,
    uuid: uuid as string,
    memoryMiB: memory as number,
    vcpus: vcpus as number,
    boot: boot!,
    disks,
    nics,
    serial: raw.serial !== false,
    postcopy: raw.postcopy !== false,
    ...(typeof raw.cpu === 'string' ? { cpu: raw.cpu } : {}),
  };
}

/** disks: each a path, a format, read-only or not, a bus. */
function parseDisks(list: unknown, bad: Bad): DiskConfig[] {
  const disks: DiskConfig[] = [];
  if (list !== undefined && !Array.isArray(list)) bad('disks', 'must be a list');
  for (const [i, d] of (Array.isArray(list) ? list : []).entries()) {
    if (!isPlainObject(d)) {
      bad(`disks[${i}]`, 'must be an object');
      continue;
    }
    for (const k of Object.keys(d)) if (!['path', 'format', 'readOnly', 'bus'].includes(k)) bad(`disks[${i}].${k}`, 'unknown field');
    if (typeof d.path !== 'string' || !d.path.startsWith('/') || d.path.includes(',') || d.path.includes('\n'))
      bad(`disks[${i}].path`, 'must be an absolute path without commas or newlines');
    const format = d.format ?? 'raw';
    if (format !== 'raw' && format !== 'qcow2') bad(`disks[${i}].format`, `must be "raw" or "qcow2", got ${JSON.stringify(d.format)}`);
    if (d.readOnly !== undefined && typeof d.readOnly !== 'boolean') bad(`disks[${i}].readOnly`, 'must be true or false');
    const bus = d.bus ?? 'virtio';
    if (bus !== 'virtio' && bus !== 'ide' && bus !== 'floppy')
      bad(`disks[${i}].bus`, `must be "virtio", "ide" or "floppy", got ${JSON.stringify(d.bus)}`);
    if (bus === 'ide' && d.readOnly === true) bad(`disks[${i}].bus`, 'QEMU cannot attach a read-only IDE disk; use "virtio" or "floppy"');
    if (bus === 'floppy' && format !== 'raw') bad(`disks[${i}].format`, 'a floppy must be raw');
    // Never String()/Number() an unchecked value: an object without a prototype throws.
    disks.push({
      path: typeof d.path === 'string' ? d.path : '',
      format: format as DiskFormat,
      readOnly: d.readOnly === true,
      bus: bus as DiskBus,
    });
  }

  return disks;
}

/** boot: a kernel (with initrd and command line) or the index of a disk. */
function parseBoot(raw: unknown, diskCount: number, bad: Bad): BootConfig | undefined {
  let boot: BootConfig | undefined;
  const b = raw;
  if (!isPlainObject(b)) bad('boot', 'must be an object: {"kernel", "initrd", "cmdline"} or {"disk": INDEX}');
  else if ('kernel' in b) {
    for (const k of Object.keys(b)) if (!['kernel', 'initrd', 'cmdline'].includes(k)) bad(`boot.${k}`, 'unknown field');
    if (typeof b.kernel !== 'string' || !b.kernel.startsWith('/') || b.kernel.includes(','))
      bad('boot.kernel', 'must be an absolute path without commas');
    if (b.initrd !== undefined && (typeof b.initrd !== 'string' || !b.initrd.startsWith('/') || b.initrd.includes(',')))
      bad('boot.initrd', 'must be an absolute path without commas');
    if (b.cmdline !== undefined && (typeof b.cmdline !== 'string' || b.cmdline.length > 2048 || /[\n\0]/.test(b.cmdline)))
      bad('boot.cmdline', 'must be a single line of at most 2048 characters');
    boot = {
      kind: 'kernel',
      kernel: typeof b.kernel === 'string' ? b.kernel : '',
      ...(typeof b.initrd === 'string' ? { initrd: b.initrd } : {}),
      cmdline: typeof b.cmdline === 'string' ? b.cmdline : '',
    };
  } else if ('disk' in b) {
    for (const k of Object.keys(b)) if (k !== 'disk') bad(`boot.${k}`, 'unknown field');
    if (!Number.isInteger(b.disk) || (b.disk as number) < 0 || (b.disk as number) >= diskCount)
      bad('boot.disk', `must be the index of a disk (0..${diskCount - 1}), got ${JSON.stringify(b.disk)}`);
    boot = { kind: 'disk', disk: Number.isInteger(b.disk) ? (b.disk as number) : -1 };
  } else bad('boot', 'needs "kernel" or "disk"');

  return boot;
}

/** nics: each on a network, with a MAC (stable from the uuid when absent) and an optional IPv4 address. */
function parseNics(list: unknown, uuid: string | undefined, bad: Bad): NicConfig[] {
  const nics: NicConfig[] = [];
  if (list !== undefined && !Array.isArray(list)) bad('nics', 'must be a list');
  const nicList = Array.isArray(list) ? list : [];
  if (nicList.length > 8) bad('nics', 'at most 8 NICs');
  const macs = new Set<string>();
  for (const [i, n] of nicList.entries()) {
    if (!isPlainObject(n)) {
      bad(`nics[${i}]`, 'must be an object');
      continue;
    }
    for (const k of Object.keys(n)) if (!['network', 'mac', 'ip'].includes(k)) bad(`nics[${i}].${k}`, 'unknown field');
    if (typeof n.network !== 'string' || !NAME_RE.test(n.network))
      bad(`nics[${i}].network`, `must be a network name, got ${JSON.stringify(n.network)}`);
    let mac = n.mac;
    if (mac === undefined) mac = uuid !== undefined ? stableMac(uuid, i) : '';
    else if (typeof mac !== 'string' || !MAC_RE.test(mac.toLowerCase()))
      bad(`nics[${i}].mac`, `must be a MAC like 52:54:00:12:34:56, got ${JSON.stringify(mac)}`);
    else if (parseInt(mac.slice(0, 2), 16) & 1) bad(`nics[${i}].mac`, `must be a unicast MAC, got ${mac}`);
    mac = typeof mac === 'string' ? mac.toLowerCase() : '';
    if (macs.has(mac as string)) bad(`nics[${i}].mac`, `duplicates another NIC's MAC ${mac}`);
    macs.add(mac as string);
    if (n.ip !== undefined && (typeof n.ip !== 'string' || !isValidIpv4Cidr(n.ip)))
      bad(`nics[${i}].ip`, `must be an IPv4 address, optionally with /prefix, got ${JSON.stringify(n.ip)}`);
    nics.push({
      network: typeof n.network === 'string' ? n.network : '',
      mac: mac as string,
      ...(typeof n.ip === 'string' ? { ip: n.ip } : {}),
    });
  }

  return nics;
}

/** The inverse of parseDomainConfig: the JSON a user would write for this config. */
export function domainConfigToJson(c: DomainConfig): Record<string, unknown> {
  return {
    name: c.name,
    uuid: c.uuid,
    memory: c.memoryMiB,
    vcpus: c.vcpus,
    boot:
      c.boot.kind === 'kernel'
        ? { kernel: c.boot.kernel, ...(c.boot.initrd ? { initrd: c.boot.initrd } : {}), cmdline: c.boot.cmdline }
        : { disk: c.boot.disk },
    disks: c.disks.map((d) => ({ ...d })),
    nics: c.nics.map((n) => ({ ...n })),
    serial: c.serial,
    ...(c.postcopy ? {} : { postcopy: false }),
    ...(c.cpu ? { cpu: c.cpu } : {}),
  };
}

/** Paths the domain needs to find on any host it runs on (boot files and disks). */
export function domainPaths(c: DomainConfig): string[] {
  const p = c.disks.map((d) => d.path);
  if (c.boot.kind === 'kernel') {
    p.push(c.boot.kernel);
    if (c.boot.initrd) p.push(c.boot.initrd);
  }
  return p;
}
