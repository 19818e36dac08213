/**
 * Placement's verbs (cluster mode): `ferry rule add|list|remove`, `ferry cluster cpu`,
 * `ferry cluster balance [--apply]`. Any host of the cluster answers (its etcd watches);
 * `--apply` asks each move's source host to run it, as `ferry migrate` would, with the
 * balancer's priority (after evacuations and operators' moves in that host's line).
 */
import type { Command } from 'commander';
import { FerryError, asFerryError } from '../errors.ts';
import { call, type Target } from '../api/client.ts';
import { resolveTarget } from './targets.ts';
import { peerTarget } from './evacuate.ts';
import { act, hostOpt, table } from './output.ts';
import type { ClusterCpu, Report } from '../api/protocol.ts';
import { describeRule, type Rule } from '../placement/rules.ts';
import { breaches } from '../placement/place.ts';
import { describeAuto, type Balance, type BalanceMove, type BalanceSettings, type Hold } from '../placement/balance.ts';

const KINDS = ['keepApart', 'keepTogether', 'preferHosts', 'avoidHosts'] as const;
const KIND_OF = { keepApart: 'keep-apart', keepTogether: 'keep-together', preferHosts: 'prefer-hosts', avoidHosts: 'avoid-hosts' } as const;

interface RuleOpts {
  keepApart?: string[];
  keepTogether?: string[];
  preferHosts?: string[];
  avoidHosts?: string[];
  domains?: string[];
}

/** The one rule the options describe: exactly one kind; prefer/avoid name hosts and take --domains. */
export function ruleFromOpts(name: string, o: RuleOpts): { name: string; kind: Rule['kind']; domains: string[]; hosts: string[] } {
  const given = KINDS.filter((k) => o[k]?.length);
  if (given.length !== 1)
    throw new FerryError(
      'CLI_USAGE',
      'give exactly one of --keep-apart DOMAIN..., --keep-together DOMAIN..., --prefer-hosts HOST... --domains DOMAIN..., --avoid-hosts HOST... --domains DOMAIN...',
    );
  const k = given[0];
  if (k === 'keepApart' || k === 'keepTogether') {
    if (o.domains?.length) throw new FerryError('CLI_USAGE', `--${KIND_OF[k]} names its domains itself; drop --domains`);
    return { name, kind: KIND_OF[k], domains: o[k]!, hosts: [] };
  }
  if (!o.domains?.length) throw new FerryError('CLI_USAGE', `--${KIND_OF[k]} needs --domains DOMAIN... (the domains the rule is about)`);
  return { name, kind: KIND_OF[k], domains: o.domains, hosts: o[k]! };
}

export function registerPlacement(prog: Command, cluster: Command): void {
  const rule = prog
    .command('rule')
    .description('placement rules: keep domains apart or together, prefer or avoid hosts (cluster: in etcd; standalone: on every host)');
  const list = (v: string, prev: string[] = []): string[] => [...prev, v];
  rule
    .command('add')
    .argument('<name>')
    .option('--keep-apart <domain...>', 'these domains never share a host (hard)')
    .option('--keep-together <domain...>', 'these domains always share one host (hard)')
    .option('--prefer-hosts <host...>', '--domains run on these hosts when they can (soft)')
    .option('--avoid-hosts <host...>', '--domains stay off these hosts when they can (soft)')
    .option('--domains <domain...>', 'with --prefer-hosts or --avoid-hosts: the domains the rule is about', list)
    .option('--json', 'JSON output')
    .action(
      act(
        async (name: string, o: RuleOpts, cmd: Command) => addRule(resolveTarget(hostOpt(cmd)), ruleFromOpts(name, o)),
        (r) =>
          process.stdout.write(
            `rule ${r.name} added: ${describeRule(r)}\n` +
              (r.brokenNow?.length
                ? `broken where its domains run now: ${r.brokenNow.join('; ')}\n` +
                  (r.clustered
                    ? '`ferry cluster balance --apply` (or the automatic balancer) moves them; new placements keep it from now on\n'
                    : '`ferry migrate` one of them to end it; new placements keep it from now on\n')
                : ''),
          ),
      ),
    );
  rule
    .command('list')
    .option('--json', 'JSON output')
    .action(
      act(
        async (_o: unknown, cmd: Command) => call(resolveTarget(hostOpt(cmd)), 'rule.list'),
        (rs) =>
          process.stdout.write(
            rs.length
              ? table([['Rule', 'Kind', 'Meaning'], ...rs.map((r) => [r.name, r.kind, describeRule(r)])], ['l', 'l', 'l'])
              : 'no placement rules\n',
          ),
      ),
    );
  rule
    .command('remove')
    .argument('<name>')
    .option('--json', 'JSON output')
    .action(
      act(
        async (name: string, _o: unknown, cmd: Command) => removeRule(resolveTarget(hostOpt(cmd)), name),
        (r) => process.stdout.write(`rule ${r.removed} removed\n`),
      ),
    );

  cluster
    .command('cpu')
    .description('the cluster\'s baseline CPU model (what "cpu": "cluster" gives a domain) and what each host can give')
    .option('--json', 'JSON output')
    .action(act(async (_o: unknown, cmd: Command) => call(resolveTarget(hostOpt(cmd)), 'cluster.cpu'), printCpu));

  cluster
    .command('balance')
    .description(
      'recommend moves that bring every host within --threshold of the mean memory and CPU load; --apply runs them; --auto on|off sets the automatic balancer',
    )
    .option('--threshold <percent>', "how far from the mean a host may be, percentage points (default: the cluster's setting, 20)", num)
    .option('--apply', 'run the recommended moves (live), each from its host, after evacuations in its line')
    .option('--auto <on|off>', 'turn the automatic balancer on or off, cluster-wide (with --threshold, --hold, --interval)')
    .option('--hold <seconds>', 'with --auto: a domain the balancer moved stays put this long (default 600)', num)
    .option('--interval <seconds>', 'with --auto: how often each host looks (default 30)', num)
    .option('--json', 'JSON output')
    .action(
      act(async (o: BalanceOpts, cmd: Command) => {
        const t = resolveTarget(hostOpt(cmd));
        if (o.threshold !== undefined && !(Number.isInteger(o.threshold) && o.threshold >= 1 && o.threshold <= 100))
          throw new FerryError('CLI_USAGE', '--threshold must be a whole number of percentage points from 1 to 100');
        if (o.auto !== undefined || o.hold !== undefined || o.interval !== undefined) return autoCmd(t, o);
        return balanceCmd(t, o.threshold, !!o.apply);
      }, printBalanceOrAuto),
    );
}

interface BalanceOpts {
  threshold?: number;
  apply?: boolean;
  auto?: string;
  hold?: number;
  interval?: number;
}

const num = (v: string): number => Number(v);

/** `cluster balance --auto on|off [--threshold] [--hold] [--interval]`: the cluster-wide setting, what is not given kept. */
async function autoCmd(t: Target, o: BalanceOpts): Promise<BalanceSettings & { setting: true }> {
  if (o.apply) throw new FerryError('CLI_USAGE', '--apply runs one recommendation; it does not go with --auto');
  if (o.auto !== undefined && o.auto !== 'on' && o.auto !== 'off') throw new FerryError('CLI_USAGE', '--auto takes on or off');
  if (o.hold !== undefined && !(Number.isInteger(o.hold) && o.hold >= 0 && o.hold <= 86400))
    throw new FerryError('CLI_USAGE', '--hold must be a whole number of seconds from 0 to 86400');
  if (o.interval !== undefined && !(Number.isInteger(o.interval) && o.interval >= 5 && o.interval <= 3600))
    throw new FerryError('CLI_USAGE', '--interval must be a whole number of seconds from 5 to 3600');
  const s = await call(t, 'cluster.autobalance', {
    ...(o.auto !== undefined ? { mode: o.auto === 'on' ? ('auto' as const) : ('off' as const) } : {}),
    ...(o.threshold !== undefined ? { threshold: o.threshold } : {}),
    ...(o.hold !== undefined ? { holdSeconds: o.hold } : {}),
    ...(o.interval !== undefined ? { intervalSeconds: o.interval } : {}),
  });
  return { ...s, setting: true };
}

function printBalanceOrAuto(r: BalanceResult | (BalanceSettings & { setting: true })): void {
  if ('setting' in r) process.stdout.write(`automatic balancer ${describeAuto(r)}\n`);
  else printBalance(r);
}

/**
 * Standalone: every host ferry knows (HOST and its peers), each answering, or none is
 * changed: a rule kept by some hosts and not others would steer some placements only.
 */
async function standaloneHosts(t: Target): Promise<{ name: string; t: Target }[] | null> {
  const info = await call(t, 'host.info');
  if (info.mode === 'cluster') return null;
  const hosts = [
    { name: info.name, t },
    ...Object.keys(info.peers)
      .filter((n) => n !== info.name)
      .map((n) => ({ name: n, t: peerTarget(n, info.peers) })),
  ];
  const down: string[] = [];
  await Promise.all(
    hosts.map((h) => call(h.t, 'api.hello', {}, 10000).catch((e) => down.push(`${h.name} (${asFerryError(e).message.slice(0, 100)})`))),
  );
  if (down.length)
    throw new FerryError(
      'DAEMON_UNREACHABLE',
      `Standalone hosts keep the rules each (no cluster), so every one must answer to change them; not answering: ${down.join(', ')}. Nothing was changed`,
    );
  return hosts;
}

/** `ferry rule add`: cluster mode, one etcd write by any host; standalone, on every host, or on none. */
async function addRule(t: Target, rule: ReturnType<typeof ruleFromOpts>): Promise<Rule & { brokenNow?: string[]; clustered: boolean }> {
  const hosts = await standaloneHosts(t);
  if (!hosts) return { ...(await call(t, 'rule.add', rule)), clustered: true };
  // A domain may run on any of them: only here can all be asked.
  const lists = await Promise.all(hosts.map((h) => call(h.t, 'domain.list', {}, 10000)));
  const where = new Map(lists.flatMap((l, i) => l.map((d) => [d.name, hosts[i].name] as const)));
  const known = new Set(where.keys());
  const unknown = rule.domains.filter((d) => !known.has(d));
  if (unknown.length)
    throw new FerryError(
      'RULE_UNKNOWN_DOMAIN',
      `Rule "${rule.name}" names ${unknown.join(', ')}, which no host has (${hosts.map((h) => h.name).join(', ')}); check \`ferry list\` on each`,
      { domains: unknown },
    );
  const done: { name: string; t: Target }[] = [];
  let first: Rule | undefined;
  for (const h of hosts) {
    try {
      const r = await call(h.t, 'rule.add', rule);
      first ??= r;
      done.push(h);
    } catch (e) {
      // One refused (a contradiction with its own list, say): the others take it back.
      for (const d of done) await call(d.t, 'rule.remove', { name: rule.name }).catch(() => undefined);
      const fe = asFerryError(e);
      throw new FerryError(fe.code, `${h.name}: ${fe.message}`, fe.details);
    }
  }
  return { ...first!, brokenNow: breaches(first!, where), clustered: false };
}

/** `ferry rule remove`: cluster mode, one etcd write; standalone, from every host that has it (RULE_NOT_FOUND if none). */
async function removeRule(t: Target, name: string): Promise<{ removed: string }> {
  const hosts = await standaloneHosts(t);
  if (!hosts) return call(t, 'rule.remove', { name });
  let found = false;
  for (const h of hosts) {
    const has = (await call(h.t, 'rule.list', {}, 10000)).some((r) => r.name === name);
    if (!has) continue;
    await call(h.t, 'rule.remove', { name });
    found = true;
  }
  if (!found) throw new FerryError('RULE_NOT_FOUND', `No placement rule "${name}" on any host (\`ferry rule list\`)`);
  return { removed: name };
}

function printCpu(r: ClusterCpu): void {
  process.stdout.write(
    `baseline: ${r.baseline} (${r.features.length} features); every host can give: ${r.common.slice(0, 12).join(', ')}${r.common.length > 12 ? ', …' : ''}\n\n` +
      table(
        [
          ['Host', 'Accel', 'Ceiling', 'Default model', 'Models it can give'],
          ...r.hosts.map((h) => [h.name, h.accel, h.ceiling ?? '-', h.defaultModel, h.models]),
        ],
        ['l', 'l', 'l', 'l', 'r'],
      ),
  );
}

interface BalanceResult extends Balance {
  auto: BalanceSettings;
  held: Hold[];
  /** Each move's predicted time (the autopilot's plan) and, with --apply, its outcome. */
  plan: (BalanceMove & { predictedMs: number | null; outcome?: string; error?: { code: string; message: string } })[];
  applied: boolean;
}

/** Where a host's API is: its lab socket, or its relocation address in the cluster. */
async function balanceCmd(t: Target, threshold: number | undefined, apply: boolean): Promise<BalanceResult> {
  const b = await call(t, 'cluster.balance', threshold === undefined ? {} : { threshold });
  const plan: BalanceResult['plan'] = [];
  for (const m of b.moves) {
    const src = resolveTarget(m.from);
    // The autopilot's prediction (it measures the guest): the move's cost, before it is applied.
    const predictedMs = await call(src, 'migration.plan', { domain: m.domain, dest: m.to }, 30000).then(
      (pv) => pv.predictions.find((p) => p.strategy === pv.pick)?.totalMs ?? null,
      () => null,
    );
    plan.push({ ...m, predictedMs });
  }
  if (apply)
    await Promise.all(
      plan.map(async (m) => {
        try {
          const r: Report = await call(
            resolveTarget(m.from),
            'migration.start',
            { domain: m.domain, dest: m.to, live: true, priority: 'balance' },
            0,
          );
          m.outcome = r.outcome;
          if (r.error) m.error = r.error;
        } catch (e) {
          const fe = asFerryError(e);
          m.outcome = 'failed';
          m.error = { code: fe.code, message: fe.message };
        }
      }),
    );
  if (apply && plan.some((m) => m.outcome !== 'succeeded')) process.exitCode = new FerryError('MIGRATION_FAILED', '').exitCode;
  return { ...b, plan, applied: apply };
}

function printBalance(r: BalanceResult): void {
  const pct = (x: number): string => `${Math.round(x * 100)}%`;
  const out: string[] = [
    `mean load: memory ${pct(r.mean.mem)}, CPU ${pct(r.mean.cpu)}; threshold ${pct(r.threshold)}`,
    table(
      [
        ['Host', 'Memory', 'CPU', 'After: memory', 'CPU'],
        ...r.before.map((l) => {
          const a = r.after.find((x) => x.host === l.host)!;
          return [l.host, pct(l.mem), pct(l.cpu), pct(a.mem), pct(a.cpu)];
        }),
      ],
      ['l', 'r', 'r', 'r', 'r'],
    ).trimEnd(),
  ];
  if (!r.cpuJudged)
    out.push(
      `CPU not judged: ${r.unmeasured.join(', ')} ${r.unmeasured.length > 1 ? 'have' : 'has'} run on ${r.unmeasured.length > 1 ? 'their' : 'its'} host too briefly to measure (15 s); memory only`,
    );
  if (r.held.length)
    out.push(
      `Held where the balancer put them: ${r.held.map((h) => `${h.domain} (on ${h.to} since ${h.at.slice(11, 19)}, ${h.holdSeconds} s)`).join(', ')}`,
    );
  out.push(`Automatic balancer ${describeAuto(r.auto)}`);
  if (r.broken.length) out.push(`Rules still broken (no move ends the breach now): ${r.broken.join('; ')}`);
  if (!r.plan.length) out.push(r.stuck ? `No move recommended: ${r.stuck}` : 'Balanced: no move recommended.');
  else
    out.push(
      table(
        [
          ['Domain', 'From', 'To', 'Memory', 'Dirty', 'Predicted', r.applied ? 'Outcome' : 'Why'],
          ...r.plan.map((m) => [
            m.domain,
            m.from,
            m.to,
            `${m.memoryMiB} MiB`,
            m.dirtyRateMBps === null ? '?' : `${m.dirtyRateMBps} MB/s`,
            m.predictedMs === null ? '?' : `${(m.predictedMs / 1000).toFixed(1)} s`,
            r.applied ? (m.error ? `${m.outcome}: ${m.error.code}` : (m.outcome ?? '')) : m.why,
          ]),
        ],
        ['l', 'l', 'l', 'r', 'r', 'r', 'l'],
      ).trimEnd(),
    );
  process.stdout.write(out.join('\n') + '\n');
}
