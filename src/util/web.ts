/**
 * What ferry's small web servers (the dashboard, cli/ui.ts; the metrics, daemon/metrics.ts)
 * share: which addresses count as loopback, and their bounds.
 */
import type http from 'node:http';
import type https from 'node:https';

/** 127.0.0.0/8, ::1 and localhost: the host's own processes only. */
export function isLoopback(address: string): boolean {
  return address === 'localhost' || address === '::1' || address.startsWith('127.');
}

/** Milliseconds a TLS client has to finish its handshake (https.createServer's handshakeTimeout). */
export const WEB_HANDSHAKE_MS = 5000;

/**
 * At most `maxConnections`, 5 s for a request's headers and 10 s for all of it; with TLS,
 * a handshake that failed or stalled is dropped (Node leaves the socket open once anyone
 * listens for tlsClientError, as its own http layer does).
 */
export function boundWebServer(server: http.Server | https.Server, maxConnections: number): void {
  server.maxConnections = maxConnections;
  server.headersTimeout = 5000;
  server.requestTimeout = 10000;
  if ('addContext' in server) server.on('tlsClientError', (_e, sock) => sock.destroy());
}
