/**
 * The memory check (`--verify-memory`, README "Memory check"): after the copy, while both
 * guests are paused and before the point of no return, the source compares per-chunk
 * SHA-256 digests of its RAM with the destination's loaded copy, has every chunk that
 * differs rewritten there from its own bytes, and goes on only if a second digest then
 * agrees everywhere. Both guests are paused throughout, so it is part of the pause. The
 * destination's answers are untrusted input.
 */
import { FerryError } from '../errors.ts';
import type { ApiClient } from '../api/client.ts';
import { MAX_REPAIR_BYTES } from '../api/protocol.ts';
import { differingChunks, overallDigest, type RamDigests } from '../qemu/memory.ts';
import type { MigrationHost, DomainHandle, MigrationLog } from './host.ts';
import type { SourceJob, Report, Mode } from './jobs.ts';
import { ask } from './ask.ts';
import type { RelocationAnswers } from '../api/relocation.ts';

export class MemoryCheck {
  constructor(
    private readonly host: MigrationHost,
    private readonly log: MigrationLog,
  ) {}

  /**
   * Compares per-chunk digests of the paused source's RAM and the destination's loaded
   * copy, rewrites on the destination every chunk that differs, and refuses to go on
   * unless a second digest of the destination then agrees everywhere. Both guests are
   * paused throughout, so this is part of the pause. The destination's answers are
   * untrusted input.
   */
  async verify(
    j: SourceJob,
    client: ApiClient,
    how: { dom: DomainHandle; mode: Mode; unreliable: boolean },
  ): Promise<NonNullable<Report['memoryCheck']>> {
    const { dom, mode, unreliable } = how;
    const t0 = Date.now();
    const [mine, first] = await Promise.all([
      this.host.ramDigests(dom),
      ask(client, 'relocation.digest', { jobId: j.jobId }, { timeoutMs: 180000 }),
    ]);
    // Shaped as the protocol says (ask); here: the same RAM as ours, chunk for chunk.
    const theirs = (o: RelocationAnswers['relocation.digest']): Buffer => {
      const d = Buffer.from(o.digests, 'base64');
      if (o.bytes !== mine.bytes || o.chunkBytes !== mine.chunkBytes || d.length !== mine.digests.length) {
        throw new FerryError(
          'MIGRATION_PROTOCOL',
          `${j.peer.name} answered relocation.digest with something that is not ${mine.digests.length / 32} chunk digests of ${mine.bytes} bytes`,
        );
      }
      return d;
    };
    const diff = differingChunks(mine.digests, theirs(first));
    let repairedBytes = 0;
    if (diff.length > 0) {
      repairedBytes = await this.repair(j, client, { dom, mine }, diff);
      // A second look at the repaired chunks only, in batches the API takes.
      const left: number[] = [];
      for (let k = 0; k < diff.length; k += 8192) {
        const part = diff.slice(k, k + 8192);
        const r = await ask(client, 'relocation.digest', { jobId: j.jobId, chunks: part }, { timeoutMs: 180000 });
        const d = Buffer.from(r.digests, 'base64');
        if (d.length !== part.length * 32)
          throw new FerryError(
            'MIGRATION_PROTOCOL',
            `${j.peer.name} answered relocation.digest for ${part.length} chunks with ${d.length} bytes`,
          );
        part.forEach((c, i) => {
          if (mine.digests.compare(d, i * 32, i * 32 + 32, c * 32, c * 32 + 32) !== 0) left.push(c);
        });
      }
      if (left.length > 0) {
        const why = unreliable
          ? `; QEMU ${this.host.qemu.version} under TCG loses dirty-page tracking in live migrations (fixed in QEMU 9.0)`
          : '';
        throw new FerryError(
          'MIGRATION_MEMORY_MISMATCH',
          `Cannot migrate domain "${j.domain}"${mode === 'live' ? ' live' : ''}: after the copy, ${left.length} of its ${mine.digests.length / 32} RAM chunks on ${j.peer.name} differ from ${this.host.cfg.name}'s even after they were rewritten${why}. It keeps running on ${this.host.cfg.name}`,
        );
      }
      this.log.warn('guest memory arrived different and was repaired', {
        jobId: j.jobId,
        domain: j.domain,
        chunks: diff.length,
        bytes: repairedBytes,
      });
    }
    const ms = Date.now() - t0;
    this.log.info('guest memory verified', {
      jobId: j.jobId,
      domain: j.domain,
      bytes: mine.bytes,
      digest: overallDigest(mine.digests),
      ms,
    });
    return { bytes: mine.bytes, ms, repairedBytes, repairedChunks: diff.length };
  }

  /** Sends the source's version of the given chunks, a few requests in flight at once. */
  private async repair(j: SourceJob, client: ApiClient, from: { dom: DomainHandle; mine: RamDigests }, chunks: number[]): Promise<number> {
    const { dom, mine } = from;
    const pieces: { offset: number; len: number }[] = [];
    for (const c of chunks) {
      const end = Math.min((c + 1) * mine.chunkBytes, mine.bytes);
      for (let o = c * mine.chunkBytes; o < end; o += MAX_REPAIR_BYTES)
        pieces.push({ offset: o, len: Math.min(MAX_REPAIR_BYTES, end - o) });
    }
    let sent = 0;
    await this.host.withRam(dom, false, async (ram) => {
      const worker = async (): Promise<void> => {
        const buf = Buffer.alloc(MAX_REPAIR_BYTES);
        for (let p = pieces.shift(); p; p = pieces.shift()) {
          try {
            const got = await ram.read(buf, p.len, p.offset);
            if (got !== p.len) throw new Error(`read ${got} of ${p.len} bytes at ${p.offset}`);
            // Raw bytes after the request line: no base64, no JSON escaping.
            await ask(
              client,
              'relocation.repair',
              { jobId: j.jobId, offset: p.offset, length: p.len },
              { timeoutMs: 60000, attachment: Buffer.from(buf.subarray(0, p.len)) },
            );
          } catch (e) {
            pieces.length = 0; // the others stop after their current piece
            throw e;
          }
          sent += p.len;
        }
      };
      // Every worker must have stopped before the RAM is closed (its fd could be reused).
      const done = await Promise.allSettled([worker(), worker(), worker(), worker()]);
      const failed = done.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) throw failed.reason;
    });
    return sent;
  }
}
