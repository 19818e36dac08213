/**
 * `migrate --copy-storage`: a domain's writable disks move with it. QEMU 9.1 removed the
 * old block migration; the way is NBD plus blockdev-mirror, as libvirt does it.
 *
 *   source ferryd / QEMU                               destination ferryd / QEMU
 *     |-- Begin {copyDisks: index, format, sizes} ------->|  checks free space in storage.localDir,
 *     |                                                   |  creates each disk there (qemu-img), starts
 *     |                                                   |  the incoming QEMU on them
 *     |-- Prepare ---------------------------------------->|  nbd-server-start (TLS, authz: the source's
 *     |<-- {nbd: address, port} --------------------------|  certificate only), block-export-add per disk
 *     |   blockdev-add nbd (TLS, tls-hostname = its CN)    |
 *     |   blockdev-mirror sync full (top over a shared     |
 *     |     backing file), copy-mode background            |
 *     |   ... BLOCK_JOB_READY for every disk ...           |
 *     |   migrate (RAM) ... completed (guest paused)       |
 *     |   block-job-cancel: a ready mirror completes with  |
 *     |     a point-in-time copy (BLOCK_JOB_COMPLETED)     |
 *     |-- Finish ----------------------------------------->|  nbd-server-stop, then cont
 *
 * background, not write-blocking: a guest write never waits for the destination, so a
 * slow or dead link cannot stall the guest's disk. Once ready, the mirror keeps copying
 * what the guest writes; what is left when the guest pauses is copied at the
 * switchover (block-job-cancel on a ready mirror syncs to that moment). Before the
 * switchover, any failure leaves the source's disk the only live copy: the mirror is
 * force-cancelled, and where a dead link holds its NBD requests, ferryd aborts that TCP
 * connection (ss -K) so nothing hangs; the destination deletes what it made.
 */
import { execFileSync } from 'node:child_process';
import { FerryError } from '../errors.ts';
import { backingImages } from '../domain/storage.ts';
import type { QmpClient, QmpEvent } from '../qmp/client.ts';

/** What the source says of each disk it copies (Begin's domain.copyDisks). */
/** A disk the destination creates and the source mirrors into (a relocation message's shape: api/relocation.ts). */
export type { CopyDisk } from '../api/relocation.ts';
import type { CopyDisk } from '../api/relocation.ts';

interface BlockInfo {
  device: string;
  inserted?: { 'node-name': string; image: { 'virtual-size': number; 'actual-size'?: number; format: string } };
}

/**
 * The source's writable disks as Begin describes them: sizes from QEMU (device names are
 * disk<i>, qemu/argv.ts), the backing file from the image itself (QEMU was handed the
 * chain as descriptors, so it knows no path for it).
 */
export async function describeDisks(q: QmpClient, disks: { index: number; path: string }[]): Promise<CopyDisk[]> {
  const blocks = await q.execute<BlockInfo[]>('query-block');
  return disks.map(({ index, path }) => {
    const b = blocks.find((x) => x.device === `disk${index}`);
    const img = b?.inserted?.image;
    if (!img) throw new FerryError('MIGRATION_FAILED', `The source QEMU has no disk${index} to copy`);
    if (img.format !== 'raw' && img.format !== 'qcow2')
      throw new FerryError('MIGRATION_FAILED', `disk${index} is ${img.format}; --copy-storage copies raw and qcow2`);
    const backing = img.format === 'qcow2' ? backingImages(path)[0] : undefined;
    return {
      index,
      format: img.format,
      virtualSize: img['virtual-size'],
      allocated: img['actual-size'] ?? img['virtual-size'],
      ...(backing ? { backing } : {}),
    };
  });
}

/** The node under a drive (its format layer): what a mirror copies from, or an export serves. */
export async function nodeOf(q: QmpClient, index: number): Promise<string> {
  const blocks = await q.execute<BlockInfo[]>('query-block');
  const node = blocks.find((x) => x.device === `disk${index}`)?.inserted?.['node-name'];
  if (!node) throw new FerryError('MIGRATION_FAILED', `QEMU has no disk${index}`);
  return node;
}

/** ferry's own block jobs and NBD client nodes in a source QEMU: found by these prefixes, also after a restart. */
const JOB_PREFIX = 'ferry-mirror';
const TARGET_PREFIX = 'ferry-nbd';
const JOB = (i: number): string => `${JOB_PREFIX}${i}`;
const TARGET = (i: number): string => `${TARGET_PREFIX}${i}`;
export const EXPORT = (i: number): string => `disk${i}`;

/** Source side: one mirror job per copied disk, into the destination's NBD exports. */
export class DiskMirror {
  /** Why a job ended before it was asked to (an I/O error on the target, a dead link). */
  failed: string | undefined;
  /** The latest byte counts (progress), for the bar while RAM moves. */
  last = { copied: 0, total: 0 };
  private readonly ready = new Set<number>();
  private readonly ended = new Map<number, string | null>();
  private waiters: (() => void)[] = [];
  private readonly onEvent = (e: QmpEvent): void => {
    const id = typeof e.data?.device === 'string' ? e.data.device : typeof e.data?.id === 'string' ? e.data.id : '';
    const i = this.disks.find((d) => JOB(d.index) === id)?.index;
    if (i === undefined) return;
    if (e.event === 'BLOCK_JOB_READY') this.ready.add(i);
    if (e.event === 'BLOCK_JOB_COMPLETED' || e.event === 'BLOCK_JOB_CANCELLED') {
      const err =
        typeof e.data?.error === 'string' ? e.data.error : e.event === 'BLOCK_JOB_CANCELLED' && !this.finishing ? 'cancelled' : null;
      this.ended.set(i, err);
      if (err && !this.finishing && !this.failed) this.failed = `the copy of disk${i} ended: ${err}`;
    }
    for (const w of this.waiters.splice(0)) w();
  };
  private finishing = false;

  constructor(
    private readonly q: QmpClient,
    readonly disks: CopyDisk[],
  ) {
    q.on('event', this.onEvent);
  }

  /** Connects to the exports and starts every mirror; `speed` caps each (bytes/s, 0: none). */
  async start(nbd: { address: string; port: number }, tls: { creds: string; hostname: string } | null, speed: number): Promise<void> {
    for (const d of this.disks) {
      await this.q.execute('blockdev-add', {
        driver: 'nbd',
        'node-name': TARGET(d.index),
        server: { type: 'inet', host: nbd.address, port: String(nbd.port) },
        export: EXPORT(d.index),
        ...(tls ? { 'tls-creds': tls.creds, 'tls-hostname': tls.hostname } : {}),
      });
      await this.q.execute('blockdev-mirror', {
        'job-id': JOB(d.index),
        device: await nodeOf(this.q, d.index),
        target: TARGET(d.index),
        sync: d.backing ? 'top' : 'full',
        'copy-mode': 'background',
        ...(speed > 0 ? { speed } : {}),
      });
    }
  }

  private changed(): Promise<void> {
    return new Promise((r) => this.waiters.push(r));
  }

  /** Waits until every disk is in sync (BLOCK_JOB_READY), `stop` resolves, or a job fails. */
  async untilReady(stop: Promise<string>): Promise<void> {
    let why: string | undefined;
    void stop.then((w) => {
      why = w;
      for (const f of this.waiters.splice(0)) f();
    });
    while (this.ready.size < this.disks.length) {
      if (this.failed) throw new FerryError('MIGRATION_FAILED', `Copying the disks failed: ${this.failed}`);
      if (why) throw new FerryError(why === 'cancelled' ? 'MIGRATION_CANCELLED' : 'TIMEOUT', why === 'cancelled' ? 'cancelled' : why);
      await this.changed();
    }
  }

  /** Bytes copied and to copy, over every disk. */
  async progress(): Promise<{ copied: number; total: number }> {
    const jobs = await this.q.execute<{ device: string; offset: number; len: number }[]>('query-block-jobs');
    let copied = 0,
      total = 0;
    for (const j of jobs)
      if (j.device.startsWith(JOB_PREFIX)) {
        copied += j.offset;
        total += j.len;
      }
    return { copied, total };
  }

  /**
   * The guest is paused and its RAM is there: each ready mirror ends with a point-in-time
   * copy (block-job-cancel on a ready mirror completes it), and the NBD clients go.
   */
  async complete(timeoutMs = 30000): Promise<void> {
    if (this.failed) throw new FerryError('MIGRATION_FAILED', `Copying the disks failed: ${this.failed}`);
    this.finishing = true;
    for (const d of this.disks) await this.q.execute('block-job-cancel', { device: JOB(d.index) });
    const deadline = Date.now() + timeoutMs;
    while (this.ended.size < this.disks.length) {
      if (Date.now() > deadline) throw new FerryError('MIGRATION_FAILED', 'The disk copies did not complete within 30 s of the switchover');
      await Promise.race([this.changed(), new Promise((r) => setTimeout(r, 500))]);
    }
    const bad = [...this.ended].find(([, e]) => e);
    if (bad) throw new FerryError('MIGRATION_FAILED', `The copy of disk${bad[0]} failed at the switchover: ${bad[1]}`);
    for (const d of this.disks) await this.q.execute('blockdev-del', { 'node-name': TARGET(d.index) }).catch(() => undefined);
    this.dispose();
  }

  dispose(): void {
    this.q.off('event', this.onEvent);
  }
}

/**
 * Before the point of no return, whatever state it is in (also after a restart): force
 * every ferry mirror job off (dropping in-flight NBD requests, so a dead link cannot hang
 * it) and remove the NBD clients. The source's own disks are untouched.
 */
export async function abortMirrors(q: QmpClient, nbd?: { address: string; port: number }): Promise<number> {
  const list = async <T>(cmd: string, args?: Record<string, unknown>): Promise<T[]> => {
    const r = await q.execute<T[]>(cmd, args).catch(() => []);
    return Array.isArray(r) ? r : [];
  };
  const jobs = await list<{ device: string }>('query-block-jobs');
  const ours = jobs.filter((j) => j.device.startsWith(JOB_PREFIX));
  for (const j of ours) await q.execute('block-job-cancel', { device: j.device, force: true }).catch(() => undefined);
  const gone = async (ms: number): Promise<boolean> => {
    const deadline = Date.now() + ms;
    for (;;) {
      const left = await list<{ device: string }>('query-block-jobs');
      if (!left.some((j) => j.device.startsWith(JOB_PREFIX))) return true;
      if (Date.now() > deadline) return false;
      await new Promise((r) => setTimeout(r, 100));
    }
  };
  // NBD requests stuck on a dead link hold the job until TCP gives up (minutes): abort
  // the connection to the export, and they fail at once.
  if (ours.length && !(await gone(2000)) && nbd) dropConnections(nbd.address, nbd.port);
  await gone(10000);
  const nodes = await list<{ 'node-name': string }>('query-named-block-nodes', { flat: true });
  for (const n of nodes)
    if (n['node-name'].startsWith(TARGET_PREFIX)) await q.execute('blockdev-del', { 'node-name': n['node-name'] }).catch(() => undefined);
  return ours.length;
}

/** Aborts this host's TCP connections to ADDRESS:PORT (a dead NBD export), as `ss -K` does. */
export function dropConnections(address: string, port: number): void {
  if (!/^[0-9a-fA-F.:]+$/.test(address) || !Number.isInteger(port)) return;
  try {
    execFileSync('ss', ['-K', 'dst', address, 'dport', '=', String(port)], { stdio: 'ignore', timeout: 5000 });
  } catch {
    /* nothing to abort */
  }
}
