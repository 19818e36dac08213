/**
 * Fakes for the migration layer's unit tests (never used outside them): a host that
 * implements MigrationHost in memory, and scripted QMP peers for an incoming and an
 * outgoing QEMU. The lab tests (test/e2e) run the same code against the real ones.
 */
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import { knownPeers, type MigrationHost, type DomainHandle, type MoveOwnership, type TunnelHome } from '../migration/host.ts';
import { vniFor } from '../migration/preflight.ts';
import { QmpClient } from '../qmp/client.ts';
import { fakeQmp } from './qmp.ts';
import type { DomainConfig } from '../domain/config.ts';
import { transition, type DomainEvent, type DomainState } from '../domain/state.ts';
import { FerryError } from '../errors.ts';

export const quiet = {
  debug: (): void => undefined,
  info: (): void => undefined,
  warn: (): void => undefined,
  error: (): void => undefined,
};

/**
 * A fake QMP peer whose `script` answers each command: `ok` replies, `fail` errs, `event`
 * emits; `seen` lists the commands in order.
 */
interface Reply {
  ok: (ret?: unknown) => void;
  fail: (desc: string) => void;
}
async function scripted(script: (command: string, r: Reply, args?: Record<string, unknown>) => void) {
  let sock: net.Socket | undefined;
  /** QEMU dies: the connection drops without an answer. */
  const kill = (): void => {
    sock?.destroy();
  };
  const send = (obj: unknown): void => {
    sock?.write(JSON.stringify(obj) + '\r\n');
  };
  const event = (name: string, data?: unknown): void =>
    send({ event: name, data, timestamp: { seconds: Math.floor(Date.now() / 1000), microseconds: 0 } });
  const seen: string[] = [];
  const fake = await fakeQmp((msg, s) => {
    sock = s;
    seen.push(msg.execute);
    script(
      msg.execute,
      {
        ok: (ret: unknown = {}) => send({ return: ret, id: msg.id }),
        fail: (desc) => send({ error: { class: 'GenericError', desc }, id: msg.id }),
      },
      msg.arguments,
    );
  });
  return { fake, event, seen, kill };
}

/** A scripted incoming QEMU: answers what Destination asks; `stream()` plays the source's copy. */
export async function incomingQemu(o: { contFails?: 'paused' | 'unknown' | 'dies' } = {}) {
  let running = false;
  let contTried = false;
  let status = 'none';
  const mig = (st: string): void => {
    status = st;
    q.event('MIGRATION', { status: st });
  };
  const q = await scripted((command, r) => {
    switch (command) {
      case 'migrate-incoming':
        r.ok();
        mig('setup');
        break;
      case 'query-migrate':
        r.ok({ status });
        break;
      case 'query-status':
        // 'unknown': after a failed cont, QEMU cannot even say whether it runs.
        if (o.contFails === 'unknown' && contTried) r.fail('busy');
        else r.ok({ status: running ? 'running' : 'paused', running });
        break;
      case 'cont':
        contTried = true;
        if (o.contFails === 'dies') {
          q.kill();
          break;
        }
        if (o.contFails) {
          r.fail('Failed to get "write" lock');
          break;
        }
        running = true;
        r.ok();
        q.event('RESUME');
        break;
      default:
        r.ok();
    }
  });
  return {
    path: q.fake.path,
    seen: q.seen,
    cleanup: q.fake.cleanup,
    stream: (): void => {
      mig('active');
      mig('completed');
    },
    /**
     * The source switched to post-copy: the devices are here, the rest follows while the
     * guest runs and the stream completes, or (`short`) breaks before the last pages came.
     */
    postcopy: (end: 'completed' | 'short' = 'completed'): void => {
      mig('active');
      mig('postcopy-active');
      setTimeout(() => mig(end === 'short' ? 'postcopy-paused' : 'completed'), 60);
    },
  };
}

export type Handle = DomainHandle & { rec: { config: DomainConfig; state: DomainState }; qmp?: QmpClient; busy?: string };

export class FakeHost extends EventEmitter implements MigrationHost {
  readonly domains = new Map<string, Handle>();
  readonly reservations = new Map<string, number>();
  readonly discarded: string[] = [];
  readonly retired: string[] = [];
  readonly qemu = {
    version: '10.0.2',
    machine: 'pc-i440fx-10.0',
    cpuModel: 'qemu64',
    cpuFeatures: ['lm'],
    cpuUnavailable: [],
    accel: 'tcg' as const,
    machines: ['pc-i440fx-10.0'],
    models: { qemu64: { features: ['lm'], unavailable: [] as string[] } } as Record<string, { features: string[]; unavailable: string[] }>,
    ceiling: null as string | null,
  };
  readonly accel = { accel: 'tcg' as const };
  /** Standalone unless a test gives it a record to settle moves by (FakeOwnership). */
  ownership: MoveOwnership | null = null;
  readonly cfg;
  peers(): Record<string, string> {
    return knownPeers(this.cfg.peers, this.ownership);
  }
  constructor(
    name: string,
    readonly runDir: string,
    readonly qmpPath: string,
    port: number,
  ) {
    super();
    this.cfg = {
      name,
      stateDir: runDir,
      tlsDir: runDir,
      relocation: {
        address: '127.0.0.1',
        port: 0,
        dataPorts: [port, port + 3] as [number, number],
        allowInsecure: false,
        acceptPostcopy: true,
        tunnels: true,
      },
      peers: {},
      networks: {},
      limits: { incomingPerPeer: 4, incomingTotal: 8, reservationS: 30, movesOut: 4, movesPerLink: 2 },
      storage: { localDir: runDir },
    };
  }
  get(name: string): Handle {
    const d = this.domains.get(name);
    if (!d) throw new FerryError('DOMAIN_NOT_FOUND', name);
    return d;
  }
  find(name: string): Handle | undefined {
    return this.domains.get(name);
  }
  domainNames(): string[] {
    return [...this.domains.keys()];
  }
  domainUuids(): string[] {
    return [...this.domains.values()].map((d) => d.rec.config.uuid);
  }
  memoryFacts(): { freeMiB: number; freeWhy: string } {
    return { freeMiB: 4096 - [...this.reservations.values()].reduce((a, b) => a + b, 0), freeWhy: 'a fake host' };
  }
  checkPaths(): void {
    /* the fake pools hold everything */
  }
  postcopyIncoming(): { ok: boolean; why: string } {
    return { ok: true, why: 'a fake host' };
  }
  /** What touchedBytes and compressibility answer (null: not known, as for a guest that could not be read). */
  touched: number | null = null;
  ratio: number | null = null;
  async touchedBytes(): Promise<number | null> {
    return this.touched;
  }
  async compressibility(): Promise<number | null> {
    return this.ratio;
  }
  apply(d: DomainHandle, e: DomainEvent): void {
    (d as Handle).rec.state = transition(d.rec.state, e);
  }
  setBusy(d: DomainHandle, why: string | undefined): void {
    (d as Handle).busy = why;
  }
  reserve(jobId: string, _domain: string, memoryMiB: number): void {
    this.reservations.set(jobId, memoryMiB);
  }
  release(jobId: string): void {
    this.reservations.delete(jobId);
  }
  async startIncoming(config: DomainConfig, jobId: string, _o: unknown, onDefined: (pid: number) => void): Promise<DomainHandle> {
    const d: Handle = { rec: { config, state: { kind: 'defined' } }, busy: 'incoming migration' };
    this.domains.set(config.name, d);
    d.qmp = await QmpClient.connect(this.qmpPath, 2000);
    onDefined(424242);
    this.apply(d, { type: 'incoming', pid: 424242, domid: 1, jobId, at: Date.now() });
    return d;
  }
  defineMoved(config: DomainConfig): void {
    this.domains.set(config.name, { rec: { config, state: { kind: 'defined' } } });
  }
  async discardIncoming(d: DomainHandle): Promise<void> {
    d.qmp?.close();
    this.discarded.push(d.rec.config.name);
    this.domains.delete(d.rec.config.name);
  }
  async retireMigrated(d: DomainHandle): Promise<void> {
    d.qmp?.close();
    if (d.rec.state.kind === 'migrating-out') this.apply(d, { type: 'stopped', reason: 'migrated', at: Date.now() });
    this.retired.push(d.rec.config.name);
    this.domains.delete(d.rec.config.name);
  }
  cleanupRuntime(d: DomainHandle): void {
    d.qmp?.close();
  }
  forget(name: string): void {
    this.domains.delete(name);
  }
  removeTaps(): void {
    /* no taps */
  }
  /** Tunnel calls as they came: "away+ uuid nic", "away- uuid", "home+ uuid nic remote", "home- uuid nic remote". */
  readonly tunnelLog: string[] = [];
  tunnelHomes(c: DomainConfig): TunnelHome[] {
    return c.nics.map((n, i) => ({
      host: this.cfg.name,
      address: this.cfg.relocation.address,
      subnet: (this.cfg.networks as Record<string, { subnet: string }>)[n.network]?.subnet ?? '',
      vni: vniFor(c.uuid, i),
    }));
  }
  openAway(c: DomainConfig, homes: Map<number, TunnelHome>): (string | undefined)[] {
    for (const i of homes.keys()) this.tunnelLog.push(`away+ ${c.uuid} ${i}`);
    return c.nics.map((_, i) => (homes.has(i) ? `fb${i}` : undefined));
  }
  closeAway(uuid: string): { nic: number; home: TunnelHome }[] {
    this.tunnelLog.push(`away- ${uuid}`);
    return [];
  }
  extendHome(c: DomainConfig, nic: number, remote: string): string[] {
    this.tunnelLog.push(`home+ ${c.uuid} ${nic} ${remote}`);
    return [remote];
  }
  retractHome(uuid: string, nic: number, remote: string): void {
    this.tunnelLog.push(`home- ${uuid} ${nic} ${remote}`);
  }
  tunnelFromPeer(): string[] {
    return [];
  }
  maintenanceOn = false;
  maintenance(): { on: boolean; since: string | null } {
    return { on: this.maintenanceOn, since: null };
  }
  readonly createdDisks: string[] = [];
  createDisk(p: string): void {
    this.createdDisks.push(p);
  }
  localFreeBytes(): number {
    return 1 << 30;
  }
  qemuDirOf(): string {
    return this.runDir;
  }
  qemuTlsDir(): string {
    return this.runDir;
  }
  withRam<T>(): Promise<T> {
    throw new Error('no RAM in a fake');
  }
  ramDigests(): never {
    throw new Error('no RAM in a fake');
  }
  ramChunkDigests(): never {
    throw new Error('no RAM in a fake');
  }
}

/**
 * A scripted running QEMU on the source: `migrate` plays QEMU's events (setup, active,
 * STOP, completed, or failed when told to) and calls `onSent` once it "sent" everything.
 */
export async function outgoingQemu(
  o: {
    fail?: boolean;
    onSent?: () => void;
    neverConverges?: boolean;
    onPostcopy?: () => void;
    /** The post-copy stream ends failed (QEMU's answer to a break as it completes) instead of completed. */
    postcopyFails?: boolean;
    /** What calc-dirty-rate measures, MiB/s (default 2). */
    dirtyMiBs?: number;
  } = {},
) {
  let running = true;
  let status = 'none';
  /** The migration parameters as set (migrate-set-parameters), the last value of each. */
  const params: Record<string, unknown> = {};
  // Capabilities stay set from one migration to the next, and QEMU 10.0 refuses this pair.
  const caps = new Map<string, boolean>();
  const mig = (st: string): void => {
    status = st;
    q.event('MIGRATION', { status: st });
  };
  const q = await scripted((command, r, args) => {
    switch (command) {
      case 'migrate-set-capabilities': {
        const next = new Map(caps);
        for (const c of (args?.capabilities ?? []) as { capability: string; state: boolean }[]) next.set(c.capability, c.state);
        if (next.get('multifd') && next.get('postcopy-ram')) {
          r.fail('Postcopy is not yet compatible with multifd');
          break;
        }
        for (const [k, v] of next) caps.set(k, v);
        r.ok();
        break;
      }
      case 'migrate':
        r.ok();
        setTimeout(() => {
          mig('setup');
          mig('active');
          if (o.fail) {
            mig('failed');
            return;
          }
          // A guest that dirties faster than the link: active until told to switch.
          if (o.neverConverges) return;
          running = false;
          q.event('STOP');
          mig('device');
          mig('completed');
          o.onSent?.();
        }, 5);
        break;
      case 'migrate-start-postcopy':
        if (status !== 'active') {
          r.fail('Postcopy must be started after migration has been started');
          break;
        }
        r.ok();
        setTimeout(() => {
          running = false;
          q.event('STOP');
          mig('postcopy-active');
          o.onPostcopy?.();
          // The rest of RAM reaches the destination a moment after its guest runs.
          setTimeout(() => mig(o.postcopyFails ? 'failed' : 'completed'), 60);
        }, 5);
        break;
      case 'migrate_cancel':
        r.ok();
        if (status === 'active') mig('cancelled');
        break;
      case 'query-migrate':
        r.ok(
          status === 'completed'
            ? { status, 'total-time': 40, downtime: 7, ram: { transferred: 1 << 20, total: 1 << 20, remaining: 0, 'dirty-sync-count': 2 } }
            : status === 'failed'
              ? { status, 'error-desc': 'fake failure' }
              : status === 'active'
                ? {
                    status,
                    ram: {
                      transferred: 8 << 20,
                      total: 4 << 20,
                      remaining: 3 << 20,
                      'dirty-sync-count': 3,
                      mbps: 80,
                      'dirty-pages-rate': 10000,
                      'page-size': 4096,
                    },
                  }
                : { status },
        );
        break;
      case 'query-status':
        r.ok({ status: running ? 'running' : 'postmigrate', running });
        break;
      case 'cont':
        running = true;
        r.ok();
        q.event('RESUME');
        break;
      case 'query-dirty-rate':
        r.ok({ status: 'measured', 'dirty-rate': o.dirtyMiBs ?? 2 });
        break;
      case 'migrate-set-parameters':
        Object.assign(params, args);
        r.ok();
        break;
      default:
        r.ok();
    }
  });
  return { path: q.fake.path, seen: q.seen, params, cleanup: q.fake.cleanup, running: (): boolean => running };
}
