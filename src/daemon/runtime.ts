/**
 * The QEMU runtime of domains: spawning a domain's QEMU (its files opened here, its
 * taps created, confined to the QEMU user), attaching QMP and the console, hearing its
 * events and its end, and cleaning up after it. Per-domain runtime files (QMP, console,
 * logs) live in STATE/run/NAME/, QEMU's own sockets in STATE/run/NAME/q/.
 *
 * A QEMU outlives ferryd: after a restart `reattach` finds it again by pid + QMP socket.
 */
import fs from 'node:fs';
import path from 'node:path';
import { FerryError } from '../errors.ts';
import type { DomainConfig } from '../domain/config.ts';
import { hasProcess, describeKind } from '../domain/state.ts';
import { domainArgv, tapName } from '../qemu/argv.ts';
import { startQemu, isOurQemu, killAndWait, pidAlive, processStartTicks, unixPeerIs } from '../qemu/process.ts';
import { QmpClient, type QmpEvent } from '../qmp/client.ts';
import type { QemuFacts, AccelChoice } from '../qemu/probe.ts';
import { prepareQemuDir, copyTlsForQemu, privateDevNodes, type DomainIdentity } from '../qemu/confine.ts';
import type { UidPool } from './uids.ts';
import type { DaemonConfig } from './config.ts';
import type { Logger } from './log.ts';
import { createTap, deleteTap } from './net.ts';
import { checkedBackingImages } from '../domain/storage.ts';
import { ConsoleMux } from './console.ts';
import type { DomainStore, HostedDomain, Runtime } from './records.ts';

/** `bridges`: per NIC, a bridge other than its network's (a tunnel's away end, daemon/tunnels.ts). */
export interface SpawnOptions {
  incoming?: boolean;
  preallocate?: boolean;
  machine?: string;
  cpuModel?: string;
  bridges?: (string | undefined)[];
  /** A save file a restore reads (the caller's descriptor, read-only; it stays the caller's to close). */
  stateFd?: number;
}

/** What the runtime works with: the host's config, log, accelerator and engine, the uid pool, the domain store, and the host's event emitter. */
export interface RuntimeDeps {
  cfg: DaemonConfig;
  log: Logger;
  accel: AccelChoice;
  qemu: QemuFacts;
  uids: UidPool | null;
  store: DomainStore;
  emit: (event: string, data: unknown) => void;
}

export class QemuRuntime {
  private readonly cfg: DaemonConfig;
  private readonly log: Logger;
  private readonly accel: AccelChoice;
  private readonly qemu: QemuFacts;
  /** Where each QEMU's uid comes from; null: QEMUs run as root (qemu.user "root"). */
  readonly uids: UidPool | null;
  private readonly store: DomainStore;
  private readonly emit: (event: string, data: unknown) => void;

  constructor(deps: RuntimeDeps) {
    ({ cfg: this.cfg, log: this.log, accel: this.accel, qemu: this.qemu, uids: this.uids, store: this.store, emit: this.emit } = deps);
    fs.mkdirSync(this.runDir, { recursive: true, mode: 0o700 });
    // Domains' uids pass through to their own directories, but may not list which
    // domains exist (run/DOM is root:DOMGID 0710, confine.ts).
    fs.chmodSync(this.runDir, this.uids ? 0o711 : 0o700);
  }

  /** Whether QEMUs here run confined (a uid each, a private /dev). */
  get confined(): boolean {
    return this.uids !== null;
  }

  /** The uid and gid a domain's running QEMU has, or null when unconfined. */
  identityOf(dom: HostedDomain): DomainIdentity | null {
    const u = dom.rec.runtime?.uid;
    return this.uids && u !== undefined ? { uid: u, gid: u } : null;
  }

  get runDir(): string {
    return path.join(this.cfg.stateDir, 'run');
  }

  runtimeFor(c: DomainConfig, id: DomainIdentity | null): Runtime {
    const dir = path.join(this.runDir, c.name);
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const qdir = path.join(dir, 'q');
    prepareQemuDir(qdir, this.cfg.stateDir, id);
    return {
      ...(id ? { uid: id.uid } : {}),
      qemuDir: qdir,
      qmpPath: path.join(qdir, 'qmp.sock'),
      consolePath: path.join(qdir, 'console.sock'),
      logPath: path.join(dir, 'qemu.log'),
      consoleLog: path.join(dir, 'console.log'),
      taps: c.nics.map((_, i) => tapName(c.uuid, i)),
      accel: this.accel.accel,
      machine: this.qemu.machine,
      cpuModel: this.qemu.cpuModel,
    };
  }

  /** The directory a domain's QEMU may write in (sockets for save, restore, the data gate). */
  qemuDirOf(dom: HostedDomain): string {
    return dom.rec.runtime?.qemuDir ?? path.join(this.runDir, dom.rec.config.name);
  }

  /** A copy of this host's TLS files that the domain's QEMU can read (tls-creds-x509 dir). */
  qemuTlsDir(dom: HostedDomain): string {
    return copyTlsForQemu(this.cfg.tlsDir, this.qemuDirOf(dom), this.identityOf(dom));
  }

  /**
   * Starts QEMU for a domain, stopped (-S), with taps created. The caller decides whether
   * to `cont` and which event to apply. The domain's files are opened here, without
   * following symlinks, and passed to QEMU as descriptors; QEMU runs as a uid of its own,
   * with a private /dev, under seccomp (qemu/confine.ts). The uid is released again if
   * the start fails; otherwise when the QEMU is gone (cleanup).
   */
  async spawn(c: DomainConfig, opts: SpawnOptions = {}): Promise<{ pid: number; qmp: QmpClient; runtime: Runtime }> {
    const id = this.uids?.allocate(`domain "${c.name}"`) ?? null;
    try {
      return await this.spawnAs(c, opts, id);
    } catch (e) {
      this.uids?.release(id?.uid);
      throw e;
    }
  }

  private async spawnAs(
    c: DomainConfig,
    opts: SpawnOptions,
    id: DomainIdentity | null,
  ): Promise<{ pid: number; qmp: QmpClient; runtime: Runtime }> {
    const runtime = this.runtimeFor(c, id);
    if (opts.machine) runtime.machine = opts.machine;
    if (opts.cpuModel) runtime.cpuModel = opts.cpuModel;
    const opened: number[] = [];
    const open = (p: string, write: boolean): number => {
      try {
        opened.push(fs.openSync(p, (write ? fs.constants.O_RDWR : fs.constants.O_RDONLY) | fs.constants.O_NOFOLLOW));
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        throw new FerryError(
          code === 'ELOOP' ? 'PATH_NOT_ALLOWED' : 'DISK_NOT_FOUND',
          `Domain "${c.name}": cannot open ${p} (${code === 'ELOOP' ? 'it became a symlink' : code})`,
        );
      }
      return 3 + opened.length - 1; // the descriptor's number inside QEMU
    };
    try {
      const fds = {
        kernel: c.boot.kind === 'kernel' ? open(c.boot.kernel, false) : undefined,
        initrd: c.boot.kind === 'kernel' && c.boot.initrd ? open(c.boot.initrd, false) : undefined,
        disks: c.disks.map((d) => open(d.path, !d.readOnly)),
        // qcow2 backing files, read and checked against the pools here, where they are
        // opened: read-only descriptors too.
        backing: c.disks.map((d) =>
          d.format === 'qcow2'
            ? checkedBackingImages(d.path, this.cfg.storage, `Domain "${c.name}" on ${this.cfg.name}`).map((b) => ({
                fd: open(b.path, false),
                format: b.format,
              }))
            : [],
        ),
        // Numbered after the files opened here: QEMU sees passFds from descriptor 3 on.
        ...(opts.stateFd !== undefined ? { state: 3 + opened.length } : {}),
      };
      c.nics.forEach((n, i) => createTap(runtime.taps[i], opts.bridges?.[i] ?? this.cfg.networks[n.network].bridge, n.network, id?.uid));
      try {
        const argv = domainArgv(c, { ...runtime, incoming: opts.incoming, preallocate: opts.preallocate, fds });
        const q = await startQemu(argv, {
          qmpPath: runtime.qmpPath,
          logPath: runtime.logPath,
          what: `domain "${c.name}"`,
          engine: this.cfg.qemu,
          passFds: opts.stateFd !== undefined ? [...opened, opts.stateFd] : opened,
          ...(id ? { confine: { id, devices: privateDevNodes(this.devicesFor(c, opts)) } } : {}),
        });
        await this.proveQmp(q.qmp, q.pid, runtime.qmpPath).catch(async (e) => {
          q.qmp.close();
          await killAndWait(q.pid, 0);
          throw e;
        });
        return { pid: q.pid, qmp: q.qmp, runtime: { ...runtime, startTicks: processStartTicks(q.pid) } };
      } catch (e) {
        for (const t of runtime.taps) deleteTap(t);
        throw e;
      }
    } finally {
      for (const fd of opened) fs.closeSync(fd);
    }
  }

  /** The host device nodes a domain's QEMU gets in its private /dev (qemu/confine.ts). */
  private devicesFor(c: DomainConfig, opts: SpawnOptions): string[] {
    const out: string[] = [];
    if (c.nics.length) out.push('net/tun');
    if (this.accel.accel === 'kvm') out.push('kvm');
    // Post-copy's destination handles its page faults through userfaultfd.
    if (opts.incoming && this.cfg.relocation.acceptPostcopy) out.push('userfaultfd');
    return out;
  }

  /**
   * A socket at the right path proves nothing by itself (a confined QEMU owns its
   * directory): its other end must be held by the very process ferryd spawned.
   */
  private async proveQmp(q: QmpClient, pid: number, where: string): Promise<void> {
    if (this.uids && !(await unixPeerIs(q.socket, pid)))
      throw new FerryError('QMP_ERROR', `The QMP socket ${where} is not held by QEMU pid ${pid}; not trusting it`);
  }

  /** Wires QMP events and the console for a domain whose QEMU runs with `pid`. */
  async attach(dom: HostedDomain, pid: number, qmp?: QmpClient): Promise<void> {
    const rt = dom.rec.runtime!;
    if (qmp) dom.qmp = qmp;
    else {
      // Re-attaching (ferryd restarted): the socket at this path must still be our QEMU's.
      const q = await QmpClient.connect(rt.qmpPath, 5000);
      await this.proveQmp(q, pid, rt.qmpPath).catch((e) => {
        q.close();
        throw e;
      });
      dom.qmp = q;
    }
    const name = dom.rec.config.name;
    dom.qmp.on('event', (e: QmpEvent) => this.onQmpEvent(dom, e));
    dom.exited = new Promise<void>((resolve) =>
      dom.qmp!.once('close', () => {
        void this.onQemuGone(dom, pid).finally(resolve);
      }),
    );
    if (!dom.console) {
      dom.console = new ConsoleMux(rt.consolePath, rt.consoleLog);
      try {
        await dom.console.connect();
      } catch (e) {
        this.log.warn('console not connected', { domain: name, error: String(e) });
      }
    }
  }

  /**
   * After a ferryd restart: attaches to the domain's QEMU if it is still ours and brings
   * the record in line with what QEMU says (it may have paused or resumed meanwhile).
   * A domain whose QEMU is gone crashed; migration states are the migration layer's.
   */
  async reattach(dom: HostedDomain): Promise<void> {
    const s = dom.rec.state;
    const name = dom.rec.config.name;
    if (!hasProcess(s)) return;
    // Its uid stays taken while its QEMU lives, whoever settles the domain (cleanup releases it).
    if (dom.rec.runtime?.uid !== undefined && pidAlive(s.pid)) this.uids?.adopt([dom.rec.runtime.uid]);
    if (isOurQemu(s.pid, dom.rec.config.uuid) && dom.rec.runtime) {
      try {
        await this.attach(dom, s.pid);
        const st = await dom.qmp!.execute<{ running: boolean; status: string }>('query-status');
        if (s.kind === 'running' && !st.running) this.store.apply(dom, { type: 'pause', at: Date.now() });
        else if (s.kind === 'paused' && st.running) this.store.apply(dom, { type: 'resume', at: Date.now() });
        this.log.info('re-attached to domain', { domain: name, pid: s.pid, status: st.status });
        return;
      } catch (e) {
        this.log.error('cannot re-attach to QEMU; killing it', { domain: name, pid: s.pid, error: String(e) });
        await killAndWait(s.pid, 1000);
      }
    }
    if (s.kind === 'running' || s.kind === 'paused') {
      this.cleanup(dom);
      this.store.apply(dom, { type: 'crash', reason: 'QEMU exited while ferryd was not running', at: Date.now() });
    }
  }

  private onQmpEvent(dom: HostedDomain, e: QmpEvent): void {
    const s = dom.rec.state.kind;
    this.log.debug('qmp event', { domain: dom.rec.config.name, event: e.event, data: e.data });
    this.emit('qmp.event', { domain: dom.rec.config.name, event: e });
    // Guest- or QEMU-initiated pauses and resumes; ferryd's own pause/unpause apply
    // the same events, and whichever comes second finds nothing to do.
    if (dom.busy) return;
    if (e.event === 'STOP' && s === 'running') this.store.apply(dom, { type: 'pause', at: Date.now() });
    else if (e.event === 'RESUME' && s === 'paused') this.store.apply(dom, { type: 'resume', at: Date.now() });
    else if (e.event === 'SHUTDOWN' && !dom.expectStop) dom.expectStop = 'poweroff';
  }

  /** QEMU's QMP socket closed: the process is ending. A stop we asked for, or a crash. */
  private async onQemuGone(dom: HostedDomain, pid: number): Promise<void> {
    const deadline = Date.now() + 5000;
    while (pidAlive(pid) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    const s = dom.rec.state;
    if (!hasProcess(s) || s.pid !== pid) return; // already settled by whoever stopped it
    const reason = dom.expectStop;
    this.cleanup(dom, reason ? { event: 'stopped', reason } : undefined);
    this.emit('qemu.gone', { domain: dom.rec.config.name, pid, expected: reason ?? null });
    if (s.kind === 'migrating-out' || s.kind === 'incoming') return; // the migration job settles these
    if (reason) this.store.apply(dom, { type: 'stopped', reason, at: Date.now() });
    else this.store.apply(dom, { type: 'crash', reason: 'QEMU exited unexpectedly', at: Date.now() });
  }

  /** Removes taps and runtime sockets; closes QMP and console. Keeps logs. */
  cleanup(dom: HostedDomain, consoleFinal?: Record<string, unknown>): void {
    dom.qmp?.close();
    dom.qmp = undefined;
    dom.console?.close(consoleFinal);
    dom.console = undefined;
    const rt = dom.rec.runtime;
    if (rt) {
      for (const t of rt.taps) deleteTap(t);
      fs.rmSync(rt.qmpPath, { force: true });
      fs.rmSync(rt.consolePath, { force: true });
      // Its QEMU is gone: the uid may serve another domain (uids.ts skips it while any process still has it).
      this.uids?.release(rt.uid);
    }
  }

  /** Deletes a domain's taps by their uuid-derived names (when no record lists them). */
  removeTaps(uuid: string, nics: number): void {
    for (let i = 0; i < nics; i++) deleteTap(tapName(uuid, i));
  }

  /** The domain's QEMU and QMP, or DOMAIN_BAD_STATE if it has none or something else owns it. */
  needProcess(dom: HostedDomain, verb: string): { pid: number; qmp: QmpClient } {
    const s = dom.rec.state;
    if (!hasProcess(s) || !dom.qmp)
      throw new FerryError('DOMAIN_BAD_STATE', `Cannot ${verb} domain "${dom.rec.config.name}": it is ${describeKind(s.kind)}`);
    if (dom.busy) throw new FerryError('DOMAIN_BAD_STATE', `Cannot ${verb} domain "${dom.rec.config.name}": it is busy (${dom.busy})`);
    return { pid: s.pid, qmp: dom.qmp };
  }

  /** Closes QMP and consoles without touching QEMU: domains outlive ferryd. */
  detach(dom: HostedDomain): void {
    dom.qmp?.removeAllListeners('close');
    dom.qmp?.close();
    dom.console?.close();
  }
}
