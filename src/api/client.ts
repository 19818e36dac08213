/**
 * API client: the CLI's (and the migration source's) way to talk to a ferryd, over
 * its unix socket or over mutually authenticated TLS.
 */
import fs from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import path from 'node:path';
import { EventEmitter } from 'node:events';
import { FerryError, isErrorCode } from '../errors.ts';
import { FrameSplitter } from '../util/fsx.ts';
import type { Action, EventMsg, Reply, Results } from './protocol.ts';

export type Target =
  | { kind: 'unix'; path: string; label: string }
  | { kind: 'tls'; host: string; port: number; tlsDir: string; label: string; servername?: string };

/** The longest reply line the client accepts (a digest list is the largest, well below). */
const MAX_REPLY_BYTES = 64 * 1024 * 1024;

function isTlsTrustError(e: Error): boolean {
  const code = String((e as NodeJS.ErrnoException).code ?? '');
  return /CERT|SELF_SIGNED|UNABLE_TO_VERIFY|ALTNAME|ERR_SSL|ERR_TLS/.test(code) || /certificate|alert/i.test(e.message);
}

export class ApiClient extends EventEmitter {
  private nextId = 1;
  private pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private closed = false;
  /** The server's coded refusal (an unsolicited error), kept for requests made after it closed. */
  private refusal?: FerryError;
  private splitter: FrameSplitter;
  /** After the reply to console.attach the stream is console frames, not lines. */
  private rawMode = false;
  private rawAfterId = -1;
  private rawRest: Buffer[] = [];

  private constructor(
    readonly socket: net.Socket,
    readonly target: Target,
  ) {
    super();
    this.splitter = new FrameSplitter(
      (line) => {
        this.onLine(line);
        return this.rawMode ? FrameSplitter.REST : 0;
      },
      () => undefined, // replies announce no raw bytes
      {
        maxLine: MAX_REPLY_BYTES,
        onOverflow: () => {
          this.shutdown(new FerryError('DAEMON_UNREACHABLE', `${this.target.label} sent a reply longer than ${MAX_REPLY_BYTES} bytes`));
          this.socket.destroy();
        },
        onRest: (rest) => this.rawRest.push(rest),
      },
    );
    socket.on('data', this.onData);
    socket.on('close', () => this.shutdown(new FerryError('DAEMON_UNREACHABLE', `Connection to ${target.label} closed`)));
    socket.on('error', (e) => this.shutdown(new FerryError('DAEMON_UNREACHABLE', `Connection to ${target.label} failed: ${e.message}`)));
  }

  // Once console.attach is answered, the rest of this read (and later ones) is the console's.
  private onData = (d: Buffer): void => this.splitter.push(d);

  static async connect(target: Target, timeoutMs = 5000, tlsFiles?: { ca: Buffer; cert: Buffer; key: Buffer } | null): Promise<ApiClient> {
    const sock = await new Promise<net.Socket>((resolve, reject) => {
      let s: net.Socket;
      const fail = (e: Error): void => {
        clearTimeout(t);
        s?.destroy();
        const code = (e as NodeJS.ErrnoException).code;
        if (target.kind === 'unix')
          reject(new FerryError('DAEMON_UNREACHABLE', `Cannot reach ferryd at ${target.path} (${code ?? e.message}): is it running?`));
        else if (e instanceof FerryError) reject(e);
        else if (isTlsTrustError(e))
          reject(
            new FerryError(
              'TLS_REFUSED',
              `ferryd at ${target.host}:${target.port} is not trusted: ${e.message} (${code}); its certificate must come from the cluster CA in ${target.tlsDir}`,
            ),
          );
        else reject(new FerryError('DAEMON_UNREACHABLE', `Cannot reach ferryd at ${target.host}:${target.port} (${code ?? e.message})`));
      };
      const t = setTimeout(() => fail(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
      if (target.kind === 'unix') {
        s = net.createConnection({ path: target.path });
        s.once('connect', () => {
          clearTimeout(t);
          resolve(s);
        });
      } else {
        let files = tlsFiles;
        if (files === undefined) {
          const rd = (n: string): Buffer => {
            const p = path.join(target.tlsDir, n);
            if (!fs.existsSync(p))
              throw new FerryError('TLS_MISSING', `TLS file ${p} is missing; remote hosts need a certificate (ferry host cert)`);
            return fs.readFileSync(p);
          };
          try {
            files = { ca: rd('ca-cert.pem'), cert: rd('client-cert.pem'), key: rd('client-key.pem') };
          } catch (e) {
            clearTimeout(t);
            reject(e);
            return;
          }
        }
        const opts: tls.ConnectionOptions = {
          host: target.host,
          port: target.port,
          minVersion: 'TLSv1.3',
          ...(files ? { ca: files.ca, cert: files.cert, key: files.key } : { rejectUnauthorized: false }),
        };
        // Certificates name hosts by CN/SAN; an address target is checked against IP SANs.
        if (files) opts.checkServerIdentity = (hostname, cert) => tls.checkServerIdentity(target.servername ?? hostname, cert);
        s = tls.connect(opts);
        s.once('secureConnect', () => {
          clearTimeout(t);
          resolve(s);
        });
      }
      s.once('error', fail);
    });
    return new ApiClient(sock, target);
  }

  private onLine(line: string): void {
    if (!line.trim()) return;
    let parsed: unknown;
    try {
      parsed = JSON.parse(line);
    } catch {
      return;
    }
    if (typeof parsed !== 'object' || parsed === null) return;
    const msg = parsed as Partial<Reply> & { event?: unknown };
    if (msg.event) {
      this.emit('event', msg as EventMsg);
      return;
    }
    const p = typeof msg.id === 'number' ? this.pending.get(msg.id) : undefined;
    if (!p || typeof msg.id !== 'number') {
      // An unsolicited error (id 0/null): the server refused us before any request. A
      // request made later (a caller that measures before its first ask) gets it too.
      if (msg.error) {
        this.refusal ??= toError(msg.error);
        this.shutdown(this.refusal);
      }
      return;
    }
    this.pending.delete(msg.id);
    if (msg.id === this.rawAfterId && !msg.error) this.rawMode = true;
    if (msg.error) p.reject(toError(msg.error));
    else p.resolve(msg.result);
  }

  /** `attachment`: raw bytes sent right after the request line (BINARY_ACTIONS). */
  request<A extends Action>(action: A, params: Record<string, unknown> = {}, timeoutMs = 0, attachment?: Buffer): Promise<Results[A]> {
    type T = Results[A];
    if (this.closed)
      return Promise.reject(this.refusal ?? new FerryError('DAEMON_UNREACHABLE', `Connection to ${this.target.label} is closed`));
    const id = this.nextId++;
    if (action === 'console.attach') this.rawAfterId = id;
    return new Promise<T>((resolve, reject) => {
      let t: NodeJS.Timeout | undefined;
      if (timeoutMs > 0)
        t = setTimeout(() => {
          this.pending.delete(id);
          reject(new FerryError('TIMEOUT', `${action} on ${this.target.label}: no answer within ${timeoutMs} ms`));
        }, timeoutMs);
      this.pending.set(id, {
        resolve: (v) => {
          if (t) clearTimeout(t);
          resolve(v as T);
        },
        reject: (e) => {
          if (t) clearTimeout(t);
          reject(e);
        },
      });
      this.socket.write(JSON.stringify({ id, action, params }) + '\n');
      if (attachment) this.socket.write(attachment);
    });
  }

  /** The CN of the certificate a TLS peer proved it holds (undefined on a unix socket). */
  peerName(): string | undefined {
    if (!(this.socket instanceof tls.TLSSocket)) return undefined;
    const cn = this.socket.getPeerCertificate()?.subject?.CN;
    return (Array.isArray(cn) ? cn[0] : cn) || undefined;
  }

  /** After `console.attach` answered: stop reading lines; returns the console bytes already read. */
  goRaw(): Buffer {
    this.rawMode = true;
    this.socket.removeListener('data', this.onData);
    const rest = Buffer.concat(this.rawRest);
    this.rawRest = [];
    return rest;
  }

  private shutdown(err: Error): void {
    if (this.closed) return;
    this.closed = true;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    this.emit('close', err);
  }

  /** Closes from this side: a request still waiting fails (it would otherwise never settle). */
  close(): void {
    if (!this.closed) {
      this.closed = true;
      for (const p of this.pending.values())
        p.reject(new FerryError('DAEMON_UNREACHABLE', `Connection to ${this.target.label} closed by this side`));
      this.pending.clear();
    }
    this.socket.destroy();
  }
}

export function toError(e: { code?: unknown; message?: unknown; details?: unknown }): FerryError {
  const code = isErrorCode(e.code) ? e.code : 'INTERNAL';
  return new FerryError(code, String(e.message ?? e.code), e.details as Record<string, unknown> | undefined);
}

/** One request on a fresh connection. */
export async function call<A extends Action>(
  target: Target,
  action: A,
  params: Record<string, unknown> = {},
  timeoutMs = 0,
): Promise<Results[A]> {
  const c = await ApiClient.connect(target);
  try {
    return await c.request(action, params, timeoutMs);
  } finally {
    c.close();
  }
}
