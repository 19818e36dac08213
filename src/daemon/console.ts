/**
 * A domain's serial console, multiplexed. ferryd holds the one connection QEMU's
 * chardev socket allows, keeps a ring of recent output and a log file, and fans the
 * bytes out to every attached client; what clients type goes to the guest.
 */
import fs from 'node:fs';
import type net from 'node:net';
import { connectUnix } from '../qemu/process.ts';
import { consoleDataFrames, consoleFrame, CONSOLE_CONTROL } from '../api/protocol.ts';

/** A client this far behind the guest's output is dropped instead of buffered without end. */
const CLIENT_BACKLOG_MAX = 1024 * 1024;

const RING_BYTES = 64 * 1024;
const LOG_MAX_BYTES = 4 * 1024 * 1024;

export class ConsoleMux {
  private sock?: net.Socket;
  private ring: Buffer = Buffer.alloc(0);
  private clients = new Set<net.Socket>();
  private logFd?: number;
  private logBytes = 0;
  private closed = false;

  constructor(
    private readonly path: string,
    private readonly logPath: string,
  ) {}

  async connect(timeoutMs = 5000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        this.sock = await connectUnix(this.path, 1000);
        break;
      } catch (e) {
        if (Date.now() > deadline || this.closed) throw e;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    try {
      this.logBytes = fs.statSync(this.logPath).size;
    } catch {
      this.logBytes = 0;
    }
    this.logFd = fs.openSync(this.logPath, 'a', 0o600);
    this.sock.on('data', (d: Buffer) => this.onOutput(d));
    this.sock.on('error', () => {
      /* QEMU went away; the domain's QMP close handles it */
    });
    this.sock.on('close', () => this.close());
  }

  private onOutput(d: Buffer): void {
    this.ring = Buffer.concat([this.ring, d]);
    if (this.ring.length > RING_BYTES) this.ring = this.ring.subarray(this.ring.length - RING_BYTES);
    if (this.logFd !== undefined) {
      if (this.logBytes > LOG_MAX_BYTES) {
        fs.ftruncateSync(this.logFd, 0);
        this.logBytes = 0;
      }
      try {
        fs.writeSync(this.logFd, d);
        this.logBytes += d.length;
      } catch {
        /* disk full: the ring buffer still serves clients; the file misses this chunk */
      }
    }
    if (this.clients.size === 0) return;
    const f = consoleDataFrames(d);
    for (const c of this.clients) {
      if (c.writableLength > CLIENT_BACKLOG_MAX) {
        this.clients.delete(c);
        c.destroy();
        continue;
      }
      c.write(f);
    }
  }

  /** Attaches a client: replays up to `replay` recent bytes, then streams both ways. */
  attach(client: net.Socket, replay = 0): void {
    if (replay > 0 && this.ring.length > 0) client.write(consoleDataFrames(this.ring.subarray(Math.max(0, this.ring.length - replay))));
    this.clients.add(client);
    client.on('data', (d: Buffer) => {
      if (this.sock && !this.sock.destroyed) this.sock.write(d);
    });
    const drop = (): void => {
      this.clients.delete(client);
    };
    client.on('close', drop);
    client.on('error', drop);
  }

  /** Detaches every client, sending each a last control frame first (e.g. moved to host2). */
  detachAll(final?: Record<string, unknown>): void {
    const f = final ? consoleFrame(CONSOLE_CONTROL, Buffer.from(JSON.stringify(final))) : undefined;
    for (const c of this.clients) {
      if (f) c.end(f);
      else c.end();
    }
    this.clients.clear();
  }

  close(final?: Record<string, unknown>): void {
    if (this.closed) return;
    this.closed = true;
    this.detachAll(final);
    this.sock?.destroy();
    if (this.logFd !== undefined) {
      fs.closeSync(this.logFd);
      this.logFd = undefined;
    }
  }
}
