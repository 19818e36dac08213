/**
 * Save and restore (xm save / xm restore): a domain's state streamed by QEMU into a
 * file that ferryd owns, and back into a new QEMU. No user string reaches QEMU: ferryd
 * opens the file, QEMU sees only a socket in its own directory.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { FerryError } from '../errors.ts';
import { parseDomainConfig, domainConfigToJson, type DomainConfig } from '../domain/config.ts';
import { transition, hasProcess, describeKind } from '../domain/state.ts';
import { killAndWait } from '../qemu/process.ts';
import type { QmpClient } from '../qmp/client.ts';
import { MigrationWatcher, FINAL_STATUSES } from '../qemu/migstatus.ts';
import { MigrationQmp, uri } from '../qemu/migration.ts';
import { cpuMissing, type QemuFacts } from '../qemu/probe.ts';
import { resolveSaveFile } from '../domain/storage.ts';
import type { DomainInfo, Results } from '../api/protocol.ts';
import type { DaemonConfig } from './config.ts';
import type { DomainStore, HostedDomain } from './records.ts';
import type { QemuRuntime } from './runtime.ts';

const SAVE_MAGIC = 'FERRY-SAVE-1\n';

export interface SaveRestoreDeps {
  cfg: DaemonConfig;
  qemu: QemuFacts;
  store: DomainStore;
  runtime: QemuRuntime;
  /** The checks a start makes (networks, paths, CPU, memory). */
  checkStart(c: DomainConfig, verb: string): void;
  domainInfo(name: string): DomainInfo;
}

export class SaveRestore {
  constructor(private readonly d: SaveRestoreDeps) {}

  /**
   * Streams QEMU's migration output through a unix socket that ferryd owns into FILE.
   * No user string reaches QEMU: the file is opened by ferryd, QEMU only sees our socket.
   * Layout: SAVE_MAGIC, one JSON line {config, wasRunning, machine, cpuModel}, then the stream.
   */
  async save(
    name: string,
    fileArg: string,
    opts: { anyPath?: boolean; local: boolean } = { local: true },
  ): Promise<Results['domain.save']> {
    const file = resolveSaveFile(fileArg, this.d.cfg.storage, opts);
    const dom = this.d.store.get(name);
    transition(dom.rec.state, { type: 'stopped', reason: 'saved', at: 0 }, name);
    const { qmp } = this.d.runtime.needProcess(dom, 'save');
    const wasRunning = dom.rec.state.kind === 'running';
    const rt = dom.rec.runtime!;
    const sockPath = path.join(this.d.runtime.qemuDirOf(dom), 'save.sock');
    fs.rmSync(sockPath, { force: true });
    const tmp = `${file}.partial`;
    const t0 = Date.now();
    dom.busy = 'saving';
    let out: fs.WriteStream | undefined;
    const server = net.createServer();
    try {
      out = await createExclusive(tmp);
      out.write(
        SAVE_MAGIC +
          JSON.stringify({
            config: domainConfigToJson(dom.rec.config),
            wasRunning,
            machine: rt.machine,
            cpuModel: rt.cpuModel,
            savedAt: new Date().toISOString(),
            host: this.d.cfg.name,
          }) +
          '\n',
      );
      const received = receiveInto(server, out);
      await new Promise<void>((r, j) => {
        server.once('error', j);
        server.listen(sockPath, r);
      });
      // QEMU (the domain's uid) connects to it; the directory is QEMU's own and nobody else's.
      const id = this.d.runtime.identityOf(dom);
      if (id) fs.chownSync(sockPath, id.uid, id.gid);
      // A save is a migration into a socket: QEMU's source side (qemu/migration.ts).
      const mq = new MigrationQmp(qmp, 'source');
      if (wasRunning) await mq.stop();
      await mq.setCapabilities({ events: true });
      await mq.setParameters({ maxBandwidth: 0x7fffffffffff });
      const watch = new MigrationWatcher(qmp);
      try {
        await mq.migrate(uri.unix(sockPath));
        await this.migrationDone(qmp, watch, 600_000);
      } finally {
        watch.dispose();
      }
      const bytes = await received;
      await new Promise<void>((r, j) => out!.end((e?: Error | null) => (e ? j(e) : r())));
      fs.renameSync(tmp, file);
      dom.expectStop = 'saved';
      dom.busy = undefined;
      await qmp.execute('quit').catch(() => undefined);
      await dom.exited;
      return { name, file, bytes, ms: Date.now() - t0 };
    } catch (e) {
      dom.busy = undefined;
      out?.destroy();
      fs.rmSync(tmp, { force: true });
      if (wasRunning && dom.qmp) await dom.qmp.execute('cont').catch(() => undefined);
      throw e instanceof FerryError ? e : new FerryError('SAVE_FAILED', `Cannot save domain "${name}" to ${file}: ${(e as Error).message}`);
    } finally {
      server.close();
      fs.rmSync(sockPath, { force: true });
    }
  }

  /** Waits (by MIGRATION events) until completed (resolves) or failed/cancelled (SAVE_FAILED). */
  private async migrationDone(qmp: QmpClient, watch: MigrationWatcher, timeoutMs: number): Promise<void> {
    let status: string;
    try {
      status = await watch.until(FINAL_STATUSES, timeoutMs);
    } catch (e) {
      throw new FerryError(qmp.closed ? 'SAVE_FAILED' : 'TIMEOUT', `QEMU's migration stream did not finish: ${(e as Error).message}`);
    }
    if (status === 'completed') return;
    const m = await qmp.execute<Record<string, unknown>>('query-migrate').catch(() => ({}) as Record<string, unknown>);
    throw new FerryError('SAVE_FAILED', `QEMU migration ${status}: ${m['error-desc'] ?? 'no reason given'}`);
  }

  /** The save file is opened once (no symlink followed): its header and its stream are read from that one descriptor. */
  async restore(fileArg: string, opts: { anyPath?: boolean; local: boolean } = { local: true }): Promise<Results['domain.restore']> {
    const t0 = Date.now();
    const file = resolveSaveFile(fileArg, this.d.cfg.storage, opts);
    let fd: number;
    try {
      fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
    } catch (e) {
      throw new FerryError(
        (e as NodeJS.ErrnoException).code === 'ELOOP' ? 'PATH_NOT_ALLOWED' : 'SAVE_FAILED',
        `Cannot read ${file}: ${(e as Error).message}`,
      );
    }
    try {
      return await this.restoreFrom(file, fd, t0);
    } finally {
      fs.closeSync(fd);
    }
  }

  /** The record a restore fills: the domain's own (same uuid, not running), or a new one held until QEMU runs. */
  private placeFor(c: DomainConfig): { dom: HostedDomain; created: boolean } {
    const dom = this.d.store.find(c.name);
    if (dom) {
      if (dom.rec.config.uuid !== c.uuid)
        throw new FerryError('DOMAIN_EXISTS', `Another domain named "${c.name}" exists on ${this.d.cfg.name}`);
      if (hasProcess(dom.rec.state))
        throw new FerryError('DOMAIN_EXISTS', `Domain "${c.name}" is already ${describeKind(dom.rec.state.kind)} on ${this.d.cfg.name}`);
    } else {
      this.d.store.checkUnique(c);
    }
    this.d.checkStart(c, 'restore');
    if (dom) {
      dom.rec.config = c;
      return { dom, created: false };
    }
    const held: HostedDomain = { rec: { config: c, state: { kind: 'defined' } } };
    this.d.store.hold(held);
    return { dom: held, created: true };
  }

  private async restoreFrom(file: string, fd: number, t0: number): Promise<Results['domain.restore']> {
    const { header, offset } = readHeader(file, fd);
    // The header reaches QEMU's command line: only values this host's QEMU offers.
    if (typeof header !== 'object' || header === null) throw new FerryError('SAVE_FAILED', `${file}: header is not an object`);
    if (typeof header.machine !== 'string' || !this.d.qemu.machines.includes(header.machine))
      throw new FerryError(
        'SAVE_FAILED',
        `${file}: machine type ${JSON.stringify(header.machine)} is not one this host's QEMU ${this.d.qemu.version} offers`,
      );
    // The model the domain ran with (its own "cpu", fixed at start): this host must give all of it.
    const missing = typeof header.cpuModel === 'string' ? cpuMissing(this.d.qemu, header.cpuModel) : null;
    if (!missing || missing.length)
      throw new FerryError(
        'SAVE_FAILED',
        `${file}: CPU model ${JSON.stringify(header.cpuModel)} ${missing ? `needs ${missing.join(', ')}, which this host cannot give` : "is not one this host's QEMU knows"}`,
      );
    const c = parseDomainConfig(header.config);
    const { dom: l, created } = this.placeFor(c);
    l.busy = 'restoring';
    let sockPath = '';
    let pid: number | undefined;
    try {
      const sp = await this.d.runtime.spawn(c, { incoming: true, machine: header.machine, cpuModel: header.cpuModel });
      pid = sp.pid;
      l.rec.runtime = sp.runtime;
      sockPath = path.join(this.d.runtime.qemuDirOf(l), 'restore.sock');
      fs.rmSync(sockPath, { force: true });
      // A restore is an incoming migration from a socket (qemu/migration.ts).
      const mq = new MigrationQmp(sp.qmp, 'destination');
      await mq.setCapabilities({ events: true });
      const watch = new MigrationWatcher(sp.qmp);
      await mq.incoming(uri.unix(sockPath));
      await feed(sockPath, fd, offset);
      // The stream is in; wait until QEMU has loaded it.
      try {
        await this.migrationDone(sp.qmp, watch, 600_000);
      } catch (e) {
        throw new FerryError('SAVE_FAILED', `QEMU could not load ${file} (${(e as Error).message}): see ${sp.runtime.logPath}`);
      } finally {
        watch.dispose();
      }
      this.d.store.apply(l, { type: 'start', pid, domid: this.d.store.allocDomid(), at: Date.now() });
      await this.d.runtime.attach(l, pid, sp.qmp);
      l.busy = undefined;
      // xm restore resumes the domain; a domain saved while paused stays paused.
      if (header.wasRunning) await sp.qmp.execute('cont');
      else this.d.store.apply(l, { type: 'pause', at: Date.now() });
      return { ...this.d.domainInfo(c.name), restoreMs: Date.now() - t0 };
    } catch (e) {
      l.busy = undefined;
      if (pid) await killAndWait(pid, 0);
      this.d.runtime.cleanup(l);
      if (created) this.d.store.unhold(c.name);
      throw e instanceof FerryError ? e : new FerryError('SAVE_FAILED', `Cannot restore ${file}: ${(e as Error).message}`);
    } finally {
      fs.rmSync(sockPath, { force: true });
    }
  }
}

/** O_CREAT|O_EXCL: never follows a symlink planted at FILE.partial, never truncates another file. */
async function createExclusive(tmp: string): Promise<fs.WriteStream> {
  const out = fs.createWriteStream(tmp, { mode: 0o600, flags: 'wx' });
  try {
    await new Promise<void>((r, j) => {
      out.once('open', () => r());
      out.once('error', j);
    });
  } catch (e) {
    throw new FerryError('SAVE_FAILED', `Cannot create ${tmp}: ${(e as Error).message} (a leftover from an earlier save? remove it)`);
  }
  return out;
}

/** QEMU's stream, from the first connection to `server`, appended to `out`; resolves with its bytes at its end. */
function receiveInto(server: net.Server, out: fs.WriteStream): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    server.once('connection', (s) => {
      let bytes = 0;
      s.on('data', (d: Buffer) => {
        bytes += d.length;
      });
      s.pipe(out, { end: false });
      s.on('end', () => resolve(bytes));
      s.on('error', reject);
    });
  });
}

/** A save file's header (checked to be one) and where its stream starts. */
function readHeader(file: string, fd: number): { header: SaveHeader; offset: number } {
  if (!fs.fstatSync(fd).isFile()) throw new FerryError('PATH_NOT_ALLOWED', `${file} is not a regular file`);
  const head = Buffer.alloc(64 * 1024);
  const n = fs.readSync(fd, head, 0, head.length, 0);
  const text = head.subarray(0, n).toString('latin1');
  if (!text.startsWith(SAVE_MAGIC)) throw new FerryError('SAVE_FAILED', `${file} is not a ferry save file`);
  const nl = text.indexOf('\n', SAVE_MAGIC.length);
  if (nl < 0) throw new FerryError('SAVE_FAILED', `${file}: header is truncated`);
  let header: SaveHeader;
  try {
    header = JSON.parse(Buffer.from(text.slice(SAVE_MAGIC.length, nl), 'latin1').toString('utf8'));
  } catch {
    throw new FerryError('SAVE_FAILED', `${file}: header is not JSON`);
  }
  return { header, offset: Buffer.byteLength(text.slice(0, nl + 1), 'latin1') };
}

interface SaveHeader {
  config: unknown;
  wasRunning: boolean;
  machine: string;
  cpuModel: string;
}

/** The save file's stream, from `offset` of the open descriptor, into QEMU's incoming socket. */
function feed(sockPath: string, fd: number, offset: number): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const s = net.createConnection({ path: sockPath });
    let rs: fs.ReadStream | undefined;
    // The descriptor is closed by restore() once this settles: stop reading it first.
    const fail = (e: Error): void => {
      rs?.destroy();
      reject(e);
    };
    s.once('error', fail);
    s.once('connect', () => {
      rs = fs.createReadStream('', { fd, start: offset, autoClose: false });
      rs.once('error', fail);
      rs.pipe(s);
      s.once('finish', resolve);
    });
  });
}
