/**
 * What the side benches (save, evacuation, cluster) share: the commit a result file
 * measured, and their own marked section of BENCHMARKS.md, which `npm run bench` keeps
 * when it rewrites the rest.
 */
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/**
 * The checked-out commit, `-dirty` when the tree has changes: a result file says what
 * code it measured. The bench's own output (bench/results/, BENCHMARKS.md) does not count:
 * a run rewrites it scenario by scenario, and every later scenario read as dirty.
 */
export function benchCommit(): string {
  const git = (args: string[]): string => execFileSync('git', args, { cwd: ROOT, encoding: 'utf8' }).trim();
  const changed = git(['status', '--porcelain', '--untracked-files=no', '--', '.', ':(exclude)bench/results', ':(exclude)BENCHMARKS.md']);
  return git(['rev-parse', 'HEAD']) + (changed ? '-dirty' : '');
}

/**
 * Replaces BENCHMARKS.md's section between `<!-- KEY:begin -->` and `<!-- KEY:end -->`
 * with `md` (which carries both markers), or appends it; `echo` prints it too.
 */
export function writeSection(key: string, md: string, echo = true): void {
  const f = path.join(ROOT, 'BENCHMARKS.md');
  const cur = fs.existsSync(f) ? fs.readFileSync(f, 'utf8') : '# Benchmarks\n';
  const re = new RegExp(`<!-- ${key}:begin -->[\\s\\S]*<!-- ${key}:end -->\\n?`);
  fs.writeFileSync(f, re.test(cur) ? cur.replace(re, () => md) : `${cur.trimEnd()}\n\n${md}`);
  if (echo) process.stdout.write(md);
}
