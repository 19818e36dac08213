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
 * (migration/memcheck.ts). The main RAM block is the only guest-writable one ferry's
 * machines have (`-vga none`; the BIOS, option ROMs and ACPI tables are read-only ROM
 * blocks), so equal main RAM is equal guest memory.
 */
import fs from 'node:fs';
import os from 'node:os';
import crypto from 'node:crypto';
import { Worker } from 'node:worker_threads';
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
  /** `pagemap`: the process's /proc/PID/pagemap, or null where every page counts as populated. */
  constructor(
    readonly fd: number,
    readonly base: number,
    readonly bytes: number,
    private readonly pagemap: number | null = null,
  ) {}

  /**
   * For each chunk, whether any of its pages may hold something other than zeros. A page
   * that is neither in memory nor in swap was never touched (bits 63 and 62 of a pagemap
   * entry). A page that is "in memory" may also be the kernel's shared zero page: QEMU's
   * own migration reads every page to find the zero ones, which maps the zero page (or,
   * with THP, the huge zero page) behind every untouched one. Such a page is found by its
   * frame number (root sees them): one mapped at more than one guest page is shared, and
   * /proc/kpageflags says whether it is a zero page (KPF_ZERO_PAGE, bit 24). Chunks of
   * nothing but such pages hash as zero without being read: an idle 1 GiB guest that has
   * touched 80 MiB hashes 80 MiB. Without that access, every present page counts.
   */
  async populated(chunkBytes: number): Promise<boolean[]> {
    const n = Math.ceil(this.bytes / chunkBytes);
    if (this.pagemap === null) return new Array<boolean>(n).fill(true);
    const pages = this.bytes / PAGE;
    const per = chunkBytes / PAGE;
    const map = Buffer.alloc(8 * pages);
    for (let p0 = 0; p0 < pages; p0 += 65536) {
      const cnt = Math.min(65536, pages - p0);
      const got = await pread(this.pagemap, map.subarray(p0 * 8), cnt * 8, (this.base / PAGE + p0) * 8);
      if (got !== cnt * 8) throw new Error(`pagemap ended after ${p0 + got / 8} of ${pages} pages`);
    }
    // One decoding pass: the frame of each page in memory, -1 for a page never touched,
    // Infinity for one in swap (its content is real).
    const frame = new Float64Array(pages);
    for (let k = 0; k < pages; k++) {
      const hi = map.readUInt32LE(k * 8 + 4);
      frame[k] = hi & 0x40000000 ? Infinity : hi & 0x80000000 ? (hi & 0x7fffff) * 0x100000000 + map.readUInt32LE(k * 8) : -1;
    }
    const zero = zeroFrames(frame);
    const out = new Array<boolean>(n).fill(false);
    for (let k = 0; k < pages; k++) if (frame[k] !== -1 && !zero.has(frame[k])) out[Math.floor(k / per)] = true;
    return out;
  }

  read(buf: Buffer, len: number, offset: number): Promise<number> {
    if (offset < 0 || offset + len > this.bytes)
      return Promise.reject(new Error(`a RAM read of ${len} bytes at ${offset} is outside ${this.bytes} bytes`));
    return pread(this.fd, buf, len, this.base + offset);
  }

  /** Writes `data` at `offset`; page-aligned and inside the block, or it throws. */
  write(offset: number, data: Buffer): void {
    if (offset % PAGE !== 0 || data.length % PAGE !== 0 || data.length === 0 || offset < 0 || offset + data.length > this.bytes) {
      throw new Error(`a RAM write of ${data.length} bytes at ${offset} is not page-aligned inside ${this.bytes} bytes`);
    }
    let done = 0;
    while (done < data.length) done += fs.writeSync(this.fd, data, done, data.length - done, this.base + offset + done);
  }

  close(): void {
    fs.closeSync(this.fd);
    if (this.pagemap !== null) fs.closeSync(this.pagemap);
  }
}

/**
 * The zero frames among the frames of pages in memory (populated()'s `frame`): those mapped at more than one page
 * (at most a few thousand of them are looked at) whose /proc/kpageflags entry has
 * KPF_ZERO_PAGE. Empty where kpageflags cannot be read (not root) or frame numbers are
 * hidden (they read as 0, which is no zero page).
 */
function zeroFrames(frame: Float64Array): Set<number> {
  const seen = new Map<number, number>();
  for (const f of frame) if (f >= 0 && f !== Infinity) seen.set(f, (seen.get(f) ?? 0) + 1);
  const shared = [...seen].filter(([, c]) => c > 1).map(([f]) => f);
  const zero = new Set<number>();
  if (shared.length === 0 || shared.length > 4096) return zero;
  let fd: number;
  try {
    fd = fs.openSync('/proc/kpageflags', 'r');
  } catch {
    return zero;
  }
  try {
    const b = Buffer.alloc(8);
    for (const f of shared) {
      if (fs.readSync(fd, b, 0, 8, f * 8) === 8 && b.readUInt32LE(0) & (1 << 24)) zero.add(f);
    }
  } catch {
    /* unreadable: count them as data */
  } finally {
    fs.closeSync(fd);
  }
  return zero;
}

function pread(fd: number, buf: Buffer, len: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => fs.read(fd, buf, 0, len, position, (e, n) => (e ? reject(e) : resolve(n))));
}

/** Parses HMP's `gpa2hva 0` answer; the address must belong to the main RAM block. */
export function parseGpa2hva(text: string): number {
  const m = /^Host virtual address for 0x0 \(pc\.ram\) is (0x[0-9a-f]+)\s*$/i.exec(text.trim());
  if (!m) throw new Error(`unexpected answer to gpa2hva: ${JSON.stringify(text.slice(0, 120))}`);
  return Number(m[1]);
}

/**
 * Opens the main RAM of QEMU process `pid`, whose QMP is `qmp`, as `bytes` long. Only a
 * reader needs the pagemap (to skip untouched chunks); a writer (one repair) does not.
 */
export async function openGuestRam(qmp: QmpClient, pid: number, bytes: number, write = false): Promise<GuestRam> {
  const base = parseGpa2hva(await qmp.execute<string>('human-monitor-command', { 'command-line': 'gpa2hva 0' }));
  const fd = fs.openSync(`/proc/${pid}/mem`, write ? 'r+' : 'r');
  if (write) return new GuestRam(fd, base, bytes);
  let pagemap: number;
  try {
    pagemap = fs.openSync(`/proc/${pid}/pagemap`, 'r');
  } catch (e) {
    fs.closeSync(fd);
    throw e;
  }
  return new GuestRam(fd, base, bytes, pagemap);
}

export interface RamDigests {
  bytes: number;
  chunkBytes: number;
  /** SHA-256 of each chunk, concatenated (32 bytes each). */
  digests: Buffer;
  ms: number;
  /** Chunks actually read and hashed (the others were never touched: zero). */
  hashedChunks: number;
}

/**
 * Hashing runs in worker threads: SHA-256 runs at ~1.3 GB/s per core here, so one
 * thread would keep a 1 GiB guest paused for most of a second. The workers read guest
 * RAM themselves (a file descriptor is the process's, so they share the caller's), each
 * a share of the chunks, and are kept for the next digest (starting one costs ~30 ms).
 * Written as plain CommonJS so that it runs the same from the sources and the bundle.
 */
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const fs = require('node:fs');
const crypto = require('node:crypto');
let buf = Buffer.alloc(0);
parentPort.on('message', (m) => {
  try {
    if (buf.length < m.chunkBytes) buf = Buffer.alloc(m.chunkBytes);
    const out = Buffer.alloc(m.chunks.length * 32);
    for (let k = 0; k < m.chunks.length; k++) {
      const off = m.chunks[k] * m.chunkBytes;
      const len = Math.min(m.chunkBytes, m.bytes - off);
      let got = 0;
      while (got < len) {
        const n = fs.readSync(m.fd, buf, got, len - got, m.base + off + got);
        if (n === 0) throw new Error('guest RAM ended at ' + (off + got) + ' of ' + m.bytes + ' bytes');
        got += n;
      }
      crypto.createHash('sha256').update(buf.subarray(0, len)).digest().copy(out, k * 32);
    }
    parentPort.postMessage({ id: m.id, out });
  } catch (e) {
    parentPort.postMessage({ id: m.id, error: String((e && e.message) || e) });
  }
});
`;

interface HashJob {
  resolve: (b: Buffer) => void;
  reject: (e: Error) => void;
}
let pool: { workers: Worker[]; jobs: Map<number, HashJob>; next: number } | undefined;

/** Hashing threads: one per core, at most four. */
export function hashThreads(): number {
  return Math.max(1, Math.min(4, os.availableParallelism()));
}

function hashPool(): NonNullable<typeof pool> {
  if (pool) return pool;
  const p = { workers: [] as Worker[], jobs: new Map<number, HashJob>(), next: 1 };
  for (let i = 0; i < hashThreads(); i++) {
    const w = new Worker(WORKER_SOURCE, { eval: true });
    w.on('message', (m: { id: number; out?: Uint8Array; error?: string }) => {
      const j = p.jobs.get(m.id);
      p.jobs.delete(m.id);
      if (!j) return;
      if (m.error !== undefined) j.reject(new Error(m.error));
      else j.resolve(Buffer.from(m.out!.buffer, m.out!.byteOffset, m.out!.byteLength));
      if (p.jobs.size === 0) for (const x of p.workers) x.unref();
    });
    w.on('error', (e) => {
      // A dead worker fails what it had; the next digest starts a fresh pool.
      for (const j of p.jobs.values()) j.reject(e);
      p.jobs.clear();
      if (pool === p) pool = undefined;
    });
    w.unref(); // after the listeners (which ref it): idle workers never keep a process alive
    p.workers.push(w);
  }
  pool = p;
  return p;
}

/** SHA-256 of the given chunks of `ram`, in that order (32 bytes each), hashed in parallel. */
export async function digestChunks(ram: GuestRam, chunkBytes: number, chunks: number[]): Promise<Buffer> {
  if (chunks.length === 0) return Buffer.alloc(0);
  const p = hashPool();
  const n = Math.min(p.workers.length, chunks.length);
  // Interleaved blocks of 8 chunks, so that dense and empty regions spread evenly.
  const shares: number[][] = Array.from({ length: n }, () => []);
  for (let k = 0; k < chunks.length; k++) shares[Math.floor(k / 8) % n].push(chunks[k]);
  // Busy workers hold the process open (a digest in flight must finish); idle ones do not.
  for (const w of p.workers) w.ref();
  let parts: Buffer[];
  try {
    parts = await Promise.all(
      shares.map(
        (share, wi) =>
          new Promise<Buffer>((resolve, reject) => {
            const id = p.next++;
            p.jobs.set(id, { resolve, reject });
            p.workers[wi].postMessage({ id, fd: ram.fd, base: ram.base, bytes: ram.bytes, chunkBytes, chunks: share });
          }),
      ),
    );
  } finally {
    if (p.jobs.size === 0) for (const w of p.workers) w.unref();
  }
  const out = Buffer.alloc(chunks.length * 32);
  const at = new Array<number>(n).fill(0);
  for (let k = 0; k < chunks.length; k++) {
    const wi = Math.floor(k / 8) % n;
    parts[wi].copy(out, k * 32, at[wi] * 32, at[wi] * 32 + 32);
    at[wi]++;
  }
  return out;
}

/** Per-chunk SHA-256 of a stopped guest's RAM; chunks never touched are not read. */
export async function digestRam(ram: GuestRam): Promise<RamDigests> {
  const t0 = Date.now();
  const bytes = ram.bytes;
  const chunkBytes = chunkBytesFor(bytes);
  const present = await ram.populated(chunkBytes);
  const digests = Buffer.alloc(present.length * 32);
  const zero = new Map<number, Buffer>();
  const read: number[] = [];
  for (let i = 0; i < present.length; i++) {
    if (present[i]) {
      read.push(i);
      continue;
    }
    const len = Math.min(chunkBytes, bytes - i * chunkBytes);
    let d = zero.get(len);
    if (!d) zero.set(len, (d = crypto.createHash('sha256').update(Buffer.alloc(len)).digest()));
    d.copy(digests, i * 32);
  }
  const got = await digestChunks(ram, chunkBytes, read);
  read.forEach((c, k) => got.copy(digests, c * 32, k * 32, k * 32 + 32));
  return { bytes, chunkBytes, digests, ms: Date.now() - t0, hashedChunks: read.length };
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

/**
 * How much of the guest's main RAM is resident (touched at some point), from the smaps
 * entry of the mapping QEMU reports for guest address 0. Pages never touched are zero,
 * and a migration scans rather than sends them. Null if it cannot be told.
 */
export async function guestResidentBytes(qmp: QmpClient, pid: number): Promise<number | null> {
  try {
    const base = parseGpa2hva(await qmp.execute<string>('human-monitor-command', { 'command-line': 'gpa2hva 0' }));
    const smaps = await fs.promises.readFile(`/proc/${pid}/smaps`, 'utf8');
    let inside = false;
    for (const line of smaps.split('\n')) {
      const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
      if (m) {
        inside = parseInt(m[1], 16) <= base && base < parseInt(m[2], 16);
        continue;
      }
      if (inside && line.startsWith('Rss:')) return Number(/(\d+)/.exec(line)?.[1] ?? NaN) * 1024 || null;
    }
  } catch {
    /* no QMP, no smaps: unknown */
  }
  return null;
}
