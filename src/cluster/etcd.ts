/**
 * ferryd's connection to etcd: mutual TLS with the host's own certificate (issued by
 * `ferry ca`), a short deadline on every unary call, and one mapping of etcd's and
 * gRPC's failures onto ferry's codes. Nothing in cluster mode talks to etcd otherwise.
 *
 * Every read here is linearizable (etcd's default), so a member cut off from its
 * quorum answers nothing rather than something stale: to ferry, that is
 * CLUSTER_NO_QUORUM, and nothing new starts or moves on such an answer.
 */
import fs from 'node:fs';
import path from 'node:path';
import { Etcd3, isRecoverableError, type IOptions, type Namespace } from 'etcd3';
import { ConsecutiveBreaker, ExponentialBackoff, circuitBreaker, handleWhen, retry, type IBackoff } from 'cockatiel';
import { FerryError, asFerryError } from '../errors.ts';

/** A unary call's budget: long enough for a leader's round trip under load, short enough to fence on time. */
export const CALL_DEADLINE_MS = 2500;

export interface EtcdEndpoint {
  endpoints: string[];
  /** Holds ca-cert.pem, client-cert.pem and client-key.pem. */
  tlsDir: string;
}

/** A value read from etcd with the revision that last changed it (the compare-and-swap token). */
export interface Versioned<T> {
  key: string;
  value: T;
  modRevision: string;
}

function readTls(dir: string): NonNullable<IOptions['credentials']> {
  const f = (n: string): Buffer => {
    const p = path.join(dir, n);
    try {
      return fs.readFileSync(p);
    } catch {
      throw new FerryError('TLS_MISSING', `Cluster mode needs ${p} to reach etcd (issue this host a certificate with \`ferry host cert\`)`);
    }
  };
  return { rootCertificate: f('ca-cert.pem'), certChain: f('client-cert.pem'), privateKey: f('client-key.pem') };
}

/** Says what an etcd failure means to an operator; TLS trouble is told apart from a missing quorum. */
export function clusterError(what: string, e: unknown): FerryError {
  if (e instanceof FerryError) return e;
  const msg = e instanceof Error ? e.message : String(e);
  if (/certificate|handshake|SSL|TLS|self.signed|unknown ca|bad cert/i.test(msg))
    return new FerryError(
      'TLS_REFUSED',
      `etcd refused this host's certificate, or showed one this host does not trust, during ${what}: ${msg}. Both must come from the cluster's CA (\`ferry ca\`)`,
    );
  if (e instanceof Error && (isRecoverableError(e) || /deadline|unavailable|timed out|no leader|connect|ECONNREFUSED/i.test(msg)))
    return new FerryError(
      'CLUSTER_NO_QUORUM',
      `etcd did not answer ${what} with a quorum (${msg}): check that most etcd members run and this host reaches them (\`ferry cluster status\`)`,
    );
  const fe = asFerryError(e);
  return fe.code === 'INTERNAL' ? new FerryError('CLUSTER_NO_QUORUM', `etcd failed ${what}: ${msg}`) : fe;
}

/** How often a client pings its member (a connection to a member cut off is dropped within 2 such periods); etcd must allow it (etcdconf.ts). */
export const KEEPALIVE_MS = 2000;

/** One client per ferryd (or per CLI call): every call mutual TLS, each unary call bounded by CALL_DEADLINE_MS. */
export function connectEtcd(ep: EtcdEndpoint): Etcd3 {
  return new Etcd3({
    hosts: ep.endpoints,
    credentials: readTls(ep.tlsDir),
    // Streams (watches, keep-alives) live on; a unary call that outlives this is no answer.
    defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + CALL_DEADLINE_MS }),
    faultHandling: {
      // One retry on another member, never a long backoff: ferry's callers retry on their own schedule.
      global: retry(handleWhen(isRecoverableError), { maxAttempts: 1 }),
      // A member that failed three times running is skipped for a second only (etcd3's default is
      // 5 s, and after a partition heals every member's breaker would be open at once).
      host: () => circuitBreaker(handleWhen(isRecoverableError), { halfOpenAfter: 1000, breaker: new ConsecutiveBreaker(3) }),
      // A watch broken by a partition comes back within a second of the link (default: backoff up to 30 s).
      // etcd3 types this as a backoff but calls next() on it, as on its own default, a factory like this one.
      watchBackoff: new ExponentialBackoff({ initialDelay: 200, maxDelay: 1000 }) as unknown as IBackoff<unknown>,
    },
    grpcOptions: { 'grpc.keepalive_time_ms': KEEPALIVE_MS, 'grpc.keepalive_timeout_ms': 2000 },
  });
}

/** A leader election in flux: the same call a moment later usually lands. */
const TRANSIENT = /leader changed|no leader|not capable|too many requests/i;

/**
 * Runs one etcd call, its failure mapped by clusterError. Retried twice, 250 ms apart,
 * while etcd is changing leaders: a read is harmless to repeat, and every write ferry
 * makes is a compare-and-swap, which fails rather than applies twice.
 */
export async function etcdCall<T>(what: string, f: () => Promise<T>): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await f();
    } catch (e) {
      if (attempt < 2 && TRANSIENT.test(String((e as Error)?.message))) {
        await new Promise((r) => setTimeout(r, 250));
        continue;
      }
      throw clusterError(what, e);
    }
  }
}

/** A key's JSON value and revision; null when the key does not exist. `parse` checks the shape. */
export async function getJson<T>(kv: Namespace, key: string, parse: (v: unknown, key: string) => T): Promise<Versioned<T> | null> {
  const r = await etcdCall(`reading ${key}`, () => kv.get(key).exec());
  const kvs = r.kvs[0];
  if (!kvs) return null;
  return { key, value: parse(jsonOf(kvs.value, key), key), modRevision: kvs.mod_revision };
}

/** Every key under a prefix, parsed; a value that does not parse is reported through onBad and skipped. */
export async function listJson<T>(
  kv: Namespace,
  prefix: string,
  parse: (v: unknown, key: string) => T,
  onBad?: (key: string, e: FerryError) => void,
): Promise<Versioned<T>[]> {
  return (await listJsonAt(kv, prefix, parse, onBad)).items;
}

/** listJson, and the revision etcd read them at (a watch that follows the list starts after it). */
export async function listJsonAt<T>(
  kv: Namespace,
  prefix: string,
  parse: (v: unknown, key: string) => T,
  onBad?: (key: string, e: FerryError) => void,
): Promise<{ items: Versioned<T>[]; revision: string }> {
  const r = await etcdCall(`listing ${prefix}`, () => kv.getAll().prefix(prefix).exec());
  const items: Versioned<T>[] = [];
  for (const x of r.kvs) {
    const key = x.key.toString();
    try {
      items.push({ key, value: parse(jsonOf(x.value, key), key), modRevision: x.mod_revision });
    } catch (e) {
      onBad?.(key, asFerryError(e));
    }
  }
  return { items, revision: r.header.revision };
}

export function jsonOf(v: Buffer, key: string): unknown {
  try {
    return JSON.parse(v.toString('utf8'));
  } catch {
    throw new FerryError('CLUSTER_BAD_RECORD', `etcd key ${key} does not hold JSON`);
  }
}

/**
 * Compare-and-swap: writes `value` at key only if the key's revision is still
 * `expect` ('0' or 0: only if the key does not exist). True if written. The revision
 * compared is the fencing token: a writer that read an older one loses.
 */
export async function casJson(kv: Namespace, key: string, expect: string | number, value: unknown): Promise<string | null> {
  const put = kv.put(key).value(JSON.stringify(value));
  const cmp = String(expect) === '0' ? kv.if(key, 'Create', '==', 0) : kv.if(key, 'Mod', '==', String(expect));
  const r = await etcdCall(`writing ${key}`, () => cmp.then(put).commit());
  return r.succeeded ? r.header.revision : null;
}

/** Deletes key only if its revision is still `expect`. */
export async function casDelete(kv: Namespace, key: string, expect: string): Promise<boolean> {
  const r = await etcdCall(`deleting ${key}`, () => kv.if(key, 'Mod', '==', expect).then(kv.delete().key(key)).commit());
  return r.succeeded;
}
