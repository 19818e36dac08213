/** `ferry lab …`: build, inspect and tear down the lab cluster. */
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import type { Command } from 'commander';
import { FerryError } from '../errors.ts';
import { table, isTty, act } from './output.ts';
import {
  labUp,
  labDown,
  readLab,
  requireLab,
  restartFerryd,
  restartEtcd,
  labLink,
  labNamespace,
  isFerryd,
  isEtcd,
  IMAGES_DIR,
  FERRY_BIN,
  type LabState,
} from '../lab/lab.ts';
import { linuxGuestConfig, patternGuestConfig } from '../lab/guests.ts';
import { call } from '../api/client.ts';
import type { DomainInfo } from '../api/protocol.ts';
import { REPO_ROOT } from '../util/paths.ts';
import { checkPattern, patternRange } from '../testing/checker.ts';

const repoRoot = REPO_ROOT;

function int(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new FerryError('CLI_USAGE', `${name} must be a whole number, got "${v}"`);
    return n;
  };
}

/** Where a domain runs in the lab: the host whose ferryd has it with a QEMU process. */
export async function findDomain(s: LabState, name: string): Promise<{ host: string; apiSocket: string; info: DomainInfo }[]> {
  const found = [];
  for (const h of s.hosts) {
    try {
      const info = await call({ kind: 'unix', path: h.apiSocket, label: h.name }, 'domain.info', { domain: name }, 10000);
      found.push({ host: h.name, apiSocket: h.apiSocket, info });
    } catch (e) {
      // A host whose ferryd is down cannot run anything we could check; skip it.
      if (!(e instanceof FerryError) || (e.code !== 'DOMAIN_NOT_FOUND' && e.code !== 'DAEMON_UNREACHABLE')) throw e;
    }
  }
  return found;
}

export async function verifyPattern(
  name: string,
): Promise<{ ok: boolean; host: string; pages: number; first: number; edge: number | null; bad: unknown[] }> {
  const s = requireLab();
  const where = (await findDomain(s, name)).filter((f) => f.info.pid);
  if (where.length === 0) throw new FerryError('DOMAIN_NOT_FOUND', `Domain "${name}" runs on no lab host`);
  if (where.length > 1)
    throw new FerryError('VERIFY_FAILED', `Domain "${name}" runs on ${where.length} hosts: ${where.map((w) => w.host).join(', ')}`);
  const { host, apiSocket, info } = where[0];
  const cfg = info.config as { disks?: { path: string }[]; boot?: { disk?: number } };
  const disk = cfg.disks?.[cfg.boot?.disk ?? 0];
  if (!disk) throw new FerryError('CLI_USAGE', `Domain "${name}" is not a pattern guest (no boot disk)`);
  const fd = fs.openSync(disk.path, 'r');
  const sector = Buffer.alloc(512);
  fs.readSync(fd, sector, 0, 512, 0);
  fs.closeSync(fd);
  if (sector.readUInt16LE(510) !== 0xaa55 || !sector.includes(Buffer.from('ferry-pattern')))
    throw new FerryError('CLI_USAGE', `Domain "${name}" does not boot the pattern guest`);
  const range = patternRange(sector, info.memoryMiB);
  const r = await call(
    { kind: 'unix', path: apiSocket, label: host },
    'domain.sample-memory',
    { domain: name, ...{ startMiB: range.startMiB, endMiB: range.endMiB } },
    120000,
  );
  const res = checkPattern(Buffer.from(r.bytes, 'base64'));
  return { host, ...res };
}

/**
 * `ferry lab ssh`: OpenSSH's client from the lab's client namespace to the guest's IP
 * (wherever it runs), with the key and the pinned guest host key that `ferry lab images`
 * made: no prompts, no trust on first use. Resolves to ssh's exit status (the remote
 * command's, or 255 when ssh itself failed).
 */
export async function labSsh(name: string, cmd: string[]): Promise<number> {
  const s = requireLab();
  const where = (await findDomain(s, name)).filter((f) => f.info.pid && f.info.state !== 'incoming');
  if (where.length === 0) throw new FerryError('DOMAIN_NOT_FOUND', `Domain "${name}" runs on no lab host`);
  const ip = where[0].info.nics[0]?.ip?.split('/')[0];
  if (!ip) throw new FerryError('CLI_USAGE', `Domain "${name}" has no NIC with an IP address`);
  const keys = path.join(IMAGES_DIR, 'lab-ssh');
  if (!fs.existsSync(path.join(keys, 'id_ed25519')))
    throw new FerryError('IMAGES_MISSING', `The lab's SSH key ${keys}/id_ed25519 is missing: run \`ferry lab images\``);
  const args = [
    'netns',
    'exec',
    s.client.namespace,
    'ssh',
    '-i',
    path.join(keys, 'id_ed25519'),
    '-o',
    `UserKnownHostsFile=${path.join(keys, 'known_hosts')}`,
    '-o',
    'GlobalKnownHostsFile=/dev/null',
    '-o',
    'HostKeyAlias=ferry-lab-guest',
    '-o',
    'StrictHostKeyChecking=yes',
    '-o',
    'BatchMode=yes',
    '-o',
    'IdentitiesOnly=yes',
    '-o',
    'LogLevel=ERROR',
    '-o',
    'ConnectTimeout=10',
    ...(cmd.length === 0 && process.stdin.isTTY ? ['-t'] : []),
    `root@${ip}`,
    ...cmd,
  ];
  const r = spawnSync('ip', args, { stdio: 'inherit' });
  return r.status ?? 255;
}

type GuestRow = { name: string; host: string; state: string; ip: string | null; mac: string | null };

function printStatus(s: LabState & { guests: GuestRow[] }): void {
  // Cluster labs: each host's etcd member too (a killed one shows as down: `ferry lab etcd-start HOST`).
  const etcd = !!s.cluster;
  const rows: (string | number)[][] = [['Host', 'Namespace', 'Address', 'ferryd', ...(etcd ? ['etcd'] : []), 'State dir']];
  for (const h of s.hosts)
    rows.push([
      h.name,
      h.namespace,
      h.address,
      isFerryd(h.pid) ? String(h.pid) : 'down',
      ...(etcd ? [isEtcd(h.etcdPid) ? String(h.etcdPid) : 'down'] : []),
      h.stateDir,
    ]);
  rows.push(['client', s.client.namespace, s.client.address, '-', ...(etcd ? ['-'] : []), '-']);
  process.stdout.write(table(rows, ['l', 'l', 'l', 'r', ...(etcd ? ['r' as const] : []), 'l']));
  if (etcd) process.stdout.write(`\nCluster mode: etcd at ${s.cluster!.endpoints.join(', ')} (\`ferry -H HOST cluster status\`)\n`);
  if (s.link) process.stdout.write(`\nMigration links shaped: ${s.link.rateBitsPerS / 1e6} Mbit/s both ways\n`);
  if (s.guests.length) {
    process.stdout.write(
      '\n' +
        table(
          [['Guest', 'Host', 'State', 'IP', 'MAC'], ...s.guests.map((g) => [g.name, g.host, g.state, g.ip ?? '-', g.mac ?? '-'])],
          ['l', 'l', 'l', 'l', 'l'],
        ),
    );
  }
}

export function registerLab(prog: Command): void {
  const lab = prog.command('lab').description('a cluster of real hosts on this machine, in network namespaces');
  registerLabLifecycle(lab);
  registerLabAccess(lab);
  registerLabGuests(lab);
}

/** `lab up`'s options, as commander parses them. */
interface UpOpts {
  hosts: number;
  segments: number;
  hostMemory?: number;
  stateSize?: number;
  allowInsecure?: boolean;
  cluster?: boolean;
  cpuCeiling?: Record<string, string>;
  movesOut?: number;
  movesIn?: number;
  reservation?: number;
  linkRate?: string;
  json?: boolean;
}

/** `lab guest`'s options. */
interface GuestOpts {
  memory?: number;
  dataDisk?: number;
  on: string;
  fill?: number;
  fillKind: string;
  dirtyRate?: number;
}

/** --cpu-ceiling HOST=MODEL, repeatable. */
function ceilingOpt(v: string, prev: Record<string, string> = {}): Record<string, string> {
  const [h, m] = v.split('=');
  if (!h || !m) throw new FerryError('CLI_USAGE', `--cpu-ceiling must be HOST=MODEL, got "${v}"`);
  return { ...prev, [h]: m };
}

/** `lab up`'s options (the lab's shape, its hosts' limits and links). */
function upOptions(cmd: Command): Command {
  return cmd
    .option('--hosts <n>', 'number of hosts', int('--hosts'), 2)
    .option('--segments <n>', '1, or 2 for a second L2 segment (the last host\'s "lab" network moves there)', int('--segments'), 1)
    .option('--host-memory <MiB>', 'memory each host offers to domains', int('--host-memory'))
    .option('--state-size <MiB>', "give each host's state directory a tmpfs of this size (to test a full disk)", int('--state-size'))
    .option('--allow-insecure', 'hosts accept plain-TCP migration streams (relocation.allowInsecure)')
    .option('--cluster', 'cluster mode: an etcd member in every host (3 or more), mutual TLS, every ferryd joined')
    .option(
      '--cpu-ceiling <host=model>',
      'cap a host\'s CPU models ("cpuCeiling" in its ferryd.json), as an older CPU in a mixed fleet; repeatable',
      ceilingOpt,
    )
    .option('--moves-out <n>', "each host's limits.movesOut: outgoing moves at once, more wait in line", int('--moves-out'))
    .option(
      '--moves-in <n>',
      "each host's limits.incomingTotal: incoming moves at once, more wait in their sources' lines",
      int('--moves-in'),
    )
    .option(
      '--reservation <s>',
      "each host's limits.reservationS: seconds an incoming move waits for its source's next step before it is abandoned",
      int('--reservation'),
    )
    .option('--link-rate <rate>', "shape every host's migration link to RATE both ways (tc's spelling: 1gbit, 10gbit, 500mbit)");
}

/** lab up, down and status. */
function registerLabLifecycle(lab: Command): void {
  upOptions(lab.command('up').description('build the lab: switch, hosts with ferryd, client'))
    .option('--json', 'JSON output')
    .action(
      act(
        async (o: UpOpts) => {
          const tty = isTty() && !o.json;
          return labUp({
            hosts: o.hosts,
            segments: o.segments,
            hostMemoryMiB: o.hostMemory,
            stateMiB: o.stateSize,
            allowInsecure: o.allowInsecure,
            cluster: o.cluster,
            cpuCeiling: o.cpuCeiling,
            movesOut: o.movesOut,
            movesIn: o.movesIn,
            reservationS: o.reservation,
            linkRate: o.linkRate,
            progress: tty ? (m) => process.stderr.write(`  … ${m}\n`) : undefined,
          });
        },
        (s: LabState) => {
          process.stdout.write(`Lab up in ${s.dir}:\n`);
          printStatus({ ...s, guests: [] });
        },
      ),
    );
  lab
    .command('down')
    .description('remove everything the lab made (idempotent)')
    .option('--json', 'JSON output')
    .action(
      act(
        async () => labDown(),
        (r) => process.stdout.write(`Lab down: removed ${r.namespaces.length} namespaces, ended ${r.processes.length} processes\n`),
      ),
    );
  lab
    .command('status')
    .description('hosts and guests of the lab')
    .option('--json', 'JSON output')
    .action(
      act(async () => {
        const s = readLab();
        if (!s) throw new FerryError('LAB_NOT_UP', 'The lab is not up');
        const guests: GuestRow[] = [];
        for (const h of s.hosts) {
          if (!isFerryd(h.pid)) continue;
          try {
            const list = await call({ kind: 'unix', path: h.apiSocket, label: h.name }, 'domain.list', {}, 5000);
            for (const d of list) {
              const info = await call({ kind: 'unix', path: h.apiSocket, label: h.name }, 'domain.info', { domain: d.name }, 5000);
              guests.push({ name: d.name, host: h.name, state: d.state, ip: info.nics[0]?.ip ?? null, mac: info.nics[0]?.mac ?? null });
            }
          } catch {
            /* host down: shown as such */
          }
        }
        return { ...s, hosts: s.hosts.map((h) => ({ ...h, ferrydUp: isFerryd(h.pid) })), guests };
      }, printStatus),
    );
}

/** lab exec and ssh (a command in a namespace, a shell in a guest) and restart (a host's ferryd). */
function registerLabAccess(lab: Command): void {
  lab
    .command('exec')
    .description('run a command in a lab namespace (host1, client, switch)')
    .argument('<name>')
    .argument('<cmd...>')
    .action(async (name: string, cmd: string[]) => {
      try {
        const s = requireLab();
        const ns = labNamespace(s, name);
        const h = s.hosts.find((x) => x.namespace === ns);
        const env = {
          ...process.env,
          PATH: `${path.join(repoRoot, 'node_modules', '.bin')}:${path.dirname(FERRY_BIN)}:${process.env.PATH}`,
          ...(h ? { FERRY_SOCKET: h.apiSocket, FERRY_TLS_DIR: h.tlsDir } : { FERRY_TLS_DIR: s.adminTlsDir }),
        };
        const r = spawnSync('ip', ['netns', 'exec', ns, ...cmd], { stdio: 'inherit', env });
        process.exitCode = r.status ?? 1;
      } catch (e) {
        const { reportError } = await import('./output.ts');
        process.exitCode = reportError(e, false);
      }
    });
  lab
    .command('ssh')
    .description(
      "SSH into a lab Linux guest as root from the client namespace (lab key, pinned host key); exits with the remote command's status",
    )
    .argument('<domain>')
    .argument('[cmd...]', 'a command to run instead of a shell (after --)')
    .action(async (name: string, cmd: string[]) => {
      try {
        process.exitCode = await labSsh(name, cmd);
      } catch (e) {
        const { reportError } = await import('./output.ts');
        process.exitCode = reportError(e, false);
      }
    });
  lab
    .command('restart')
    .description("restart a host's ferryd")
    .argument('<host>')
    .option('--json', 'JSON output')
    .action(
      act(
        async (h: string) => restartFerryd(h),
        (h) => process.stdout.write(`ferryd on ${h.name} restarted (pid ${h.pid})\n`),
      ),
    );
  lab
    .command('link')
    .description('cut (down) or restore (up) every link of a host: a real partition for its ferryd, etcd and guests')
    .argument('<host>')
    .argument('<state>', 'down or up')
    .option('--json', 'JSON output')
    .action(
      act(
        async (h: string, st: string) => {
          if (st !== 'up' && st !== 'down') throw new FerryError('CLI_USAGE', `link state must be "up" or "down", got "${st}"`);
          return labLink(h, st === 'up');
        },
        (r) => process.stdout.write(`${r.host}: ${r.links.join(', ')} ${r.up ? 'up' : 'down'}\n`),
      ),
    );
  lab
    .command('etcd-start')
    .description("start a host's etcd member again (--cluster labs), from its data directory")
    .argument('<host>')
    .option('--json', 'JSON output')
    .action(
      act(
        async (h: string) => restartEtcd(h),
        (h) => process.stdout.write(`etcd on ${h.name} started (pid ${h.etcdPid})\n`),
      ),
    );
}

/** lab verify (the pattern guest's memory), guest (the test guests' configs) and images. */
function registerLabGuests(lab: Command): void {
  lab
    .command('verify')
    .description("check a pattern guest's memory, wherever it runs (exit 0 only if consistent)")
    .argument('<domain>')
    .option('--json', 'JSON output')
    .action(
      act(
        async (d: string) => {
          const r = await verifyPattern(d);
          if (!r.ok) {
            throw new FerryError(
              'VERIFY_FAILED',
              `Domain "${d}" on ${r.host}: memory pattern inconsistent at ${r.bad.length}+ pages, first ${JSON.stringify(r.bad[0])}`,
              { ...r },
            );
          }
          return r;
        },
        (r) =>
          process.stdout.write(
            `Domain memory consistent on ${r.host}: ${r.pages} pages, pass value ${r.first}${r.edge !== null ? `, edge at page ${r.edge}` : ''}\n`,
          ),
      ),
    );
  lab
    .command('guest')
    .description('print a ready domain config for a lab test guest')
    .argument('<kind>', 'linux or pattern')
    .argument('<name>')
    .option('--memory <MiB>', 'guest memory', int('--memory'))
    .option('--json', 'JSON output (the config is JSON either way)')
    .option(
      '--data-disk <MiB>',
      "linux: a qcow2 data disk of this size in the host's own disk directory, /dev/vda in the guest",
      int('--data-disk'),
    )
    .option('--on <host>', 'with --data-disk: the lab host whose disk directory holds it', 'host1')
    .option('--fill <MiB>', "linux: a dense guest: fill this much of its RAM (fill-check prints the fill's SHA-256)", int('--fill'))
    .option('--fill-kind <kind>', 'with --fill: mixed (a third random, the rest compressible), random or text', 'mixed')
    .option('--dirty-rate <MiB/s>', 'with --fill: then rewrite a separate region of this many MiB once a second', int('--dirty-rate'))
    .action(
      act(
        async (kind: string, name: string, o: GuestOpts) => {
          if (o.dataDisk !== undefined && kind !== 'linux') throw new FerryError('CLI_USAGE', '--data-disk is for the linux guest');
          if (o.fill === undefined && o.dirtyRate !== undefined) throw new FerryError('CLI_USAGE', '--dirty-rate goes with --fill');
          if (o.fill !== undefined && kind !== 'linux') throw new FerryError('CLI_USAGE', '--fill is for the linux guest');
          if (kind === 'linux')
            return linuxGuestConfig(
              name,
              o.memory,
              o.dataDisk !== undefined ? { mib: o.dataDisk, host: o.on } : undefined,
              o.fill !== undefined ? { fillMiB: o.fill, fillKind: o.fillKind, dirtyMiBs: o.dirtyRate } : undefined,
            );
          if (kind === 'pattern') return patternGuestConfig(name, o.memory);
          throw new FerryError('CLI_USAGE', `Guest kind must be "linux" or "pattern", got "${kind}"`);
        },
        (c) => process.stdout.write(JSON.stringify(c, null, 2) + '\n'),
      ),
    );
  lab
    .command('images')
    .description('build the test guest images (cached)')
    .action(async () => {
      const r = spawnSync('bash', [path.join(repoRoot, 'guest', 'build-images.sh'), IMAGES_DIR], { stdio: 'inherit' });
      process.exitCode = r.status === 0 ? 0 : 5;
    });
}
