/**
 * Reproduces, without ferry, the QEMU bug behind the fault campaign's stale pages: two
 * bare QEMUs in the lab, the pattern guest migrated live between them, and the source's
 * RAM (paused after completion) compared page by page with the destination's (loaded,
 * not resumed). `--warm N` first runs N started-and-cancelled migrations: each dirty-log
 * start/stop flushes the vCPU's TLB and a full TLB doubles, until it holds the whole
 * pattern range and QEMU < 9.0 under TCG stops seeing the guest's writes.
 *
 *   node --import tsx reliability/tcg-dirty-repro.ts --warm 6 --trials 3 --bw 0 --loss 0
 *
 * QEMU 10 (ferry's engine) has the fix; to see the bug, point it at 7.2 from
 * scripts/old-engine.sh: FERRY_QEMU=images/qemu-7.2/usr/bin/qemu-system-x86_64
 * FERRY_QEMU_L=images/qemu-7.2/usr/share/qemu:/usr/share/seabios.
 *
 * Needs a lab (`ferry lab up`). Other knobs: --ac on|off (auto-converge), --raise-ms N
 * (raise the downtime limit to 2 s after N ms), --loss P (drop P of the destination's
 * incoming packets for 4 s, from --loss-at ms), --bw MiB/s (0 = uncapped), --mem MiB.
 */
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { QmpClient } from '../src/qmp/client.ts';
import { parseDomainConfig } from '../src/domain/config.ts';
import { domainArgv, engineArgs, QEMU_BINARY } from '../src/qemu/argv.ts';
import { startQemuWith, killAndWait, connectUnix } from '../src/qemu/process.ts';
import { ok } from '../test/helpers.ts';

const args = process.argv.slice(2);
const opt = (k: string, d: string): string => {
  const i = args.indexOf(k);
  return i >= 0 ? args[i + 1] : d;
};
const TRIALS = Number(opt('--trials', '3'));
const AC = opt('--ac', 'on') === 'on';
const RAISE = Number(opt('--raise-ms', '-1'));
const LOSS = opt('--loss', '0');
const BW = Number(opt('--bw', '0'));
const LOSS_AT = Number(opt('--loss-at', '300'));
const DEADLINE = Number(opt('--deadline', '120000'));
const WARM = Number(opt('--warm', '6'));
const MEM = Number(opt('--mem', '128'));
const LAB = '/var/lib/ferry-lab';
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const ns = (h: string): string => `ferry-${h}`;
const addr: Record<string, string> = { host1: '198.19.0.11', host2: '198.19.0.12' };
const ipt = (h: string, op: string): void => {
  try {
    execFileSync('ip', [
      'netns',
      'exec',
      ns(h),
      'iptables',
      op,
      'INPUT',
      '-m',
      'statistic',
      '--mode',
      'random',
      '--probability',
      LOSS,
      '-j',
      'DROP',
    ]);
  } catch {
    /* */
  }
};

async function main(): Promise<void> {
  const raw = await ok(['lab', 'guest', 'pattern', 'dg', '--memory', String(MEM), '--json']);
  const c = parseDomainConfig(raw);
  const dir = path.join(LAB, 'diag');
  fs.mkdirSync(dir, { recursive: true });
  let n = 0;
  const start = async (h: string, incoming: boolean): Promise<{ pid: number; qmp: QmpClient; h: string }> => {
    const id = `${h}-${n++}`;
    const rt = {
      accel: 'tcg' as const,
      cpuModel: 'qemu64',
      machine: 'pc-i440fx-7.2',
      qmpPath: path.join(dir, `${id}.qmp`),
      consolePath: path.join(dir, `${id}.con`),
      taps: [],
      incoming,
    };
    const s = await startQemuWith(
      'ip',
      [
        'netns',
        'exec',
        ns(h),
        QEMU_BINARY,
        ...engineArgs({ binary: QEMU_BINARY, dataDirs: (process.env.FERRY_QEMU_L ?? '').split(':').filter(Boolean) }),
        ...domainArgv(c, rt),
      ],
      { qmpPath: rt.qmpPath, logPath: path.join(dir, `${id}.log`), what: 'diag QEMU' },
    );
    started.push(s.pid);
    return { ...s, h };
  };
  let cur = await start('host1', false);
  let log = '';
  const con = await connectUnix(path.join(dir, 'host1-0.con'), 5000);
  con.on('data', (d) => {
    log += d.toString('latin1');
  });
  await cur.qmp.execute('cont');
  console.log('booting');
  for (let i = 0; i < 200 && !log.includes('ready'); i++) await sleep(100);
  await sleep(1000);
  let bad = 0;
  // Grow the TCG TLB: every dirty-log start/stop flushes it, and a full TLB doubles on flush.
  for (let w = 0; w < WARM; w++) {
    const to = cur.h === 'host1' ? 'host2' : 'host1';
    const dst = await start(to, true);
    await dst.qmp.execute('migrate-incoming', { uri: `tcp:${addr[to]}:49201` });
    await cur.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 8 * 1048576, 'tls-creds': '' });
    await cur.qmp.execute('migrate', { uri: `tcp:${addr[to]}:49201` });
    await sleep(300);
    await cur.qmp.execute('migrate_cancel');
    for (;;) {
      const m = await cur.qmp.execute<{ status: string }>('query-migrate');
      if (m.status === 'cancelled') break;
      await sleep(20);
    }
    await killAndWait(dst.pid, 1000);
  }
  if (WARM) console.log(`warmed with ${WARM} cancelled migrations`);
  for (let t = 0; t < TRIALS; t++) {
    const to = cur.h === 'host1' ? 'host2' : 'host1';
    const dst = await start(to, true);
    const src = cur;
    await dst.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await dst.qmp.execute('migrate-incoming', { uri: `tcp:${addr[to]}:49201` });
    await src.qmp.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'events', state: true },
        { capability: 'auto-converge', state: AC },
      ],
    });
    await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': (BW || 100000) * 1048576, 'downtime-limit': 300, 'tls-creds': '' });
    const t0 = Date.now();
    await src.qmp.execute('migrate', { uri: `tcp:${addr[to]}:49201` });
    let lossOn = false;
    let lossOff = false;
    let raised = false;
    let m: any;
    for (;;) {
      m = await src.qmp.execute('query-migrate');
      const el = Date.now() - t0;
      if (!lossOn && LOSS !== '0' && el > LOSS_AT) {
        ipt(to, '-I');
        lossOn = true;
      }
      if (lossOn && !lossOff && el > LOSS_AT + 4000) {
        ipt(to, '-D');
        lossOff = true;
      }
      if (RAISE >= 0 && !raised && el > RAISE) {
        raised = true;
        await src.qmp.execute('migrate-set-parameters', { 'downtime-limit': 2000 });
      }
      if (['completed', 'failed', 'cancelled'].includes(m.status)) break;
      if (el > DEADLINE && m.status === 'active') await src.qmp.execute('migrate_cancel');
      if (el % 5000 < 50)
        console.log(
          `  ${el} ms ${m.status} pass=${m.ram?.['dirty-sync-count']} throttle=${m['cpu-throttle-percentage'] ?? 0} remaining=${m.ram?.remaining}`,
        );
      await sleep(50);
    }
    if (lossOn && !lossOff) ipt(to, '-D');
    if (m.status !== 'completed') {
      console.log(`trial ${t} ${m.status}`);
      await killAndWait(dst.pid, 1000);
      await src.qmp.execute('cont');
      continue;
    }
    for (;;) {
      const st = await dst.qmp.execute<{ status: string }>('query-status');
      if (st.status !== 'inmigrate') break;
      await sleep(10);
    }
    const sst = (await src.qmp.execute<{ status: string }>('query-status')).status;
    const dst_st = (await dst.qmp.execute<{ status: string }>('query-status')).status;
    const fs1 = path.join(dir, 'src.bin');
    const fs2 = path.join(dir, 'dst.bin');
    await src.qmp.execute('pmemsave', { val: 0, size: MEM * 1048576, filename: fs1 });
    await dst.qmp.execute('pmemsave', { val: 0, size: MEM * 1048576, filename: fs2 });
    const a = fs.readFileSync(fs1);
    const b = fs.readFileSync(fs2);
    const diffPages: number[] = [];
    for (let p = 0; p < a.length / 4096; p++)
      if (Buffer.compare(a.subarray(p * 4096, (p + 1) * 4096), b.subarray(p * 4096, (p + 1) * 4096)) !== 0) diffPages.push(p);
    const desc = diffPages
      .slice(0, 12)
      .map((p) => `${p}:${a[p * 4096]}/${b[p * 4096]}`)
      .join(' ');
    console.log(
      `trial ${t} ${src.h}->${to} ${m.status} ${Date.now() - t0}ms passes=${m.ram?.['dirty-sync-count']} throttle=${m['cpu-throttle-percentage'] ?? 0} downtime=${m.downtime} src=${sst} dst=${dst_st} diffPages=${diffPages.length} ${desc}`,
    );
    if (diffPages.length) bad++;
    if (m.status === 'completed') {
      await src.qmp.execute('quit').catch(() => undefined);
      await killAndWait(src.pid, 2000);
      await dst.qmp.execute('cont');
      cur = dst;
    } else {
      await dst.qmp.execute('quit').catch(() => undefined);
      await killAndWait(dst.pid, 2000);
      await src.qmp.execute('cont');
    }
    await sleep(500);
  }
  console.log(`${bad}/${TRIALS} trials with differing pages (ac=${AC} raise=${RAISE} loss=${LOSS} bw=${BW})`);
  await cur.qmp.execute('quit').catch(() => undefined);
  await killAndWait(cur.pid, 2000);
}
const started: number[] = [];
for (const sig of ['SIGTERM', 'SIGINT'] as const) process.on(sig, () => process.exit(130));
process.on('exit', () => {
  for (const p of started)
    try {
      process.kill(p, 'SIGKILL');
    } catch {
      /* gone */
    }
});
main().catch((e) => {
  console.error(e);
  process.exit(1);
});
