/**
 * QEMU runs unprivileged and under seccomp. ferryd (root) prepares everything a domain's
 * QEMU needs and hands it over, so QEMU itself never needs root:
 *   - files (disks, kernel, initrd): opened by ferryd without following symlinks and
 *     passed as file descriptors (disks through -add-fd / /dev/fdset, boot files as
 *     /proc/self/fd/N), so the QEMU user needs no access to their paths;
 *   - taps: created by ferryd, owned by the QEMU user;
 *   - a private directory (run/DOM/q, mode 0700, owned by the QEMU user) for its QMP,
 *     console and migration sockets and a copy of the TLS files it needs;
 *   - then QEMU is spawned as that user (uid/gid set at exec, as libvirt does) with
 *     -sandbox: no obsolete syscalls, no set*id, no spawning, no resource control.
 * QEMU's own -run-with user= cannot be combined with elevateprivileges=deny (it calls
 * setuid after the filter is in place: "Bad system call"), hence exec as the user.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { FerryError } from '../errors.ts';

export const QEMU_SANDBOX = ['-sandbox', 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny'];
export const DEFAULT_QEMU_USER = 'ferry-qemu';

export interface QemuUser { name: string; uid: number; gid: number }

/** Looks the QEMU user up; 'root' means unconfined (null). Throws CONFIG_INVALID if it does not exist. */
export function resolveQemuUser(name: string): QemuUser | null {
  if (name === 'root') return null;
  const ent = (db: string, key: string): string[] | undefined => {
    try { return execFileSync('getent', [db, key], { stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim().split(':'); } catch { return undefined; }
  };
  const pw = ent('passwd', name);
  if (!pw) throw new FerryError('CONFIG_INVALID', `Invalid ferryd config: qemu.user "${name}" does not exist; create it (scripts/install-packages.sh does: useradd --system ${name}) or set qemu.user to "root" (unconfined, not recommended)`);
  // libuv drops supplementary groups at exec: run with group kvm, so /dev/kvm stays usable.
  const kvm = ent('group', 'kvm');
  return { name, uid: Number(pw[2]), gid: kvm ? Number(kvm[2]) : Number(pw[3]) };
}

/**
 * The QEMU user must be able to pass through every directory above the state directory
 * (ferryd opens the rest for it). Says which one blocks it, or null.
 */
export function blockedAncestor(stateDir: string): string | null {
  for (let d = path.dirname(path.resolve(stateDir)); ; d = path.dirname(d)) {
    try { if ((fs.statSync(d).mode & 0o001) === 0) return d; } catch { return d; }
    if (d === path.dirname(d)) return null;
  }
}

/** Makes `dir` QEMU's own (0700) and lets the QEMU user traverse its parents up to `top`. */
export function prepareQemuDir(dir: string, top: string, user: QemuUser | null): void {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  if (!user) return;
  fs.chownSync(dir, user.uid, user.gid);
  fs.chmodSync(dir, 0o700);
  // Search (x) only, no listing: the QEMU user reaches its own directory and nothing
  // else (everything ferryd keeps beside it is 0600/0700).
  for (let d = path.dirname(dir); d.startsWith(top) && d !== path.dirname(d); d = path.dirname(d)) {
    const m = fs.statSync(d).mode & 0o777;
    if ((m & 0o001) === 0) fs.chmodSync(d, m | 0o001);
    if (d === top) break;
  }
}

/** The files QEMU's tls-creds-x509 reads, copied into QEMU's directory (the host's TLS directory stays root's). */
export function copyTlsForQemu(tlsDir: string, qemuDir: string, user: QemuUser | null): string {
  const out = path.join(qemuDir, 'tls');
  fs.rmSync(out, { recursive: true, force: true });
  fs.mkdirSync(out, { mode: 0o700 });
  for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem', 'client-cert.pem', 'client-key.pem', 'dh-params.pem', 'ca-crl.pem']) {
    const src = path.join(tlsDir, f);
    if (!fs.existsSync(src)) continue;
    fs.copyFileSync(src, path.join(out, f));
    fs.chmodSync(path.join(out, f), 0o400);
    if (user) fs.chownSync(path.join(out, f), user.uid, user.gid);
  }
  if (user) fs.chownSync(out, user.uid, user.gid);
  return out;
}

export const USERFAULTFD_DEV = '/dev/userfaultfd';

/**
 * Post-copy's destination QEMU needs userfaultfd. The kernel lets an unprivileged
 * process have it through /dev/userfaultfd (vm.unprivileged_userfaultfd stays 0), so
 * the QEMU user's group gets read-write on that node, as libvirt gives its QEMU user.
 * A reboot restores udev's 0600 root:root; ferryd sets it again at start. Returns
 * whether the QEMU user can open it, and why not.
 */
export function grantUserfaultfd(user: QemuUser | null, dev = USERFAULTFD_DEV): { ok: boolean; why: string } {
  let st: fs.Stats;
  try { st = fs.statSync(dev); } catch { return { ok: false, why: `${dev} does not exist (a kernel older than 6.1, or built without it)` }; }
  if (!user) return { ok: true, why: `QEMU runs as root` };
  if (st.gid !== user.gid || (st.mode & 0o060) !== 0o060) {
    try {
      fs.chownSync(dev, st.uid, user.gid);
      fs.chmodSync(dev, (st.mode & 0o7777) | 0o060);
    } catch (e) {
      return { ok: false, why: `cannot give the QEMU user's group access to ${dev}: ${(e as Error).message}` };
    }
  }
  return { ok: true, why: `${dev} is read-write for the QEMU user's group (gid ${user.gid})` };
}
