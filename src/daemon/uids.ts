/**
 * The uids domains' QEMUs run as: one per running QEMU, from a reserved range
 * (ferryd.json qemu.uids, default 1879048192 + 4096: above the ranges Debian, systemd
 * and /etc/subuid give out), gid = uid. A uid is handed out at spawn and recorded in
 * the domain's runtime record, so a restarted ferryd knows which are taken; it is free
 * again once that QEMU is gone. An incoming move, a restore and a restart each spawn a
 * new QEMU and so get a fresh uid on their host: nothing ties a domain to a uid.
 *
 * Besides the records, a uid that still owns a process (a QEMU orphaned by a crash
 * between spawn and record) is never handed out: two domains must never share one.
 */
import fs from 'node:fs';
import { FerryError } from '../errors.ts';
import type { DomainIdentity } from '../qemu/confine.ts';
import { processUid } from '../qemu/process.ts';

export interface UidRange {
  first: number;
  count: number;
}
export const DEFAULT_UID_RANGE: UidRange = { first: 0x70000000, count: 4096 };

/** Uids of every live process (their real uids, /proc/N/status). */
export function processUids(): Set<number> {
  const out = new Set<number>();
  for (const d of fs.readdirSync('/proc')) {
    const u = /^\d+$/.test(d) ? processUid(Number(d)) : undefined;
    if (u !== undefined && !Number.isNaN(u)) out.add(u);
  }
  return out;
}

/**
 * What else on this host claims ids in the range: users and groups in /etc/passwd and
 * /etc/group, and subordinate ranges in /etc/subuid and /etc/subgid (a container's root
 * mapped onto a domain's uid would own that domain). Returns a sentence per clash.
 */
export function rangeClashes(r: UidRange, etc = '/etc'): string[] {
  const last = r.first + r.count - 1;
  const out: string[] = [];
  const read = (f: string): string[] => {
    try {
      return fs
        .readFileSync(`${etc}/${f}`, 'utf8')
        .split('\n')
        .filter((l) => l && !l.startsWith('#'));
    } catch {
      return [];
    }
  };
  for (const f of ['passwd', 'group']) {
    for (const l of read(f)) {
      const [name, , id] = l.split(':');
      if (Number(id) >= r.first && Number(id) <= last) out.push(`${f} has ${name} with id ${id}`);
    }
  }
  for (const f of ['subuid', 'subgid']) {
    for (const l of read(f)) {
      const [name, start, count] = l.split(':');
      const a = Number(start);
      const b = a + Number(count) - 1;
      if (a <= last && b >= r.first) out.push(`${f} gives ${name} ${a}-${b}`);
    }
  }
  return out;
}

export class UidPool {
  /** Uids handed out and not yet released: spawns under way and QEMUs that run. */
  private readonly taken = new Set<number>();

  constructor(
    readonly range: UidRange,
    private readonly busyUids: () => Set<number> = () => processUids(),
  ) {}

  /** Marks uids on record as taken (at start, from the records of QEMUs that survived). */
  adopt(uids: Iterable<number>): void {
    for (const u of uids) if (this.contains(u)) this.taken.add(u);
  }

  contains(uid: number): boolean {
    return uid >= this.range.first && uid < this.range.first + this.range.count;
  }

  /** A free uid for `what`'s new QEMU, or HOST_UIDS_EXHAUSTED. */
  allocate(what: string): DomainIdentity {
    const busy = this.busyUids();
    for (let u = this.range.first; u < this.range.first + this.range.count; u++) {
      if (this.taken.has(u) || busy.has(u)) continue;
      this.taken.add(u);
      return { uid: u, gid: u };
    }
    throw new FerryError(
      'HOST_UIDS_EXHAUSTED',
      `Cannot start ${what}: all ${this.range.count} QEMU uids (${this.range.first}-${this.range.first + this.range.count - 1}) are in use; raise qemu.uids.count in ferryd.json`,
    );
  }

  release(uid: number | undefined): void {
    if (uid !== undefined) this.taken.delete(uid);
  }

  get inUse(): number {
    return this.taken.size;
  }
}
