/**
 * What every fault campaign shares (faults.ts, cluster-faults.ts): the seeded random
 * numbers that make a round replayable, and the commit a result file names.
 */
import { execFileSync } from 'node:child_process';

/** mulberry32: the same seed gives the same rounds. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The commit a campaign ran on (a working tree with changes says so), or null outside git. */
export function campaignCommit(root: string): string | null {
  try {
    const head = execFileSync('git', ['rev-parse', 'HEAD'], { cwd: root, encoding: 'utf8' }).trim();
    const dirty = execFileSync('git', ['status', '--porcelain', '--untracked-files=no'], { cwd: root, encoding: 'utf8' }).trim() !== '';
    return dirty ? `${head}+changes` : head;
  } catch {
    return null;
  }
}
