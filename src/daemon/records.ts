/**
 * The domain store: every domain defined on this host, in memory and in
 * STATE/domains/NAME.json. It owns the records, their atomic writes and the domain ids;
 * a lifecycle change goes through `apply`, which runs domain/state.ts's transition,
 * persists, and tells subscribers.
 */
import fs from 'node:fs';
import path from 'node:path';
import { FerryError } from '../errors.ts';
import { parseDomainConfig, domainConfigToJson, type DomainConfig } from '../domain/config.ts';
import { transition, describeKind, type DomainState, type DomainEvent, type StopReason } from '../domain/state.ts';
import type { Accel } from '../qemu/argv.ts';
import type { QmpClient } from '../qmp/client.ts';
import { StateWriter, readJson } from '../util/fsx.ts';
import type { ConsoleMux } from './console.ts';
import type { Logger } from './log.ts';

export interface Runtime {
  /** QEMU's own directory (confine.ts): its sockets and TLS copy. Absent in records of ferry < 0.3. */
  qemuDir?: string;
  /** The QEMU process's start time (processStartTicks), taken at spawn: its identity beside the pid. */
  startTicks?: number;
  /** The uid (= gid) this QEMU runs as (daemon/uids.ts); absent when unconfined or from ferry < 0.3. */
  uid?: number;
  qmpPath: string;
  consolePath: string;
  logPath: string;
  consoleLog: string;
  taps: string[];
  accel: Accel;
  machine: string;
  cpuModel: string;
}

export interface DomainRecord {
  config: DomainConfig;
  state: DomainState;
  runtime?: Runtime;
}

/** A domain in memory: its record plus what exists only while ferryd runs. */
export interface HostedDomain {
  rec: DomainRecord;
  qmp?: QmpClient;
  console?: ConsoleMux;
  /** Set when ferryd itself asked QEMU to end, so its exit is a stop, not a crash. */
  expectStop?: StopReason;
  /** Set while an operation owns the domain's process (save, sample, migration). */
  busy?: string;
  exited?: Promise<void>;
}

export type StateChange = { domain: string; from: string | null; to: string; state?: DomainState };

export class DomainStore {
  private readonly domains = new Map<string, HostedDomain>();
  private nextDomid = 1;
  private readonly writer: StateWriter;

  constructor(
    readonly stateDir: string,
    readonly hostName: string,
    private readonly log: Logger,
    private readonly onChange: (c: StateChange) => void,
  ) {
    this.writer = new StateWriter((file, error) => log.warn('state write still failing; retrying', { file, error }));
    fs.mkdirSync(this.domainsDir, { recursive: true, mode: 0o700 });
    try {
      this.nextDomid = readJson<{ nextDomid: number }>(this.hostFile).nextDomid;
    } catch {
      /* first start */
    }
  }

  get domainsDir(): string {
    return path.join(this.stateDir, 'domains');
  }
  private get hostFile(): string {
    return path.join(this.stateDir, 'host.json');
  }
  private recordFile(name: string): string {
    return path.join(this.domainsDir, `${name}.json`);
  }

  /** Reads every record on disk into memory; the runtime re-attaches to their QEMUs. */
  load(): HostedDomain[] {
    const out: HostedDomain[] = [];
    for (const f of fs.readdirSync(this.domainsDir)) {
      if (!f.endsWith('.json')) continue;
      try {
        const raw = readJson<{ config: unknown; state: DomainState; runtime?: Runtime }>(path.join(this.domainsDir, f));
        const dom: HostedDomain = { rec: { config: parseDomainConfig(raw.config), state: raw.state, runtime: raw.runtime } };
        this.domains.set(dom.rec.config.name, dom);
        out.push(dom);
      } catch (e) {
        this.log.error('unreadable domain record, skipped', { file: f, error: String(e) });
      }
    }
    return out;
  }

  get(name: string): HostedDomain {
    const l = this.domains.get(name);
    if (!l) throw new FerryError('DOMAIN_NOT_FOUND', `No domain "${name}" on host ${this.hostName}`);
    return l;
  }

  find(name: string): HostedDomain | undefined {
    return this.domains.get(name);
  }
  all(): HostedDomain[] {
    return [...this.domains.values()];
  }
  names(): string[] {
    return [...this.domains.keys()];
  }
  get size(): number {
    return this.domains.size;
  }

  /** A new name and a new uuid, or DOMAIN_EXISTS. */
  checkUnique(c: DomainConfig): void {
    const byName = this.domains.get(c.name);
    if (byName)
      throw new FerryError(
        'DOMAIN_EXISTS',
        `A domain named "${c.name}" already exists on ${this.hostName} (${describeKind(byName.rec.state.kind)}); use \`ferry start ${c.name}\` or \`ferry delete ${c.name}\``,
      );
    for (const l of this.domains.values())
      if (l.rec.config.uuid === c.uuid)
        throw new FerryError('DOMAIN_EXISTS', `Domain "${l.rec.config.name}" on ${this.hostName} already has uuid ${c.uuid}`);
  }

  /** Holds a domain in memory only (an incoming one, a restore in progress): no record yet. */
  hold(dom: HostedDomain): void {
    this.domains.set(dom.rec.config.name, dom);
  }

  /** Adds a domain and writes its record now; nothing remains if the write fails. */
  define(dom: HostedDomain): void {
    try {
      this.persist(dom);
    } catch (e) {
      this.writer.drop(this.recordFile(dom.rec.config.name)); // a refused define must not appear later
      throw e;
    }
    this.domains.set(dom.rec.config.name, dom);
  }

  /** Writes the domain's record now; throws STATE_WRITE_FAILED if the disk refuses. */
  persist(dom: HostedDomain): void {
    this.writer.write(this.recordFile(dom.rec.config.name), () => this.recordOf(dom));
  }

  private recordOf(dom: HostedDomain): Record<string, unknown> {
    return { config: domainConfigToJson(dom.rec.config), state: dom.rec.state, runtime: dom.rec.runtime };
  }

  allocDomid(): number {
    const id = this.nextDomid++;
    // Domain ids are for display; a lost write only risks reusing one after a restart.
    this.writer.writeLater(this.hostFile, () => ({ nextDomid: this.nextDomid }));
    return id;
  }

  /**
   * Applies a lifecycle event, persists, and tells subscribers. The event has already
   * happened (QEMU started, stopped, resumed), so a full disk must not undo it in
   * memory: the record is retried until it lands, and a restarted ferryd re-derives
   * the state from the QEMU it finds anyway.
   */
  apply(dom: HostedDomain, e: DomainEvent): void {
    const from = dom.rec.state.kind;
    dom.rec.state = transition(dom.rec.state, e, dom.rec.config.name);
    if (!this.writer.writeLater(this.recordFile(dom.rec.config.name), () => this.recordOf(dom))) {
      this.log.warn('domain state not persisted yet (retrying)', { domain: dom.rec.config.name, to: dom.rec.state.kind });
    }
    this.log.info('domain state', { domain: dom.rec.config.name, from, to: dom.rec.state.kind, event: e.type });
    this.onChange({ domain: dom.rec.config.name, from, to: dom.rec.state.kind, state: dom.rec.state });
  }

  /** Drops a record and the domain's run directory (the definition is gone from this host). */
  forget(name: string, runDir: string): void {
    this.unhold(name);
    fs.rmSync(path.join(runDir, name), { recursive: true, force: true });
    this.onChange({ domain: name, from: null, to: 'deleted' });
  }

  /** Forgets a domain held in memory whose record was never meant to stay (a failed create or restore). */
  unhold(name: string): void {
    this.domains.delete(name);
    this.writer.drop(this.recordFile(name));
    fs.rmSync(this.recordFile(name), { force: true });
  }
}
