/**
 * The relocation protocol's messages: what two ferryds tell each other, one module for
 * both ends (as libvirt's migration cookie is one format and one parse). The source
 * builds its Begin as `BeginInput` (so a field it forgets or misspells does not
 * compile); the destination reads it with `parseBegin`, which checks the version first,
 * then the shape (zod), then what depends on more than one field. Anything off is
 * MIGRATION_PROTOCOL and changes nothing; another version is MIGRATION_DEST_VERSION.
 * The other messages are small, and their schemas live in `RELOCATION_ACTIONS`, which
 * the API's one registry (schema.ts) takes in.
 *
 *   source ferryd                                  destination ferryd
 *     |-- relocation.begin  BeginInput ------------>|  parseBegin: version, shape, cross-checks
 *     |<------------------- {dataPort, tunnels, …} -|
 *     |-- relocation.prepare {jobId} -------------->|
 *     |-- relocation.digest {jobId, chunks?} ------>|  (--verify-memory)
 *     |-- relocation.repair {jobId, offset, length} + bytes
 *     |-- relocation.finish {jobId, running?} ----->|  the point of no return
 *     |-- relocation.confirm {jobId} -------------->|
 *     |   relocation.abandon / status / recover / tunnel, as needed
 */
import crypto from 'node:crypto';
import { z } from 'zod';
import { FerryError } from '../errors.ts';
import { parseDomainConfig, type DomainConfig } from '../domain/config.ts';
import { MAX_REPAIR_BYTES } from './limits.ts';
import { str, optStr, optBool, int, optNum, optCompress, params } from './shapes.ts';
import type { Compression } from './shapes.ts';

/**
 * Begin refuses any other version, so hosts that would disagree later (after the copy)
 * disagree before anything is reserved. 2: Digest answers per-chunk digests, and Repair.
 * 3: Begin carries the source's QEMU version and starts the incoming QEMU; no hello.
 * 4: Begin says whether the move may switch to post-copy (both QEMUs need the capability).
 * 5: Begin carries each NIC's home segment, and its answer the tunnels the destination
 *    opened (daemon/tunnels.ts); relocation.tunnel changes a home end.
 * 6: Begin says the multifd compression (the incoming QEMU needs it before the stream: a
 *    peer of 5 would ignore the field, Begin being a loose object, and fail in the stream);
 *    relocation.lost settles a post-copy stream that broke as it completed.
 */
export const PROTOCOL_VERSION = 6;

/**
 * The first check of a Begin, before its shape: a peer of another protocol version may
 * send another message altogether, and must hear "version", not "malformed".
 */
export function checkProtocolVersion(version: unknown, dstName = 'this host'): void {
  if (version !== PROTOCOL_VERSION)
    throw new FerryError(
      'MIGRATION_DEST_VERSION',
      `Cannot migrate: ${dstName} speaks relocation protocol ${PROTOCOL_VERSION}, the source ${typeof version === 'number' ? version : 'an unknown one'}; upgrade ferry on both hosts to the same version`,
    );
}

/** A NIC's VXLAN id, from the domain and the NIC: both ends agree without asking, and no peer can aim a tunnel at another domain's. */
export function vniFor(uuid: string, nic: number): number {
  const h = crypto.createHash('sha256').update(`${uuid}:${nic}`).digest();
  return (h.readUIntBE(0, 3) % 0xfffffe) + 1;
}

const IPV4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/;
export const isIpv4 = (s: unknown): s is string => typeof s === 'string' && IPV4.test(s) && s.split('.').every((x) => Number(x) <= 255);

// Field shapes, each with the words a refusal uses.
const short = z.string({ error: 'must be a short string' }).max(128, { error: 'must be a short string' });
const name = z
  .string({ error: 'must be a name' })
  .regex(/^[a-zA-Z0-9_.-]+$/, { error: 'must be a name' })
  .max(128, { error: 'must be a name' });
const ipv4 = z.string({ error: 'must be an IPv4 address' }).refine(isIpv4, { error: 'must be an IPv4 address' });
const bytes = z
  .number({ error: 'must be a byte count (at most 1 PiB)' })
  .int({ error: 'must be a byte count (at most 1 PiB)' })
  .min(0, { error: 'must be a byte count (at most 1 PiB)' })
  .max(2 ** 50, { error: 'must be a byte count (at most 1 PiB)' });
const format = z.enum(['raw', 'qcow2'], { error: 'must be raw or qcow2' });
const jobId = z.string({ error: 'must be a UUID' }).regex(/^[0-9a-f-]{36}$/, { error: 'must be a UUID' });

/** What the source tells the destination about itself. Unknown keys are kept (a newer source may say more). */
export const SourceFactsSchema = z.looseObject({
  name: short,
  version: short,
  qemuVersion: short,
  arch: short,
  accel: short,
  cpuModel: short,
  machine: short,
  cpuFeatures: z.array(z.string().max(255), { error: 'must be a list of names' }).max(512, { error: 'must be a list of names' }),
  networks: z
    .record(
      z.string().max(128),
      z.object({
        bridge: z.string({ error: 'needs a bridge' }),
        subnet: z.string({ error: 'needs a subnet' }),
        address: z.string().optional(),
      }),
      { error: 'must map network names to {bridge, subnet}' },
    )
    .refine((n) => Object.keys(n).length <= 64, { error: 'has more than 64 networks' }),
});
export type SourceFacts = z.infer<typeof SourceFactsSchema>;

/** Where a NIC's L2 segment lives: the source's own, or a tunnel's home (daemon/tunnels.ts). */
export const TunnelHomeSchema = z.object({
  host: short,
  address: ipv4,
  subnet: z.string().max(64),
  vni: z.number().int(),
  ip: ipv4.optional(),
});
export type TunnelHome = z.infer<typeof TunnelHomeSchema>;

/** --copy-storage: a writable disk the destination creates and the source mirrors into (migration/mirror.ts). */
export const CopyDiskSchema = z.object({
  index: z.number({ error: 'must name a disk' }).int({ error: 'must name a disk' }).min(0).max(63),
  format,
  /** Guest-visible size, bytes: the copy is created this large. */
  virtualSize: bytes.min(512, { error: 'must be a byte count (at most 1 PiB)' }),
  /** Bytes the image holds on the source's storage (what the copy may need). */
  allocated: bytes,
  /** A qcow2 backing file, which the destination must have at the same path (shared): only the top is copied. */
  backing: z
    .object({
      path: z
        .string()
        .startsWith('/')
        .max(4095)
        .refine((p) => !p.includes(','), { error: 'must not contain a comma' }),
      format: z.string().refine((f) => ['raw', 'qcow2'].includes(f), { error: 'must be raw or qcow2' }),
    })
    .optional(),
});
export type CopyDisk = z.infer<typeof CopyDiskSchema>;

const BeginDomainSchema = z.looseObject({
  /** Checked in depth by parseDomainConfig (domain/config.ts). */
  config: z.unknown(),
  /** Sizes of its files on the source, to prove the destination sees the same shared files. */
  fileSizes: z.record(z.string(), z.number().int(), { error: 'must map paths to sizes' }),
  /** The nonce of the markers the source wrote beside its writable disks. */
  storageNonce: z
    .string()
    .regex(/^[0-9a-f]{32}$/, { error: 'must be 32 hex digits' })
    .optional(),
  machine: name,
  cpuModel: name,
  copyDisks: z.array(CopyDiskSchema, { error: 'must be a list' }).max(64, { error: 'must be a list' }).optional(),
});

export const BeginSchema = z.looseObject({
  version: z.number().int(),
  jobId,
  mode: z.enum(['live', 'offline', 'definition'], { error: 'must be live, offline or definition' }),
  insecure: z.boolean().optional(),
  /** multifd channels (1 = the single classic stream). */
  parallel: z
    .number({ error: 'must be 1-16' })
    .int({ error: 'must be 1-16' })
    .min(1, { error: 'must be 1-16' })
    .max(16, { error: 'must be 1-16' })
    .optional(),
  /** multifd's page compression (absent: none); zstd needs multifd, on the channels above. */
  compress: optCompress,
  /** The move may switch to post-copy: the incoming QEMU needs the capability before the stream. */
  postcopy: z.boolean({ error: 'must be true or false' }).optional(),
  peer: SourceFactsSchema,
  domain: BeginDomainSchema,
  /** Where each NIC's segment lives; absent: every NIC lives on the source's own segment. */
  homes: z.array(TunnelHomeSchema, { error: 'must list one home per NIC' }).max(64).optional(),
});
/** What the source sends (before defaults). */
export type BeginInput = z.input<typeof BeginSchema>;

/** A Begin as the destination uses it: checked, with defaults filled and the domain's config parsed. */
export interface BeginMsg {
  version: number;
  jobId: string;
  mode: 'live' | 'offline' | 'definition';
  insecure: boolean;
  parallel: number;
  compress: Compression;
  peer: SourceFacts;
  config: DomainConfig;
  fileSizes: Record<string, number>;
  /** '' if the source sent no markers. */
  storageNonce: string;
  machine: string;
  cpuModel: string;
  postcopy: boolean;
  homes: TunnelHome[];
  copyDisks: CopyDisk[];
}

const protocolError = (why: string): FerryError => new FerryError('MIGRATION_PROTOCOL', `relocation.begin: ${why}`);

/**
 * A value checked against a schema: its data, or the first problem's path and words.
 * zod itself can throw on hostile values (an object whose `constructor.name` is an
 * object without a prototype, found by the fuzz suite), as it builds an issue's
 * message: that is `malformed`.
 */
function check<T extends z.ZodType>(
  schema: T,
  value: unknown,
): { data: z.infer<T> } | { where: string; why: string } | { malformed: true } {
  try {
    const r = schema.safeParse(value);
    if (r.success) return { data: r.data };
    const issue = r.error.issues[0];
    const where = issue.path
      .map((k) => (typeof k === 'number' ? `[${k}]` : `.${String(k)}`))
      .join('')
      .replace(/^\./, '');
    return { where, why: issue.message };
  } catch {
    return { malformed: true };
  }
}

/** Validates a Begin; anything off is MIGRATION_PROTOCOL (another version: MIGRATION_DEST_VERSION) and changes nothing. */
export function parseBegin(raw: unknown): BeginMsg {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw protocolError('the message must be an object');
  checkProtocolVersion((raw as { version?: unknown }).version);
  const r = check(BeginSchema, raw);
  if ('malformed' in r) throw protocolError('the message is malformed');
  if ('where' in r) throw protocolError(`${r.where || 'the message'} ${r.why}`);
  const p = r.data;
  let config: DomainConfig;
  try {
    config = parseDomainConfig(p.domain.config);
  } catch (e) {
    throw protocolError(`domain.config is invalid: ${(e as Error).message}`);
  }
  if (p.postcopy && (p.mode !== 'live' || (p.parallel ?? 1) !== 1)) throw protocolError('postcopy needs a live move on one channel');
  if (p.postcopy && !config.postcopy) throw protocolError("postcopy is forbidden by the domain's config");
  if (p.postcopy && p.compress === 'zstd') throw protocolError('postcopy cannot go with compression (it needs multifd)');
  return {
    version: p.version,
    jobId: p.jobId,
    mode: p.mode,
    insecure: p.insecure === true,
    parallel: p.parallel ?? 1,
    compress: p.compress ?? 'none',
    peer: p.peer,
    config,
    fileSizes: p.domain.fileSizes,
    storageNonce: p.domain.storageNonce ?? '',
    machine: p.domain.machine,
    cpuModel: p.domain.cpuModel,
    postcopy: p.postcopy === true,
    homes: checkHomes(p.homes, config, p.peer),
    copyDisks: checkCopyDisks(p.domain.copyDisks ?? [], config),
  };
}

/** One home per NIC, each with its own VNI; none sent: every NIC lives on the source's segment. */
function checkHomes(homes: TunnelHome[] | undefined, config: DomainConfig, peer: SourceFacts): TunnelHome[] {
  if (homes === undefined)
    return config.nics.map((n, i) => ({
      host: peer.name,
      address: '',
      subnet: peer.networks[n.network]?.subnet ?? '',
      vni: vniFor(config.uuid, i),
    }));
  if (homes.length !== config.nics.length) throw protocolError('homes must list one home per NIC');
  homes.forEach((h, i) => {
    // The VNI follows from the domain and NIC, so a peer cannot point a tunnel at another's.
    if (h.vni !== vniFor(config.uuid, i)) throw protocolError(`homes[${i}].vni is not the VNI of NIC ${i} of this domain`);
  });
  return homes;
}

/** Each writable disk at most once, in its config's format; a backing file only under a qcow2. */
function checkCopyDisks(disks: CopyDisk[], config: DomainConfig): CopyDisk[] {
  const seen = new Set<number>();
  for (const c of disks) {
    const d = config.disks[c.index];
    if (!d || d.readOnly || seen.has(c.index)) throw protocolError('domain.copyDisks[].index must name each writable disk at most once');
    seen.add(c.index);
    if (c.format !== d.format) throw protocolError(`domain.copyDisks: disk${c.index}'s format must be its config's`);
    if (c.backing && c.format !== 'qcow2') throw protocolError('domain.copyDisks[].backing must be {path, format} of a qcow2 disk');
  }
  return disks;
}

const chunkList = (() => {
  const error = 'must be a list of at most 8192 integers from 0 to 1048576';
  return z
    .array(
      z
        .number({ error })
        .int({ error })
        .min(0, { error })
        .max(1 << 20, { error }),
      { error },
    )
    .max(8192, { error })
    .optional();
})();

/**
 * The envelope of each relocation action, checked when the request is parsed (a miss
 * is API_BAD_REQUEST). Begin's payload (peer, domain, homes) is left to `parseBegin`,
 * after the version: a peer of another version must hear so, whatever it sent.
 */
export const RELOCATION_ACTIONS = {
  'relocation.begin': params({
    version: int(0, 1000),
    peer: z.unknown(),
    domain: z.unknown(),
    mode: str,
    insecure: optBool,
    parallel: optNum(1, 16),
    compress: optCompress,
    jobId: str,
    postcopy: optBool,
    homes: z.unknown().optional(),
  }),
  'relocation.prepare': params({ jobId: str }),
  'relocation.digest': params({ jobId: str, chunks: chunkList }),
  'relocation.repair': params({ jobId: str, offset: int(0, 2 ** 50), length: int(1, MAX_REPAIR_BYTES) }),
  'relocation.finish': params({ jobId: str, running: optBool }),
  'relocation.abandon': params({ jobId: str, reason: optStr }),
  'relocation.confirm': params({ jobId: str }),
  'relocation.status': params({ jobId: str }),
  // post-copy whose source QEMU failed the stream for good: did every page arrive?
  'relocation.lost': params({ jobId: str, reason: optStr }),
  // post-copy whose stream broke: a new one-shot listener on the incoming QEMU (migrate-recover)
  'relocation.recover': params({ jobId: str }),
  // a tunnelled domain's home end: flood to one more away host, or one fewer (daemon/tunnels.ts)
  'relocation.tunnel': params({
    op: z.enum(['extend', 'retract'], { error: 'must be one of extend, retract' }),
    uuid: str,
    nic: int(0, 63),
    remote: str,
  }),
} as const;

/*
 * The answers, checked by the source as it receives them: a peer's answer is as
 * untrusted as its request. Loose objects: a field a newer peer adds is not an error.
 */
const count = z.number().int().min(0);
const tcpPort = z.number().int().min(1).max(65535);
const answer = <T extends z.ZodRawShape>(shape: T) => z.looseObject(shape);

export const RELOCATION_ANSWERS = {
  'relocation.begin': answer({
    jobId: z.string(),
    host: z.string(),
    dataAddress: z.string(),
    // 0 for a shut-off domain's definition: no stream, no data port.
    dataPort: z.number().int().min(0).max(65535),
    checks: z.array(z.string()),
    postcopy: z.boolean().optional(),
    postcopyWhy: z.string().optional(),
    tunnels: z.array(z.object({ nic: count, vni: count, address: z.string() })).optional(),
    copyDisks: z.array(z.object({ index: count, path: z.string() })).optional(),
  }),
  'relocation.prepare': answer({
    dataAddress: z.string(),
    dataPort: tcpPort,
    tlsHostname: z.string(),
    nbd: z.object({ address: z.string(), port: tcpPort }).optional(),
  }),
  // Per-chunk SHA-256 of the loaded RAM, base64 (all chunks, or the ones asked for).
  'relocation.digest': answer({
    bytes: count,
    chunkBytes: count,
    digests: z.string(),
    chunks: z.array(count).optional(),
    ms: z.number().optional(),
  }),
  'relocation.repair': answer({ written: count }),
  'relocation.finish': answer({ phase: z.string(), resumedAt: z.number().nullable(), host: z.string(), crashed: z.boolean().optional() }),
  'relocation.abandon': answer({ phase: z.string() }),
  'relocation.confirm': answer({ phase: z.string() }),
  'relocation.status': answer({ phase: z.string(), domain: z.string().optional() }),
  'relocation.recover': answer({ dataAddress: z.string(), dataPort: tcpPort }),
  'relocation.lost': answer({ stream: z.string(), crashed: z.boolean() }),
  'relocation.tunnel': answer({ remotes: z.array(z.string()) }),
} as const;

export type RelocationAction = keyof typeof RELOCATION_ANSWERS;
export type RelocationAnswers = { [A in RelocationAction]: z.infer<(typeof RELOCATION_ANSWERS)[A]> };

/** A peer's answer to `action`, if it has the protocol's shape; else MIGRATION_PROTOCOL naming the field. */
export function checkAnswer<A extends RelocationAction>(action: A, value: unknown, peer: string): RelocationAnswers[A] {
  const r = check(RELOCATION_ANSWERS[action], value);
  if ('malformed' in r) throw new FerryError('MIGRATION_PROTOCOL', `${peer} answered ${action} with something malformed`);
  if ('where' in r) throw new FerryError('MIGRATION_PROTOCOL', `${peer} answered ${action} with ${r.where || 'an answer'} that ${r.why}`);
  return r.data as RelocationAnswers[A];
}
