/**
 * QEMU's command line for a domain. Pure: a DomainConfig plus the host's runtime
 * choices in, an argv out. Nothing user-supplied is ever put into a shell or an
 * `exec:` URI; paths were validated to contain no commas (QEMU's option separator).
 */
import type { DomainConfig } from '../domain/config.ts';
import { QEMU_SANDBOX } from './confine.ts';

/** The default engine; ferryd.json's "qemu" (or FERRY_QEMU) picks another per host. */
export const QEMU_BINARY = process.env.FERRY_QEMU ?? 'qemu-system-x86_64';

/** Which QEMU a host runs: its binary and where its firmware and option ROMs are (-L). */
export interface Engine {
  binary: string;
  dataDirs: string[];
}

export const DEFAULT_ENGINE: Engine = { binary: QEMU_BINARY, dataDirs: [] };

/** `-L DIR` for each data directory (a QEMU unpacked under a prefix needs them). */
export function engineArgs(e: Engine): string[] {
  return e.dataDirs.flatMap((d) => ['-L', d]);
}
export const QBOOT_ROM = '/usr/share/qemu/qboot.rom';

export type Accel = 'kvm' | 'tcg';

export interface RuntimeChoice {
  accel: Accel;
  cpuModel: string;
  /** A concrete, versioned machine type (e.g. pc-i440fx-7.2), so both ends of a migration agree. */
  machine: string;
  qmpPath: string;
  consolePath: string;
  /** Tap device names, one per NIC, already created and attached to their bridges. */
  taps: string[];
  /** Wait for an incoming migration stream (`-incoming defer`) instead of booting. */
  incoming?: boolean;
  /** Allocate all guest RAM up front (faster offline migration into this QEMU). */
  preallocate?: boolean;
  /**
   * File descriptors (as QEMU will see them) ferryd opened for the domain's files:
   * QEMU then opens no path of its own (confine.ts). Absent: paths, as in unit tests.
   */
  fds?: { kernel?: number; initrd?: number; disks: number[]; backing?: { fd: number; format: string }[][]; state?: number };
}

/** The fd set holding a save file a restore reads (`file:/dev/fdset/300`): the disks' sets are 1… and 100…. */
export const STATE_FDSET = 300;

export function domainArgv(c: DomainConfig, r: RuntimeChoice): string[] {
  const a: string[] = [
    '-name',
    `guest=${c.name},debug-threads=on`,
    '-uuid',
    c.uuid,
    '-machine',
    `${r.machine},accel=${r.accel}`,
    // enforce: QEMU refuses to start rather than silently drop a feature the accelerator
    // lacks (a guest that then moves would find the feature gone, or appear).
    '-cpu',
    `${r.cpuModel},enforce`,
    '-m',
    `${c.memoryMiB}M`,
    '-smp',
    String(c.vcpus),
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-vga',
    'none',
    '-qmp',
    `unix:${r.qmpPath},server=on,wait=off`,
    '-chardev',
    `socket,id=con0,path=${r.consolePath},server=on,wait=off`,
    '-serial',
    'chardev:con0',
    // Start stopped: ferryd attaches QMP and the console before the guest runs a single
    // instruction, so no early console output is lost and every state change is seen.
    '-S',
    ...QEMU_SANDBOX,
  ];
  if (r.preallocate) a.push('-mem-prealloc');
  if (c.boot.kind === 'kernel') {
    a.push('-bios', QBOOT_ROM, '-kernel', r.fds?.kernel !== undefined ? `/proc/self/fd/${r.fds.kernel}` : c.boot.kernel);
    if (c.boot.initrd) a.push('-initrd', r.fds?.initrd !== undefined ? `/proc/self/fd/${r.fds.initrd}` : c.boot.initrd);
    a.push('-append', c.boot.cmdline);
  }
  c.disks.forEach((d, i) => {
    const ro = `readonly=${d.readOnly ? 'on' : 'off'}`;
    let file = d.path;
    if (r.fds) {
      // fd set i+1 holds the one descriptor ferryd opened (read-only or read-write as the disk).
      a.push('-add-fd', `fd=${r.fds.disks[i]},set=${i + 1},opaque=disk${i}`);
      file = `/dev/fdset/${i + 1}`;
    }
    // A writable disk from an fd set: -drive's default auto-read-only opens it read-only
    // first and asks the set for a read-only descriptor, which it does not hold. A second,
    // read-only descriptor would be worse: the set keeps both open file descriptions alive,
    // so image locks that QEMU drops at the switchover stay held and the destination
    // could never take the disk. One read-write descriptor, no auto-read-only.
    const rw = r.fds && !d.readOnly ? ',file.auto-read-only=off' : '';
    // A qcow2's backing files, also as descriptors ferryd opened (read-only): QEMU, an
    // unprivileged user, would otherwise open them by the paths in the image's header.
    // Each level overrides the header's: backing., backing.backing., …
    let chain = '';
    for (const [k, b] of (r.fds?.backing?.[i] ?? []).entries()) {
      const set = 100 + i * 16 + k;
      a.push('-add-fd', `fd=${b.fd},set=${set},opaque=disk${i}-backing${k}`);
      const pre = 'backing.'.repeat(k + 1);
      chain += `,${pre}driver=${b.format},${pre}file.driver=file,${pre}file.filename=/dev/fdset/${set}`;
    }
    const isBoot = c.boot.kind === 'disk' && c.boot.disk === i;
    if (d.bus === 'floppy') {
      a.push('-drive', `file=${file},format=raw,if=floppy,index=0,${ro}${rw}`);
      if (isBoot) a.push('-boot', 'order=a');
      return;
    }
    a.push('-drive', `file=${file},format=${d.format},if=none,id=disk${i},${ro}${rw}${chain}`);
    const boot = isBoot ? ',bootindex=1' : '';
    a.push('-device', d.bus === 'ide' ? `ide-hd,drive=disk${i},id=ide${i}${boot}` : `virtio-blk-pci,drive=disk${i},id=vblk${i}${boot}`);
  });
  c.nics.forEach((n, i) => {
    a.push('-netdev', `tap,id=net${i},ifname=${r.taps[i]},script=no,downscript=no`);
    a.push('-device', `virtio-net-pci,netdev=net${i},id=nic${i},mac=${n.mac},romfile=`);
  });
  // A restore's save file, read-only: QEMU reads it through the fd set, never by its path.
  if (r.fds?.state !== undefined) a.push('-add-fd', `fd=${r.fds.state},set=${STATE_FDSET},opaque=state`);
  if (r.incoming) a.push('-incoming', 'defer');
  return a;
}

/** Tap names must fit IFNAMSIZ (15); they are unique per host by uuid prefix and NIC index. */
export function tapName(uuid: string, index: number): string {
  return `ft${uuid.replace(/-/g, '').slice(0, 10)}${index}`;
}
