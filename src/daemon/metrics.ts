/**
 * Prometheus metrics (prom-client), served as text on `metrics` (ferryd.json,
 * ADDRESS:PORT, off unless set) at GET /metrics. The figures come from what ferryd
 * already knows: gauges are read from the host when scraped; counters and histograms
 * follow the migration events (`migration.done` on the source, the destination's
 * terminal phases) and the refusals the API hands out.
 *
 * The page names no domain and no address (labels: state, role, outcome, side, code,
 * tunnel end, and the host's own name). On a loopback address it is plain HTTP; on any
 * other it is HTTPS with the host's certificate and wants a client certificate from
 * the cluster CA (an admin's or a host's: Prometheus' tls_config cert_file/key_file),
 * so nothing outside the cluster reads it. Either way: few connections, short timeouts.
 */
import http from 'node:http';
import https from 'node:https';
import { loadTls } from '../tls/ca.ts';
import { isLoopback, boundWebServer, WEB_HANDSHAKE_MS } from '../util/web.ts';
import client from 'prom-client';
import type { Report } from '../api/protocol.ts';
import type { Host } from './host.ts';
import type { Logger } from './log.ts';
import type { ClusterAgent } from './cluster.ts';

/** Seconds: migrations from a second to half an hour; pauses from a millisecond to a minute. */
const TOTAL_BUCKETS = [0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800];
const PAUSE_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60];

export class Metrics {
  readonly registry = new client.Registry();
  private readonly migrations: client.Counter<'role' | 'outcome'>;
  private readonly refusals: client.Counter<'side' | 'code'>;
  private readonly bytes: client.Counter;
  private readonly total: client.Histogram;
  private readonly pause: client.Histogram;
  private readonly guest: client.Histogram;
  private server: http.Server | undefined;

  constructor(
    host: Host,
    private readonly log: Logger,
    cluster?: ClusterAgent,
  ) {
    const r = this.registry;
    r.setDefaultLabels({ host: host.cfg.name });
    hostGauges(host, r);
    if (cluster) clusterGauges(cluster, r);
    this.migrations = new client.Counter({
      name: 'ferry_migrations_total',
      help: "Migrations that ended, by this host's role and outcome",
      labelNames: ['role', 'outcome'],
      registers: [r],
    });
    this.refusals = new client.Counter({
      name: 'ferry_refusals_total',
      help: "Migrations refused before anything moved, by this host's side of the move and the error code",
      labelNames: ['side', 'code'],
      registers: [r],
    });
    this.bytes = new client.Counter({
      name: 'ferry_migration_bytes_total',
      help: 'Bytes of guest RAM sent by migrations from this host',
      registers: [r],
    });
    this.total = new client.Histogram({
      name: 'ferry_migration_duration_seconds',
      help: 'Total time of successful migrations from this host',
      buckets: TOTAL_BUCKETS,
      registers: [r],
    });
    this.pause = new client.Histogram({
      name: 'ferry_migration_pause_seconds',
      help: "Guest pause of successful live migrations (source STOP to the destination's resume)",
      buckets: PAUSE_BUCKETS,
      registers: [r],
    });
    this.guest = new client.Histogram({
      name: 'ferry_migration_guest_downtime_seconds',
      help: "Guest-perceived downtime of successful live migrations (the longest gap in the guest's answers)",
      buckets: PAUSE_BUCKETS,
      registers: [r],
    });
    host.on('migration.done', (ev: { report: Report }) => this.onReport(ev.report));
    host.on('migration.phase', (ev: { role: string; phase: string }) => {
      if (ev.role === 'destination' && (ev.phase === 'confirmed' || ev.phase === 'abandoned'))
        this.migrations.inc({ role: 'destination', outcome: ev.phase === 'confirmed' ? 'succeeded' : 'abandoned' });
    });
  }

  private onReport(r: Report): void {
    this.migrations.inc({ role: 'source', outcome: r.outcome });
    this.bytes.inc(r.bytes ?? 0);
    if (r.outcome === 'succeeded') {
      this.total.observe(r.totalMs / 1000);
      if (r.mode === 'live' && r.pauseMs !== null) this.pause.observe(r.pauseMs / 1000);
      if (r.guestDowntimeMs !== null) this.guest.observe(r.guestDowntimeMs / 1000);
    } else if (r.error && r.timeline?.begun === undefined) {
      // Refused at or before Begin (this host's checks or the destination's pre-flight).
      this.refusal('source', r.error.code);
    }
  }

  /** A move refused before anything moved: `side` is where it was refused. */
  refusal(side: 'source' | 'destination', code: string): void {
    this.refusals.inc({ side, code });
  }

  /** Serves GET /metrics; off loopback over HTTPS with mutual TLS from `tlsDir`'s CA. */
  async listen(address: string, port: number, tlsDir: string): Promise<void> {
    const serve = (req: http.IncomingMessage, res: http.ServerResponse): void => {
      if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
        res.writeHead(404).end('ferry metrics: GET /metrics\n');
        return;
      }
      this.registry.metrics().then(
        (text) => {
          res.writeHead(200, { 'content-type': this.registry.contentType }).end(text);
        },
        (e) => {
          res.writeHead(500).end(String(e));
        },
      );
    };
    const tls = !isLoopback(address);
    if (tls) {
      const f = loadTls(tlsDir);
      this.server = https.createServer(
        {
          ca: f.ca,
          cert: f.cert,
          key: f.key,
          ...(f.crl ? { crl: f.crl } : {}),
          requestCert: true,
          rejectUnauthorized: true,
          minVersion: 'TLSv1.3',
          handshakeTimeout: WEB_HANDSHAKE_MS,
        },
        serve,
      );
    } else {
      this.server = http.createServer(serve);
    }
    boundWebServer(this.server, 32);
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', reject);
      this.server!.listen(port, address, () => resolve());
    });
    this.log.info('metrics served', { address, port, tls });
  }

  close(): void {
    this.server?.close();
  }
}

/**
 * Cluster mode, read at each scrape from what ferryd already holds (its lease, and its
 * watch's copy of the ownership records): no etcd request per scrape.
 */
function clusterGauges(c: ClusterAgent, r: client.Registry): void {
  new client.Gauge({
    name: 'ferry_cluster_quorate',
    help: "1 while this host's cluster lease is current (it may start, resume and move domains); 0 without quorum",
    registers: [r],
    collect() {
      this.set(c.member.quorate() ? 1 : 0);
    },
  });
  new client.Gauge({
    name: 'ferry_cluster_ha_manager',
    help: '1 while this host is the HA manager',
    registers: [r],
    collect() {
      this.set(c.ha.isLeader ? 1 : 0);
    },
  });
  new client.Gauge({
    name: 'ferry_cluster_domains',
    help: "The cluster's domains by their ownership record's state and whether they are marked for HA restart (every host reports the whole cluster)",
    labelNames: ['state', 'ha'],
    registers: [r],
    collect() {
      this.reset();
      for (const d of c.recordsSeen()) this.inc({ state: d.state, ha: d.ha ? 'yes' : 'no' });
    },
  });
}

/** The host's state, read at each scrape: domains by state, memory, maintenance, tunnel ends. */
function hostGauges(host: Host, r: client.Registry): void {
  new client.Gauge({
    name: 'ferry_domains',
    help: 'Domains defined on this host, by state',
    labelNames: ['state'],
    registers: [r],
    collect() {
      this.reset();
      for (const l of host.all()) this.inc({ state: l.rec.state.kind });
    },
  });
  new client.Gauge({
    name: 'ferry_memory_mib',
    help: 'Memory for domains, MiB: offered, used (running domains and reservations), reserved (incoming moves), free',
    labelNames: ['kind'],
    registers: [r],
    collect() {
      const m = host.info().memory;
      this.set({ kind: 'offered' }, m.offeredMiB);
      this.set({ kind: 'used' }, m.usedMiB);
      this.set({ kind: 'reserved' }, m.reservedMiB);
      this.set({ kind: 'free' }, m.freeMiB);
    },
  });
  new client.Gauge({
    name: 'ferry_maintenance',
    help: '1 while this host is in maintenance',
    registers: [r],
    collect() {
      this.set(host.maintenance().on ? 1 : 0);
    },
  });
  new client.Gauge({
    name: 'ferry_tunnels',
    help: "VXLAN tunnel ends carrying domains' segments through this host",
    labelNames: ['end'],
    registers: [r],
    collect() {
      this.reset();
      for (const t of host.tunnelList()) this.inc({ end: t.end });
    },
  });
}
