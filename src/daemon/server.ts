/**
 * ferryd's API server: the same JSON-lines protocol (api/protocol.ts) on a unix socket
 * (local, mode 0600, root only) and on a TLS port (remote, mutually authenticated).
 *
 * A TLS peer is admitted only if its certificate chains to the cluster CA *and* its
 * name (certificate CN) or address matches one of relocation.hostsAllow, as xend's
 * xend-relocation-hosts-allow did. Refusals are logged with the peer's identity and
 * answered with one coded error line before the connection is closed.
 */
import fs from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import { FerryError, asFerryError } from '../errors.ts';
import { parseRequest, attachmentLength, MAX_REQUEST_BYTES, type Request } from '../api/protocol.ts';
import { FrameSplitter } from '../util/fsx.ts';
import type { Logger } from './log.ts';
import { loadTls, tlsPresent } from '../tls/ca.ts';

export interface Caller {
  transport: 'unix' | 'tls';
  /** Certificate CN for TLS callers. */
  peerName?: string;
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

export function hostsAllowMatch(patterns: string[], name: string | undefined, address: string | undefined): boolean {
  const cands = [name, address?.replace(/^::ffff:/, '')].filter((x): x is string => !!x);
  return patterns.some((p) => {
    const re = new RegExp(p);
    return cands.some((c) => re.test(c));
  });
}

export class ApiServer {
  private unixServer?: net.Server;
  private tlsServer?: tls.Server;
  private conns = new Set<net.Socket>();

  constructor(private readonly log: Logger, private readonly handler: Handler) {}

  async listenUnix(path: string): Promise<void> {
    try { fs.unlinkSync(path); } catch { /* none */ }
    this.unixServer = net.createServer((s) => this.serve(s, { transport: 'unix' }));
    await new Promise<void>((r, j) => { this.unixServer!.once('error', j); this.unixServer!.listen(path, r); });
    fs.chmodSync(path, 0o600);
  }

  async listenTls(opts: { address: string; port: number; tlsDir: string; hostsAllow: string[] }): Promise<boolean> {
    if (!tlsPresent(opts.tlsDir)) {
      this.log.warn('no TLS certificates: the remote API and relocation server are off', { tlsDir: opts.tlsDir });
      return false;
    }
    const files = loadTls(opts.tlsDir);
    // rejectUnauthorized is false so that a refused peer gets a coded answer and its
    // identity is logged; `authorized` is still checked before anything is served.
    this.tlsServer = tls.createServer({ ca: files.ca, cert: files.cert, key: files.key, requestCert: true, rejectUnauthorized: false, minVersion: 'TLSv1.3' }, (s) => {
      const cert = s.getPeerCertificate();
      const cn = cert && typeof cert.subject === 'object' ? cert.subject?.CN : undefined;
      const peerName = Array.isArray(cn) ? cn[0] : cn;
      const peerAddress = s.remoteAddress;
      const refuse = (code: 'TLS_REFUSED' | 'PEER_NOT_ALLOWED', why: string): void => {
        this.log.warn('refused peer', { code, peerName: peerName ?? null, peerAddress, issuer: cert?.issuer?.CN ?? null, why });
        s.end(JSON.stringify({ id: 0, error: { code, message: why } }) + '\n');
        setTimeout(() => s.destroy(), 1000).unref();
      };
      if (!s.authorized) {
        const why = !cert || !cert.subject ? 'no client certificate' : `certificate of "${peerName}" rejected: ${s.authorizationError}`;
        refuse('TLS_REFUSED', `Host refuses the connection: ${why}`);
        return;
      }
      if (!hostsAllowMatch(opts.hostsAllow, peerName, peerAddress)) {
        refuse('PEER_NOT_ALLOWED', `Host refuses peer "${peerName}" (${peerAddress}): not matched by relocation.hostsAllow`);
        return;
      }
      this.serve(s, { transport: 'tls', peerName, peerAddress });
    });
    this.tlsServer.on('tlsClientError', (err, s) => {
      this.log.warn('refused peer', { code: 'TLS_REFUSED', peerAddress: s.remoteAddress ?? null, why: err.message });
    });
    await new Promise<void>((r, j) => { this.tlsServer!.once('error', j); this.tlsServer!.listen(opts.port, opts.address, r); });
    return true;
  }

  private serve(s: net.Socket, caller: Caller): void {
    this.conns.add(s);
    let raw = false;
    const closers: (() => void)[] = [];
    s.on('close', () => { this.conns.delete(s); for (const f of closers) f(); });
    s.on('error', () => s.destroy());
    const send = (obj: unknown): void => { if (!s.destroyed && !raw) s.write(JSON.stringify(obj) + '\n'); };
    const ctx: ConnContext = {
      caller, socket: s, send, onClose: (f) => closers.push(f),
      goRaw: () => { raw = true; s.removeListener('data', onData); },
    };
    const dispatch = (req: Request): void => {
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
