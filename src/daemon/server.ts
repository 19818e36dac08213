/**
 * ferryd's API server: the same JSON-lines protocol (api/protocol.ts) on a unix socket
 * (local, mode 0600, root only) and on a TLS port (remote, mutually authenticated).
 *
 * A TLS client is admitted only if its certificate chains to the cluster CA, is not in
 * the CA's revocation list (ca-crl.pem, re-read when it changes), claims a known role
 * (OU host or admin), and, for a host, its name is matched whole by
 * relocation.hostsAllow (see access.ts). Every request is then checked against the role table (ROLES in
 * api/protocol.ts): a host certificate is a peer, which may drive relocation and
 * nothing else. Refusals are logged (rate-limited) with the caller's identity and
 * answered with a coded error.
 *
 * Before authentication a connection costs little and lives briefly: a cap per remote
 * address and in total, and 5 s to finish the TLS handshake.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { FerryError, asFerryError } from '../errors.ts';
import { parseRequest } from '../api/schema.ts';
import { attachmentLength, mayCall, MAX_REQUEST_BYTES, type Request, type Role } from '../api/protocol.ts';
import { FrameSplitter } from '../util/fsx.ts';
import type { Logger } from './log.ts';
import { loadTls, tlsPresent, certRole } from '../tls/ca.ts';
import { ConnectionLimiter, RateLimitedLog, hostsAllowMatch, parseHostsAllow, type AllowRule } from './access.ts';
import type { Limits } from './config.ts';

export interface Caller {
  transport: 'unix' | 'tls';
  role: Role;
  /** Certificate CN for TLS callers. */
  peerName?: string;
  /** The certificate's subject as QEMU's tls-authz sees it (O=…,OU=…,CN=…). */
  peerDn?: string;
  peerAddress?: string;
}

export interface ConnContext {
  caller: Caller;
  socket: net.Socket;
  /** Stop parsing JSON lines: the connection now carries raw bytes (console). */
  goRaw(): void;
  /** Sends an unsolicited event line. */
  send(obj: unknown): void;
  onClose(fn: () => void): void;
}

export type Handler = (req: Request, ctx: ConnContext) => Promise<unknown>;

/** A subscriber or console reader this far behind is cut off rather than buffered without end. */
export const MAX_SEND_BACKLOG = 8 * 1024 * 1024;

export class ApiServer {
  private unixServer?: net.Server;
  private tlsServer?: tls.Server;
  private conns = new Set<net.Socket>();
  /** Set by listenTls: how long a TLS connection may stay silent before its first request. */
  private firstRequestMs = 0;

  /** Refusals on either socket, rate-limited (access.ts). */
  private readonly refusals: RateLimitedLog;

  constructor(
    private readonly log: Logger,
    private readonly handler: Handler,
  ) {
    this.refusals = new RateLimitedLog((f) => log.warn('refused peer', f));
  }

  async listenUnix(path: string): Promise<void> {
    try {
      fs.unlinkSync(path);
    } catch {
      /* none */
    }
    this.unixServer = net.createServer((s) => this.serve(s, { transport: 'unix', role: 'local' }));
    await new Promise<void>((r, j) => {
      this.unixServer!.once('error', j);
      this.unixServer!.listen(path, r);
    });
    fs.chmodSync(path, 0o600);
  }

  async listenTls(opts: {
    address: string;
    port: number;
    tlsDir: string;
    hostsAllow: string[];
    limits: Pick<Limits, 'connections' | 'connectionsPerAddress' | 'handshakeMs' | 'firstRequestMs'>;
  }): Promise<boolean> {
    if (!tlsPresent(opts.tlsDir)) {
      this.log.warn('no TLS certificates: the remote API and relocation server are off', { tlsDir: opts.tlsDir });
      return false;
    }
    const limits = opts.limits;
    this.firstRequestMs = limits.firstRequestMs;
    const parsed = parseHostsAllow(opts.hostsAllow);
    if ('error' in parsed) throw new FerryError('CONFIG_INVALID', `relocation.hostsAllow: ${parsed.error}`);
    const rules = parsed.rules;
    const files = new TlsFiles(opts.tlsDir);
    // rejectUnauthorized is false so that a refused peer gets a coded answer and its
    // identity is logged; `authorized` is still checked before anything is served.
    const server = tls.createServer(
      { ...files.context(), requestCert: true, rejectUnauthorized: false, minVersion: 'TLSv1.3', handshakeTimeout: limits.handshakeMs },
      (s) => {
        const caller = this.admit(s, rules);
        if (caller) this.serve(s, caller);
      },
    );
    this.tlsServer = server;
    // Before TLS: count the raw connection, and re-read the CRL if it changed.
    // prepend: before the TLS server wraps the socket, so a new CRL applies to this very connection.
    const limiter = new ConnectionLimiter(limits.connections, limits.connectionsPerAddress);
    server.prependListener('connection', (raw: net.Socket) => {
      const addr = raw.remoteAddress ?? '?';
      const why = limiter.take(addr);
      if (why) {
        this.refusals.log(`API_LIMIT:${addr}`, { code: 'API_LIMIT', peerAddress: addr, why });
        raw.destroy();
        return;
      }
      raw.once('close', () => limiter.release(addr));
      if (files.changed()) {
        server.setSecureContext(files.context());
        this.log.info('reloaded TLS files (revocation list changed)', { crl: files.crlPath });
      }
    });
    server.on('tlsClientError', (err, s) => {
      this.refusals.log(`TLS_REFUSED:${s.remoteAddress}`, { code: 'TLS_REFUSED', peerAddress: s.remoteAddress ?? null, why: err.message });
      // With a listener here Node leaves the socket open: a client that never finished
      // (or never began) its handshake would keep its slot forever (server.test.ts).
      s.destroy();
    });
    await new Promise<void>((r, j) => {
      server.once('error', j);
      server.listen(opts.port, opts.address, r);
    });
    return true;
  }

  /**
   * A TLS client after its handshake: its certificate chains to the CA and is not
   * revoked, claims a known role, and a host's name is matched by hostsAllow. The caller
   * it is, or undefined after a coded refusal.
   */
  private admit(s: tls.TLSSocket, rules: AllowRule[]): Caller | undefined {
    const cert = s.getPeerCertificate();
    const cn = cert && typeof cert.subject === 'object' ? cert.subject?.CN : undefined;
    const peerName = Array.isArray(cn) ? cn[0] : cn;
    const peerAddress = s.remoteAddress;
    const refuse = (code: 'TLS_REFUSED' | 'PEER_NOT_ALLOWED', why: string): undefined => {
      this.refusals.log(`${code}:${peerAddress}`, { code, peerName: peerName ?? null, peerAddress, issuer: cert?.issuer?.CN ?? null, why });
      s.end(JSON.stringify({ id: 0, error: { code, message: why } }) + '\n');
      setTimeout(() => s.destroy(), 1000).unref();
      return undefined;
    };
    if (!s.authorized) {
      const revoked = String(s.authorizationError) === 'CERT_REVOKED';
      const why =
        !cert || !cert.subject
          ? 'no client certificate'
          : revoked
            ? `certificate of "${peerName}" is revoked (ca-crl.pem)`
            : `certificate of "${peerName}" rejected: ${s.authorizationError}`;
      return refuse('TLS_REFUSED', `Host refuses the connection: ${why}`);
    }
    const role = certRole(cert.subject as unknown as Record<string, unknown>);
    if (!role) {
      return refuse(
        'TLS_REFUSED',
        `Host refuses the connection: certificate of "${peerName}" claims an unknown role (OU ${JSON.stringify(cert.subject.OU)}); ferry issues OU=host or OU=admin`,
      );
    }
    // hostsAllow names the relocation peers (as xend's did); an administrator is
    // admitted by its certificate's role (and the CA and revocation list) alone.
    if (role === 'host' && !hostsAllowMatch(rules, peerName, peerAddress)) {
      return refuse('PEER_NOT_ALLOWED', `Host refuses "${peerName}" (${peerAddress}): its name is not matched by relocation.hostsAllow`);
    }
    const sub = cert.subject as unknown as Record<string, string | string[] | undefined>;
    const peerDn = (['O', 'OU', 'CN'] as const)
      .flatMap((k) => (sub[k] === undefined ? [] : [`${k}=${Array.isArray(sub[k]) ? (sub[k] as string[]).join('+') : sub[k]}`]))
      .join(',');
    return { transport: 'tls', role: role === 'admin' ? 'admin' : 'peer', peerName, peerAddress, peerDn };
  }

  private serve(s: net.Socket, caller: Caller): void {
    this.conns.add(s);
    s.on('close', () => this.conns.delete(s));
    new ApiConnection(s, caller, {
      log: this.log,
      refusals: this.refusals,
      handler: this.handler,
      firstRequestMs: this.firstRequestMs,
    }).start();
  }

  async close(): Promise<void> {
    for (const c of this.conns) c.destroy();
    await Promise.all([this.unixServer, this.tlsServer].filter(Boolean).map((srv) => new Promise<void>((r) => srv!.close(() => r()))));
  }
}

/** The TLS server's files, re-read when the CA's revocation list changes (a revoked certificate is refused from its next connection). */
class TlsFiles {
  readonly crlPath: string;
  private stamp = '';

  constructor(private readonly dir: string) {
    this.crlPath = path.join(dir, 'ca-crl.pem');
  }

  private current(): string {
    try {
      const st = fs.statSync(this.crlPath);
      return `${st.mtimeMs}:${st.size}`;
    } catch {
      return '';
    }
  }

  context(): tls.SecureContextOptions {
    const files = loadTls(this.dir);
    this.stamp = this.current();
    return { ca: files.ca, cert: files.cert, key: files.key, ...(files.crl ? { crl: files.crl } : {}) };
  }

  /** The revocation list appeared, went or changed since the last context(). */
  changed(): boolean {
    return this.current() !== this.stamp;
  }
}

/** What a connection needs from its server. */
interface ConnectionDeps {
  log: Logger;
  refusals: RateLimitedLog;
  handler: Handler;
  /** How long a TLS caller may stay silent before its first request (0: for ever). */
  firstRequestMs: number;
}

/**
 * One API connection: JSON lines in, each request checked against the caller's role
 * and handed to the handler, its answer (or coded error) sent back; a request may carry
 * raw bytes after its line (relocation.repair), and console.attach turns the connection raw.
 */
class ApiConnection {
  private raw = false;
  private readonly closers: (() => void)[] = [];
  private silent: NodeJS.Timeout | undefined;
  /** A request whose raw bytes are still arriving (null: refused, its bytes are skipped). */
  private awaiting: Request | null = null;
  private readonly splitter: FrameSplitter;
  private readonly onData = (d: Buffer): void => this.splitter.push(d);

  constructor(
    private readonly s: net.Socket,
    private readonly caller: Caller,
    private readonly deps: ConnectionDeps,
  ) {
    this.splitter = new FrameSplitter(
      (line) => this.onLine(line),
      (data) => {
        const req = this.awaiting;
        this.awaiting = null;
        if (req) this.dispatch({ ...req, attachment: data });
      },
      {
        maxLine: MAX_REQUEST_BYTES,
        onOverflow: () => {
          this.send({ id: null, error: { code: 'API_BAD_REQUEST', message: `API request longer than ${MAX_REQUEST_BYTES} bytes` } });
          s.end();
        },
      },
    );
  }

  start(): void {
    const { s, caller, deps } = this;
    // A TLS peer that authenticated but never asks anything holds a connection slot:
    // it gets firstRequestMs to send its first request (the local socket is root's own).
    if (caller.transport === 'tls' && deps.firstRequestMs > 0) {
      this.silent = setTimeout(() => {
        deps.refusals.log(`SILENT:${caller.peerAddress}`, {
          code: 'API_LIMIT',
          peerName: caller.peerName ?? null,
          peerAddress: caller.peerAddress ?? null,
          why: `no request within ${deps.firstRequestMs} ms`,
        });
        s.destroy();
      }, deps.firstRequestMs);
    }
    s.on('close', () => {
      clearTimeout(this.silent);
      for (const f of this.closers) f();
    });
    s.on('error', () => s.destroy());
    s.on('data', this.onData);
  }

  private send(obj: unknown): void {
    const s = this.s;
    if (s.destroyed || this.raw) return;
    // Backpressure: a reader that stopped reading is cut off, not buffered without end.
    if (s.writableLength > MAX_SEND_BACKLOG) {
      this.deps.log.warn('closing a connection that does not read its events', {
        caller: this.caller.peerName ?? this.caller.transport,
        backlog: s.writableLength,
      });
      s.destroy();
      return;
    }
    s.write(JSON.stringify(obj) + '\n');
  }

  private context(): ConnContext {
    return {
      caller: this.caller,
      socket: this.s,
      send: (obj) => this.send(obj),
      onClose: (f) => this.closers.push(f),
      goRaw: () => {
        this.raw = true;
        this.s.removeListener('data', this.onData);
      },
    };
  }

  /** One request line: parsed and validated, then dispatched (or its raw bytes awaited first). */
  private onLine(line: string): number {
    if (this.raw || !line.trim()) return 0;
    let obj: unknown;
    try {
      obj = JSON.parse(line);
    } catch {
      this.send({ id: null, error: new FerryError('API_BAD_REQUEST', 'API request is not valid JSON').toJSON() });
      return 0;
    }
    const follow = attachmentLength(obj);
    let req: Request;
    try {
      req = parseRequest(obj);
    } catch (e) {
      const id = typeof obj === 'object' && obj !== null ? ((obj as { id?: unknown }).id ?? null) : null;
      this.send({ id, error: asFerryError(e).toJSON() });
      this.awaiting = null;
      return follow;
    }
    if (follow > 0) {
      this.awaiting = req;
      return follow;
    }
    this.dispatch(req);
    return 0;
  }

  private dispatch(req: Request): void {
    const { caller, deps } = this;
    clearTimeout(this.silent);
    this.silent = undefined;
    if (!mayCall(caller.role, req.action)) {
      const who =
        caller.role === 'peer' ? `host "${caller.peerName}" (a host certificate may only relocate domains)` : `${caller.role} callers`;
      const fe = new FerryError(
        'API_FORBIDDEN',
        `${req.action} is not allowed for ${who}; use an admin certificate (ferry admin cert NAME) or the local socket`,
      );
      deps.refusals.log(`API_FORBIDDEN:${caller.peerName}`, {
        code: 'API_FORBIDDEN',
        action: req.action,
        role: caller.role,
        peerName: caller.peerName ?? null,
        peerAddress: caller.peerAddress ?? null,
      });
      this.send({ id: req.id, error: fe.toJSON() });
      return;
    }
    deps.handler(req, this.context()).then(
      (result) => {
        if (!this.raw) this.send({ id: req.id, result: result ?? null });
      },
      (e) => {
        const fe = asFerryError(e);
        if (fe.code === 'INTERNAL') deps.log.error('internal error', { action: req.action, error: String(e), stack: (e as Error)?.stack });
        if (!this.raw) this.send({ id: req.id, error: fe.toJSON() });
        else this.s.destroy();
      },
    );
  }
}
