/**
 * Cluster mode's verbs: `ferry cluster init|join|leave|status`, `ferry ha
 * add|remove|status`, `ferry events [--follow]`. Any host of the cluster answers for
 * all of it (they read etcd); `-H` picks which, as everywhere.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { FerryError } from '../errors.ts';
import { ApiClient, call } from '../api/client.ts';
import { resolveTarget } from './targets.ts';
import { act, hostOpt, table } from './output.ts';
import { etcdEnv, etcdEnvFile, clientUrl } from '../cluster/etcdconf.ts';
import { DEFAULT_CONFIG_PATH } from '../api/protocol.ts';
import { parseDaemonConfig } from '../daemon/config.ts';
import { REPO_ROOT } from '../util/paths.ts';
import type { ClusterDomainView, ClusterEventView, ClusterStatus } from '../api/protocol.ts';

const ago = (iso: string): string => {
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  return s < 120 ? `${s}s` : s < 7200 ? `${Math.round(s / 60)}m` : `${Math.round(s / 3600)}h`;
};

function printStatus(r: ClusterStatus): void {
  const l = r.lease;
  const out: string[] = [];
  out.push(
    `${r.host}: lease ${l.state}${l.id ? ` (${l.id})` : ''}, ${l.quorate ? 'quorate' : 'NO QUORUM'}${l.fenceInMs !== null ? `, fences in ${(l.fenceInMs / 1000).toFixed(1)} s without a renewal` : ''}; TTL ${l.ttlS} s, margin ${l.fenceMarginS} s`,
  );
  out.push(`HA manager: ${r.haManager ?? '(none elected)'}`);
  out.push('', 'etcd:');
  out.push(
    table(
      [
        ['Endpoint', 'Member', 'Up', 'Leader', 'Term', 'Version'],
        ...r.etcd.map((e) => [e.url, e.name ?? '-', e.ok ? 'yes' : `no: ${e.error}`, e.leader ?? '-', e.term ?? '-', e.version ?? '-']),
      ],
      ['l', 'l', 'l', 'l', 'r', 'l'],
    ).trimEnd(),
  );
  out.push('', 'hosts (with a live lease):');
  if (!r.hosts) out.push('  (etcd did not answer)');
  else
    out.push(
      table(
        [
          ['Host', 'Engine', 'CPU', 'Mem MiB', 'Free MiB', 'Maint', 'Up for'],
          ...r.hosts.map((h) => [
            h.name,
            `${h.engine}/${h.accel}`,
            h.cpuModel,
            h.memoryMiB,
            h.freeMiB,
            h.maintenance ? 'yes' : 'no',
            ago(h.since),
          ]),
        ],
        ['l', 'l', 'l', 'r', 'r', 'l', 'r'],
      ).trimEnd(),
    );
  out.push('', `domains: ${r.domains.length} (\`ferry list --all\`)`);
  process.stdout.write(out.join('\n') + '\n');
}

export function printClusterDomains(rows: ClusterDomainView[]): void {
  process.stdout.write(
    table(
      [
        ['Name', 'Host', 'State', 'Memory', 'HA', 'Gen', 'Note'],
        ...rows.map((d) => [
          d.name,
          d.ownerUp ? d.owner : `${d.owner} (down)`,
          d.moving ? `${d.state}, moving to ${d.moving.to}` : d.state,
          `${d.memoryMiB} MiB`,
          d.ha ? `prio ${d.ha.priority}${d.restartable.ok ? '' : ' (not restartable)'}` : '-',
          d.generation,
          d.note,
        ]),
      ],
      ['l', 'l', 'l', 'r', 'l', 'r', 'l'],
    ),
  );
}

const eventLine = (e: ClusterEventView): string => `${e.at}  ${e.type.padEnd(15)} ${e.detail}\n`;

/** Reads, edits and writes a ferryd.json (the CLI runs on the host, as root); an edit that makes it invalid writes nothing. */
function editConfig(file: string, edit: (cfg: Record<string, unknown>) => void): void {
  let cfg: Record<string, unknown>;
  try {
    cfg = JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>;
  } catch (e) {
    throw new FerryError('CONFIG_UNREADABLE', `Cannot read ferryd config ${file}: ${(e as Error).message}`);
  }
  edit(cfg);
  parseDaemonConfig(cfg, REPO_ROOT);
  fs.writeFileSync(file + '.tmp', JSON.stringify(cfg, null, 2) + '\n');
  fs.renameSync(file + '.tmp', file);
}

function parseMembers(v: string): { name: string; address: string }[] {
  return v.split(',').map((m) => {
    const [name, address] = m.split('=');
    if (!name || !address) throw new FerryError('CLI_USAGE', `--members must be NAME=ADDRESS[,NAME=ADDRESS...], got "${m}"`);
    return { name, address };
  });
}

export function registerCluster(prog: Command): Command {
  const cl = prog.command('cluster').description('cluster mode: shared state on etcd (README "Cluster mode")');
  cl.command('status')
    .description("the cluster as this host sees it: its lease, etcd's members and leader, live hosts, the HA manager")
    .option('--json', 'JSON output')
    .action(act(async (_o: unknown, cmd: Command) => call(resolveTarget(hostOpt(cmd)), 'cluster.status'), printStatus));
  registerClusterSetup(cl);
  registerHa(prog);
  registerEvents(prog);
  return cl;
}

interface InitOpts {
  name: string;
  address: string;
  members: string;
  tlsDir: string;
  dataDir: string;
  existing?: boolean;
  out?: string;
}

/** `cluster init`: this member's etcd environment, written to --out or returned to print. */
function etcdConf(o: InitOpts): { env: Record<string, string>; file: string | null; endpoints: string[] } {
  const members = parseMembers(o.members);
  const env = etcdEnv({
    me: { name: o.name, address: o.address },
    members,
    dataDir: path.resolve(o.dataDir),
    tlsDir: path.resolve(o.tlsDir),
    token: 'ferry',
    state: o.existing ? 'existing' : 'new',
  });
  if (o.out) fs.writeFileSync(o.out, etcdEnvFile(env), { mode: 0o644 });
  return { env, file: o.out ?? null, endpoints: members.map((m) => clientUrl(m.address)) };
}

/** cluster init, join and leave: the configuration files of etcd and ferryd. */
function registerClusterSetup(cl: Command): void {
  cl.command('init')
    .description(
      "write this host's etcd member configuration (/etc/default/etcd for Debian's etcd-server), mutual TLS with ferry's certificates",
    )
    .requiredOption('--name <name>', 'this member (the host name)')
    .requiredOption('--address <ip>', 'the address etcd listens on here')
    .requiredOption('--members <list>', 'every member: NAME=ADDRESS,... (this one included)')
    .option('--tls-dir <dir>', "this host's TLS directory (its certificate must name --address)", '/etc/ferry/tls')
    .option('--data-dir <dir>', "etcd's data directory", '/var/lib/etcd/ferry')
    .option('--existing', 'join a running etcd cluster (after `etcdctl member add`) instead of forming a new one')
    .option('--out <file>', 'write the environment file here instead of printing it')
    .option('--json', 'JSON output')
    .action(
      act(
        async (o: InitOpts) => etcdConf(o),
        (r) => {
          if (!r.file) process.stdout.write(etcdEnvFile(r.env));
          else
            process.stdout.write(
              `Wrote ${r.file}. Start etcd, then on every host: ferry cluster join --endpoints ${r.endpoints.join(',')}\n`,
            );
        },
      ),
    );
  cl.command('join')
    .description("give this host's ferryd.json a cluster section (restart ferryd to take it)")
    .requiredOption('--endpoints <urls>', 'etcd client URLs, https://ADDRESS:2379,...')
    .option('--config <file>', 'ferryd.json', DEFAULT_CONFIG_PATH)
    .option('--lease-ttl <s>', 'lease TTL in seconds', (v) => Number(v))
    .option('--json', 'JSON output')
    .action(
      act(
        async (o: { endpoints: string; config: string; leaseTtl?: number }) => {
          const endpoints = o.endpoints.split(',').filter(Boolean);
          editConfig(o.config, (cfg) => {
            cfg.cluster = { ...(cfg.cluster as object | undefined), endpoints, ...(o.leaseTtl ? { leaseTtlS: o.leaseTtl } : {}) };
          });
          return { config: o.config, endpoints };
        },
        (r) => process.stdout.write(`${r.config}: cluster section written (${r.endpoints.length} endpoints). Restart ferryd to join.\n`),
      ),
    );
  cl.command('leave')
    .description('leave the cluster (refused while this host owns domains); its ferryd.json loses the cluster section')
    .option('--config <file>', 'ferryd.json to edit afterwards (on this host)')
    .option('--json', 'JSON output')
    .action(
      act(
        async (o: { config?: string }, cmd: Command) => {
          const r = await call(resolveTarget(hostOpt(cmd)), 'cluster.leave');
          if (o.config)
            editConfig(o.config, (cfg) => {
              delete cfg.cluster;
            });
          return { ...r, config: o.config ?? null };
        },
        (r) =>
          process.stdout.write(
            `${r.host} left the cluster${r.config ? `; ${r.config} edited` : ''}. Restart its ferryd to run standalone.\n`,
          ),
      ),
    );
}

function registerHa(prog: Command): void {
  const ha = prog.command('ha').description('HA restart: domains that run again elsewhere when their host fails');
  ha.command('add')
    .argument('<domain>')
    .option('--priority <n>', 'higher restarts first', (v) => Number(v), 0)
    .option('--json', 'JSON output')
    .action(
      act(
        async (d: string, o: { priority: number }, cmd: Command) =>
          call(resolveTarget(hostOpt(cmd)), 'ha.set', { domain: d, on: true, priority: o.priority }),
        (r) =>
          process.stdout.write(
            `${r.name}: HA restart on (priority ${r.ha?.priority ?? 0}), runs on ${r.owner}${r.restartable.ok ? '' : `; WARNING: not restartable elsewhere: ${r.restartable.why}`}\n`,
          ),
      ),
    );
  ha.command('remove')
    .argument('<domain>')
    .option('--json', 'JSON output')
    .action(
      act(
        async (d: string, _o: unknown, cmd: Command) => call(resolveTarget(hostOpt(cmd)), 'ha.set', { domain: d, on: false }),
        (r) => process.stdout.write(`${r.name}: HA restart off\n`),
      ),
    );
  ha.command('status')
    .option('--json', 'JSON output')
    .action(act(async (_o: unknown, cmd: Command) => call(resolveTarget(hostOpt(cmd)), 'ha.status'), printClusterDomains));
}

function registerEvents(prog: Command): void {
  prog
    .command('events')
    .description("the cluster's event log: hosts down, fenced, restarted, moved")
    .option('--follow', 'keep printing new events')
    .option('--limit <n>', 'how many past events', (v) => Number(v), 50)
    .option('--json', 'JSON output (with --follow: one JSON object per line)')
    .action(async (o: { follow?: boolean; limit: number; json?: boolean }, cmd: Command) => {
      if (!o.follow)
        return act(
          async (_o: unknown, c: Command) => call(resolveTarget(hostOpt(c)), 'cluster.events', { limit: o.limit }),
          (r) => r.forEach((e) => process.stdout.write(eventLine(e))),
        )(o, cmd);
      await follow(resolveTarget(hostOpt(cmd)), o.limit, !!o.json);
    });
}

/** `ferry events --follow`: the past events, then each new one as etcd's watch delivers it, until interrupted. */
async function follow(target: ReturnType<typeof resolveTarget>, limit: number, json: boolean): Promise<void> {
  const c = await ApiClient.connect(target);
  const show = (e: ClusterEventView): void => void process.stdout.write(json ? JSON.stringify(e) + '\n' : eventLine(e));
  c.on('event', (ev: { event: string; data: ClusterEventView }) => {
    if (ev.event === 'cluster.event') show(ev.data);
  });
  for (const e of await c.request('cluster.events', { limit, follow: true }, 0)) show(e);
  await new Promise<void>((resolve) => {
    c.on('close', () => resolve());
    process.once('SIGINT', () => {
      c.close();
      resolve();
    });
  });
}
