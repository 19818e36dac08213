/**
 * `ferry`: the CLI. xm/xl-style verbs; every verb takes --json. -H/--host picks the
 * daemon: a lab host name, or NAME|ADDRESS[:PORT] over TLS; the default is local.
 * Exit codes come from the error registry (README "Exit codes").
 */
import fs from 'node:fs';
import path from 'node:path';
import { Command, CommanderError } from 'commander';
import { FerryError } from '../errors.ts';
import { call, ApiClient, type Target } from '../api/client.ts';
import { resolveTarget } from './targets.ts';
import { registerEvacuate } from './evacuate.ts';
import { table, reportError, humanState, act, hostOpt, lastJsonMode, fmtBytes } from './output.ts';
import { runConsole } from './console.ts';
import { caInit, issueHostCert, revokeCert } from '../tls/ca.ts';
import { registerLab } from './lab.ts';
import { registerCluster, printClusterDomains } from './cluster.ts';
import { registerMigrate } from './migrate.ts';
import { registerPlacement } from './placement.ts';
import { FERRY_VERSION } from '../version.ts';
import type { DomainSummary, DomainInfo, HostInfo, TunnelView, EventMsg, Results, SaveProgress } from '../api/protocol.ts';

/** Runs a verb: its result printed as JSON or by `human`; errors become exit codes. */
function readConfigFile(file: string): unknown {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new FerryError('CONFIG_UNREADABLE', `Cannot read domain config ${file}: ${(e as NodeJS.ErrnoException).code ?? e}`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new FerryError('CONFIG_UNREADABLE', `Domain config ${file} is not valid JSON: ${(e as Error).message}`);
  }
}

function positiveNumber(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isFinite(n) || n < 0) throw new FerryError('CLI_USAGE', `${name} must be a non-negative number, got "${v}"`);
    return n;
  };
}

function printList(rows: DomainSummary[]): void {
  const out: (string | number)[][] = [['Name', 'ID', 'Mem', 'VCPUs', 'State', 'Time(s)']];
  for (const r of rows) out.push([r.name, r.id ?? '-', r.memoryMiB, r.vcpus, humanState(r.state), r.cpuTime.toFixed(1)]);
  process.stdout.write(table(out, ['l', 'r', 'r', 'r', 'l', 'r']));
}

function printInfo(r: DomainInfo): void {
  const c = r.config as { boot: { kernel?: string; disk?: number }; disks: { path: string; format: string; readOnly?: boolean }[] };
  const lines = [
    ['name', r.name],
    ['uuid', r.uuid],
    ['host', r.host],
    ['state', humanState(r.state)],
    ['id', r.id ?? '-'],
    ['pid', r.pid ?? '-'],
    ['memory', `${r.memoryMiB} MiB`],
    ['vcpus', r.vcpus],
    ['accel', r.accel],
    ['boot', c.boot.kernel ? `kernel ${c.boot.kernel}` : `disk ${c.boot.disk}`],
    ...c.disks.map((d, i) => [`disk${i}`, `${d.path} (${d.format}${d.readOnly ? ', read-only' : ''})`]),
    ...r.nics.map((n, i) => [`nic${i}`, `${n.network} mac=${n.mac}${n.ip ? ` ip=${n.ip}` : ''}${n.tap ? ` tap=${n.tap}` : ''}`]),
    ['console log', r.consoleLog],
  ];
  process.stdout.write(table(lines, ['l', 'l']));
}

function printHostInfo(r: HostInfo): void {
  const lines = [
    ['host', r.name],
    ['version', `ferry ${r.version}`],
    [
      'engine',
      `QEMU ${r.qemuVersion} (${r.engine.binary}${r.engine.dataDirs.length ? ` -L ${r.engine.dataDirs.join(' -L ')}` : ''})${r.engine.liveDirtyTrackingReliable ? '' : '; its live dirty-page tracking is unreliable under TCG (before 9.0): live moves check guest RAM'}`,
    ],
    ['arch', r.arch],
    ['accelerator', `${r.accel} (${r.accelReason})`],
    ['machine', r.machine],
    ['cpu model', `${r.cpuModel}${r.cpuUnavailable?.length ? ` (CANNOT RUN HERE: ${r.accel} lacks ${r.cpuUnavailable.join(', ')})` : ''}`],
    ['cpu flags', r.cpuFeatures.join(' ')],
    ['memory', `${r.memory.offeredMiB} MiB offered, ${r.memory.usedMiB} MiB used, ${r.memory.freeMiB} MiB free (it ${r.memory.limitedBy})`],
    ...Object.entries(r.networks).map(([n, v]) => [
      `network ${n}`,
      `bridge ${v.bridge}, subnet ${v.subnet}${v.address ? `, address ${v.address}` : ''}`,
    ]),
    ['relocation', `${r.relocation.address}:${r.relocation.port}, data ports ${r.relocation.dataPorts.join('-')}`],
    ['maintenance', r.maintenance?.on ? `ON since ${r.maintenance.since} (no starts, no incoming moves)` : 'off'],
    ...(r.tunnels ?? []).map((t) => [`tunnel ${t.device}`, tunnelWords(t)]),
  ];
  process.stdout.write(table(lines, ['l', 'l']));
}

function tunnelWords(t: TunnelView): string {
  return t.end === 'home'
    ? `${t.domain} NIC ${t.nic}: home end of ${t.home.subnet} on ${t.bridge}, to ${t.remotes.join(', ')}`
    : `${t.domain} NIC ${t.nic}: away end (${t.bridge}), segment ${t.home.subnet} from ${t.home.host} (${t.home.address})`;
}

function printTunnels(r: TunnelView[]): void {
  if (!r.length) {
    process.stdout.write('no tunnels\n');
    return;
  }
  process.stdout.write(
    table(
      [
        ['DOMAIN', 'NIC', 'END', 'VNI', 'DEVICE', 'BRIDGE', 'SEGMENT', 'PEERS', 'SINCE'],
        ...r.map((t) => [
          t.domain,
          String(t.nic),
          t.end,
          String(t.vni),
          t.device,
          t.bridge,
          `${t.home.subnet} (${t.home.host})`,
          t.remotes.join(','),
          t.since,
        ]),
      ],
      ['l', 'r', 'l', 'r', 'l', 'l', 'l', 'l', 'l'],
    ),
  );
}

const domainVerb = (prog: Command, name: string, desc: string): Command =>
  prog.command(name).description(desc).option('--json', 'JSON output');

/** The xm-style domain verbs: create, list, info, start, pause, unpause, shutdown, destroy, delete. */
function registerDomainVerbs(prog: Command): void {
  domainVerb(prog, 'create', 'define a domain from a config file and start it')
    .argument('<file>')
    .option('--defer-start', 'define only (start later with `ferry start`)')
    .option('-p, --paused', 'start it with its vCPUs stopped, as xm create -p (`ferry unpause` runs it)')
    .action(
      act(
        async (file: string, o: { deferStart?: boolean; paused?: boolean }, cmd: Command) =>
          call(
            resolveTarget(hostOpt(cmd)),
            'domain.create',
            { config: readConfigFile(file), start: !o.deferStart, ...(o.paused ? { paused: true } : {}) },
            0,
          ),
        (r) => process.stdout.write(`Started domain ${r.name} (id ${r.id ?? '-'}) on ${r.host}\n`),
      ),
    );
  domainVerb(prog, 'list', 'list domains (as xm list)')
    .option('--all', "cluster mode: every domain of the cluster, with its host (from etcd's ownership records)")
    .action(async (o: { all?: boolean }, cmd: Command) =>
      o.all
        ? act(async (_o: unknown, c: Command) => call(resolveTarget(hostOpt(c)), 'cluster.domains'), printClusterDomains)(o, cmd)
        : act(async (_o: unknown, c: Command) => call(resolveTarget(hostOpt(c)), 'domain.list'), printList)(o, cmd),
    );
  domainVerb(prog, 'info', 'show a domain')
    .argument('<domain>')
    .action(
      act(async (d: string, _o: unknown, cmd: Command) => call(resolveTarget(hostOpt(cmd)), 'domain.info', { domain: d }), printInfo),
    );
  domainVerb(prog, 'start', 'start a defined or shut-off domain')
    .argument('<domain>')
    .action(
      act(
        async (d: string, _o: unknown, cmd: Command) => call(resolveTarget(hostOpt(cmd)), 'domain.start', { domain: d }),
        (r) => process.stdout.write(`Started domain ${r.name} (id ${r.id})\n`),
      ),
    );
  domainVerb(prog, 'pause', 'pause a domain')
    .argument('<domain>')
    .action(
      act(
        async (d: string, _o: unknown, cmd: Command) => call(resolveTarget(hostOpt(cmd)), 'domain.pause', { domain: d }),
        (r) => process.stdout.write(`Domain ${r.name} paused\n`),
      ),
    );
  domainVerb(prog, 'unpause', 'resume a paused domain')
    .argument('<domain>')
    .action(
      act(
        async (d: string, _o: unknown, cmd: Command) => call(resolveTarget(hostOpt(cmd)), 'domain.unpause', { domain: d }),
        (r) => process.stdout.write(`Domain ${r.name} unpaused\n`),
      ),
    );
  domainVerb(prog, 'shutdown', 'ACPI shutdown, then report')
    .argument('<domain>')
    .option('--timeout <s>', 'seconds to wait for the guest', positiveNumber('--timeout'), 60)
    .action(
      act(
        async (d: string, o: { timeout: number }, cmd: Command) =>
          call(resolveTarget(hostOpt(cmd)), 'domain.shutdown', { domain: d, timeoutS: o.timeout }),
        (r) => process.stdout.write(`Domain ${r.name} shut down in ${(r.shutdownMs / 1000).toFixed(1)} s\n`),
      ),
    );
  domainVerb(prog, 'destroy', 'stop a domain at once')
    .argument('<domain>')
    .action(
      act(
        async (d: string, _o: unknown, cmd: Command) => call(resolveTarget(hostOpt(cmd)), 'domain.destroy', { domain: d }),
        (r) => process.stdout.write(`Domain ${r.name} destroyed\n`),
      ),
    );
  domainVerb(prog, 'delete', "remove a shut-off domain's definition")
    .argument('<domain>')
    .action(
      act(
        async (d: string, _o: unknown, cmd: Command) => call(resolveTarget(hostOpt(cmd)), 'domain.delete', { domain: d }),
        (r) => process.stdout.write(`Domain ${r.name} deleted\n`),
      ),
    );
}

/** domain.save, with a progress bar on a terminal (the host's 'domain.progress' events); quiet when piped. */
async function saveWithProgress(target: Target, params: Record<string, unknown>, tty: boolean): Promise<Results['domain.save']> {
  const c = await ApiClient.connect(target);
  let shown = 0;
  try {
    if (tty) {
      await c.request('events.subscribe', { domain: params.domain });
      c.on('event', (ev: EventMsg) => {
        if (ev.event !== 'domain.progress') return;
        const p = ev.data as SaveProgress;
        const w = 24;
        const filled = Math.round((p.percent / 100) * w);
        const eta = p.etaS === null ? '?' : `${p.etaS.toFixed(1)} s`;
        const line = `[${'#'.repeat(filled)}${'-'.repeat(w - filled)}] ${p.percent.toFixed(1).padStart(5)}%  saving  ${p.rateMBps.toFixed(0).padStart(5)} MB/s  ${fmtBytes(p.written)}/${fmtBytes(p.total)}  ETA ${eta}`;
        process.stderr.write(`\r${line}${' '.repeat(Math.max(0, shown - line.length))}`);
        shown = line.length;
      });
    }
    return await c.request('domain.save', params);
  } finally {
    if (shown) process.stderr.write('\n');
    c.close();
  }
}

/** save and restore (xm save/restore), and the serial console. */
function registerSaveAndConsole(prog: Command): void {
  // FILE: a bare name is a file in the host's save directory (storage.saveDir); a path
  // elsewhere needs --any-path and the local socket.
  const saveArg = (f: string): string => (f.includes('/') ? path.resolve(f) : f);
  domainVerb(prog, 'save', "save a domain's state to a file and stop it (xm save)")
    .argument('<domain>')
    .argument('<file>', 'a name in the save directory, or a path with --any-path')
    .option('--any-path', 'allow a path outside the save directory (local socket only)')
    .option('--stream', "write QEMU's migration stream (restorable by any QEMU) instead of a mapped-ram file")
    .action(
      act(
        async (d: string, f: string, o: { anyPath?: boolean; stream?: boolean; json?: boolean }, cmd: Command) =>
          saveWithProgress(
            resolveTarget(hostOpt(cmd)),
            {
              domain: d,
              file: saveArg(f),
              ...(o.anyPath ? { anyPath: true } : {}),
              ...(o.stream ? { stream: true } : {}),
            },
            !o.json && !!process.stderr.isTTY,
          ),
        (r) =>
          process.stdout.write(
            `Domain ${r.name} saved to ${r.file} (${r.format}${r.directIo ? ', direct I/O' : ''}: ${(r.bytes / 1048576).toFixed(1)} MiB on disk, ${r.ms} ms)\n${r.why ? `  a stream, not mapped-ram: ${r.why}\n` : ''}`,
          ),
      ),
    );
  domainVerb(prog, 'restore', 'restore a domain from a save file (xm restore)')
    .argument('<file>', 'a name in the save directory, or a path with --any-path')
    .option('--any-path', 'allow a path outside the save directory (local socket only)')
    .action(
      act(
        async (f: string, o: { anyPath?: boolean }, cmd: Command) =>
          call(resolveTarget(hostOpt(cmd)), 'domain.restore', { file: saveArg(f), ...(o.anyPath ? { anyPath: true } : {}) }),
        (r) => process.stdout.write(`Domain ${r.name} restored (id ${r.id}) from a ${r.format} file in ${r.restoreMs} ms\n`),
      ),
    );
  prog
    .command('console')
    .description("attach to a domain's serial console (Ctrl-] detaches)")
    .argument('<domain>')
    .option(
      '--idle <ms>',
      'when stdin is not a terminal: exit once stdin ended and the guest was silent this long',
      positiveNumber('--idle'),
      1500,
    )
    .option('--replay <bytes>', 'first print up to this many bytes of recent console output', positiveNumber('--replay'), 0)
    .option('--max <ms>', 'when stdin is not a terminal: give up after this long', positiveNumber('--max'))
    .action(async (d: string, o: { idle: number; replay: number; max?: number }, cmd: Command) => {
      try {
        process.exitCode = await runConsole(hostOpt(cmd), d, { idleMs: o.idle, replay: o.replay, maxMs: o.max });
      } catch (e) {
        process.exitCode = reportError(e, false);
      }
    });
}

/** host info, cert and evacuate; the dashboard; the host's tunnels. */
function registerHostVerbs(prog: Command): void {
  const host = prog.command('host').description('host facts and certificates');
  host
    .command('info')
    .description('show the host: arch, accelerator, CPU, memory, networks')
    .option('--json', 'JSON output')
    .action(act(async (_o: unknown, cmd: Command) => call(resolveTarget(hostOpt(cmd)), 'host.info'), printHostInfo));
  host
    .command('cert')
    .description('issue a host its certificate from the cluster CA')
    .argument('<name>')
    .option('--ca <dir>', 'CA directory', '/etc/ferry/ca')
    .option('--out <dir>', 'host TLS directory to write', '/etc/ferry/tls')
    .option('--ip <addr...>', 'IP addresses to put in the certificate')
    .option('--json', 'JSON output')
    .action(
      act(
        async (name: string, o: { ca: string; out: string; ip?: string[] }) => ({
          name,
          ...issueHostCert(name, { caDir: o.ca, outDir: o.out, ips: o.ip }),
        }),
        (r) => process.stdout.write(`Issued a certificate for ${r.name} in ${r.dir}\n`),
      ),
    );
  registerEvacuate(host);
  prog
    .command('ui')
    .description('serve the web dashboard: hosts, domains, live migrations with charts, consoles, evacuation')
    .option(
      '--listen <address:port>',
      'where to serve it (loopback: plain HTTP with a token in the printed address; elsewhere HTTPS, see --tls-dir)',
      '127.0.0.1:8080',
    )
    .option('--hosts <names>', "the hosts to show, comma-separated (default: the lab's, else the local ferryd and its peers)")
    .option(
      '--tls-dir <dir>',
      'serve HTTPS with the certificate in DIR (server-cert.pem, server-key.pem, ca-cert.pem); browsers must present an administrator certificate (OU=admin) from the same CA',
    )
    .action(async (o: { listen: string; hosts?: string; tlsDir?: string }) => {
      const { UiServer } = await import('./ui.ts');
      const ui = new UiServer({ listen: o.listen, hosts: o.hosts?.split(',').filter(Boolean), tlsDir: o.tlsDir });
      try {
        const url = await ui.start();
        process.stdout.write(`ferry ui: ${url}\n`);
      } catch (e) {
        process.exitCode = reportError(e, false);
        ui.close();
        return;
      }
      await new Promise<void>((resolve) => {
        process.once('SIGINT', resolve);
        process.once('SIGTERM', resolve);
      });
      ui.close();
    });
  const netCmd = prog.command('net').description('host networking for domains');
  netCmd
    .command('tunnels')
    .description("list the VXLAN tunnels that carry domains' home segments through this host")
    .option('--json', 'JSON output')
    .action(act(async (_o: unknown, cmd: Command) => call(resolveTarget(hostOpt(cmd)), 'net.tunnels'), printTunnels));
}

/** The cluster CA and administrator certificates. */
function registerTrust(prog: Command): void {
  const admin = prog.command('admin').description('administrator certificates');
  admin
    .command('cert')
    .description('issue an administrator certificate (OU=admin): manages hosts from afar; cannot act as a host')
    .argument('<name>')
    .option('--ca <dir>', 'CA directory', '/etc/ferry/ca')
    .option('--out <dir>', 'TLS directory to write (point FERRY_TLS_DIR at it)', '/etc/ferry/admin-tls')
    .option('--json', 'JSON output')
    .action(
      act(
        async (name: string, o: { ca: string; out: string }) => ({
          name,
          ...issueHostCert(name, { caDir: o.ca, outDir: o.out, role: 'admin' }),
        }),
        (r) => process.stdout.write(`Issued an administrator certificate for ${r.name} in ${r.dir}\n`),
      ),
    );
  const ca = prog.command('ca').description('the cluster CA');
  ca.command('init')
    .description('create the cluster CA')
    .option('--dir <dir>', 'CA directory', '/etc/ferry/ca')
    .option('--force', 'replace an existing CA')
    .option('--json', 'JSON output')
    .action(
      act(
        async (o: { dir: string; force?: boolean }) => ({ dir: o.dir, ...caInit(o.dir, { force: o.force }) }),
        (r) => process.stdout.write(`Created the cluster CA in ${r.dir}\n`),
      ),
    );
  ca.command('revoke')
    .description("revoke a certificate the CA issued; writes ca-crl.pem (copy it into every host's TLS directory)")
    .argument('<name>')
    .option('--dir <dir>', 'CA directory', '/etc/ferry/ca')
    .option('--publish <dir...>', 'host TLS directories to copy ca-crl.pem into')
    .option('--days <n>', 'days until the CRL must be renewed', positiveNumber('--days'), 30)
    .option('--json', 'JSON output')
    .action(
      act(
        async (name: string, o: { dir: string; publish?: string[]; days: number }) =>
          revokeCert(name, { caDir: o.dir, publish: o.publish, days: o.days }),
        (r) => process.stdout.write(`Revoked ${r.name} (serial ${r.serial}); revocation list ${r.crl} (${r.revoked.length} revoked)\n`),
      ),
    );
}

export function buildProgram(): Command {
  const prog = new Command('ferry')
    .description('ferry: run and move QEMU domains between hosts')
    .version(FERRY_VERSION)
    .option('-H, --host <host>', 'the host to talk to: lab host name, NAME|ADDRESS[:PORT]; default: local ferryd')
    .configureOutput({ outputError: () => undefined })
    .exitOverride();
  registerDomainVerbs(prog);
  registerSaveAndConsole(prog);
  registerHostVerbs(prog);
  registerTrust(prog);

  registerMigrate(prog);
  registerPlacement(prog, registerCluster(prog));
  registerLab(prog);
  return prog;
}

export async function main(argv: string[]): Promise<void> {
  const prog = buildProgram();
  try {
    await prog.parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.code === 'commander.help') {
        process.exitCode = 0;
        return;
      }
      process.exitCode = reportError(
        new FerryError('CLI_USAGE', e.message.replace(/^error: /, '')),
        lastJsonMode() || argv.includes('--json'),
      );
      return;
    }
    process.exitCode = reportError(e, argv.includes('--json'));
  }
}
