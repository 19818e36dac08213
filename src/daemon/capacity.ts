/**
 * How much memory a new or incoming domain may have here: the smaller of what the
 * host offers (ferryd.json `memory`, less its domains and reservations) and what it
 * really has. "Really" is the kernel's MemAvailable less the RAM its running guests
 * have not touched yet (they may, at any time: QEMU maps guest RAM lazily) and less
 * a margin kept for the host (`memoryMargin`).
 */
import fs from 'node:fs';

export interface Capacity {
  offerMiB: number;
  usedMiB: number;
  /** MemAvailable, MiB. */
  availableMiB: number;
  /** Guest RAM that running domains have not touched yet, MiB. */
  untouchedMiB: number;
  marginMiB: number;
}

export function freeMiB(c: Capacity): number {
  return Math.min(c.offerMiB - c.usedMiB, c.availableMiB - c.untouchedMiB - c.marginMiB);
}

/** Which of the two limits binds, in words, for refusals and `host info`. */
export function explainFree(c: Capacity): string {
  const byOffer = c.offerMiB - c.usedMiB;
  const real = c.availableMiB - c.untouchedMiB - c.marginMiB;
  return byOffer <= real
    ? `offers ${c.offerMiB} MiB to domains, ${c.usedMiB} MiB in use or reserved`
    : `has ${c.availableMiB} MiB available (MemAvailable), ${c.untouchedMiB} MiB of it promised to running guests that have not touched it yet, ${c.marginMiB} MiB kept for the host (memoryMargin)`;
}

export function memAvailableMiB(meminfo = '/proc/meminfo'): number {
  const m = /^MemAvailable:\s+(\d+) kB/m.exec(fs.readFileSync(meminfo, 'utf8'));
  return m ? Math.floor(Number(m[1]) / 1024) : 0;
}

/** Resident memory of a process, MiB; 0 if it is gone. */
export function rssMiB(pid: number): number {
  try {
    const resident = Number(fs.readFileSync(`/proc/${pid}/statm`, 'utf8').split(' ')[1]);
    return Math.floor((resident * 4096) / 1048576);
  } catch {
    return 0;
  }
}
