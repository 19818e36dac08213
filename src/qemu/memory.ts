/**
 * Guest RAM as ferryd reads and writes it: through /proc/PID/mem of the domain's QEMU
 * (ferryd runs as root), at the host address where QEMU maps the main RAM block, which
 * QEMU itself reports (HMP `gpa2hva 0`). Only while the guest is stopped do the bytes
 * mean anything. Nothing the size of guest RAM touches the disk, never-touched pages
 * read as the shared zero page without being allocated, and reading runs at several
 * GB/s, so hashing (about 1.5 GB/s with SHA-NI) is the cost, against ~130 MB/s through
 * pmemsave. (A memfd backend was tried first: it made QEMU's own stream 6× slower.)
 *
 * Why ferry needs this: QEMU before 9.0 loses dirty-page tracking under TCG. Its fast
 * path for syncing the migration bitmap (aa8dc044772, "synchronize memory bitmap 64bits
 * at a time") clears the bits without re-arming the TCG TLB's not-dirty trap, so a page
 * whose TLB entry outlives a sync is written without being marked dirty, and is never
 * sent again. A live migration then converges with stale pages on the destination and
 * QEMU reports success. It is worst once the vCPU's TLB has grown (every dirty-log
 * start/stop flushes and may double it), but idle Linux guests are hit too. Upstream
 * fixed it in 9.0 (03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG
 * memory access"); Debian 12 ships 7.2. KVM tracks dirty pages in the kernel.
 *
 * So the migration compares per-chunk SHA-256 digests of both paused copies and writes
 * the source's version of every chunk that differs into the destination's RAM
 * (migration/source.ts). The main RAM block is the only guest-writable one ferry's
 * machines have (`-vga none`; the BIOS, option ROMs and ACPI tables are read-only ROM
 * blocks), so equal main RAM is equal guest memory.
 */
import fs from 'node:fs';
import crypto from 'node:crypto';
import type { QmpClient } from '../qmp/client.ts';

const PAGE = 4096;
/** Digests sent in one message: 8192 × 32 bytes stays far below the API's 1 MiB. */
const MAX_CHUNKS = 8192;

/** True where QEMU's live-migration dirty tracking is known to lose pages (see above). */
export function dirtyTrackingUnreliable(accel: string, qemuVersion: string): boolean {
  const major = Number(qemuVersion.split('.')[0]);
  // An unreadable version is treated as affected: checking costs time, not safety.
  return accel === 'tcg' && !(major >= 9);
}

/** Chunk size for a RAM size: at least 256 KiB, a power of two, at most MAX_CHUNKS chunks. */
export function chunkBytesFor(bytes: number): number {
  let c = 256 * 1024;
  while (Math.ceil(bytes / c) > MAX_CHUNKS) c *= 2;
  return c;
}

/** The main RAM block of a QEMU, `bytes` long, mapped at `base` in its address space. */
export class GuestRam {
  constructor(readonly fd: number, readonly base: number, readonly bytes: number) {}

  read(buf: Buffer, len: number, offset: number): Promise<number> {
    if (offset < 0 || offset + len > this.bytes) return Promise.reject(new Error(`a RAM read of ${len} bytes at ${offset} is outside ${this.bytes} bytes`));
    return new Promise((resolve, reject) => fs.read(this.fd, buf, 0, len, this.base + offset, (e, n) => (e ? reject(e) : resolve(n))));
  }

  /** Writes `data` at `offset`; page-aligned and inside the block, or it throws. */
  write(offset: number, data: Buffer): void {
    if (offset % PAGE !== 0 || data.length % PAGE !== 0 || data.length === 0 || offset < 0 || offset + data.length > this.bytes) {
      throw new Error(`a RAM write of ${data.length} bytes at ${offset} is not page-aligned inside ${this.bytes} bytes`);
    }
    let done = 0;
    while (done < data.length) done += fs.writeSync(this.fd, data, done, data.length - done, this.base + offset + done);
  }

  close(): void { fs.closeSync(this.fd); }
}

/** Parses HMP's `gpa2hva 0` answer; the address must belong to the main RAM block. */
export function parseGpa2hva(text: string): number {
  const m = /^Host virtual address for 0x0 \(pc\.ram\) is (0x[0-9a-f]+)\s*$/i.exec(text.trim());
  if (!m) throw new Error(`unexpected answer to gpa2hva: ${JSON.stringify(text.slice(0, 120))}`);
  return Number(m[1]);
}

/** Opens the main RAM of QEMU process `pid`, whose QMP is `qmp`, as `bytes` long. */
export async function openGuestRam(qmp: QmpClient, pid: number, bytes: number, write = false): Promise<GuestRam> {
  const base = parseGpa2hva(await qmp.execute<string>('human-monitor-command', { 'command-line': 'gpa2hva 0' }));
  const fd = fs.openSync(`/proc/${pid}/mem`, write ? 'r+' : 'r');
  return new GuestRam(fd, base, bytes);
}

export interface RamDigests {
  bytes: number;
  chunkBytes: number;
  /** SHA-256 of each chunk, concatenated (32 bytes each). */
  digests: Buffer;
  ms: number;
}

/** Per-chunk SHA-256 of `bytes` of RAM read from `fd`, without blocking the event loop for long. */
export async function digestRam(ram: GuestRam): Promise<RamDigests> {
  const t0 = Date.now();
  const bytes = ram.bytes;
  const chunkBytes = chunkBytesFor(bytes);
  const n = Math.ceil(bytes / chunkBytes);
  const digests = Buffer.alloc(n * 32);
  const buf = Buffer.alloc(chunkBytes * 16);
  for (let i = 0; i < n; i += 16) {
    const off = i * chunkBytes;
    const len = Math.min(buf.length, bytes - off);
    const got = await ram.read(buf, len, off);
    if (got !== len) throw new Error(`guest RAM ended at ${off + got} of ${bytes} bytes`);
    for (let k = 0; k < 16 && i + k < n; k++) {
      const s = k * chunkBytes;
      crypto.createHash('sha256').update(buf.subarray(s, Math.min(s + chunkBytes, len))).digest().copy(digests, (i + k) * 32);
    }
  }
  return { bytes, chunkBytes, digests, ms: Date.now() - t0 };
}

/** Indexes of the chunks whose digests differ. */
export function differingChunks(a: Buffer, b: Buffer): number[] {
  if (a.length !== b.length) throw new Error('digest lists of different lengths');
  const out: number[] = [];
  for (let i = 0; i < a.length; i += 32) if (a.compare(b, i, i + 32, i, i + 32) !== 0) out.push(i / 32);
  return out;
}

/** One digest over the whole list, for logs and reports. */
export function overallDigest(d: Buffer): string {
  return crypto.createHash('sha256').update(d).digest('hex');
}
