/**
 * ferryd: the host daemon. `ferryd [--config FILE] [--name N] [--state-dir D] ...`
 * Runs domains, serves the API on a unix socket and, with certificates, on TLS.
 */
import fs from 'node:fs';
import path from 'node:path';
import { Command } from 'commander';
import { loadDaemonConfig, type DaemonConfig } from './config.ts';
import { Logger } from './log.ts';
import { Host } from './host.ts';
import { ApiServer } from './server.ts';
import { Metrics } from './metrics.ts';
import { makeHandler } from './actions.ts';
import { probeQemu, chooseAccel, type AccelChoice, type QemuFacts } from '../qemu/probe.ts';
import { pidAlive } from '../qemu/process.ts';
import { asFerryError } from '../errors.ts';
import { Migrations } from '../migration/manager.ts';
import { ClusterAgent } from './cluster.ts';
import { AutoBalancer } from './balancer.ts';
import { Placement } from './placement.ts';
import { tlsPresent, ensureDhParams } from '../tls/ca.ts';

import { REPO_ROOT as repoRoot } from '../util/paths.ts';

/** The command line over ferryd.json (a flag wins over the file). */
function configFromArgs(): { cfg: DaemonConfig; logStderr: boolean } {
  const prog = new Command('ferryd')
    .description('ferry host daemon')
    .option('-c, --config <file>', 'config file (default /etc/ferry/ferryd.json)')
    .option('--name <name>', 'host name')
    .option('--state-dir <dir>', 'state directory')
    .option('--api-socket <path>', 'API unix socket')
    .option('--relocation-address <addr>', 'relocation (TLS API) listen address')
    .option('--relocation-port <port>', 'relocation (TLS API) port', (v) => Number(v))
    .option('--tls-dir <dir>', 'TLS directory')
    .option('--memory <MiB>', 'memory offered to domains', (v) => Number(v))
    .option('--accel <accel>', 'auto, kvm or tcg (FERRY_ACCEL overrides)')
    .option('--log-stderr', 'also write logs to stderr')
    .parse();
  const o = prog.opts();
  const cfg = loadDaemonConfig(
    o.config,
    {
      name: o.name,
      stateDir: o.stateDir,
      apiSocket: o.apiSocket,
      tlsDir: o.tlsDir,
      memory: o.memory,
      accel: o.accel,
      'relocation.address': o.relocationAddress,
      'relocation.port': o.relocationPort,
    },
    repoRoot,
  );
  return { cfg, logStderr: !!o.logStderr };
}

/** One ferryd per state directory: its pid on file, refused if another live ferryd's is there. */
function claimPidFile(stateDir: string): string {
  const pidFile = path.join(stateDir, 'ferryd.pid');
  try {
    const old = Number(fs.readFileSync(pidFile, 'utf8'));
    if (old && old !== process.pid && pidAlive(old)) {
      process.stderr.write(`ferryd: another ferryd (pid ${old}) uses ${stateDir}\n`);
      process.exit(5);
    }
  } catch {
    /* no pid file */
  }
  fs.writeFileSync(pidFile, String(process.pid));
  return pidFile;
}

/** What the host offers domains: DH parameters for QEMU's TLS, the accelerator and the engine's CPU facts under it. */
async function prepareHost(cfg: DaemonConfig, log: Logger): Promise<{ accel: AccelChoice; qemu: QemuFacts }> {
  // QEMU generates DH parameters (up to a second) for a server TLS object without them.
  try {
    if (tlsPresent(cfg.tlsDir) && ensureDhParams(cfg.tlsDir))
      log.info('wrote RFC 7919 ffdhe2048 dh-params.pem into the TLS directory', { tlsDir: cfg.tlsDir });
  } catch (e) {
    log.warn('no dh-params.pem in the TLS directory and cannot write one: QEMU will generate DH parameters in every incoming migration', {
      tlsDir: cfg.tlsDir,
      error: String(e),
    });
  }
  const scratch = path.join(cfg.stateDir, 'run');
  const warn = (msg: string): void => log.warn(msg, { probeLog: path.join(scratch, 'probe.log') });
  // The CPU facts must come from the accelerator domains will use: probed under TCG
  // while the choice is made, and again under KVM if that is the choice.
  const [tcgFacts, accel] = await Promise.all([
    probeQemu(cfg.cpuModel, scratch, cfg.qemu, { accel: 'tcg', ceiling: cfg.cpuCeiling, warn }),
    chooseAccel({ forced: cfg.accel, patternImage: path.join(cfg.imagesDir, 'pattern.img'), scratchDir: scratch, engine: cfg.qemu }),
  ]);
  const qemu =
    accel.accel === 'tcg'
      ? tcgFacts
      : await probeQemu(cfg.cpuModel, scratch, cfg.qemu, { accel: accel.accel, ceiling: cfg.cpuCeiling, warn });
  log.info('accelerator chosen', { accel: accel.accel, reason: accel.reason });
  if (qemu.cpuUnavailable.length)
    log.warn("this host cannot provide the CPU model's features: domains will not start here, and migrations here are refused", {
      cpuModel: cfg.cpuModel,
      accel: accel.accel,
      unavailable: qemu.cpuUnavailable,
    });
  return { accel, qemu };
}

async function main(): Promise<void> {
  const { cfg, logStderr } = configFromArgs();
  fs.mkdirSync(cfg.stateDir, { recursive: true, mode: 0o700 });
  const pidFile = claimPidFile(cfg.stateDir);
  const log = new Logger(path.join(cfg.stateDir, 'ferryd.log'), {
    base: { host: cfg.name },
    echo: logStderr,
    rotate: { maxBytes: cfg.limits.logMaxMiB * 1048576, keep: cfg.limits.logKeep },
    level: cfg.logLevel,
  });
  log.info('ferryd starting', { pid: process.pid, stateDir: cfg.stateDir });
  const { accel, qemu } = await prepareHost(cfg, log);
  const host = new Host(cfg, log, accel, qemu);
  await host.recover();
  // Cluster mode: from here on no domain starts, resumes or moves without etcd's word.
  const cluster = cfg.cluster ? new ClusterAgent(host, cfg.cluster, log) : undefined;
  if (cluster) {
    host.useOwnership(cluster);
    cluster.start();
    log.info('cluster mode', {
      endpoints: cfg.cluster!.endpoints,
      leaseTtlS: cfg.cluster!.leaseTtlS,
      fenceMarginS: cfg.cluster!.fenceMarginS,
    });
  }
  const migrations = new Migrations(host, log);
  cluster?.useQueue(() => migrations.source.queue.views());
  // The automatic balancer: every host runs it, each moves only its own domains (off until `ferry cluster balance --auto on`).
  const balancer = cluster ? new AutoBalancer(cluster, new Placement(host, cluster), migrations, log) : undefined;
  balancer?.start();
  await migrations.recover();
  // Only where served: otherwise no registry, no listeners on the host's events.
  const metrics = cfg.metrics ? new Metrics(host, log, cluster) : undefined;
  if (cfg.metrics) await metrics!.listen(cfg.metrics.address, cfg.metrics.port, cfg.tlsDir);
  const server = new ApiServer(log, makeHandler(host, migrations, metrics, cluster));
  await server.listenUnix(cfg.apiSocket);
  const tlsOn = await server.listenTls({
    address: cfg.relocation.address,
    port: cfg.relocation.port,
    tlsDir: cfg.tlsDir,
    hostsAllow: cfg.relocation.hostsAllow,
    limits: cfg.limits,
  });
  log.info('ferryd ready', { apiSocket: cfg.apiSocket, tls: tlsOn ? `${cfg.relocation.address}:${cfg.relocation.port}` : null });
  process.stdout.write(
    `ferryd ${cfg.name} ready (api ${cfg.apiSocket}${tlsOn ? `, tls ${cfg.relocation.address}:${cfg.relocation.port}` : ''}, accel ${accel.accel})\n`,
  );
  const stop = async (sig: string): Promise<void> => {
    log.info('ferryd stopping; domains keep running', { signal: sig });
    await server.close();
    metrics?.close();
    balancer?.stop();
    await cluster?.stop();
    host.detachAll();
    try {
      if (Number(fs.readFileSync(pidFile, 'utf8')) === process.pid) fs.unlinkSync(pidFile);
    } catch {
      /* gone */
    }
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
}

main().catch((e) => {
  const fe = asFerryError(e);
  process.stderr.write(`ferryd: ${fe.code}: ${fe.message}\n`);
  process.exit(fe.exitCode);
});
