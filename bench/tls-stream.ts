/**
 * The migration stream alone: a stopped 512 MiB pattern guest (every page non-zero)
 * sent between two QEMUs on loopback, plain TCP against QEMU's TLS with several
 * gnutls priorities and with multifd, and against a plain QEMU stream carried over
 * Node TLS by two relay processes (what a ferryd relay would cost). Answers "why is TLS slower, and what helps".
 * The destination preallocates its RAM, as ferry's offline migrations do, so that its
 * page faults do not hide the stream's own speed.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { caInit, issueHostCert } from '../src/tls/ca.ts';
import { execFileSync, fork, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { startQemu, killAndWait } from '../src/qemu/process.ts';

const RELAY = fileURLToPath(new URL('./tls-relay.mjs', import.meta.url));

let d = '';
function certs(): void {
  if (d) return;
  d = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-tls-bench-'));
  caInit(d + '/ca', { force: true });
  issueHostCert('hostA', { caDir: d + '/ca', outDir: d + '/a', ips: ['127.0.0.1'] });
  issueHostCert('hostB', { caDir: d + '/ca', outDir: d + '/b', ips: ['127.0.0.1'] });
}
const base = (img: string): string[] => [
  '-machine',
  'pc,accel=tcg',
  '-cpu',
  'qemu64',
  '-m',
  '512',
  '-nodefaults',
  '-display',
  'none',
  '-drive',
  `file=${img},format=raw,if=floppy,readonly=on`,
  '-S',
];
async function run(img: string, kind: 'plain' | 'tls' | 'relay', prio?: string, multifd = 0): Promise<number> {
  const src = await startQemu([...base(img), '-qmp', `unix:${d}/s.qmp,server=on,wait=off`], {
    qmpPath: d + '/s.qmp',
    logPath: d + '/s.log',
    what: 's',
  });
  const dst = await startQemu([...base(img), '-mem-prealloc', '-qmp', `unix:${d}/d.qmp,server=on,wait=off`, '-incoming', 'defer'], {
    qmpPath: d + '/d.qmp',
    logPath: d + '/d.log',
    what: 'd',
  });
  const relays: ChildProcess[] = [];
  try {
    await src.qmp.execute('cont');
    await new Promise((r) => setTimeout(r, 2500)); // pattern zeroes and counts over all 512 MiB
    await src.qmp.execute('stop');
    const tls = kind === 'tls';
    for (const [q, ep, dir] of [
      [dst, 'server', 'b'],
      [src, 'client', 'a'],
    ] as const) {
      if (multifd) {
        await q.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] });
        await q.qmp.execute('migrate-set-parameters', { 'multifd-channels': multifd });
      }
      if (tls) {
        await q.qmp.execute('object-add', {
          'qom-type': 'tls-creds-x509',
          id: 'tls0',
          dir: `${d}/${dir}`,
          endpoint: ep,
          'verify-peer': true,
          ...(prio ? { priority: prio } : {}),
        });
        await q.qmp.execute('migrate-set-parameters', { 'tls-creds': 'tls0', ...(ep === 'client' ? { 'tls-hostname': 'hostB' } : {}) });
      }
    }
    let out = 'tcp:127.0.0.1:49198';
    if (kind === 'relay') {
      // QEMU plain into a unix socket on each side; the relays carry it over TLS.
      await dst.qmp.execute('migrate-incoming', { uri: `unix:${d}/dst.sock` });
      for (const [side, dir, sock] of [
        ['dst', 'b', 'dst.sock'],
        ['src', 'a', 'src.sock'],
      ]) {
        const k = fork(RELAY, [side, `${d}/${dir}`, `${d}/${sock}`, '49198'], { stdio: 'ignore' });
        relays.push(k);
        await new Promise((r, j) => {
          k.once('message', r);
          k.once('exit', () => j(new Error('relay exited')));
        });
      }
      out = `unix:${d}/src.sock`;
    } else {
      await dst.qmp.execute('migrate-incoming', { uri: out });
    }
    await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 100 * 1024 ** 3 });
    await src.qmp.execute('migrate', { uri: out });
    let m: any;
    for (;;) {
      m = await src.qmp.execute('query-migrate');
      if (m.status !== 'active' && m.status !== 'setup' && m.status !== 'device') break;
      await new Promise((r) => setTimeout(r, 20));
    }
    for (let i = 0; i < 20 && !(m['total-time'] > 0); i++) {
      await new Promise((r) => setTimeout(r, 10));
      m = await src.qmp.execute('query-migrate');
    }
    if (m.status !== 'completed') {
      console.log(kind, m.status, m['error-desc']);
      return 0;
    }
    // The stream ends when the destination has it all (a relay may still hold bytes
    // when the source is done): add the time until then.
    const srcDone = Date.now();
    for (;;) {
      const x = await dst.qmp.execute<any>('query-migrate');
      if (x.status === 'completed') break;
      if (x.status === 'failed') return 0;
      await new Promise((r) => setTimeout(r, 2));
    }
    return (m.ram.transferred * 8) / 1e9 / ((m['total-time'] + Date.now() - srcDone) / 1000);
  } finally {
    for (const k of relays) k.kill();
    for (const q of [src, dst]) {
      q.qmp.close();
      await killAndWait(q.pid, 0);
    }
  }
}
export const TLS_CASES: [string, string | undefined, number][] = [
  ['plain', undefined, 0],
  ['tls-default', undefined, 0],
  ['tls-aes128gcm', 'NORMAL:-CIPHER-ALL:+AES-128-GCM', 0],
  ['tls-multifd2', undefined, 2],
  ['tls-multifd4', undefined, 4],
  ['plain-multifd2', undefined, 2],
  ['tls-ferryd-relay', undefined, 0],
];

/** Gbit/s per case, `reps` times each in alternating order. */
/** What bounds a secure stream on this machine, measured when the bench runs (not written into its text). */
export interface StreamFacts {
  cores: number;
  /** `openssl speed -evp aes-128-gcm` on 16 KiB blocks, one core; null without openssl. */
  aesGcmGbps: number | null;
  /** The kernel offers the `tls` TCP ULP (kernel TLS). */
  ktls: boolean;
  /** The kernel's drivers for AES and AES-GCM (/proc/crypto): hardware ones would name aesni or similar. */
  kernelAes: string[];
}

export function streamFacts(): StreamFacts {
  let aesGcmGbps: number | null = null;
  try {
    const out = execFileSync('openssl', ['speed', '-evp', 'aes-128-gcm', '-seconds', '2', '-bytes', '16384'], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
    });
    const m = /^AES-128-GCM\s+([\d.]+)k\s*$/m.exec(out);
    if (m) aesGcmGbps = +((Number(m[1]) * 1000 * 8) / 1e9).toFixed(1);
  } catch {
    /* no openssl */
  }
  const read = (f: string): string => {
    try {
      return fs.readFileSync(f, 'utf8');
    } catch {
      return '';
    }
  };
  const ktls = read('/proc/sys/net/ipv4/tcp_available_ulp').split(/\s+/).includes('tls');
  const kernelAes = [
    ...new Set(
      read('/proc/crypto')
        .split('\n\n')
        .filter((b) => /^name\s*: (aes|gcm\(aes\))$/m.test(b))
        .map((b) => /^driver\s*: (.+)$/m.exec(b)?.[1] ?? '?'),
    ),
  ];
  return { cores: os.cpus().length, aesGcmGbps, ktls, kernelAes };
}

export async function tlsStreamBench(
  img: string,
  reps: number,
  say: (m: string) => void = () => undefined,
): Promise<Record<string, number[]>> {
  certs();
  const res: Record<string, number[]> = {};
  try {
    for (let rep = 0; rep < reps; rep++)
      for (const [k, p, mf] of rep % 2 ? [...TLS_CASES].reverse() : TLS_CASES) {
        const gbps = await run(img, k.startsWith('plain') ? 'plain' : k === 'tls-ferryd-relay' ? 'relay' : 'tls', p, mf);
        (res[k] ??= []).push(+gbps.toFixed(2));
        say(`   stream ${k.padEnd(15)} ${gbps.toFixed(2)} Gbit/s`);
      }
  } finally {
    fs.rmSync(d, { recursive: true, force: true });
    d = '';
  }
  return res;
}
