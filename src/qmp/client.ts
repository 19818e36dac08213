/**
 * QMP wire client. Knows only the QEMU Machine Protocol: the greeting, capability
 * negotiation, commands matched to replies by id, asynchronous events, and close.
 *
 *   client                         QEMU
 *     | <------ {"QMP": {...}} ------ |   greeting
 *     | --- qmp_capabilities (id) --> |
 *     | <------ {"return": {}} ------ |
 *     | --- {"execute", id} --------> |
 *     | <-- {"event": ...} ---------- |   events may interleave with replies
 *     | <-- {"return"|"error", id} -- |
 *
 * QEMU writes one JSON object per line. Nothing here knows about domains.
 */
import net from 'node:net';
import { EventEmitter } from 'node:events';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly qmpClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command} failed: ${qmpClass}: ${desc}`);
    this.name = 'QmpError';
  }
}

export class QmpClosedError extends Error {
  constructor(readonly command?: string) {
    super(command ? `QMP connection closed before ${command} completed` : 'QMP connection closed');
    this.name = 'QmpClosedError';
  }
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

/** Maximum size of one QMP line we accept; QEMU's replies are far below this. */
const MAX_LINE = 16 * 1024 * 1024;

export class QmpClient extends EventEmitter {
  private sock: net.Socket;
  private buf = '';
  private nextId = 1;
  private pending = new Map<string, Pending>();
  private greetingWaiter?: { resolve: (g: unknown) => void; reject: (e: Error) => void };
  private _closed = false;
  greeting?: unknown;

  private constructor(sock: net.Socket) {
    super();
    this.sock = sock;
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => this.onData(d));
    sock.on('error', () => this.shutdown());
    sock.on('close', () => this.shutdown());
  }

  get closed(): boolean {
    return this._closed;
  }

  /** The connected socket (to check who holds its other end). */
  get socket(): net.Socket {
    return this.sock;
  }

  /** Connects, waits for the greeting and negotiates capabilities. */
  static async connect(path: string, timeoutMs = 5000): Promise<QmpClient> {
    const sock = net.createConnection({ path });
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => {
        sock.destroy();
        reject(new Error(`QMP connect to ${path} timed out`));
      }, timeoutMs);
      sock.once('connect', () => {
        clearTimeout(t);
        resolve();
      });
      sock.once('error', (e) => {
        clearTimeout(t);
        reject(e);
      });
    });
    const c = new QmpClient(sock);
    const greeting = new Promise((resolve, reject) => {
      c.greetingWaiter = { resolve, reject };
    });
    const t = setTimeout(() => c.close(), timeoutMs);
    try {
      c.greeting = await greeting;
      await c.execute('qmp_capabilities');
    } finally {
      clearTimeout(t);
    }
    return c;
  }

  private onData(d: string): void {
    this.buf += d;
    if (this.buf.length > MAX_LINE && !this.buf.includes('\n')) {
      this.sock.destroy(new Error('QMP line too long'));
      return;
    }
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (!line) continue;
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(line);
      } catch {
        this.emit('protocol-error', line);
        continue;
      }
      this.dispatch(msg);
    }
  }

  private dispatch(msg: Record<string, unknown>): void {
    if ('QMP' in msg) {
      this.greetingWaiter?.resolve(msg.QMP);
      this.greetingWaiter = undefined;
      return;
    }
    if ('event' in msg) {
      this.emit('event', msg as unknown as QmpEvent);
      return;
    }
    const id = msg.id === undefined ? undefined : String(msg.id);
    const p = id === undefined ? undefined : this.pending.get(id);
    if (!p || id === undefined) {
      this.emit('protocol-error', JSON.stringify(msg));
      return;
    }
    this.pending.delete(id);
    if ('error' in msg) {
      const err = msg.error as { class?: string; desc?: string };
      p.reject(new QmpError(p.command, String(err?.class ?? 'GenericError'), String(err?.desc ?? 'unknown error')));
    } else {
      p.resolve(msg.return);
    }
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this._closed) return Promise.reject(new QmpClosedError(command));
    const id = String(this.nextId++);
    const msg: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) msg.arguments = args;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject });
      this.sock.write(JSON.stringify(msg) + '\n');
    });
  }

  /** Resolves with the first event named `name` (and matching `pred`), or rejects on close/timeout. */
  waitEvent(name: string, timeoutMs: number, pred: (e: QmpEvent) => boolean = () => true): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const onEvent = (e: QmpEvent): void => {
        if (e.event === name && pred(e)) {
          cleanup();
          resolve(e);
        }
      };
      const onClose = (): void => {
        cleanup();
        reject(new QmpClosedError(`event ${name}`));
      };
      const t = setTimeout(() => {
        cleanup();
        reject(new Error(`timed out waiting for QMP event ${name}`));
      }, timeoutMs);
      const cleanup = (): void => {
        clearTimeout(t);
        this.off('event', onEvent);
        this.off('close', onClose);
      };
      this.on('event', onEvent);
      this.once('close', onClose);
    });
  }

  private shutdown(): void {
    if (this._closed) return;
    this._closed = true;
    this.greetingWaiter?.reject(new QmpClosedError('greeting'));
    for (const p of this.pending.values()) p.reject(new QmpClosedError(p.command));
    this.pending.clear();
    this.emit('close');
  }

  close(): void {
    this.sock.destroy();
    this.shutdown();
  }
}
