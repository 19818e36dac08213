/**
 * The data port of a plain-TCP (--insecure) incoming migration. QEMU's own listener
 * would hand the first connection from anyone to its vmstate loader, so QEMU listens
 * on a unix socket in its run directory instead, and ferryd holds the TCP port:
 *
 *   source QEMU ──tcp──> gate (ferryd, data port) ──unix──> incoming QEMU
 *   anyone else ──tcp──> gate: closed at once, logged, never reaches QEMU
 *
 * The gate accepts only the source host's address, and only as many connections as the
 * migration has channels; then it stops listening. (A TLS migration needs no gate:
 * QEMU's tls-authz admits only the source host's certificate, and a failed handshake
 * costs the migration nothing.)
 */
import net from 'node:net';

export interface GateLog {
  warn(msg: string, f?: Record<string, unknown>): void;
}

export class DataGate {
  private server?: net.Server;
  private accepted = 0;
  private readonly sockets = new Set<net.Socket>();
  refused = 0;

  constructor(private readonly o: { address: string; port: number; allowFrom: string; target: string; channels: number; log: GateLog }) {}

  async open(): Promise<void> {
    const srv = net.createServer((s) => this.onConnection(s));
    this.server = srv;
    await new Promise<void>((resolve, reject) => {
      srv.once('error', reject);
      srv.listen(this.o.port, this.o.address, () => resolve());
    });
  }

  private onConnection(s: net.Socket): void {
    const from = (s.remoteAddress ?? '').replace(/^::ffff:/, '');
    if (from !== this.o.allowFrom || this.accepted >= this.o.channels) {
      this.refused++;
      if (this.refused <= 10)
        this.o.log.warn('data port: refused a connection that is not the source', { from, port: this.o.port, expected: this.o.allowFrom });
      s.destroy();
      return;
    }
    this.accepted++;
    // One-shot: once every channel is in, nobody else can connect.
    if (this.accepted >= this.o.channels) this.server?.close();
    const up = net.createConnection({ path: this.o.target });
    for (const x of [s, up]) {
      this.sockets.add(x);
      x.on('close', () => this.sockets.delete(x));
      x.on('error', () => {
        s.destroy();
        up.destroy();
      });
    }
    s.pipe(up);
    up.pipe(s);
  }

  /** Stops listening and cuts every relayed connection. */
  close(): void {
    this.server?.close();
    for (const x of this.sockets) x.destroy();
  }
}
