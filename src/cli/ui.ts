/**
 * `ferry ui`: a web dashboard, served by the CLI with the operator's own credentials
 * (a lab host's socket, or TLS with the admin certificate), so it can do exactly what
 * `ferry` can and no more. The browser talks only to this server:
 *
 *   browser                          ferry ui                           ferryd (each host)
 *     |-- GET /?token=T ------------>|  (loopback: a random token; elsewhere HTTPS with
 *     |                              |   the admin's client certificate, OU=admin)
 *     |-- GET /api/state ----------->|-- host.info, domain.list -------->|  (standalone: each host)
 *     |                              |-- cluster.fleet ----------------->|  (cluster: one host's etcd watch)
 *     |-- GET /api/events (SSE) ---->|<- events.subscribe (progress, phase, done, state)
 *     |-- POST /api/migrate -------->|-- migration.start --------------->|  (answer by SSE: done)
 *     |-- POST /api/evacuate ------->|   evacuate.ts, its view as SSE "evacuation"
 *     |-- GET /api/console (SSE) --->|-- console.attach (framed) ------->|  follows "moved"
 *     |-- POST /api/console/input -->|   raw bytes to the guest
 *
 * Charts: uPlot; console: xterm.js; both served from node_modules, nothing from the net.
 */
import { isLoopback, boundWebServer, WEB_HANDSHAKE_MS } from '../util/web.ts';
import http from 'node:http';
import https from 'node:https';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { TLSSocket } from 'node:tls';
import { ApiClient, call, type Target } from '../api/client.ts';
import { labHosts } from '../lab/hosts.ts';
import { resolveTarget } from './targets.ts';
import { type HostInfo, type DomainSummary, type ClusterFleet, type ClusterDomainView } from '../api/protocol.ts';
import { FerryError, asFerryError } from '../errors.ts';
import { REPO_ROOT } from '../util/paths.ts';
import { ConsoleFollower, followTarget } from './console.ts';
import { evacuate } from './evacuate.ts';

export interface UiOpts {
  listen: string;
  hosts?: string[];
  tlsDir?: string;
  token?: string;
}

const ASSETS: Record<string, [string, string]> = {
  '/': ['src/ui/index.html', 'text/html; charset=utf-8'],
  '/app.js': ['src/ui/app.js', 'text/javascript; charset=utf-8'],
  '/style.css': ['src/ui/style.css', 'text/css; charset=utf-8'],
  '/uplot.js': ['node_modules/uplot/dist/uPlot.iife.min.js', 'text/javascript; charset=utf-8'],
  '/uplot.css': ['node_modules/uplot/dist/uPlot.min.css', 'text/css; charset=utf-8'],
  '/xterm.js': ['node_modules/@xterm/xterm/lib/xterm.js', 'text/javascript; charset=utf-8'],
  '/xterm.css': ['node_modules/@xterm/xterm/css/xterm.css', 'text/css; charset=utf-8'],
};

const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

/** What the page shows of a host: host.info's fields the page reads, or why there is none. */
type HostRow =
  | (Pick<HostInfo, 'name' | 'qemuVersion'> & {
      memory: Pick<HostInfo['memory'], 'offeredMiB' | 'freeMiB' | 'usedMiB'>;
      maintenance: HostInfo['maintenance'];
    })
  | { name: string; error: string };
type DomainRow = Pick<DomainSummary, 'name' | 'memoryMiB'> & { host: string; state: string; ha?: { priority: number } | null };
interface UiState {
  mode: 'standalone' | 'cluster';
  /** Cluster mode: whether the ferryd that answered reaches etcd (false: the view may be stale). */
  quorate: boolean | null;
  /** Cluster mode: the ferryd whose watch answered. */
  from: string | null;
  hosts: HostRow[];
  domains: DomainRow[];
  /** Each host's line of outgoing moves (migration/queue.ts): running ones hold a slot, queued ones wait with a place and an ETA. */
  queue: QueueRow[];
}
interface QueueRow {
  host: string;
  domain: string;
  dest: string;
  priority: string;
  state: 'running' | 'queued';
  position: number | null;
  etaMs: number | null;
}

/** A domain waiting in its host's line, in words: "queued #2 → host3". */
function queuedState(q: QueueRow | undefined, state: string): string {
  return q?.state === 'queued' ? `queued #${q.position} → ${q.dest} (${q.priority})` : state;
}

/** A record's state in the words of a domain's state (the page enables Migrate and Console for running ones). */
const FLEET_STATE: Record<ClusterDomainView['state'], string> = {
  running: 'running',
  stopped: 'shutoff',
  restarting: 'restarting',
  failed: 'failed',
};

type Sse = http.ServerResponse;

export class UiServer {
  private readonly hosts = new Map<string, Target>();
  private readonly subs = new Map<string, ApiClient>();
  private readonly clients = new Set<Sse>();
  /** Per domain: its console session (it follows the domain) and who watches it. */
  private readonly consoles = new Map<string, { session: ConsoleFollower; viewers: Set<Sse> }>();
  private server: http.Server | https.Server | undefined;
  /** Cluster mode: the fleet comes from one ferryd's etcd watches, and cluster.changed events say when to read it again. */
  private cluster = false;
  readonly token: string;

  constructor(private readonly o: UiOpts) {
    this.token = o.token ?? crypto.randomBytes(18).toString('base64url');
  }

  /** The hosts shown: --hosts, else the lab's, else the local ferryd and its peers. */
  private async discover(): Promise<void> {
    const names = this.o.hosts?.length ? this.o.hosts : labHosts().map((h) => h.name);
    if (names.length) {
      for (const n of names) this.hosts.set(n, resolveTarget(n));
      // One answer says which mode the fleet runs in (a lab is all cluster or all standalone).
      for (const t of this.hosts.values()) {
        const info = await call(t, 'host.info', {}, 5000).catch(() => null);
        if (info) {
          this.cluster = info.mode === 'cluster';
          break;
        }
      }
      return;
    }
    const local = resolveTarget(undefined);
    const info = await call(local, 'host.info', {}, 10000);
    this.cluster = info.mode === 'cluster';
    this.hosts.set(info.name, local);
    for (const [n, a] of Object.entries(info.peers)) if (n !== info.name) this.hosts.set(n, resolveTarget(a));
  }

  /** A host first seen in the cluster's view: shown, and its events (moves' progress) followed. */
  private adopt(name: string, relocation: string): void {
    if (this.hosts.has(name) || !NAME.test(name)) return;
    const t = resolveTarget(name);
    this.hosts.set(name, t.kind === 'unix' ? t : resolveTarget(relocation));
    if (this.server?.listening) this.subscribe(name);
  }

  /**
   * Cluster mode: hosts and domains from the first ferryd that answers `cluster.fleet`
   * (its etcd watches), preferring one that reaches etcd. A domain's host is its owner;
   * an owner without a live lease shows as down.
   */
  private async fleetState(): Promise<UiState> {
    let got: ClusterFleet | undefined;
    const errors: string[] = [];
    for (const [name, t] of this.hosts) {
      try {
        const f = await call(t, 'cluster.fleet', {}, 5000);
        if (!got || (!got.quorate && f.quorate)) got = f;
        if (f.quorate) break;
      } catch (e) {
        errors.push(`${name}: ${asFerryError(e).message.slice(0, 100)}`);
      }
    }
    if (!got) throw new FerryError('CLUSTER_NO_QUORUM', `No host of the dashboard answered: ${errors.join('; ')}`);
    for (const h of got.hosts) this.adopt(h.name, h.relocation);
    const hosts: UiState['hosts'] = got.hosts.map((h) => ({
      name: h.name,
      qemuVersion: h.engine,
      memory: { offeredMiB: h.memoryMiB, freeMiB: h.freeMiB, usedMiB: Math.max(0, h.memoryMiB - h.freeMiB) },
      maintenance: { on: h.maintenance, since: null },
    }));
    for (const d of got.domains)
      if (!d.ownerUp && !hosts.some((h) => h.name === d.owner))
        hosts.push({ name: d.owner, error: 'down: no cluster lease (its HA domains restart elsewhere)' });
    const queue = got.hosts.flatMap((h) => h.moves.map((m) => ({ host: h.name, ...m })));
    const domains = got.domains.map((d) => ({
      name: d.name,
      host: d.owner,
      state: d.moving
        ? `moving to ${d.moving.to}`
        : queuedState(
            queue.find((q) => q.domain === d.name),
            FLEET_STATE[d.state],
          ),
      memoryMiB: d.memoryMiB,
      ha: d.ha,
    }));
    hosts.sort((a, b) => a.name.localeCompare(b.name));
    return { mode: 'cluster', quorate: got.quorate, from: got.host, hosts, domains, queue };
  }

  private broadcast(event: string, data: unknown): void {
    const line = `event: ${event}\ndata: ${JSON.stringify(data)}\n\n`;
    for (const c of this.clients) c.write(line);
  }

  /** One event subscription per host, kept up (a restarted ferryd is re-subscribed). */
  private subscribe(name: string): void {
    const t = this.hosts.get(name)!;
    const go = async (): Promise<void> => {
      try {
        const c = await ApiClient.connect(t, 5000);
        await c.request('events.subscribe', {});
        this.subs.set(name, c);
        c.on('event', (ev: { event: string; data: unknown }) => this.broadcast(ev.event, { host: name, ...(ev.data as object) }));
        c.socket.once('close', () => {
          this.subs.delete(name);
          if (this.server?.listening) setTimeout(() => void go(), 1000).unref();
        });
      } catch {
        if (this.server?.listening) setTimeout(() => void go(), 2000).unref();
      }
    };
    void go();
  }

  async state(): Promise<UiState> {
    if (this.cluster) return this.fleetState();
    const hosts: UiState['hosts'] = [];
    const domains: UiState['domains'] = [];
    const queue: QueueRow[] = [];
    await Promise.all(
      [...this.hosts].map(async ([name, t]) => {
        try {
          const [hi, list, jobs] = await Promise.all([
            call(t, 'host.info', {}, 10000),
            call(t, 'domain.list', {}, 10000),
            call(t, 'migration.jobs', {}, 10000),
          ]);
          hosts.push(hi);
          const line = jobs.flatMap((j) => (j.queue ? [{ host: name, ...j.queue }] : []));
          queue.push(...line);
          for (const d of list)
            domains.push({
              ...d,
              host: name,
              state: queuedState(
                line.find((q) => q.domain === d.name),
                d.state,
              ),
            });
        } catch (e) {
          hosts.push({ name, error: asFerryError(e).message });
        }
      }),
    );
    hosts.sort((a, b) => a.name.localeCompare(b.name));
    domains.sort((a, b) => a.name.localeCompare(b.name));
    return { mode: 'standalone', quorate: null, from: null, hosts, domains, queue };
  }

  /** A console shared by every viewer of one domain; it follows the domain when it moves. */
  private openConsole(domain: string, host: string): { session: ConsoleFollower; viewers: Set<Sse> } {
    const viewers = new Set<Sse>();
    const send = (event: string, data: unknown): void => {
      for (const v of viewers) v.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
    };
    const session = new ConsoleFollower(
      { domain: domain, host: host, target: this.hosts.get(host) ?? resolveTarget(host) },
      {
        replay: 8192,
        connectTimeoutMs: 5000,
        resolve: (h, t) => this.hosts.get(h) ?? followTarget(h, t),
      },
      {
        attached: (h) => send('attached', { host: h }),
        output: (b) => send('output', b.toString('base64')),
        moved: (from, to) => send('moved', { from, to }),
      },
    );
    void session
      .run()
      .then(
        (end) => send('closed', { reason: end.end === 'stopped' ? (end.reason ?? 'stopped') : 'closed' }),
        (e) => send('closed', { reason: asFerryError(e).message }),
      )
      .finally(() => {
        for (const v of viewers) v.end();
        if (this.consoles.get(domain)?.session === session) this.consoles.delete(domain);
      });
    return { session, viewers };
  }

  private authorized(req: http.IncomingMessage, res: http.ServerResponse, url: URL): boolean {
    if (this.o.tlsDir) {
      // HTTPS: the browser's certificate, from the cluster CA, must say OU=admin.
      const sock = req.socket as TLSSocket;
      const cert = sock.getPeerCertificate?.();
      if (sock.authorized && cert && String(cert.subject?.OU ?? '') === 'admin') return true;
      res.writeHead(403).end('ferry ui: an administrator certificate (OU=admin) from the cluster CA is required\n');
      return false;
    }
    const cookie = /(?:^|;\s*)ferry_ui=([A-Za-z0-9_-]+)/.exec(req.headers.cookie ?? '')?.[1];
    const given = url.searchParams.get('token');
    const ok = (v: string | null | undefined): boolean =>
      !!v && v.length === this.token.length && crypto.timingSafeEqual(Buffer.from(v), Buffer.from(this.token));
    if (ok(cookie)) return true;
    if (ok(given)) {
      res.setHeader('set-cookie', `ferry_ui=${this.token}; HttpOnly; SameSite=Strict; Path=/`);
      return true;
    }
    res.writeHead(403).end('ferry ui: open the address `ferry ui` printed (it carries the token)\n');
    return false;
  }

  private async body(req: http.IncomingMessage): Promise<Record<string, unknown>> {
    let raw = '';
    for await (const chunk of req) {
      raw += chunk;
      if (raw.length > 65536) throw new FerryError('API_BAD_REQUEST', 'request too large');
    }
    const v = JSON.parse(raw || '{}') as unknown;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new FerryError('API_BAD_REQUEST', 'a JSON object is expected');
    return v as Record<string, unknown>;
  }

  private name(v: unknown, what: string): string {
    if (typeof v !== 'string' || !NAME.test(v)) throw new FerryError('API_BAD_REQUEST', `${what} must be a name`);
    return v;
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://ui');
    if (!this.authorized(req, res, url)) return;
    const json = (code: number, v: unknown): void => {
      res.writeHead(code, { 'content-type': 'application/json' }).end(JSON.stringify(v));
    };
    const asset = ASSETS[url.pathname];
    if (req.method === 'GET' && asset) {
      res.writeHead(200, {
        'content-type': asset[1],
        'cache-control': 'no-store',
        'content-security-policy': "default-src 'self'; style-src 'self' 'unsafe-inline'",
      });
      fs.createReadStream(path.join(REPO_ROOT, asset[0])).pipe(res);
      return;
    }
    try {
      if (req.method === 'GET' && url.pathname === '/api/state') return json(200, await this.state());
      if (req.method === 'GET' && url.pathname === '/api/events') {
        res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-store' });
        res.write(': ferry\n\n');
        this.clients.add(res);
        req.on('close', () => this.clients.delete(res));
        return;
      }
      if (req.method === 'POST' && url.pathname === '/api/migrate') {
        return json(202, this.startMigrate(await this.body(req)));
      }
      if (req.method === 'POST' && url.pathname === '/api/evacuate') {
        return json(202, this.startEvacuate(await this.body(req)));
      }
      if (req.method === 'GET' && url.pathname === '/api/console') {
        this.viewConsole(req, res, url);
        return;
      }
      if (req.method === 'POST' && url.pathname === '/api/console/input') {
        const b = await this.body(req);
        const domain = this.name(b.domain, 'domain');
        if (typeof b.data !== 'string' || b.data.length > 4096)
          throw new FerryError('API_BAD_REQUEST', 'data must be a string of at most 4096 characters');
        const s = this.consoles.get(domain);
        if (!s) throw new FerryError('DOMAIN_BAD_STATE', `No console open for "${domain}"`);
        // Keys typed while the console follows the domain wait for it (up to 64 KiB).
        if (s.session.pendingBytes < 65536) s.session.write(Buffer.from(b.data, 'utf8'));
        return json(200, { sent: b.data.length });
      }
      json(404, { error: { code: 'API_UNKNOWN_ACTION', message: `${req.method} ${url.pathname}` } });
    } catch (e) {
      const fe = asFerryError(e);
      json(fe.code === 'API_BAD_REQUEST' || e instanceof SyntaxError ? 400 : 409, { error: fe.toJSON() });
    }
  }

  /** POST /api/migrate: the move starts; its report arrives on the event stream (ui.migrated). */
  private startMigrate(b: Record<string, unknown>): { started: true; domain: string; from: string; to: string } {
    const domain = this.name(b.domain, 'domain'),
      from = this.name(b.from, 'from'),
      to = this.name(b.to, 'to');
    const t = this.hosts.get(from);
    if (!t) throw new FerryError('HOST_UNKNOWN', `${from} is not a host of this dashboard`);
    // The answer is the report, on the event stream (migration.done); this returns at once.
    void call(t, 'migration.start', { domain, dest: to, live: b.live !== false }, 0).then(
      (r) => this.broadcast('ui.migrated', { host: from, domain, report: r }),
      (e) => this.broadcast('ui.migrated', { host: from, domain, report: { outcome: 'failed', domain, error: asFerryError(e).toJSON() } }),
    );
    return { started: true, domain, from, to };
  }

  /** POST /api/evacuate: the evacuation (or its plan) starts; its rows arrive on the event stream (ui.evacuation). */
  private startEvacuate(b: Record<string, unknown>): { started: true; host: string } {
    const host = this.name(b.host, 'host');
    if (!this.hosts.has(host)) throw new FerryError('HOST_UNKNOWN', `${host} is not a host of this dashboard`);
    void evacuate(host, { plan: b.plan === true }, (rows, etaMs) => this.broadcast('ui.evacuation', { host, rows, etaMs })).then(
      (r) => this.broadcast('ui.evacuation', { host, rows: r.domains, etaMs: 0, done: r.outcome }),
      (e) => this.broadcast('ui.evacuation', { host, error: asFerryError(e).toJSON() }),
    );
    return { started: true, host };
  }

  /** GET /api/console: the viewer joins the domain's console session (opened by the first viewer, ended with the last). */
  private viewConsole(req: http.IncomingMessage, res: http.ServerResponse, url: URL): void {
    const domain = this.name(url.searchParams.get('domain'), 'domain'),
      host = this.name(url.searchParams.get('host'), 'host');
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-store' });
    res.write(': console\n\n');
    let s = this.consoles.get(domain);
    if (!s) {
      s = this.openConsole(domain, host);
      this.consoles.set(domain, s);
      s.viewers.add(res);
    } else {
      s.viewers.add(res);
      res.write(`event: attached\ndata: ${JSON.stringify({ host: s.session.host })}\n\n`);
    }
    const mine = s;
    req.on('close', () => {
      mine.viewers.delete(res);
      // The last viewer gone: the session ends, also while it follows a move.
      if (!mine.viewers.size) mine.session.close();
    });
  }

  /** Starts serving; resolves with the URL to open. */
  async start(): Promise<string> {
    const m = /^(\[[0-9a-fA-F:]+\]|[0-9.]+|localhost):(\d{1,5})$/.exec(this.o.listen);
    if (!m) throw new FerryError('CLI_USAGE', `--listen must be ADDRESS:PORT, got "${this.o.listen}"`);
    const address = m[1].replace(/^\[|\]$/g, '');
    const loopback = isLoopback(address);
    if (!loopback && !this.o.tlsDir)
      throw new FerryError(
        'CLI_USAGE',
        `Serving on ${address} needs HTTPS: give --tls-dir (a host certificate's directory); browsers then present an administrator certificate`,
      );
    await this.discover();
    const handler = (req: http.IncomingMessage, res: http.ServerResponse): void => {
      void this.handle(req, res);
    };
    if (this.o.tlsDir) {
      const f = (n: string): Buffer => fs.readFileSync(path.join(this.o.tlsDir!, n));
      this.server = https.createServer(
        {
          cert: f('server-cert.pem'),
          key: f('server-key.pem'),
          ca: f('ca-cert.pem'),
          requestCert: true,
          rejectUnauthorized: true,
          handshakeTimeout: WEB_HANDSHAKE_MS,
        },
        handler,
      );
    } else {
      this.server = http.createServer(handler);
    }
    // A browser holds a few connections (the page, its event stream, a console socket).
    boundWebServer(this.server, 64);
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', reject);
      this.server!.listen(Number(m[2]), address, () => resolve());
    });
    for (const n of this.hosts.keys()) this.subscribe(n);
    const port = (this.server.address() as { port: number }).port;
    const shown = address.includes(':') ? `[${address}]` : address;
    return this.o.tlsDir ? `https://${shown}:${port}/` : `http://${shown}:${port}/?token=${this.token}`;
  }

  close(): void {
    for (const c of this.clients) c.end();
    for (const s of this.consoles.values()) {
      s.session.close();
      for (const v of s.viewers) v.end();
    }
    for (const c of this.subs.values()) c.close();
    this.server?.close();
    this.server?.closeAllConnections?.();
  }
}
