/**
 * QEMU's migration vocabulary: how QEMU spells what migration/ wants. migration/ says
 * "post-copy on, 2 channels, TLS as client to host2"; this module knows the QMP
 * commands, capability and parameter names, and which end each belongs to (as
 * libvirt's qemu_migration_params.c keeps one table tagged with the side).
 *
 * A capability or parameter set on the wrong end is a bug in ferry, not bad input:
 * it throws INTERNAL before QEMU sees it.
 */
import { FerryError } from '../errors.ts';
import type { QmpClient } from '../qmp/client.ts';
import type { MigrateInfo } from './migstatus.ts';
import type { Compression } from '../api/shapes.ts';

export type Side = 'source' | 'destination';
type Where = Side | 'both';

/** ferry's names for QEMU's migration capabilities, with QEMU's spelling and the end(s) that set them. */
export const CAPABILITIES = {
  /** MIGRATION events (migstatus.ts follows them instead of polling). */
  events: { qemu: 'events', side: 'both' },
  /** Parallel channels, each encrypted on its own thread; both ends must agree. */
  multifd: { qemu: 'multifd', side: 'both' },
  /** Post-copy: both QEMUs need it before the stream. */
  postcopy: { qemu: 'postcopy-ram', side: 'both' },
  /** Post-copy's second channel, so faulted pages overtake the bulk. */
  postcopyPreempt: { qemu: 'postcopy-preempt', side: 'both' },
  /** The source throttles vCPUs of a guest that dirties faster than the link. */
  autoConverge: { qemu: 'auto-converge', side: 'source' },
  /**
   * Saves into a file (QEMU 9.0+): each RAM page has a fixed place in the file, written
   * once by multifd's threads in parallel, instead of a stream that re-sends dirtied pages.
   */
  mappedRam: { qemu: 'mapped-ram', side: 'both' },
} as const satisfies Record<string, { qemu: string; side: Where }>;
export type Capability = keyof typeof CAPABILITIES;

/** QEMU's migration parameters ferry sets, with QEMU's spelling and the end(s) that set them. */
export const PARAMETERS = {
  /** Bytes per second; QEMU's default (128 MiB/s) silently throttles, so ferry always sets it. */
  maxBandwidth: { qemu: 'max-bandwidth', side: 'source' },
  /** Milliseconds the final switchover may pause the guest (QEMU's default: 300). */
  downtimeLimit: { qemu: 'downtime-limit', side: 'source' },
  multifdChannels: { qemu: 'multifd-channels', side: 'both' },
  /** How multifd compresses each page before it is sent (and encrypted); both ends must agree. */
  multifdCompression: { qemu: 'multifd-compression', side: 'both' },
  /** The id of a tls-creds-x509 object; '' turns TLS off. */
  tlsCreds: { qemu: 'tls-creds', side: 'both' },
  /** The name the destination's certificate must carry. */
  tlsHostname: { qemu: 'tls-hostname', side: 'source' },
  /** The id of an authz object: which client certificate may feed this QEMU. */
  tlsAuthz: { qemu: 'tls-authz', side: 'destination' },
  /** Where auto-converge's throttle starts, % of vCPU time taken away (QEMU's default: 20; it steps up by 10). */
  cpuThrottleInitial: { qemu: 'cpu-throttle-initial', side: 'source' },
  /** mapped-ram's pages written with O_DIRECT (QEMU 9.1+): a save does not fill the host's page cache. */
  directIo: { qemu: 'direct-io', side: 'both' },
} as const satisfies Record<string, { qemu: string; side: Where }>;
export interface ParameterValues {
  maxBandwidth: number;
  downtimeLimit: number;
  multifdChannels: number;
  multifdCompression: Compression;
  tlsCreds: string;
  tlsHostname: string;
  tlsAuthz: string;
  directIo: boolean;
  cpuThrottleInitial: number;
}

/** multifd is on for more than one channel, or for compression (QEMU compresses only multifd's pages). */
export const multifdOn = (channels: number, compress: Compression): boolean => channels > 1 || compress !== 'none';

/**
 * The connections a stream opens: the main channel, and with multifd one per channel
 * besides; post-copy's preempt channel is one more.
 */
export const streamConnections = (channels: number, compress: Compression, postcopy: boolean): number =>
  1 + (multifdOn(channels, compress) ? channels : 0) + (postcopy ? 1 : 0);

/** QEMU's own cpu-throttle-initial, %: where auto-converge starts unless the plan says otherwise. */
export const QEMU_THROTTLE_INITIAL_PCT = 20;

/** "No limit" for max-bandwidth, 100 GiB/s (QEMU's own default would throttle at 128 MiB/s). */
export const UNLIMITED_BANDWIDTH = 100 * 1024 * 1024 * 1024;

/** Whether a path can be a file migration's URI (uri.file): a save falls back to a stream where not. */
export const fileUriSafe = (path: string): boolean => /^\/[A-Za-z0-9/._-]+$/.test(path);

/** Migration URIs QEMU accepts; nothing user-supplied goes into them (never `exec:`). */
export const uri = {
  tcp: (address: string, port: number): string => `tcp:${address}:${port}`,
  unix: (path: string): string => `unix:${path}`,
  /**
   * A file QEMU writes (or, as /dev/fdset/N, reads) from byte `offset` on. QEMU splits
   * the URI at commas, so only paths ferryd made, of plain characters, are allowed.
   */
  file: (path: string, offset: number): string => {
    if (!fileUriSafe(path))
      throw new FerryError('INTERNAL', `file migration path ${JSON.stringify(path)} has characters QEMU's URI cannot carry`);
    return `file:${path},offset=${offset}`;
  },
};

/** The TLS credentials object a migration's stream (and NBD) uses, from a directory QEMU can read. */
export function tlsCredsObject(id: string, dir: string, endpoint: 'client' | 'server'): Record<string, unknown> {
  return { 'qom-type': 'tls-creds-x509', id, dir, endpoint, 'verify-peer': true };
}

/** Only the client certificate with this distinguished name passes (tls-authz). */
export function authzObject(id: string, identity: string): Record<string, unknown> {
  return { 'qom-type': 'authz-simple', id, identity };
}

/** QEMU's self-announcement after the switchover (RARP from every NIC), so switches learn the guest's new port at once. */
const ANNOUNCE = { initial: 50, max: 550, rounds: 5, step: 100 };

/** The migration commands of one QEMU, as one end of a move uses them. */
export class MigrationQmp {
  constructor(
    readonly q: QmpClient,
    readonly side: Side,
  ) {}

  private check(what: string, where: Where): void {
    if (where !== 'both' && where !== this.side)
      throw new FerryError('INTERNAL', `${what} belongs to the ${where} of a migration, not the ${this.side}`);
  }

  /** Sets each named capability on or off (one QMP command). */
  async setCapabilities(caps: Partial<Record<Capability, boolean>>): Promise<void> {
    const list = Object.entries(caps).map(([k, state]) => {
      const c = CAPABILITIES[k as Capability];
      this.check(`capability ${c.qemu}`, c.side);
      return { capability: c.qemu, state: state === true };
    });
    if (list.length) await this.q.execute('migrate-set-capabilities', { capabilities: list });
  }

  async setParameters(p: Partial<ParameterValues>): Promise<void> {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(p)) {
      if (v === undefined) continue;
      const d = PARAMETERS[k as keyof ParameterValues];
      this.check(`parameter ${d.qemu}`, d.side);
      out[d.qemu] = v;
    }
    if (Object.keys(out).length) await this.q.execute('migrate-set-parameters', out);
  }

  /** Adds the TLS credentials object (client on the source, server on the destination). */
  addTlsCreds(id: string, dir: string): Promise<unknown> {
    return this.q.execute('object-add', tlsCredsObject(id, dir, this.side === 'source' ? 'client' : 'server'));
  }

  addAuthz(id: string, identity: string): Promise<unknown> {
    this.check('tls-authz', 'destination');
    return this.q.execute('object-add', authzObject(id, identity));
  }

  /** Removes an object left by an earlier move (absent: nothing to do). */
  delObject(id: string): Promise<void> {
    return this.q.execute('object-del', { id }).then(
      () => undefined,
      () => undefined,
    );
  }

  /** Source: starts (or, after a broken post-copy, resumes) the stream to `to`. */
  migrate(to: string, resume = false): Promise<unknown> {
    this.check('migrate', 'source');
    return this.q.execute('migrate', { uri: to, ...(resume ? { resume: true } : {}) });
  }

  /** Destination: opens the one listener for the stream (the QEMU was started with -incoming defer). */
  incoming(from: string): Promise<unknown> {
    this.check('migrate-incoming', 'destination');
    return this.q.execute('migrate-incoming', { uri: from });
  }

  /** Destination: a new listener for a post-copy whose stream broke. */
  recover(from: string): Promise<unknown> {
    this.check('migrate-recover', 'destination');
    return this.q.execute('migrate-recover', { uri: from });
  }

  /** Source: switch a running pre-copy to post-copy. */
  startPostcopy(): Promise<unknown> {
    this.check('migrate-start-postcopy', 'source');
    return this.q.execute('migrate-start-postcopy');
  }

  /** Pauses a post-copy stream (either end), so it can be recovered. */
  pause(): Promise<unknown> {
    return this.q.execute('migrate-pause');
  }

  /** Source: cancels the migration; the guest keeps running here. */
  cancel(): Promise<unknown> {
    this.check('migrate_cancel', 'source');
    return this.q.execute('migrate_cancel');
  }

  /** Source: starts QEMU's dirty-rate measurement over `ms` (page sampling: 512 pages per GiB, hashed at both ends; works under TCG). */
  startDirtyRate(ms: number): Promise<unknown> {
    this.check('calc-dirty-rate', 'source');
    return this.q.execute('calc-dirty-rate', {
      'calc-time': ms,
      'calc-time-unit': 'millisecond',
      mode: 'page-sampling',
      'sample-pages': 512,
    });
  }

  /** The measured dirty rate in MiB/s, or null while it is still measuring. */
  async dirtyRate(): Promise<number | null> {
    const r = await this.q.execute<{ status: string; 'dirty-rate'?: number }>('query-dirty-rate');
    return r.status === 'measured' ? (r['dirty-rate'] ?? 0) : null;
  }

  /** The capabilities this QEMU offers, by QEMU's names (an older QEMU lacks mapped-ram). */
  async offered(): Promise<Set<string>> {
    const r = await this.q.execute<{ capability: string }[]>('query-migrate-capabilities');
    return new Set(r.map((c) => c.capability));
  }

  info(): Promise<MigrateInfo> {
    return this.q.execute<MigrateInfo>('query-migrate');
  }
  runState(): Promise<{ running: boolean; status: string }> {
    return this.q.execute<{ running: boolean; status: string }>('query-status');
  }
  stop(): Promise<unknown> {
    return this.q.execute('stop');
  }
  cont(): Promise<unknown> {
    return this.q.execute('cont');
  }

  /**
   * Destination, --copy-storage: QEMU's NBD server for the disk copies, with at most
   * `maxConnections` clients and (QEMU 10 and later) a handshake deadline; with TLS, the
   * same credentials and authz objects as the stream.
   */
  nbdServe(o: {
    address: string;
    port: number;
    maxConnections: number;
    handshakeMaxSeconds?: number;
    tls?: { creds: string; authz: string };
  }): Promise<unknown> {
    this.check('nbd-server-start', 'destination');
    return this.q.execute('nbd-server-start', {
      addr: { type: 'inet', data: { host: o.address, port: String(o.port) } },
      'max-connections': o.maxConnections,
      ...(o.handshakeMaxSeconds !== undefined ? { 'handshake-max-seconds': o.handshakeMaxSeconds } : {}),
      ...(o.tls ? { 'tls-creds': o.tls.creds, 'tls-authz': o.tls.authz } : {}),
    });
  }

  /** Destination: exports one block node, writable, under `name`. */
  nbdExport(id: string, node: string, name: string): Promise<unknown> {
    return this.q.execute('block-export-add', { type: 'nbd', id, 'node-name': node, name, writable: true });
  }

  nbdStop(): Promise<void> {
    return this.q.execute('nbd-server-stop').then(
      () => undefined,
      () => undefined,
    );
  }

  /** Destination, after `cont`: announce the guest's MACs from its new port. */
  announce(): Promise<unknown> {
    this.check('announce-self', 'destination');
    return this.q.execute('announce-self', ANNOUNCE);
  }
}

/** One dirty-rate measurement at a time per QEMU (it runs one calc-dirty-rate at once): the balancer's load meter and the autopilot queue here. */
const measuring = new WeakMap<QmpClient, Promise<unknown>>();

/**
 * The guest's dirty rate in bytes/s, measured by QEMU's calc-dirty-rate over `ms` (page
 * sampling: it hashes 512 sampled pages per GiB at both ends of the window; works under
 * TCG). QEMU emits no event for its end, so it is asked once after the window. Throws
 * when QEMU refuses; null when no answer came in time.
 */
export function measureDirtyRate(q: QmpClient, ms: number): Promise<number | null> {
  const run = async (): Promise<number | null> => {
    const mq = new MigrationQmp(q, 'source');
    await mq.startDirtyRate(ms);
    await new Promise((r) => setTimeout(r, ms + 20));
    for (let i = 0; i < 40; i++) {
      const mib = await mq.dirtyRate();
      if (mib !== null) return mib * 1048576;
      await new Promise((res) => setTimeout(res, 25));
    }
    return null;
  };
  const prev = measuring.get(q) ?? Promise.resolve();
  const next = prev.catch(() => undefined).then(run);
  measuring.set(q, next);
  return next;
}
