/**
 * Save and restore (xm save / xm restore): a domain's state written by QEMU into a file
 * that ferryd owns, and read back into a new QEMU. No user string reaches QEMU.
 *
 * Two formats, both starting with ferry's header (magic line, one JSON line):
 *   - mapped-ram (FERRY-SAVE-2, the default where QEMU has it): the header is padded to
 *     4 KiB and QEMU's file migration follows, each RAM page at a fixed place, written
 *     once by multifd threads in parallel (O_DIRECT where the filesystem allows). QEMU
 *     writes the file in its own directory (a path ferryd made); ferryd renames it into
 *     place, so that directory and the save's must share a filesystem. A restore hands
 *     QEMU the file as a read-only descriptor (an fd set), never its path.
 *   - stream (FERRY-SAVE-1): QEMU's migration stream through a unix socket ferryd owns,
 *     appended to the header by ferryd. Any QEMU, any filesystem; one thread.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { FerryError } from '../errors.ts';
import { parseDomainConfig, domainConfigToJson, type DomainConfig } from '../domain/config.ts';
import { transition, hasProcess, describeKind } from '../domain/state.ts';
import { killAndWait } from '../qemu/process.ts';
import type { QmpClient } from '../qmp/client.ts';
import { MigrationWatcher, FINAL_STATUSES, type MigrateInfo } from '../qemu/migstatus.ts';
import { MigrationQmp, uri, fileUriSafe, UNLIMITED_BANDWIDTH } from '../qemu/migration.ts';
import { STATE_FDSET } from '../qemu/argv.ts';
import { cpuMissing, type QemuFacts } from '../qemu/probe.ts';
import { resolveSaveFile } from '../domain/storage.ts';
import type { DomainInfo, Results, SaveFormat, SaveProgress } from '../api/protocol.ts';
import type { DaemonConfig } from './config.ts';
import type { DomainStore, HostedDomain } from './records.ts';
import type { QemuRuntime } from './runtime.ts';

const STREAM_MAGIC = 'FERRY-SAVE-1\n';
const MAPPED_MAGIC = 'FERRY-SAVE-2\n';
/** mapped-ram's part starts on a page boundary (O_DIRECT needs aligned offsets). */
const ALIGN = 4096;

export interface SaveRestoreDeps {
  cfg: DaemonConfig;
  qemu: QemuFacts;
  store: DomainStore;
  runtime: QemuRuntime;
  /** The checks a start makes (networks, paths, CPU, memory). */
  checkStart(c: DomainConfig, verb: string): void;
  domainInfo(name: string): DomainInfo;
  /** The host's events ('domain.progress' while a save runs: the CLI's bar). */
  emit(event: string, data: unknown): void;
}

export interface SaveOptions {
  anyPath?: boolean;
  local: boolean;
  /** 'stream' forces the stream format (a file for a host whose QEMU has no mapped-ram). */
  format?: SaveFormat;
}

/** multifd threads for a mapped-ram save or restore: each writes (reads) its share of pages. */
const fileChannels = (): number => Math.min(4, Math.max(2, os.availableParallelism()));

export class SaveRestore {
  constructor(private readonly d: SaveRestoreDeps) {}

  async save(name: string, fileArg: string, opts: SaveOptions = { local: true }): Promise<Results['domain.save']> {
    const file = resolveSaveFile(fileArg, this.d.cfg.storage, opts);
    const dom = this.d.store.get(name);
    transition(dom.rec.state, { type: 'stopped', reason: 'saved', at: 0 }, name);
    const { qmp } = this.d.runtime.needProcess(dom, 'save');
    const wasRunning = dom.rec.state.kind === 'running';
    const rt = dom.rec.runtime!;
    const header = {
      config: domainConfigToJson(dom.rec.config),
      wasRunning,
      machine: rt.machine,
      cpuModel: rt.cpuModel,
      savedAt: new Date().toISOString(),
      host: this.d.cfg.name,
    };
    const mq = new MigrationQmp(qmp, 'source');
    const blocker = opts.format === 'stream' ? '--stream asked for it' : await this.mappedRamBlocker(dom, file, mq);
    const tmp = `${file}.partial`;
    const t0 = Date.now();
    dom.busy = 'saving';
    try {
      // FILE.partial, created exclusively (never a symlink followed, never another save's),
      // is where the file is until it is complete; then one rename puts it in place.
      const r: { bytes: number; directIo?: boolean } = blocker
        ? await this.saveStream(dom, qmp, tmp, STREAM_MAGIC + JSON.stringify(header) + '\n')
        : await this.saveMappedRam(dom, mq, tmp, header);
      fs.renameSync(tmp, file);
      dom.expectStop = 'saved';
      dom.busy = undefined;
      await qmp.execute('quit').catch(() => undefined);
      await dom.exited;
      return {
        name,
        file,
        bytes: r.bytes,
        ms: Date.now() - t0,
        format: blocker ? 'stream' : 'mapped-ram',
        ...(blocker ? { why: blocker } : { directIo: !!r.directIo }),
      };
    } catch (e) {
      dom.busy = undefined;
      fs.rmSync(tmp, { force: true });
      if (wasRunning && dom.qmp) await dom.qmp.execute('cont').catch(() => undefined);
      throw e instanceof FerryError ? e : new FerryError('SAVE_FAILED', `Cannot save domain "${name}" to ${file}: ${(e as Error).message}`);
    }
  }

  /**
   * Why this save cannot be a mapped-ram file, or null when it can: QEMU must offer it,
   * and the file QEMU writes in its own directory must be renameable to FILE.
   */
  private async mappedRamBlocker(dom: HostedDomain, file: string, mq: MigrationQmp): Promise<string | null> {
    if (!(await mq.offered()).has('mapped-ram')) return `this host's QEMU has no mapped-ram (QEMU 9.0 or later has)`;
    const qdir = this.d.runtime.qemuDirOf(dom);
    if (!fileUriSafe(qdir)) return `QEMU's directory ${qdir} has characters a file migration URI cannot carry`;
    // A missing directory (--any-path) is SAVE_FAILED, as the stream format's exclusive create makes it.
    let dirDev: number;
    try {
      dirDev = fs.statSync(path.dirname(file)).dev;
    } catch (e) {
      throw new FerryError('SAVE_FAILED', `Cannot save to ${file}: ${(e as Error).message}`);
    }
    if (fs.statSync(qdir).dev !== dirDev)
      return `${path.dirname(file)} is on another filesystem than ferryd's state directory, so QEMU's file could not be renamed into place`;
    return null;
  }

  /**
   * QEMU's file migration with mapped-ram: ferryd creates the file in QEMU's directory
   * (header written, owned by the domain's uid), QEMU fills it from the page after the
   * header with its multifd threads; then the file is flushed, given back to root and
   * renamed to TMP.
   */
  private async saveMappedRam(
    dom: HostedDomain,
    mq: MigrationQmp,
    tmp: string,
    header: Record<string, unknown>,
  ): Promise<{ bytes: number; directIo: boolean }> {
    reserve(tmp);
    const staging = path.join(this.d.runtime.qemuDirOf(dom), 'save.state');
    fs.rmSync(staging, { force: true });
    const channels = fileChannels();
    const text = Buffer.from(MAPPED_MAGIC + JSON.stringify({ ...header, format: 'mapped-ram', channels }) + '\n');
    const offset = Math.ceil(text.length / ALIGN) * ALIGN;
    const fd = fs.openSync(staging, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW, 0o600);
    try {
      fs.writeSync(fd, Buffer.concat([text, Buffer.alloc(offset - text.length)]));
      const id = this.d.runtime.identityOf(dom);
      if (id) fs.fchownSync(fd, id.uid, id.gid);
    } finally {
      fs.closeSync(fd);
    }
    const directIo = directIoWorks(staging);
    const wasRunning = dom.rec.state.kind === 'running';
    try {
      if (wasRunning) await mq.stop();
      await mq.setCapabilities({ events: true, multifd: true, mappedRam: true });
      await mq.setParameters({ maxBandwidth: UNLIMITED_BANDWIDTH, multifdChannels: channels, directIo });
      await this.watchedMigration(dom, mq, () => mq.migrate(uri.file(staging, offset)));
      // The guest's pages are in the file: on the disk before it is called saved.
      const w = fs.openSync(staging, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
      try {
        fs.fsyncSync(w);
        fs.fchownSync(w, 0, 0);
        fs.fchmodSync(w, 0o600);
      } finally {
        fs.closeSync(w);
      }
      fs.renameSync(staging, tmp);
      return { bytes: fs.statSync(tmp).blocks * 512, directIo };
    } catch (e) {
      fs.rmSync(staging, { force: true });
      // This QEMU may migrate again (live, as a stream): mapped-ram must not stay on.
      await mq.setCapabilities({ multifd: false, mappedRam: false }).catch(() => undefined);
      await mq.setParameters({ directIo: false }).catch(() => undefined);
      throw e;
    }
  }

  /** The stream format: QEMU's migration into a socket ferryd owns, appended to the header in TMP. */
  private async saveStream(dom: HostedDomain, qmp: QmpClient, tmp: string, head: string): Promise<{ bytes: number }> {
    const sockPath = path.join(this.d.runtime.qemuDirOf(dom), 'save.sock');
    fs.rmSync(sockPath, { force: true });
    const server = net.createServer();
    let out: fs.WriteStream | undefined;
    try {
      out = await createExclusive(tmp);
      out.write(head);
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
      if (dom.rec.state.kind === 'running') await mq.stop();
      await mq.setCapabilities({ events: true });
      await mq.setParameters({ maxBandwidth: UNLIMITED_BANDWIDTH });
      await this.watchedMigration(dom, mq, () => mq.migrate(uri.unix(sockPath)));
      const bytes = await received;
      await new Promise<void>((r, j) => out!.end((e?: Error | null) => (e ? j(e) : r())));
      return { bytes };
    } catch (e) {
      out?.destroy();
      throw e;
    } finally {
      server.close();
      fs.rmSync(sockPath, { force: true });
    }
  }

  /**
   * Starts the save's migration and waits for its end by QEMU's events; meanwhile the
   * save's progress goes out twice a second ('domain.progress': QEMU has no progress
   * event, so its counters are asked, for the display only).
   */
  private async watchedMigration(dom: HostedDomain, mq: MigrationQmp, start: () => Promise<unknown>): Promise<void> {
    const domain = dom.rec.config.name;
    const t0 = Date.now();
    const watch = new MigrationWatcher(mq.q);
    const tick = setInterval(() => {
      mq.info().then(
        (m) => this.d.emit('domain.progress', saveProgress(domain, m, Date.now() - t0)),
        () => undefined,
      );
    }, 500);
    try {
      await start();
      await this.migrationDone(mq.q, watch, 600_000);
    } finally {
      clearInterval(tick);
      watch.dispose();
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
    const saved = readHeader(file, fd);
    const { header } = saved;
    // The header reaches QEMU's command line: only values this host's QEMU offers.
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
    let pid: number | undefined;
    try {
      const sp = await this.d.runtime.spawn(c, {
        incoming: true,
        machine: header.machine,
        cpuModel: header.cpuModel,
        // mapped-ram: QEMU reads the file through an fd set holding this descriptor.
        ...(saved.format === 'mapped-ram' ? { stateFd: fd } : {}),
      });
      pid = sp.pid;
      l.rec.runtime = sp.runtime;
      // A restore is an incoming migration (qemu/migration.ts), from the file or a socket.
      const mq = new MigrationQmp(sp.qmp, 'destination');
      // A load that fails is QEMU's to explain: its log is named.
      const loaded = (p: Promise<void>): Promise<void> =>
        p.catch((e: Error) => {
          throw new FerryError('SAVE_FAILED', `QEMU could not load ${file} (${e.message}): see ${sp.runtime.logPath}`);
        });
      if (saved.format === 'mapped-ram') await this.loadMappedRam(mq, file, saved, loaded);
      else await this.loadStream(l, mq, { fd, offset: saved.offset }, loaded);
      this.d.store.apply(l, { type: 'start', pid, domid: this.d.store.allocDomid(), at: Date.now() });
      await this.d.runtime.attach(l, pid, sp.qmp);
      l.busy = undefined;
      // xm restore resumes the domain; a domain saved while paused stays paused.
      if (header.wasRunning) await sp.qmp.execute('cont');
      else this.d.store.apply(l, { type: 'pause', at: Date.now() });
      return { ...this.d.domainInfo(c.name), restoreMs: Date.now() - t0, format: saved.format };
    } catch (e) {
      l.busy = undefined;
      if (pid) await killAndWait(pid, 0);
      this.d.runtime.cleanup(l);
      if (created) this.d.store.unhold(c.name);
      throw e instanceof FerryError ? e : new FerryError('SAVE_FAILED', `Cannot restore ${file}: ${(e as Error).message}`);
    }
  }

  /** mapped-ram: QEMU's multifd threads read the pages from the fd set's file, from `offset` on. */
  private async loadMappedRam(mq: MigrationQmp, file: string, saved: SavedFile, loaded: Loaded): Promise<void> {
    if (!(await mq.offered()).has('mapped-ram'))
      throw new FerryError(
        'SAVE_FAILED',
        `${file} is a mapped-ram save, which this host's QEMU ${this.d.qemu.version} cannot read (QEMU 9.0 or later can); save with --stream for hosts with an older QEMU`,
      );
    await mq.setCapabilities({ events: true, multifd: true, mappedRam: true });
    await mq.setParameters({ multifdChannels: saved.channels });
    const watch = new MigrationWatcher(mq.q);
    try {
      await loaded(mq.incoming(uri.file(`/dev/fdset/${STATE_FDSET}`, saved.offset)).then(() => this.migrationDone(mq.q, watch, 600_000)));
    } finally {
      watch.dispose();
    }
    // This QEMU will migrate as a stream later (a live move): mapped-ram must not stay on.
    await mq.setCapabilities({ multifd: false, mappedRam: false });
  }

  /** The stream format: the file's stream, from `offset`, fed into QEMU's incoming socket. */
  private async loadStream(l: HostedDomain, mq: MigrationQmp, from: { fd: number; offset: number }, loaded: Loaded): Promise<void> {
    const sockPath = path.join(this.d.runtime.qemuDirOf(l), 'restore.sock');
    fs.rmSync(sockPath, { force: true });
    try {
      await mq.setCapabilities({ events: true });
      const watch = new MigrationWatcher(mq.q);
      try {
        await mq.incoming(uri.unix(sockPath));
        await feed(sockPath, from.fd, from.offset);
        // The stream is in; wait until QEMU has loaded it.
        await loaded(this.migrationDone(mq.q, watch, 600_000));
      } finally {
        watch.dispose();
      }
    } finally {
      fs.rmSync(sockPath, { force: true });
    }
  }
}

/** TMP, created empty and exclusively: never a symlink followed, never another save's file taken over. */
function reserve(tmp: string): void {
  try {
    fs.closeSync(fs.openSync(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW, 0o600));
  } catch (e) {
    throw new FerryError('SAVE_FAILED', `Cannot create ${tmp}: ${(e as Error).message} (a leftover from an earlier save? remove it)`);
  }
}

/** Whether the filesystem under FILE takes O_DIRECT (ext4, xfs do; tmpfs does not). */
function directIoWorks(file: string): boolean {
  try {
    fs.closeSync(fs.openSync(file, fs.constants.O_WRONLY | fs.constants.O_DIRECT | fs.constants.O_NOFOLLOW));
    return true;
  } catch {
    return false;
  }
}

/** A save's progress from QEMU's counters: pages written of the guest's RAM. */
export function saveProgress(domain: string, m: MigrateInfo, elapsedMs: number): SaveProgress {
  const ram = m.ram ?? {};
  const total = ram.total ?? 0;
  const remaining = m.status === 'completed' ? 0 : (ram.remaining ?? total);
  const rate = ((ram.mbps ?? 0) * 1e6) / 8;
  return {
    domain,
    verb: 'save',
    percent: total ? Math.min(100, ((total - remaining) / total) * 100) : 0,
    written: ram.transferred ?? 0,
    total,
    rateMBps: rate / 1e6,
    etaS: rate > 0 ? remaining / rate : null,
    elapsedMs,
  };
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

/** A save file's header (checked to be one), its format, and where QEMU's part starts. */
function readHeader(file: string, fd: number): SavedFile {
  if (!fs.fstatSync(fd).isFile()) throw new FerryError('PATH_NOT_ALLOWED', `${file} is not a regular file`);
  const head = Buffer.alloc(64 * 1024);
  const n = fs.readSync(fd, head, 0, head.length, 0);
  const text = head.subarray(0, n).toString('latin1');
  const magic = [STREAM_MAGIC, MAPPED_MAGIC].find((m) => text.startsWith(m));
  if (!magic) throw new FerryError('SAVE_FAILED', `${file} is not a ferry save file`);
  const nl = text.indexOf('\n', magic.length);
  if (nl < 0) throw new FerryError('SAVE_FAILED', `${file}: header is truncated`);
  let header: SaveHeader;
  try {
    header = JSON.parse(Buffer.from(text.slice(magic.length, nl), 'latin1').toString('utf8'));
  } catch {
    throw new FerryError('SAVE_FAILED', `${file}: header is not JSON`);
  }
  if (typeof header !== 'object' || header === null) throw new FerryError('SAVE_FAILED', `${file}: header is not an object`);
  const end = nl + 1;
  if (magic === STREAM_MAGIC) return { header, format: 'stream', offset: end, channels: 1 };
  // mapped-ram: QEMU's part starts at the next page boundary; the channel count reaches QEMU.
  const ch = header.channels;
  if (!Number.isInteger(ch) || (ch as number) < 1 || (ch as number) > 16)
    throw new FerryError('SAVE_FAILED', `${file}: header's channels ${JSON.stringify(ch)} is not a whole number from 1 to 16`);
  return { header, format: 'mapped-ram', offset: Math.ceil(end / ALIGN) * ALIGN, channels: ch as number };
}

interface SaveHeader {
  config: unknown;
  wasRunning: boolean;
  machine: string;
  cpuModel: string;
  channels?: unknown;
}

/** Turns a failed load into SAVE_FAILED naming QEMU's log. */
type Loaded = (p: Promise<void>) => Promise<void>;

interface SavedFile {
  header: SaveHeader;
  format: SaveFormat;
  offset: number;
  channels: number;
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
