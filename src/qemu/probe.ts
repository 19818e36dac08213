/**
 * Host facts that only QEMU can tell: its version, the concrete machine type behind
 * the "pc" alias, the CPU model's features, and which accelerator is worth using.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { DEFAULT_ENGINE, engineArgs, type Accel, type Engine } from './argv.ts';
import { startQemu, killAndWait, connectUnix } from './process.ts';
import { FerryError } from '../errors.ts';
import type { QmpClient } from '../qmp/client.ts';

export interface QemuFacts {
  version: string;
  machine: string;
  cpuModel: string;
  cpuFeatures: string[];
  /** Features of the CPU model that this accelerator (and, under KVM, this CPU) cannot provide: domains with it would not start (`enforce`). */
  cpuUnavailable: string[];
  /** The accelerator the CPU facts hold for. */
  accel: Accel;
  machines: string[];
  /**
   * Every CPU model this QEMU knows, with its guest-visible features and those the
   * accelerator cannot provide: what a domain's own "cpu" is checked against.
   */
  models: Record<string, { features: string[]; unavailable: string[] }>;
  /** ferryd.json "cpuCeiling": no domain here gets a feature this model lacks (a mixed fleet's older CPUs). */
  ceiling: string | null;
}

/**
 * QEMU lists a feature under each of its spellings (sse4.1, sse4-1, sse4_1): one each,
 * the dotted or dashed one, sorted, so messages name a feature once.
 */
function oneSpelling(names: string[]): string[] {
  const by = new Map<string, string>();
  const rank = (n: string): number => (n.includes('.') ? 0 : n.includes('-') ? 1 : 2);
  for (const n of names) {
    const k = n.replace(/[-_.]/g, '');
    const cur = by.get(k);
    if (!cur || rank(n) < rank(cur)) by.set(k, n);
  }
  return [...by.values()].sort();
}

// Only guest-visible features: QEMU's own knobs (check, enforce, x-*, …) are not CPUID bits.
const KNOBS = new Set([
  'check',
  'enforce',
  'kvm',
  'tcg-cpuid',
  'full-cpuid-auto-level',
  'fill-mtrr-mask',
  'l3-cache',
  'legacy-cache',
  'vmware-cpuid-freq',
  'cpuid-0xb',
  'migratable',
  'pmu',
  'hypervisor',
]);

/** Every model's guest-visible features (query-cpu-model-expansion, sent at once: QMP answers in order). */
async function expandAll(qmp: QmpClient, defs: { name: string }[]): Promise<Record<string, string[]>> {
  const exps = await Promise.all(
    defs.map((d) =>
      qmp
        .execute<{ model: { props: Record<string, unknown> } }>('query-cpu-model-expansion', { type: 'full', model: { name: d.name } })
        .catch(() => null),
    ),
  );
  const out: Record<string, string[]> = {};
  defs.forEach((d, i) => {
    const exp = exps[i];
    if (exp)
      out[d.name] = oneSpelling(
        Object.entries(exp.model.props)
          .filter(([k, v]) => v === true && !k.startsWith('x-') && !KNOBS.has(k))
          .map(([k]) => k),
      );
  });
  return out;
}

/**
 * The CPU models' features of one QEMU build under one accelerator, on disk (default
 * /var/cache/ferry, FERRY_CACHE_DIR): the key is the binary's path, size and mtime, its
 * version, data dirs and the accelerator, so an upgraded QEMU is asked again. A cache
 * that cannot be read or written is only a slower start.
 */
function featureCache(engine: Engine, version: string, accel: Accel) {
  let file = '';
  try {
    const bin = engine.binary.includes('/') ? engine.binary : whichSync(engine.binary);
    const st = fs.statSync(bin);
    const key = crypto
      .createHash('sha256')
      .update(JSON.stringify([fs.realpathSync(bin), st.size, st.mtimeMs, version, engine.dataDirs, accel, 1]))
      .digest('hex')
      .slice(0, 24);
    file = path.join(process.env.FERRY_CACHE_DIR ?? '/var/cache/ferry', `cpu-models-${key}.json`);
  } catch {
    file = '';
  }
  return {
    read: (): Record<string, string[]> | null => {
      try {
        const v = JSON.parse(fs.readFileSync(file, 'utf8')) as unknown;
        return v && typeof v === 'object' && Object.values(v).every((x) => Array.isArray(x)) ? (v as Record<string, string[]>) : null;
      } catch {
        return null;
      }
    },
    write: (v: Record<string, string[]>): void => {
      if (!file) return;
      try {
        fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o755 });
        const tmp = `${file}.${process.pid}.tmp`;
        fs.writeFileSync(tmp, JSON.stringify(v));
        fs.renameSync(tmp, file);
      } catch {
        /* a read-only or missing cache directory: the next start asks QEMU again */
      }
    },
  };
}

/** A command's path on $PATH. */
function whichSync(cmd: string): string {
  for (const d of (process.env.PATH ?? '').split(':')) {
    const p = path.join(d, cmd);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      /* next */
    }
  }
  throw new Error(`${cmd} not on PATH`);
}

/** Models no domain may name: they are this host's own CPU, and cannot migrate. */
const UNMOVABLE = new Set(['host', 'max', 'base']);

/**
 * The features of `model` this host cannot give a guest: those its accelerator lacks,
 * and those above its ceiling. Empty: the model runs here as it runs elsewhere. Null:
 * this QEMU does not know the model.
 */
export function cpuMissing(f: Pick<QemuFacts, 'models' | 'ceiling'>, model: string): string[] | null {
  const m = f.models[model];
  if (!m || UNMOVABLE.has(model)) return null;
  const cap = f.ceiling ? new Set(f.models[f.ceiling]?.features ?? []) : null;
  const over = cap ? m.features.filter((x) => !cap.has(x)) : [];
  return [...new Set([...m.unavailable, ...over])].sort();
}

/** The models a domain can run with here (every feature available, none above the ceiling). */
export function cpuModelsHere(f: Pick<QemuFacts, 'models' | 'ceiling'>): string[] {
  return Object.keys(f.models)
    .filter((n) => cpuMissing(f, n)?.length === 0)
    .sort();
}

/**
 * Starts a machine-less QEMU under the accelerator domains will use and asks it over
 * QMP. About a quarter of a second. Under KVM the CPU model's features depend on the
 * host CPU, so a probe under TCG would prove nothing about them.
 */
export async function probeQemu(
  cpuModel: string,
  scratchDir: string,
  engine: Engine = DEFAULT_ENGINE,
  o: { accel?: Accel; ceiling?: string | null; warn?: (msg: string) => void } = {},
): Promise<QemuFacts> {
  fs.mkdirSync(scratchDir, { recursive: true });
  const logPath = path.join(scratchDir, 'probe.log');
  // What QEMU wrote in this attempt (the log is appended to by every probe).
  const said = (from: number): string => {
    try {
      const buf = fs.readFileSync(logPath);
      return buf.subarray(from).toString('utf8').split('\n').slice(1).join(' ').trim().slice(-400);
    } catch {
      return '';
    }
  };
  const size = (): number => (fs.existsSync(logPath) ? fs.statSync(logPath).size : 0);
  let at = size();
  try {
    return await probeOnce(cpuModel, scratchDir, engine, o);
  } catch (e) {
    if (!(e instanceof Error && e.name === 'QmpClosedError')) throw e;
    // Seen once in a whole suite: the probe's QEMU closed QMP right after the handshake,
    // at a ferryd restart. One more try before ferryd refuses to start; what QEMU wrote
    // (a signal and its sender, say) goes to the log either way.
    o.warn?.(`the QEMU probe closed its QMP connection before answering (${said(at) || 'QEMU wrote nothing'}); probing again`);
  }
  at = size();
  try {
    return await probeOnce(cpuModel, scratchDir, engine, o);
  } catch (e) {
    if (!(e instanceof Error && e.name === 'QmpClosedError')) throw e;
    throw new FerryError(
      'QEMU_START_FAILED',
      `The QEMU probe (${engine.binary} -machine none) closed its QMP connection before answering, twice: ${said(at) || 'QEMU wrote nothing'}. Check that ${engine.binary} runs (\`${engine.binary} -machine none -nodefaults -display none -qmp stdio\`)`,
    );
  }
}

async function probeOnce(
  cpuModel: string,
  scratchDir: string,
  engine: Engine,
  o: { accel?: Accel; ceiling?: string | null },
): Promise<QemuFacts> {
  const logPath = path.join(scratchDir, 'probe.log');
  const accel = o.accel ?? 'tcg';
  const ceiling = o.ceiling ?? null;
  const qmpPath = path.join(scratchDir, `probe-${process.pid}-${accel}.qmp`);
  // Normally a tenth of a second; but at start-up it shares two cores with the
  // accelerator race (chooseAccel), whose KVM guest can starve the host for seconds
  // under nested software KVM, and a fresh lab starts several ferryds at once.
  const q = await startQemu(
    ['-machine', 'none', '-accel', accel, '-nodefaults', '-display', 'none', '-qmp', `unix:${qmpPath},server=on,wait=off`],
    { qmpPath, logPath, what: 'QEMU probe', timeoutMs: 30000, engine },
  );
  try {
    const ver = await q.qmp.execute<{ qemu: { major: number; minor: number; micro: number } }>('query-version');
    const machines = await q.qmp.execute<{ name: string; alias?: string; 'is-default'?: boolean }[]>('query-machines');
    const pc = machines.find((m) => m.alias === 'pc') ?? machines.find((m) => m['is-default']);
    const defs = await q.qmp.execute<{ name: string; 'unavailable-features'?: string[] }[]>('query-cpu-definitions');
    // Every model's features (about 150 models, a few hundred ms to a second): a domain
    // may name any of them, and a move is checked against the one it runs with. They
    // depend only on the QEMU build and the accelerator, so they are cached per build;
    // which features this host cannot give is asked anew every time.
    const version = `${ver.qemu.major}.${ver.qemu.minor}.${ver.qemu.micro}`;
    const cache = featureCache(engine, version, accel);
    let features = cache.read();
    if (!features) {
      features = await expandAll(q.qmp, defs);
      cache.write(features);
    }
    const models: QemuFacts['models'] = {};
    for (const d of defs)
      if (features[d.name]) models[d.name] = { features: features[d.name], unavailable: d['unavailable-features'] ?? [] };
    if (ceiling && (!models[ceiling] || UNMOVABLE.has(ceiling)))
      throw new FerryError(
        'CONFIG_INVALID',
        `"cpuCeiling": QEMU ${ver.qemu.major}.${ver.qemu.minor}.${ver.qemu.micro} knows no CPU model ${JSON.stringify(ceiling)}; name one of \`${engine.binary} -cpu help\` (not host, max or base)`,
      );
    const facts = { models, ceiling };
    const own = models[cpuModel];
    return {
      version: `${ver.qemu.major}.${ver.qemu.minor}.${ver.qemu.micro}`,
      machine: pc?.name ?? 'pc',
      cpuModel,
      cpuFeatures: own?.features ?? [],
      cpuUnavailable: cpuMissing(facts, cpuModel) ?? [`the model itself (QEMU knows no ${cpuModel})`],
      accel,
      machines: machines.map((m) => m.name).sort(),
      models,
      ceiling,
    };
  } finally {
    q.qmp.close();
    await killAndWait(q.pid, 500);
    fs.rmSync(qmpPath, { force: true });
  }
}

export interface AccelChoice {
  accel: Accel;
  reason: string;
  probe?: { tcgMs: number | null; kvmMs: number | null };
}

function kvmUsable(): string | null {
  try {
    const fd = fs.openSync('/dev/kvm', 'r+');
    fs.closeSync(fd);
    return null;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'ENOENT'
      ? '/dev/kvm does not exist'
      : `/dev/kvm cannot be opened (${(e as NodeJS.ErrnoException).code})`;
  }
}

/**
 * Time from QEMU start to the pattern guest's "ready" line plus 8 progress marks, or null
 * if it does not get there within capMs. The workload mixes firmware port I/O (SeaBIOS
 * boot) and first touches of guest pages, both of which a nested, software KVM
 * (kvm_pvm) is slow at, so it predicts what a Linux guest would see.
 */
async function timePatternBoot(
  accel: Accel,
  capMs: number,
  with_: { image: string; scratchDir: string; engine: Engine },
): Promise<number | null> {
  const { image, scratchDir, engine } = with_;
  const sock = path.join(scratchDir, `probe-${accel}-${process.pid}.con`);
  fs.rmSync(sock, { force: true });
  const t0 = Date.now();
  const child = spawn(
    engine.binary,
    [
      ...engineArgs(engine),
      '-machine',
      `pc,accel=${accel}`,
      '-cpu',
      'qemu64',
      '-m',
      '64',
      '-nodefaults',
      '-display',
      'none',
      '-chardev',
      `socket,id=c,path=${sock},server=on,wait=on`,
      '-serial',
      'chardev:c',
      '-drive',
      `file=${image},format=raw,if=floppy,readonly=on`,
    ],
    { stdio: 'ignore' },
  );
  try {
    let s;
    for (;;) {
      if (Date.now() - t0 > capMs || child.exitCode !== null) return null;
      try {
        s = await connectUnix(sock, 200);
        break;
      } catch {
        await new Promise((r) => setTimeout(r, 10));
      }
    }
    return await new Promise<number | null>((resolve) => {
      let out = '';
      const t = setTimeout(
        () => {
          s.destroy();
          resolve(null);
        },
        Math.max(0, capMs - (Date.now() - t0)),
      );
      s.on('data', (d) => {
        out += d.toString('latin1');
        const i = out.indexOf('ready\n');
        if (i >= 0 && (out.slice(i).match(/P/g) ?? []).length >= 8) {
          clearTimeout(t);
          s.destroy();
          resolve(Date.now() - t0);
        }
      });
      s.on('error', () => {
        clearTimeout(t);
        resolve(null);
      });
    });
  } finally {
    if (child.pid) await killAndWait(child.pid, 0);
    fs.rmSync(sock, { force: true });
  }
}

/**
 * Picks KVM only where /dev/kvm works and a probe shows it faster than TCG. `forced`
 * (from FERRY_ACCEL or the config) skips the probe.
 */
export async function chooseAccel(opts: {
  forced?: Accel | 'auto';
  patternImage: string;
  scratchDir: string;
  engine?: Engine;
}): Promise<AccelChoice> {
  const engine = opts.engine ?? DEFAULT_ENGINE;
  if (opts.forced === 'tcg' || opts.forced === 'kvm') return { accel: opts.forced, reason: `forced by configuration (${opts.forced})` };
  const why = kvmUsable();
  if (why) return { accel: 'tcg', reason: `${why}; using TCG` };
  if (!fs.existsSync(opts.patternImage))
    return {
      accel: 'tcg',
      reason: `/dev/kvm exists but the probe image ${opts.patternImage} is missing; using TCG (run \`ferry lab images\`)`,
    };
  fs.mkdirSync(opts.scratchDir, { recursive: true });
  const tcgMs = await timePatternBoot('tcg', 5000, { image: opts.patternImage, scratchDir: opts.scratchDir, engine });
  const kvmMs = await timePatternBoot('kvm', Math.max(1000, (tcgMs ?? 5000) * 2), {
    image: opts.patternImage,
    scratchDir: opts.scratchDir,
    engine,
  });
  if (kvmMs !== null && (tcgMs === null || kvmMs < tcgMs))
    return { accel: 'kvm', reason: `probe: KVM ${kvmMs} ms vs TCG ${tcgMs ?? '>5000'} ms`, probe: { tcgMs, kvmMs } };
  return {
    accel: 'tcg',
    reason: `probe: KVM ${kvmMs === null ? 'did not finish' : `${kvmMs} ms`} vs TCG ${tcgMs} ms; /dev/kvm is slower here (nested or software KVM)`,
    probe: { tcgMs, kvmMs },
  };
}

export function hostArch(): string {
  return os.arch() === 'x64' ? 'x86_64' : os.arch();
}
