/**
 * Destination phase prepare: the tunnels proved, the phase persisted, and the one-shot
 * listener opened on the incoming QEMU (TLS with the source's certificate as its only
 * authz, or a gate for a plain stream), plus the NBD exports of a --copy-storage move.
 * Also the data ports a post-copy recovery listens on.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { FerryError } from '../../errors.ts';
import { MigrationQmp, streamConnections, uri } from '../../qemu/migration.ts';
import type { QmpClient } from '../../qmp/client.ts';
import type { Results } from '../../api/protocol.ts';
import { destTransition } from '../phases.ts';
import { DataGate } from '../gate.ts';
import { nodeOf, EXPORT } from '../mirror.ts';
import { checkL2, compareVersions } from '../preflight.ts';
import { abandonLocal, touch } from './abandon.ts';
import { bindDataPort } from './begin.ts';
import type { IncomingRun, IncomingSide } from './run.ts';

/**
 * Prepare: legal only once, right after Begin. An abandon that arrives meanwhile (the
 * source's connection dropped) waits for this to finish and then undoes all of it,
 * including a QEMU started just now.
 */
export async function prepare(run: IncomingRun): Promise<Results['relocation.prepare']> {
  const p = listen(run);
  run.preparing = p.then(
    () => undefined,
    () => undefined,
  );
  try {
    return await p;
  } finally {
    run.preparing = undefined;
  }
}

async function listen(run: IncomingRun): Promise<Results['relocation.prepare']> {
  const { j, host: h } = run;
  const m = run.begin;
  if (!m) throw new FerryError('MIGRATION_PROTOCOL', `Job ${j.jobId} has no Begin in this ferryd's life; begin again`);
  // Checked before anything.
  destTransition(j.phase, { type: 'prepared' });
  const started = run.starting;
  if (!started) throw new FerryError('MIGRATION_ILLEGAL_PHASE', `Job ${j.jobId} has no incoming QEMU to prepare (mode ${j.mode})`);
  try {
    const dom = await started;
    const q = dom.qmp;
    if (!q) throw new FerryError('MIGRATION_FAILED', `the incoming QEMU of "${j.domain}" is gone`);
    // The source has opened the tunnels' home ends: the segment must answer through them.
    if (run.tunnels.size)
      run.log.info('tunnel checked', {
        jobId: j.jobId,
        l2: await checkL2(
          m.config,
          m.peer,
          { networks: h.cfg.networks, host: h.cfg.name },
          { guestRunning: true, on: 'tunnels', tunnels: run.tunnels },
        ),
      });
    run.step({ type: 'prepared' });
    touch(run);
    run.closeProbe();
    if (m.insecure)
      await openGate(
        run,
        {
          sock: path.join(h.qemuDirOf(dom), 'incoming.sock'),
          port: j.dataPort,
          channels: streamConnections(m.parallel, m.compress, m.postcopy),
        },
        false,
      );
    else await new MigrationQmp(q, 'destination').incoming(uri.tcp(h.cfg.relocation.address, j.dataPort));
    run.log.info('incoming listener open', { jobId: j.jobId, domain: j.domain, port: j.dataPort, tls: !m.insecure, pid: j.pid });
    const nbd = m.copyDisks.length ? await exportDisks(run, q) : undefined;
    return { dataAddress: h.cfg.relocation.address, dataPort: j.dataPort, tlsHostname: h.cfg.name, ...(nbd ? { nbd } : {}) };
  } catch (e) {
    // If an abandon is already waiting for this Prepare, it undoes everything once we return.
    if (!run.abandoning) await abandonLocal(run, `prepare failed: ${(e as Error).message}`, true);
    throw e instanceof FerryError
      ? e
      : new FerryError('MIGRATION_FAILED', `Destination ${h.cfg.name} could not prepare: ${(e as Error).message}`);
  }
}

/**
 * A plain stream: the incoming QEMU listens on a unix socket in its own directory and
 * ferryd's gate admits the source's address alone on the data port (gate.ts), for
 * `channels` connections (multifd's and post-copy's preempt channel are more than one).
 * `recovery`: a post-copy recovery's listener (migrate-recover) replacing the first gate.
 */
export async function openGate(run: IncomingRun, at: { sock: string; port: number; channels: number }, recovery: boolean): Promise<void> {
  const { j, host: h } = run;
  const q = h.find(j.domain)?.qmp;
  if (!q) throw new FerryError('MIGRATION_FAILED', `the incoming QEMU of "${j.domain}" is gone`);
  fs.rmSync(at.sock, { force: true });
  const mq = new MigrationQmp(q, 'destination');
  if (recovery) await mq.recover(uri.unix(at.sock));
  else await mq.incoming(uri.unix(at.sock));
  run.gate?.close();
  run.gate = new DataGate({
    address: h.cfg.relocation.address,
    port: at.port,
    allowFrom: j.peer.address.replace(/^::ffff:/, ''),
    target: at.sock,
    channels: at.channels,
    log: run.log,
  });
  await run.gate.open();
}

/**
 * --copy-storage: the incoming QEMU serves the new disks over NBD on one more data
 * port, with the same TLS credentials and authz as the stream (the source's
 * certificate only), writable, until Finish stops the server.
 */
async function exportDisks(run: IncomingRun, q: QmpClient): Promise<{ address: string; port: number }> {
  const { j, host: h } = run;
  const m = run.begin!;
  const port = await freeDataPort(run.side, j.jobId);
  // One connection per disk (the source's mirror targets), and a client that does not
  // finish its handshake within 10 s is dropped (handshake-max-seconds, QEMU 10 and later).
  const mq = new MigrationQmp(q, 'destination');
  await mq.nbdServe({
    address: h.cfg.relocation.address,
    port,
    maxConnections: m.copyDisks.length,
    ...(compareVersions(h.qemu.version, '10.0') >= 0 ? { handshakeMaxSeconds: 10 } : {}),
    ...(m.insecure ? {} : { tls: { creds: 'ferry-tls', authz: 'ferry-authz' } }),
  });
  for (const c of m.copyDisks) await mq.nbdExport(`ferry-export${c.index}`, await nodeOf(q, c.index), EXPORT(c.index));
  run.log.info('disks exported for the copy', { jobId: j.jobId, domain: j.domain, port, disks: m.copyDisks.map((c) => c.index) });
  return { address: h.cfg.relocation.address, port };
}

/** A data port nobody listens on now (a new listener of the job's QEMU). */
export async function freeDataPort(side: IncomingSide, jobId: string): Promise<number> {
  const { port, server } = await bindDataPort(side, () => net.createServer(), ` to recover job ${jobId}`);
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}
