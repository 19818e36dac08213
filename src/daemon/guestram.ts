/**
 * Guest RAM access: reading (and for the migration memory check, writing) a domain's
 * main RAM through its QEMU's /proc/PID/mem (qemu/memory.ts). Only while the guest is
 * stopped do the bytes mean anything; every access proves the pid is still the QEMU
 * ferryd started before touching it.
 */
import { deflateRawSync } from 'node:zlib';
import { FerryError } from '../errors.ts';
import { hasProcess } from '../domain/state.ts';
import { processStartTicks, processUid } from '../qemu/process.ts';
import { openGuestRam, digestRam, digestChunks, chunkBytesFor, type GuestRam, type RamDigests } from '../qemu/memory.ts';
import type { HostedDomain } from './records.ts';
import type { QemuRuntime } from './runtime.ts';

const ZERO_PAGE = Buffer.alloc(4096);
/** Pages nonZeroBytes reads: 16 MiB, a few tens of ms. */
const NONZERO_SAMPLES = 4096;

export class GuestRamAccess {
  constructor(
    private readonly hostName: string,
    private readonly runtime: QemuRuntime,
  ) {}

  /**
   * Returns the first byte of every 4 KiB page in [startMiB, endMiB) of guest RAM, read
   * while the guest is stopped (it is resumed afterwards if it ran). The pattern checker's eyes.
   */
  async sample(dom: HostedDomain, startMiB: number, endMiB: number): Promise<{ bytes: string; pages: number }> {
    const name = dom.rec.config.name;
    const { qmp } = this.runtime.needProcess(dom, 'read the memory of');
    if (endMiB <= startMiB || endMiB > dom.rec.config.memoryMiB)
      throw new FerryError(
        'API_BAD_REQUEST',
        `Range ${startMiB}-${endMiB} MiB is outside domain "${name}" (${dom.rec.config.memoryMiB} MiB)`,
      );
    const wasRunning = dom.rec.state.kind === 'running';
    dom.busy = 'sampling memory';
    try {
      if (wasRunning) await qmp.execute('stop');
      const pages = (endMiB - startMiB) * 256;
      const out = Buffer.alloc(pages);
      await this.withRam(dom, false, async (ram) => {
        const chunk = Buffer.alloc(1048576);
        for (let mib = 0; mib < endMiB - startMiB; mib++) {
          await ram.read(chunk, chunk.length, (startMiB + mib) * 1048576);
          for (let p = 0; p < 256; p++) out[mib * 256 + p] = chunk[p * 4096];
        }
      });
      return { bytes: out.toString('base64'), pages };
    } finally {
      dom.busy = undefined;
      if (wasRunning && dom.qmp) await dom.qmp.execute('cont');
    }
  }

  /**
   * How well the guest's pages compress, for --compress auto: 32 samples of 256 KiB spread
   * over its RAM, read while it runs (a page caught mid-write changes no verdict), the
   * all-zero pages left out (QEMU sends those as markers either way), the rest deflated at
   * level 1 (Node 20 has no zstd; level 1 is near zstd's fast level in ratio). Compressed ÷
   * raw, or null when fewer than 64 non-zero pages were found.
   */
  async compressibility(dom: HostedDomain): Promise<number | null> {
    const size = dom.rec.config.memoryMiB * 1048576;
    const chunk = 256 * 1024;
    const samples = 32;
    return this.withRam(dom, false, async (ram) => {
      const buf = Buffer.alloc(chunk);
      let raw = 0;
      let packed = 0;
      for (let i = 0; i < samples; i++) {
        const at = Math.floor(((i + 0.5) * (size - chunk)) / samples / 4096) * 4096;
        await ram.read(buf, chunk, at);
        const pages: Buffer[] = [];
        for (let p = 0; p < chunk; p += 4096) {
          const page = buf.subarray(p, p + 4096);
          if (!page.equals(ZERO_PAGE)) pages.push(page);
        }
        if (!pages.length) continue;
        const data = Buffer.concat(pages);
        raw += data.length;
        packed += deflateRawSync(data, { level: 1 }).length;
      }
      return raw >= 64 * 4096 ? packed / raw : null;
    });
  }

  /**
   * How many bytes of the guest's RAM hold data (pages that are not all zero), for the
   * plan: NONZERO_SAMPLES pages, one at a random place in each of as many equal stretches
   * of its RAM, read while it runs. QEMU sends a zero page as a marker, so only these
   * cost the link. QEMU's resident memory (smaps) is no measure of that wherever the
   * kernel backs a read of a never-written page with a real page: here, all of an incoming
   * guest's RAM is resident after its move, and plans counted it whole (about 9× long on
   * an idle 1 GiB guest). One page in 64 of a 1 GiB guest: ±5 % at one standard
   * deviation where a tenth of it holds data.
   */
  async nonZeroBytes(dom: HostedDomain): Promise<number> {
    const size = dom.rec.config.memoryMiB * 1048576;
    const pages = Math.floor(size / 4096);
    const n = Math.min(NONZERO_SAMPLES, pages);
    return this.withRam(dom, false, async (ram) => {
      const batch = 64;
      const buf = Buffer.alloc(batch * 4096);
      let data = 0;
      for (let i = 0; i < n; i += batch) {
        const k = Math.min(batch, n - i);
        // Async reads, `batch` at a time: ferryd's event loop is never held for the lot.
        await Promise.all(
          Array.from({ length: k }, (_, j) => {
            const page = Math.min(pages - 1, Math.floor(((i + j + Math.random()) * pages) / n));
            return ram.read(buf.subarray(j * 4096, (j + 1) * 4096), 4096, page * 4096).then((got) => {
              if (got !== 4096) throw new Error(`a short read of guest RAM: ${got} bytes of a page at ${page * 4096}`);
            });
          }),
        );
        for (let j = 0; j < k; j++) if (!buf.subarray(j * 4096, (j + 1) * 4096).equals(ZERO_PAGE)) data++;
      }
      return Math.round((size * data) / n);
    });
  }

  /**
   * Runs `f` on a domain's main RAM and closes it afterwards. Failures of ferry's own
   * (a refused write, a peer's answer) pass through; any other is MEMORY_UNREADABLE.
   */
  async withRam<T>(dom: HostedDomain, write: boolean, f: (ram: GuestRam) => Promise<T>): Promise<T> {
    const s = dom.rec.state;
    const c = dom.rec.config;
    if (!hasProcess(s) || !dom.qmp) throw new FerryError('DOMAIN_BAD_STATE', `Domain "${c.name}" has no QEMU to read memory from`);
    const fail = (e: unknown): never => {
      if (e instanceof FerryError) throw e;
      // EACCES or EPERM: no ptrace access (kernel.yama.ptrace_scope=3, or an LSM).
      throw new FerryError(
        'MEMORY_UNREADABLE',
        `Cannot ${write ? 'write' : 'read'} the RAM of domain "${c.name}" on ${this.hostName}: ${(e as Error).message}`,
      );
    };
    const ram = await openGuestRam(dom.qmp, s.pid, c.memoryMiB * 1048576, write).catch(fail);
    // Opened first, then proven: had the pid been reused before the open, the process
    // it names now would have another start time (or not run as the domain's uid).
    const want = dom.rec.runtime?.startTicks;
    const id = this.runtime.identityOf(dom);
    if ((want !== undefined && processStartTicks(s.pid) !== want) || (id && processUid(s.pid) !== id.uid)) {
      ram.close();
      throw new FerryError(
        'MEMORY_UNREADABLE',
        `Domain "${c.name}": pid ${s.pid} is no longer the QEMU ferryd started (start time or owner changed); not touching its memory`,
      );
    }
    try {
      return await f(ram).catch(fail);
    } finally {
      ram.close();
    }
  }

  /** Per-chunk SHA-256 of a paused domain's RAM (the migration memory check). */
  digests(dom: HostedDomain): Promise<RamDigests> {
    return this.withRam(dom, false, digestRam);
  }

  /** SHA-256 of some chunks of a paused domain's RAM, in the order given. */
  chunkDigests(dom: HostedDomain, chunks: number[]): Promise<{ bytes: number; chunkBytes: number; digests: Buffer }> {
    return this.withRam(dom, false, async (ram) => {
      const chunkBytes = chunkBytesFor(ram.bytes);
      const n = Math.ceil(ram.bytes / chunkBytes);
      const bad = chunks.find((c) => c >= n);
      if (bad !== undefined)
        throw new FerryError('MIGRATION_PROTOCOL', `chunk ${bad} is outside the ${n} chunks of domain "${dom.rec.config.name}"`);
      return { bytes: ram.bytes, chunkBytes, digests: await digestChunks(ram, chunkBytes, chunks) };
    });
  }
}
