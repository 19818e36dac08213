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
import { ConnectionLimiter, RateLimitedLog, hostsAllowMatch, parseHostsAllow } from './access.ts';
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

  constructor(private readonly log: Logger, private readonly handler: Handler) {
    this.refusals = new RateLimitedLog((f) => log.warn('refused peer', f));
  }

  async listenUnix(path: string): Promise<void> {
    try { fs.unlinkSync(path); } catch { /* none */ }
    this.unixServer = net.createServer((s) => this.serve(s, { transport: 'unix', role: 'local' }));
    await new Promise<void>((r, j) => { this.unixServer!.once('error', j); this.unixServer!.listen(path, r); });
    fs.chmodSync(path, 0o600);
  }

  async listenTls(opts: { address: string; port: number; tlsDir: string; hostsAllow: string[]; limits: Pick<Limits, 'connections' | 'connectionsPerAddress' | 'handshakeMs' | 'firstRequestMs'> }): Promise<boolean> {
    if (!tlsPresent(opts.tlsDir)) {
      this.log.warn('no TLS certificates: the remote API and relocation server are off', { tlsDir: opts.tlsDir });
      return false;
    }
    const limits = opts.limits;
    this.firstRequestMs = limits.firstRequestMs;
    const parsed = parseHostsAllow(opts.hostsAllow);
    if ('error' in parsed) throw new FerryError('CONFIG_INVALID', `relocation.hostsAllow: ${parsed.error}`);
    const rules = parsed.rules;
    const refusals = this.refusals;
    const limiter = new ConnectionLimiter(limits.connections, limits.connectionsPerAddress);
    const crlPath = path.join(opts.tlsDir, 'ca-crl.pem');
    let crlStamp = '';
    const context = (): tls.SecureContextOptions => {
      const files = loadTls(opts.tlsDir);
      try { const st = fs.statSync(crlPath); crlStamp = `${st.mtimeMs}:${st.size}`; } catch { crlStamp = ''; }
      return { ca: files.ca, cert: files.cert, key: files.key, ...(files.crl ? { crl: files.crl } : {}) };
    };
    // rejectUnauthorized is false so that a refused peer gets a coded answer and its
    // identity is logged; `authorized` is still checked before anything is served.
    this.tlsServer = tls.createServer({ ...context(), requestCert: true, rejectUnauthorized: false, minVersion: 'TLSv1.3', handshakeTimeout: limits.handshakeMs }, (s) => {
      const cert = s.getPeerCertificate();
      const cn = cert && typeof cert.subject === 'object' ? cert.subject?.CN : undefined;
      const peerName = Array.isArray(cn) ? cn[0] : cn;
      const peerAddress = s.remoteAddress;
      const refuse = (code: 'TLS_REFUSED' | 'PEER_NOT_ALLOWED', why: string): void => {
        refusals.log(`${code}:${peerAddress}`, { code, peerName: peerName ?? null, peerAddress, issuer: cert?.issuer?.CN ?? null, why });
        s.end(JSON.stringify({ id: 0, error: { code, message: why } }) + '\n');
        setTimeout(() => s.destroy(), 1000).unref();
      };
      if (!s.authorized) {
        const revoked = String(s.authorizationError) === 'CERT_REVOKED';
        const why = !cert || !cert.subject ? 'no client certificate' : revoked ? `certificate of "${peerName}" is revoked (ca-crl.pem)` : `certificate of "${peerName}" rejected: ${s.authorizationError}`;
        refuse('TLS_REFUSED', `Host refuses the connection: ${why}`);
        return;
      }
      const role = certRole(cert.subject as unknown as Record<string, unknown>);
      if (!role) {
        refuse('TLS_REFUSED', `Host refuses the connection: certificate of "${peerName}" claims an unknown role (OU ${JSON.stringify(cert.subject.OU)}); ferry issues OU=host or OU=admin`);
        return;
      }
      // hostsAllow names the relocation peers (as xend's did); an administrator is
      // admitted by its certificate's role (and the CA and revocation list) alone.
      if (role === 'host' && !hostsAllowMatch(rules, peerName, peerAddress)) {
        refuse('PEER_NOT_ALLOWED', `Host refuses "${peerName}" (${peerAddress}): its name is not matched by relocation.hostsAllow`);
        return;
      }
      const sub = cert.subject as unknown as Record<string, string | string[] | undefined>;
      const peerDn = (['O', 'OU', 'CN'] as const).flatMap((k) => (sub[k] === undefined ? [] : [`${k}=${Array.isArray(sub[k]) ? (sub[k] as string[]).join('+') : sub[k]}`])).join(',');
      this.serve(s, { transport: 'tls', role: role === 'admin' ? 'admin' : 'peer', peerName, peerAddress, peerDn });
    });
    // Before TLS: count the raw connection, and re-read the CRL if it changed.
    // prepend: before the TLS server wraps the socket, so a new CRL applies to this very connection.
    this.tlsServer.prependListener('connection', (raw: net.Socket) => {
      const addr = raw.remoteAddress ?? '?';
      const why = limiter.take(addr);
      if (why) {
        refusals.log(`API_LIMIT:${addr}`, { code: 'API_LIMIT', peerAddress: addr, why });
        raw.destroy();
        return;
      }
      raw.once('close', () => limiter.release(addr));
      try {
        const st = fs.statSync(crlPath);
        if (`${st.mtimeMs}:${st.size}` !== crlStamp) { this.tlsServer!.setSecureContext(context()); this.log.info('reloaded TLS files (revocation list changed)', { crl: crlPath }); }
      } catch { if (crlStamp) { this.tlsServer!.setSecureContext(context()); } }
    });
    this.tlsServer.on('tlsClientError', (err, s) => {
      refusals.log(`TLS_REFUSED:${s.remoteAddress}`, { code: 'TLS_REFUSED', peerAddress: s.remoteAddress ?? null, why: err.message });
      // With a listener here Node leaves the socket open: a client that never finished
      // (or never began) its handshake would keep its slot forever (server.test.ts).
      s.destroy();
    });
    await new Promise<void>((r, j) => { this.tlsServer!.once('error', j); this.tlsServer!.listen(opts.port, opts.address, r); });
    return true;
  }

  private serve(s: net.Socket, caller: Caller): void {
    this.conns.add(s);
    let raw = false;
    const closers: (() => void)[] = [];
    // A TLS peer that authenticated but never asks anything holds a connection slot:
    // it gets firstRequestMs to send its first request (the local socket is root's own).
    let silent: NodeJS.Timeout | undefined = caller.transport === 'tls' && this.firstRequestMs > 0 ? setTimeout(() => {
      this.refusals.log(`SILENT:${caller.peerAddress}`, { code: 'API_LIMIT', peerName: caller.peerName ?? null, peerAddress: caller.peerAddress ?? null, why: `no request within ${this.firstRequestMs} ms` });
      s.destroy();
    }, this.firstRequestMs) : undefined;
    s.on('close', () => { clearTimeout(silent); this.conns.delete(s); for (const f of closers) f(); });
    s.on('error', () => s.destroy());
    const send = (obj: unknown): void => {
      if (s.destroyed || raw) return;
      // Backpressure: a reader that stopped reading is cut off, not buffered without end.
      if (s.writableLength > MAX_SEND_BACKLOG) { this.log.warn('closing a connection that does not read its events', { caller: caller.peerName ?? caller.transport, backlog: s.writableLength }); s.destroy(); return; }
      s.write(JSON.stringify(obj) + '\n');
    };
    const ctx: ConnContext = {
      caller, socket: s, send, onClose: (f) => closers.push(f),
      goRaw: () => { raw = true; s.removeListener('data', onData); },
    };
    const dispatch = (req: Request): void => {
      clearTimeout(silent);
      silent = undefined;
      if (!mayCall(caller.role, req.action)) {
        const fe = new FerryError('API_FORBIDDEN', `${req.action} is not allowed for ${caller.role === 'peer' ? `host "${caller.peerName}" (a host certificate may only relocate domains)` : `${caller.role} callers`}; use an admin certificate (ferry admin cert NAME) or the local socket`);
        this.refusals.log(`API_FORBIDDEN:${caller.peerName}`, { code: 'API_FORBIDDEN', action: req.action, role: caller.role, peerName: caller.peerName ?? null, peerAddress: caller.peerAddress ?? null });
        send({ id: req.id, error: fe.toJSON() });
        return;
      }
      this.handler(req, ctx).then(
        (result) => { if (!raw) send({ id: req.id, result: result ?? null }); },
        (e) => {
          const fe = asFerryError(e);
          if (fe.code === 'INTERNAL') this.log.error('internal error', { action: req.action, error: String(e), stack: (e as Error)?.stack });
          if (!raw) send({ id: req.id, error: fe.toJSON() }); else s.destroy();
        },
      );
    };
    // A request whose raw bytes are still arriving (null: refused, its bytes are skipped).
    let awaiting: Request | null = null;
    const splitter = new FrameSplitter((line) => {
      if (raw || !line.trim()) return 0;
      let obj: unknown;
      try {
        obj = JSON.parse(line);
      } catch {
        send({ id: null, error: new FerryError('API_BAD_REQUEST', 'API request is not valid JSON').toJSON() });
        return 0;
      }
      const follow = attachmentLength(obj);
      let req: Request;
      try {
        req = parseRequest(obj);
      } catch (e) {
        const id = typeof obj === 'object' && obj !== null ? ((obj as { id?: unknown }).id ?? null) : null;
        send({ id, error: asFerryError(e).toJSON() });
        awaiting = null;
        return follow;
      }
      if (follow > 0) { awaiting = req; return follow; }
      dispatch(req);
      return 0;
    }, (data) => {
      const req = awaiting;
      awaiting = null;
      if (req) dispatch({ ...req, attachment: data });
    }, MAX_REQUEST_BYTES, () => {
      send({ id: null, error: { code: 'API_BAD_REQUEST', message: `API request longer than ${MAX_REQUEST_BYTES} bytes` } });
      s.end();
    });
    const onData = (d: Buffer): void => splitter.push(d);
    s.on('data', onData);
  }

  async close(): Promise<void> {
    for (const c of this.conns) c.destroy();
    await Promise.all([this.unixServer, this.tlsServer].filter(Boolean).map((srv) => new Promise<void>((r) => srv!.close(() => r()))));
  }
}
