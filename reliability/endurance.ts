/**
 * `npm run endurance [-- --count N]`: N back-to-back live migrations of the
 * memory-pattern guest between host1 and host2 (ping-pong), with the memory checker
 * at the end, and each ferryd's open file descriptors, child processes and resident
 * memory sampled before, during and after. Writes reliability/endurance.json and the
 * endurance section of RELIABILITY.md.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { campaignCommit } from './campaign.ts';
import { ferry, ok } from '../test/helpers.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const COUNT = Number(args[args.indexOf('--count') + 1] || 100) || 100;
const tty = !!process.stderr.isTTY;

interface Sample {
  at: number;
  host: string;
  fds: number;
  children: number;
  rssKiB: number;
}
function sample(host: string, pid: number, at: number): Sample {
  const fds = fs.readdirSync(`/proc/${pid}/fd`).length;
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const rssKiB = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0);
  // Children from /proc (ps exits 1 when there are none).
  const children = fs
    .readdirSync('/proc')
    .filter((d) => /^\d+$/.test(d))
    .filter((d) => {
      try {
        return /^PPid:\s+(\d+)$/m.exec(fs.readFileSync(`/proc/${d}/status`, 'utf8'))?.[1] === String(pid);
      } catch {
        return false;
      }
    }).length;
  return { at, host, fds, children, rssKiB };
}

async function main(): Promise<void> {
  execFileSync('bash', [path.join(ROOT, 'scripts', 'setup.sh')], { stdio: ['ignore', 'ignore', 'inherit'] });
  await ferry(['lab', 'down']);
  await ok(['lab', 'up', '--hosts', '2']);
  const lab = JSON.parse(fs.readFileSync('/var/lib/ferry-lab/lab.json', 'utf8'));
  const engine: string = (await ok(['-H', 'host1', 'host', 'info', '--json'])).qemuVersion;
  const pids: Record<string, number> = Object.fromEntries(lab.hosts.map((h: any) => [h.name, h.pid]));
  const samples: Sample[] = [];
  const results: {
    i: number;
    outcome: string;
    totalMs: number | null;
    downtimeMs: number | null;
    repairedBytes: number | null;
    error?: string;
  }[] = [];
  let verified: boolean;
  try {
    const cfg = await ok(['lab', 'guest', 'pattern', 'endure', '--memory', '64', '--json']);
    const f = path.join(os.tmpdir(), 'endure.json');
    fs.writeFileSync(f, JSON.stringify(cfg));
    await ok(['-H', 'host1', 'create', f]);
    await new Promise((r) => setTimeout(r, 1500));
    // warm up once each way so lazily loaded code is not counted as growth
    await ok(['-H', 'host1', 'migrate', 'endure', 'host2', '--live', '--json']);
    await ok(['-H', 'host2', 'migrate', 'endure', 'host1', '--live', '--json']);
    for (const h of Object.keys(pids)) samples.push(sample(h, pids[h], 0));
    let from = 'host1';
    for (let i = 1; i <= COUNT; i++) {
      const to = from === 'host1' ? 'host2' : 'host1';
      const r = await ferry(['-H', from, 'migrate', 'endure', to, '--live', '--json']);
      const rep = r.json ?? {};
      results.push({
        i,
        outcome: rep.outcome ?? 'failed',
        totalMs: rep.totalMs ?? null,
        downtimeMs: rep.downtimeMs ?? null,
        repairedBytes: rep.memoryCheck?.repairedBytes ?? null,
        ...(rep.error ? { error: rep.error.code } : {}),
      });
      if (rep.outcome === 'succeeded') from = to;
      if (i % 10 === 0) for (const h of Object.keys(pids)) samples.push(sample(h, pids[h], i));
      if (tty) process.stderr.write(`\r  ${i}/${COUNT} migrations, ${results.filter((x) => x.outcome !== 'succeeded').length} failed`);
    }
    if (tty) process.stderr.write('\n');
    const v = await ferry(['lab', 'verify', 'endure', '--json']);
    verified = v.code === 0 && v.json?.ok === true;
  } finally {
    await ferry(['lab', 'down']);
  }
  const ok_ = results.filter((r) => r.outcome === 'succeeded').length;
  const totals = results
    .map((r) => r.totalMs)
    .filter((x): x is number => x !== null)
    .sort((a, b) => a - b);
  const med = totals.length ? totals[Math.floor(totals.length / 2)] : null;
  const growth = Object.keys(pids).map((h) => {
    const s = samples.filter((x) => x.host === h);
    const first = s[0];
    const last = s[s.length - 1];
    return {
      host: h,
      fds: [first.fds, last.fds],
      children: [first.children, last.children],
      rssMiB: [+(first.rssKiB / 1024).toFixed(1), +(last.rssKiB / 1024).toFixed(1)],
      maxFds: Math.max(...s.map((x) => x.fds)),
      maxChildren: Math.max(...s.map((x) => x.children)),
    };
  });
  const out = {
    date: new Date().toISOString(),
    commit: campaignCommit(ROOT),
    engine,
    count: COUNT,
    succeeded: ok_,
    memoryConsistent: verified,
    medianTotalMs: med,
    growth,
    samples,
    results,
  };
  fs.writeFileSync(path.join(ROOT, 'reliability', 'endurance.json'), JSON.stringify(out, null, 2) + '\n');
  const md = [
    '## Endurance',
    '',
    `Written by \`npm run endurance\` on ${out.date.slice(0, 10)} (commit ${out.commit?.slice(0, 12) ?? 'not recorded'}): ${COUNT} back-to-back live migrations of a 64 MiB memory-pattern guest between host1 and host2 (ping-pong, TLS, QEMU ${engine}), after one warm-up each way.`,
    '',
    `- succeeded: **${ok_}/${COUNT}**; memory pattern consistent at the end: **${verified ? 'yes' : 'NO'}**; median total ${med} ms`,
    ...(results.some((r) => r.repairedBytes !== null)
      ? [
          `- memory check (README "Memory check") on ${results.filter((r) => r.repairedBytes !== null).length} migrations; RAM that arrived different and was rewritten in ${results.filter((r) => (r.repairedBytes ?? 0) > 0).length} of them (${(results.reduce((a, r) => a + (r.repairedBytes ?? 0), 0) / 1048576).toFixed(1)} MiB in all)`,
        ]
      : []),
    ...growth.map(
      (g) =>
        `- ferryd on ${g.host}: open fds ${g.fds[0]} → ${g.fds[1]} (max ${g.maxFds}), child processes ${g.children[0]} → ${g.children[1]} (max ${g.maxChildren}), RSS ${g.rssMiB[0]} → ${g.rssMiB[1]} MiB`,
    ),
    '',
    'Samples every 10 migrations are in `reliability/endurance.json`.',
    '',
  ].join('\n');
  const relPath = path.join(ROOT, 'RELIABILITY.md');
  let rel = fs.existsSync(relPath) ? fs.readFileSync(relPath, 'utf8') : '# Reliability\n\n';
  rel = rel.includes('## Endurance') ? rel.replace(/## Endurance[\s\S]*?(?=\n## |$)/, md) : rel + md;
  fs.writeFileSync(relPath, rel);
  process.stdout.write(md + '\n');
  if (ok_ !== COUNT || !verified) process.exitCode = 1;
}

main().catch(async (e) => {
  process.stderr.write(`endurance: ${e instanceof Error ? e.stack : e}\n`);
  await ferry(['lab', 'down']);
  process.exit(1);
});
