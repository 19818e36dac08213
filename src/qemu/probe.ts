/**
 * Host facts that only QEMU can tell: its version, the concrete machine type behind
 * the "pc" alias, the CPU model's features, and which accelerator is worth using.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { DEFAULT_ENGINE, engineArgs, type Accel, type Engine } from './argv.ts';
import { startQemu, killAndWait, connectUnix } from './process.ts';

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
  accel: Accel = 'tcg',
): Promise<QemuFacts> {
  fs.mkdirSync(scratchDir, { recursive: true });
  const qmpPath = path.join(scratchDir, `probe-${process.pid}-${accel}.qmp`);
  const logPath = path.join(scratchDir, 'probe.log');
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
    const exp = await q.qmp.execute<{ model: { name: string; props: Record<string, unknown> } }>('query-cpu-model-expansion', {
      type: 'full',
      model: { name: cpuModel },
    });
    const defs = await q.qmp.execute<{ name: string; 'unavailable-features'?: string[] }[]>('query-cpu-definitions');
    const def = defs.find((d) => d.name === cpuModel);
    // Only guest-visible features: QEMU's own knobs (check, enforce, x-*, …) are not CPUID bits.
    const knobs = new Set([
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
    const features = Object.entries(exp.model.props)
      .filter(([k, v]) => v === true && !k.startsWith('x-') && !knobs.has(k))
      .map(([k]) => k)
      .sort();
    return {
      version: `${ver.qemu.major}.${ver.qemu.minor}.${ver.qemu.micro}`,
      machine: pc?.name ?? 'pc',
      cpuModel,
      cpuFeatures: features,
      cpuUnavailable: def?.['unavailable-features'] ?? [],
      accel,
      machines: machines.map((m) => m.name).sort(),
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
