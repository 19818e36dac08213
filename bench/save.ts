/**
 * `npm run bench:save`: `ferry save` and `ferry restore` of a dense Linux guest (RAM
 * filled with mixed data, `lab guest linux --fill`) on one lab host, against the disk
 * itself. Contenders, interleaved (the order rotates each run), each from the same start
 * (the guest running) to the same end (the file complete and flushed, the guest running
 * again after the restore):
 *   mapped-ram  `ferry save` as it is by default: QEMU's file migration, multifd threads,
 *               O_DIRECT where the filesystem takes it;
 *   stream      `ferry save --stream`: QEMU's migration stream through ferryd's socket;
 *   cp          `cp` of a file of as many bytes as the mapped-ram save put on disk, into
 *               the same save directory, then `sync FILE`: the disk's sequential write
 *               rate, measured in the same run.
 * The guest's fill is checked (fill-check, its SHA-256) before the first run and after
 * the last: every restore in between carried it.
 * Writes bench/results/save.json and the "Save and restore" section of BENCHMARKS.md.
 *
 *   npm run bench:save [-- --reps N] [--memory MiB] [--fill MiB]   (--render: the section again)
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { spread, cell } from './stats.ts';
import { ok as cliOk, ferry, labUp, labDown, labState, tmpFile, waitFor, consoleLog } from '../test/helpers.ts';
import { benchCommit, writeSection } from './section.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const OUT = path.join(ROOT, 'bench', 'results');
const args = process.argv.slice(2);
const opt = (k: string): string | undefined => (args.includes(k) ? args[args.indexOf(k) + 1] : undefined);
const REPS = Number(opt('--reps') ?? 5);
const MEM = Number(opt('--memory') ?? 4096);
const FILL = Number(opt('--fill') ?? 3072);
const say = (m: string): void => void process.stderr.write(`bench:save: ${m}\n`);
const ok = (a: string[]): Promise<any> => cliOk(a, { timeoutMs: 900000 });

type Contender = 'mapped-ram' | 'stream' | 'cp';
const CONTENDERS: Contender[] = ['mapped-ram', 'stream', 'cp'];

interface Run {
  contender: Contender;
  rep: number;
  /** The command's wall time, the CLI's start to its answer (save: the file complete and flushed). */
  saveMs: number;
  /** Bytes the file takes on disk (a mapped-ram file is sparse: pages never written take none). */
  bytes: number;
  /** The file's length (mapped-ram: every page has its place, written or not). */
  length: number;
  restoreMs: number | null;
  directIo?: boolean;
}

async function sha(cmd: string): Promise<string> {
  const r = await ferry(['lab', 'ssh', 'dense', '--', cmd], { timeoutMs: 600000 });
  if (r.code !== 0) throw new Error(`lab ssh ${cmd}: ${r.stderr}`);
  return r.stdout.trim();
}

/** One save and its restore, timed each from the CLI's start to its answer. */
async function saveRun(c: 'mapped-ram' | 'stream', rep: number): Promise<Run> {
  const t0 = Date.now();
  const s = await ok(['-H', 'host1', 'save', 'dense', 'bench.save', ...(c === 'stream' ? ['--stream'] : []), '--json']);
  const saveMs = Date.now() - t0;
  if (s.format !== c) throw new Error(`asked for ${c}, the save was ${s.format} (${s.why ?? ''})`);
  const length = fs.statSync(s.file).size;
  const t1 = Date.now();
  const r = await ok(['-H', 'host1', 'restore', s.file, '--json']);
  const restoreMs = Date.now() - t1;
  if (r.state !== 'running') throw new Error(`restore left the guest ${r.state}`);
  fs.rmSync(s.file, { force: true });
  return { contender: c, rep, saveMs, bytes: s.bytes, length, restoreMs, ...(c === 'mapped-ram' ? { directIo: s.directIo } : {}) };
}

/** cp of `src` into the save directory, then sync of the copy: the disk's sequential write, same bytes. */
function cpRun(src: string, dir: string, rep: number): Run {
  const dst = path.join(dir, 'cp-dst.bin');
  const t0 = Date.now();
  execFileSync('cp', [src, dst]);
  execFileSync('sync', [dst]);
  const saveMs = Date.now() - t0;
  const st = fs.statSync(dst);
  fs.rmSync(dst, { force: true });
  return { contender: 'cp', rep, saveMs, bytes: st.blocks * 512, length: st.size, restoreMs: null };
}

/** A file of `bytes` random bytes (cp's source; read from the page cache while it is copied). */
function makeSource(p: string, bytes: number): void {
  const fd = fs.openSync(p, 'w', 0o600);
  const chunk = 8 << 20;
  for (let left = bytes; left > 0; left -= chunk) fs.writeSync(fd, crypto.randomBytes(Math.min(chunk, left)));
  fs.closeSync(fd);
}

const gibps = (bytes: number, ms: number): number => bytes / 2 ** 30 / (ms / 1000);

function render(runs: Run[], meta: Record<string, any>): string {
  const of = (c: Contender): Run[] => runs.filter((r) => r.contender === c);
  const rate = (c: Contender): ReturnType<typeof spread> => spread(of(c).map((r) => gibps(r.bytes, r.saveMs) * 1000));
  const cpRate = rate('cp');
  const fmt = (s: ReturnType<typeof spread>): string =>
    s ? `${(s.median / 1000).toFixed(2)} (${(s.min / 1000).toFixed(2)}–${(s.max / 1000).toFixed(2)})` : '-';
  const lines = [
    '<!-- save:begin -->',
    '## Save and restore',
    '',
    `\`npm run bench:save\` (bench/save.ts), ${meta.date}: a dense Linux guest of ${meta.memoryMiB} MiB, ${meta.fillMiB} MiB of it filled (mixed: a third random, the rest the guest's own files), saved on one lab host and restored, ${meta.reps} runs of each contender, the order rotating each run. Each save runs from the CLI's call to its answer (the file complete and flushed); each restore from the CLI's call to the guest running. \`cp\` copies as many bytes as the mapped-ram save put on disk into the same directory, then \`sync\`s the copy: the disk's write rate in the same run. Median (min–max); machine: ${meta.cpus} cores, QEMU ${meta.qemu}, ${meta.accel}, save directory on ${meta.fs}; commit ${String(meta.commit).slice(0, 12)}. Results: bench/results/save.json.`,
    '',
    '| contender | save, ms | restore, ms | on disk, MiB | file length, MiB | write rate, GiB/s | ÷ cp |',
    '|---|---|---|---|---|---|---|',
  ];
  for (const c of CONTENDERS) {
    const rs = of(c);
    const r = rate(c);
    const mib = (xs: number[]): string => cell(spread(xs.map((b) => b / 1048576)));
    lines.push(
      `| ${c}${c === 'mapped-ram' && rs.some((x) => x.directIo) ? ' (direct I/O)' : ''} | ${cell(spread(rs.map((x) => x.saveMs)))} | ${c === 'cp' ? '-' : cell(spread(rs.map((x) => x.restoreMs ?? 0)))} | ${mib(rs.map((x) => x.bytes))} | ${mib(rs.map((x) => x.length))} | ${fmt(r)} | ${r && cpRate ? (r.median / cpRate.median).toFixed(2) : '-'} |`,
    );
  }
  const med = (c: Contender, f: (r: Run) => number): number => spread(of(c).map(f))?.median ?? 0;
  const [mrSave, stSave] = [med('mapped-ram', (x) => x.saveMs), med('stream', (x) => x.saveMs)];
  const [mrLoad, stLoad] = [med('mapped-ram', (x) => x.restoreMs ?? 0), med('stream', (x) => x.restoreMs ?? 0)];
  lines.push(
    '',
    `The fill's SHA-256 after the last restore ${meta.fillIntact ? 'matched' : 'did NOT match'} the one before the first save. Medians: mapped-ram saved in ${stSave ? (mrSave / stSave).toFixed(2) : '-'}× the stream's time and restored in ${stLoad ? (mrLoad / stLoad).toFixed(2) : '-'}× its time. A mapped-ram file is as long as the guest's RAM, but pages never written take no room on disk; the write rates count bytes on disk.`,
    '<!-- save:end -->',
  );
  return lines.join('\n') + '\n';
}

async function main(): Promise<void> {
  fs.mkdirSync(OUT, { recursive: true });
  if (args.includes('--render')) {
    const saved = JSON.parse(fs.readFileSync(path.join(OUT, 'save.json'), 'utf8'));
    return writeSection('save', render(saved.runs, saved.meta));
  }
  say(`lab up; a ${MEM} MiB guest with ${FILL} MiB filled`);
  await labUp(['--hosts', '2', '--host-memory', String(MEM + 1024)]);
  const runs: Run[] = [];
  let meta: Record<string, unknown>;
  try {
    const info = await ok(['-H', 'host1', 'host', 'info', '--json']);
    const dir = path.join(path.dirname(labState().hosts[0].stateDir), 'save');
    const cfg = await ok(['lab', 'guest', 'linux', 'dense', '--memory', String(MEM), '--fill', String(FILL), '--json']);
    await ok(['-H', 'host1', 'create', tmpFile('dense.json', cfg), '--json']);
    const t = Date.now();
    await waitFor('the fill done', () => consoleLog('host1', 'dense').includes(`fill done: ${FILL} MiB`), 1800000, 1000);
    say(`filled in ${Math.round((Date.now() - t) / 1000)} s`);
    const before = await sha('fill-check');
    const src = path.join(dir, 'cp-src.bin');
    for (let rep = 0; rep < REPS; rep++) {
      const order = CONTENDERS.map((_, i) => CONTENDERS[(i + rep) % CONTENDERS.length]);
      for (const c of order) {
        let r: Run;
        if (c === 'cp') {
          // As many bytes as mapped-ram put on disk in the first run (which starts with it).
          if (!fs.existsSync(src)) makeSource(src, runs.find((x) => x.contender === 'mapped-ram')!.bytes);
          r = cpRun(src, dir, rep);
        } else r = await saveRun(c, rep);
        runs.push(r);
        say(
          `run ${rep + 1} ${c}: ${r.saveMs} ms, ${(r.bytes / 1048576).toFixed(0)} MiB on disk, ${gibps(r.bytes, r.saveMs).toFixed(2)} GiB/s${r.restoreMs !== null ? `; restore ${r.restoreMs} ms` : ''}`,
        );
      }
    }
    const after = await sha('fill-check');
    fs.rmSync(src, { force: true });
    const commit = benchCommit();
    const fsType = execFileSync('stat', ['-f', '-c', '%T', dir], { encoding: 'utf8' }).trim();
    meta = {
      date: new Date().toISOString().slice(0, 10),
      commit,
      cpus: os.cpus().length,
      qemu: info.qemuVersion,
      accel: info.accel,
      fs: fsType,
      reps: REPS,
      memoryMiB: MEM,
      fillMiB: FILL,
      fillIntact: before === after,
    };
  } finally {
    await labDown();
  }
  fs.writeFileSync(path.join(OUT, 'save.json'), JSON.stringify({ meta, runs }, null, 2) + '\n');
  writeSection('save', render(runs, meta));
}

void main().catch((e) => {
  process.stderr.write(`bench:save: ${String(e?.stack ?? e)}\n`);
  process.exit(1);
});
