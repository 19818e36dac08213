/**
 * The memory-pattern checker. The pattern guest (guest/pattern.s) increments the first
 * byte of each page in ascending order, pass after pass. Stopped at any instant, the
 * range therefore reads v+1 … v+1, v … v (mod 256): at most one step, and that step
 * goes down by exactly one. Anything else means a page was lost, torn or stale.
 */
export interface PatternResult {
  ok: boolean;
  pages: number;
  /** Value of the first page (the pass counter mod 256). */
  first: number;
  /** Index of the page where the one allowed step happens, or null. */
  edge: number | null;
  /** The first inconsistent pages, up to 10. */
  bad: { page: number; value: number; expected: string }[];
}

export function checkPattern(bytes: Uint8Array): PatternResult {
  const pages = bytes.length;
  const bad: PatternResult['bad'] = [];
  if (pages === 0) return { ok: false, pages, first: 0, edge: null, bad: [{ page: 0, value: 0, expected: 'at least one page' }] };
  const first = bytes[0];
  let edge: number | null = null;
  let cur = first;
  for (let i = 1; i < pages; i++) {
    const b = bytes[i];
    if (b === cur) continue;
    if (edge === null && b === ((cur + 255) & 0xff)) {
      edge = i;
      cur = b;
      continue;
    }
    if (bad.length < 10) bad.push({ page: i, value: b, expected: edge === null ? `${cur} or ${(cur + 255) & 0xff}` : String(cur) });
    cur = b;
  }
  return { ok: bad.length === 0, pages, first, edge, bad };
}

/** Reads the [start_mib, end_mib) fields of a pattern boot sector (offset 0x1f0). */
export function patternRange(bootSector: Buffer, memoryMiB: number): { startMiB: number; endMiB: number } {
  const start = bootSector.readUInt32LE(0x1f0);
  const end = bootSector.readUInt32LE(0x1f4);
  return { startMiB: start, endMiB: end === 0 ? memoryMiB : Math.min(end, memoryMiB) };
}
