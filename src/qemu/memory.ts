/**
 * A digest of a stopped guest's RAM, read through QMP `pmemsave` into a FIFO so that
 * nothing the size of guest RAM ever touches the disk.
 *
 * Why ferry needs this: QEMU before 9.0 loses dirty-page tracking under TCG. Its fast
 * path for syncing the migration bitmap (aa8dc044772, "synchronize memory bitmap 64bits
 * at a time") clears the bits without re-arming the TCG TLB's not-dirty trap, so a page
 * whose TLB entry outlives a sync is written without being marked dirty, and is never
 * sent again. Once the vCPU's TLB has grown large enough (every dirty-log start/stop
 * flushes and may double it), a live migration converges with stale pages on the
 * destination and QEMU reports success. Upstream fixed it in 9.0 (03bfc2188f, "physmem:
 * Fix migration dirty bitmap coherency with TCG memory access"); Debian 12 ships 7.2.
 * KVM tracks dirty pages in the kernel and is not affected.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import crypto from 'node:crypto';
import { execFileSync } from 'node:child_process';
import type { QmpClient } from '../qmp/client.ts';

export interface RamRange { start: number; size: number }

const MiB = 1048576;

/**
 * Guest-physical ranges backed by the domain's RAM. Below 4 GiB the PC machines leave a
 * hole for PCI; what does not fit below it is mapped from 4 GiB up. (QEMU's pc_piix and
 * pc_q35: i440fx splits at 3 GiB once RAM reaches 3.5 GiB, q35 at 2 GiB once RAM reaches
 * 2.75 GiB.)
 */
export function ramRanges(memoryMiB: number, machine: string): RamRange[] {
  const total = memoryMiB * MiB;
  const q35 = /q35/.test(machine);
  const threshold = q35 ? 0xb0000000 : 0xe0000000;
  const low = total >= threshold ? (q35 ? 0x80000000 : 0xc0000000) : total;
  const r: RamRange[] = [{ start: 0, size: low }];
  if (total > low) r.push({ start: 0x100000000, size: total - low });
  return r;
}

/** True where QEMU's live-migration dirty tracking is known to lose pages (see above). */
export function dirtyTrackingUnreliable(accel: string, qemuVersion: string): boolean {
  const major = Number(qemuVersion.split('.')[0]);
  // An unreadable version is treated as affected: checking costs time, not safety.
  return accel === 'tcg' && !(major >= 9);
}

export interface RamDigest { digest: string; bytes: number; ms: number }

/**
 * SHA-256 over the RAM ranges of a QEMU whose guest is stopped (a running guest would
 * change under the reader). `dir` is a private directory for the FIFO.
 */
export async function digestGuestRam(qmp: QmpClient, dir: string, ranges: RamRange[], timeoutMs = 120000): Promise<RamDigest> {
  const t0 = Date.now();
  const hash = crypto.createHash('sha256');
  const fifo = path.join(dir, `ram-${process.pid}-${Date.now()}.fifo`);
  fs.rmSync(fifo, { force: true });
  execFileSync('mkfifo', ['-m', '0600', fifo]);
  let bytes = 0;
  try {
    for (const r of ranges) {
      // O_RDWR: opening never blocks and the pipe never reads as closed before QEMU
      // has opened it; the expected size, not EOF, ends the read.
      const fd = fs.openSync(fifo, fs.constants.O_RDWR | fs.constants.O_NONBLOCK);
      const sock = new net.Socket({ fd, readable: true, writable: false });
      let got = 0;
      let timer: NodeJS.Timeout | undefined;
      const read = new Promise<void>((resolve, reject) => {
        timer = setTimeout(() => reject(new Error(`reading guest RAM timed out after ${timeoutMs} ms`)), timeoutMs);
        sock.on('data', (d: Buffer) => {
          const take = Math.min(d.length, r.size - got);
          hash.update(take === d.length ? d : d.subarray(0, take));
          got += take;
          if (got >= r.size) { clearTimeout(timer); resolve(); }
        });
        sock.on('error', (e) => { clearTimeout(timer); reject(e); });
      });
      try {
        // QEMU writes the whole range before it answers, so both must run at once.
        await Promise.all([qmp.execute('pmemsave', { val: r.start, size: r.size, filename: fifo }), read]);
      } finally {
        clearTimeout(timer);
        sock.destroy();
      }
      bytes += got;
    }
  } finally {
    fs.rmSync(fifo, { force: true });
  }
  return { digest: hash.digest('hex'), bytes, ms: Date.now() - t0 };
}
