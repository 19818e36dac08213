/**
 * Which ferryd a command talks to (-H): the local socket, a lab host's socket, or a
 * remote host over mutually authenticated TLS with the operator's certificate.
 */
import fs from 'node:fs';
import path from 'node:path';
import { FerryError } from '../errors.ts';
import type { Target } from '../api/client.ts';
import { DEFAULT_RELOCATION_PORT, DEFAULT_CONFIG_PATH } from '../api/protocol.ts';
import { labHosts } from '../lab/hosts.ts';

function defaultSocket(): string {
  if (process.env.FERRY_SOCKET) return process.env.FERRY_SOCKET;
  try {
    const c = JSON.parse(fs.readFileSync(DEFAULT_CONFIG_PATH, 'utf8'));
    if (c.apiSocket) return c.apiSocket;
    if (c.stateDir) return path.join(c.stateDir, 'ferryd.sock');
  } catch {
    /* no config */
  }
  return '/var/lib/ferry/ferryd.sock';
}

/**
 * The certificate the CLI presents to a remote ferryd: FERRY_TLS_DIR, else an admin
 * certificate in /etc/ferry/admin-tls, else the host's own (which a remote ferryd
 * admits as a peer only: relocation, no management).
 */
export function defaultTlsDir(): string {
  if (process.env.FERRY_TLS_DIR) return process.env.FERRY_TLS_DIR;
  return fs.existsSync('/etc/ferry/admin-tls/client-cert.pem') ? '/etc/ferry/admin-tls' : '/etc/ferry/tls';
}

/**
 * -H resolution: nothing → the local socket; a lab host name → that host's socket;
 * otherwise NAME|ADDRESS[:PORT] over TLS.
 */
export function resolveTarget(h: string | undefined): Target {
  if (!h) return { kind: 'unix', path: defaultSocket(), label: 'local ferryd' };
  if (h.startsWith('/')) return { kind: 'unix', path: h, label: h };
  // Lab host NAMES are shortcuts to their local sockets; an address always means TLS,
  // with the caller's certificate and role, as on real hosts.
  const lab = labHosts().find((x) => x.name === h);
  if (lab) return { kind: 'unix', path: lab.apiSocket, label: lab.name };
  const m = /^(\[[^\]]+\]|[^:]+)(?::(\d+))?$/.exec(h);
  if (!m) throw new FerryError('HOST_UNKNOWN', `Cannot parse host "${h}": use NAME, ADDRESS or ADDRESS:PORT`);
  const port = m[2] ? Number(m[2]) : DEFAULT_RELOCATION_PORT;
  if (!(port > 0 && port < 65536)) throw new FerryError('HOST_UNKNOWN', `Bad port in "${h}"`);
  return { kind: 'tls', host: m[1].replace(/^\[|\]$/g, ''), port, tlsDir: defaultTlsDir(), label: h };
}
