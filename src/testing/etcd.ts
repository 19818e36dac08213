/**
 * A real, single-member etcd on loopback for the cluster/ unit tests: its own CA and
 * certificates (mutual TLS, as in production), free ports, a temporary data directory.
 * No root needed. `stop()` ends it and removes everything.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Etcd3 } from 'etcd3';
import { caInit, issueHostCert } from '../tls/ca.ts';
import { etcdEnv, clientUrl } from '../cluster/etcdconf.ts';
import { connectEtcd } from '../cluster/etcd.ts';

export interface TestEtcd {
  dir: string;
  endpoint: string;
  proc: ChildProcess;
  /** A client with host certificate NAME from the test CA (issued on first use). */
  client(name?: string): Etcd3;
  tlsDirOf(name: string): string;
  stop(): Promise<void>;
}

export function etcdAvailable(): boolean {
  return (process.env.PATH ?? '/usr/bin:/bin').split(':').some((d) => fs.existsSync(path.join(d, 'etcd')));
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
}

export async function startTestEtcd(): Promise<TestEtcd> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-etcd-'));
  const caDir = path.join(dir, 'ca');
  caInit(caDir, { name: 'test CA' });
  const tls = (name: string): string => {
    const d = path.join(dir, `tls-${name}`);
    if (!fs.existsSync(d)) issueHostCert(name, { caDir, outDir: d, ips: ['127.0.0.1'] });
    return d;
  };
  const [clientPort, peerPort] = [await freePort(), await freePort()];
  const env = etcdEnv({
    me: { name: 'etcd1', address: '127.0.0.1' },
    members: [{ name: 'etcd1', address: '127.0.0.1' }],
    dataDir: path.join(dir, 'data'),
    tlsDir: tls('etcd1'),
    token: 'ferry-test',
    state: 'new',
    clientPort,
    peerPort,
  });
  const out = fs.openSync(path.join(dir, 'etcd.out'), 'a');
  const proc = spawn('etcd', [], { env: { PATH: process.env.PATH, ...env }, stdio: ['ignore', out, out] });
  fs.closeSync(out);
  const endpoint = clientUrl('127.0.0.1', clientPort);
  const clients: Etcd3[] = [];
  const client = (name = 'hostA'): Etcd3 => {
    const c = connectEtcd({ endpoints: [endpoint], tlsDir: tls(name) });
    clients.push(c);
    return c;
  };
  const probe = client('probe');
  const deadline = Date.now() + 20000;
  for (;;) {
    try {
      await probe.get('/probe').string();
      break;
    } catch (e) {
      if (Date.now() > deadline)
        throw new Error(`test etcd did not start: ${String(e)}\n${fs.readFileSync(path.join(dir, 'etcd.out'), 'utf8').slice(-2000)}`, {
          cause: e,
        });
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return {
    dir,
    endpoint,
    proc,
    client,
    tlsDirOf: tls,
    stop: async () => {
      for (const c of clients) c.close();
      if (proc.exitCode === null) {
        proc.kill('SIGCONT');
        proc.kill('SIGKILL');
        await new Promise((r) => proc.once('exit', r));
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
