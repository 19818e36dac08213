/**
 * QEMU runs unprivileged, one uid per domain, under seccomp, and opens no host device
 * or file of its own. ferryd (root) prepares everything a domain's QEMU touches:
 *   - files (disks, kernel, initrd): opened by ferryd without following symlinks and
 *     passed as file descriptors (disks through -add-fd / /dev/fdset, boot files as
 *     /proc/self/fd/N), so the domain's uid needs no access to their paths, and storage
 *     shared between hosts needs no matching ownership;
 *   - taps: created by ferryd, owned by the domain's uid;
 *   - device nodes: a private /dev (a tmpfs in a mount namespace of QEMU's own) holding
 *     only null, zero, full, random, urandom and the nodes that domain needs (net/tun,
 *     kvm, userfaultfd), those owned by the domain's uid, mode 0600. The host's own nodes
 *     may be 0600 root (hardened hosts, containers): QEMU never sees them;
 *   - a private directory (run/DOM/q, mode 0700, owned by the domain's uid) for its QMP,
 *     console and migration sockets and a copy of the TLS files it needs;
 *   - then `setpriv` drops to the domain's uid and gid (no supplementary groups, an
 *     empty bounding set) and execs QEMU, with -sandbox: no obsolete syscalls, no
 *     set*id, no spawning, no resource control.
 *
 * Why a private /dev and not descriptors for the tap: QEMU's `-netdev tap,fd=N` wants a
 * descriptor already attached with the TUNSETIFF ioctl, and Node has no ioctl; a private
 * /dev needs no helper binary (mount, mknod, setpriv and unshare are util-linux and
 * coreutils, on every Debian), covers /dev/kvm and /dev/userfaultfd the same way, and is
 * what libvirt does for its QEMUs. Why a uid per domain: with one shared QEMU user, any
 * QEMU could signal every other and connect to its QMP socket (Firecracker's jailer and
 * libvirt's dynamic ownership give each VM its own uid for the same reason).
 *
 * The launcher execs (unshare → sh → setpriv → QEMU), so the pid ferryd spawned is
 * QEMU's pid.
 */
import fs from 'node:fs';
import path from 'node:path';

export const QEMU_SANDBOX = ['-sandbox', 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny'];

/** The uid and gid one domain's QEMU runs as (daemon/uids.ts hands them out). */
export interface DomainIdentity {
  uid: number;
  gid: number;
}

/** A device node for QEMU's private /dev: path under /dev, numbers, mode, owned by the domain or root. */
export interface DeviceNode {
  name: string;
  major: number;
  minor: number;
  mode: number;
  domainOwned: boolean;
}

/** Every QEMU gets these (glib and gnutls read them), world-usable and root-owned as on any host. */
const BASIC = [
  ['null', 1, 3],
  ['zero', 1, 5],
  ['full', 1, 7],
  ['random', 1, 8],
  ['urandom', 1, 9],
] as const;

/** The node's numbers from the host's own /dev, or undefined where the host has none. */
export function hostDevice(name: string, dev = '/dev'): { major: number; minor: number } | undefined {
  let st: fs.Stats;
  try {
    st = fs.statSync(path.join(dev, name));
  } catch {
    return undefined;
  }
  if (!st.isCharacterDevice()) return undefined;
  // Linux's dev_t: major in bits 8-19 (and 32+), minor in bits 0-7 and 20-31.
  const r = BigInt(st.rdev);
  return { major: Number(((r >> 8n) & 0xfffn) | ((r >> 32n) & ~0xfffn)), minor: Number((r & 0xffn) | ((r >> 12n) & ~0xffn)) };
}

/**
 * The nodes of one QEMU's private /dev: the basic ones, plus those the domain needs that
 * this host has (`wants`: e.g. net/tun, kvm, userfaultfd), owned by the domain.
 */
export function privateDevNodes(wants: string[], dev = '/dev'): DeviceNode[] {
  const out: DeviceNode[] = BASIC.map(([name, major, minor]) => ({ name, major, minor, mode: 0o666, domainOwned: false }));
  for (const name of wants) {
    const d = hostDevice(name, dev);
    if (d) out.push({ name, ...d, mode: 0o600, domainOwned: true });
  }
  return out;
}

/**
 * Runs as root in QEMU's new mount namespace: a tmpfs over /dev with the given nodes,
 * then setpriv to the domain's ids and exec. Every value arrives as an argument, never
 * spliced into the script: $1 uid, $2 gid, then name major minor mode owned (5 per
 * node), then --, then QEMU's argv. Each helper is a process on the move's critical
 * path (an incoming QEMU starts during Begin): no subshells, one chown for all nodes.
 */
const LAUNCHER = `set -eu
uid=$1 gid=$2; shift 2
mount -t tmpfs -o mode=0755,nosuid,noexec,size=64k ferry-dev /dev
owned=
while [ "$1" != -- ]; do
  case "$1" in */*) mkdir -p "/dev/\${1%/*}" ;; esac
  mknod -m "$4" "/dev/$1" c "$2" "$3"
  if [ "$5" = 1 ]; then owned="$owned /dev/$1"; fi
  shift 5
done
shift
[ -z "$owned" ] || chown "$uid:$gid" $owned
ln -s /proc/self/fd /dev/fd
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups --bounding-set=-all --inh-caps=-all -- "$@"`;

/** The command that starts `binary argv` confined as `id` with a private /dev of `nodes`. */
export function confinedCommand(binary: string, argv: string[], id: DomainIdentity, nodes: DeviceNode[]): { cmd: string; args: string[] } {
  const spec = nodes.flatMap((n) => [n.name, String(n.major), String(n.minor), n.mode.toString(8), n.domainOwned ? '1' : '0']);
  return {
    cmd: 'unshare',
    args: [
      '--mount',
      '--propagation',
      'private',
      'sh',
      '-c',
      LAUNCHER,
      'ferry-qemu-launch',
      String(id.uid),
      String(id.gid),
      ...spec,
      '--',
      binary,
      ...argv,
    ],
  };
}

/**
 * The domain's uid must be able to pass through every directory above the state
 * directory (ferryd opens the rest for it). Says which one blocks it, or null.
 */
export function blockedAncestor(stateDir: string): string | null {
  for (let d = path.dirname(path.resolve(stateDir)); ; d = path.dirname(d)) {
    try {
      if ((fs.statSync(d).mode & 0o001) === 0) return d;
    } catch {
      return d;
    }
    if (d === path.dirname(d)) return null;
  }
}

/**
 * Makes `dir` (run/DOM/q) the domain's own (0700) and its parent run/DOM passable by the
 * domain's group alone (root:gid 0710), so no other domain's uid can even reach the
 * directory; the directories above it up to `top` (the state directory) get search (x)
 * for everyone, never listing: everything ferryd keeps in them is 0600/0700.
 */
export function prepareQemuDir(dir: string, top: string, id: DomainIdentity | null): void {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  if (!id) return;
  fs.chownSync(dir, id.uid, id.gid);
  fs.chmodSync(dir, 0o700);
  const parent = path.dirname(dir);
  fs.chownSync(parent, 0, id.gid);
  fs.chmodSync(parent, 0o710);
  for (let d = path.dirname(parent); d.startsWith(top) && d !== path.dirname(d); d = path.dirname(d)) {
    const m = fs.statSync(d).mode & 0o777;
    if ((m & 0o001) === 0) fs.chmodSync(d, m | 0o001);
    if (d === top) break;
  }
}

/** The files QEMU's tls-creds-x509 reads, copied into QEMU's directory (the host's TLS directory stays root's). */
export function copyTlsForQemu(tlsDir: string, qemuDir: string, id: DomainIdentity | null): string {
  const out = path.join(qemuDir, 'tls');
  fs.rmSync(out, { recursive: true, force: true });
  fs.mkdirSync(out, { mode: 0o700 });
  for (const f of [
    'ca-cert.pem',
    'server-cert.pem',
    'server-key.pem',
    'client-cert.pem',
    'client-key.pem',
    'dh-params.pem',
    'ca-crl.pem',
  ]) {
    const src = path.join(tlsDir, f);
    if (!fs.existsSync(src)) continue;
    fs.copyFileSync(src, path.join(out, f));
    fs.chmodSync(path.join(out, f), 0o400);
    if (id) fs.chownSync(path.join(out, f), id.uid, id.gid);
  }
  if (id) fs.chownSync(out, id.uid, id.gid);
  return out;
}

export const USERFAULTFD_DEV = '/dev/userfaultfd';

/**
 * Post-copy's destination QEMU needs userfaultfd. The kernel lets an unprivileged
 * process have it through /dev/userfaultfd (vm.unprivileged_userfaultfd stays 0): each
 * QEMU gets its own node in its private /dev, owned by its uid, and the host's node is
 * left as udev made it. Says whether QEMUs here can have it, and why not.
 */
export function userfaultfdAvailable(confined: boolean, dev = USERFAULTFD_DEV): { ok: boolean; why: string } {
  if (!fs.existsSync(dev)) return { ok: false, why: `${dev} does not exist (a kernel older than 6.1, or built without it)` };
  return { ok: true, why: confined ? `each incoming QEMU gets its own ${dev} node in its private /dev` : 'QEMU runs as root' };
}
