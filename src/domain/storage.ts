/**
 * Where a domain's files may live. Every disk, kernel, initrd and qcow2 backing file,
 * whether it comes from `create`, a peer's Begin or a save file's header, must:
 *   1. lie inside a storage pool (checked on the path's text first, so that a peer
 *      never learns whether a file outside the pools exists, or its size);
 *   2. exist, and resolve to itself (realpath): no symlink anywhere on the way, no `..`;
 *   3. be a regular file, or a block device the config lists by exact path.
 * Save files live in the save directory: a bare NAME resolves there. Only the local
 * root socket may name another absolute path, and only when it says so (anyPath).
 *
 * When: ferryd checks before it starts QEMU (create, start, restore, Begin), and the
 * spawn itself opens every file (O_NOFOLLOW) and hands QEMU descriptors. The backing
 * chain is read and checked once more by the spawn, so the chain QEMU gets is the chain
 * that was checked, not one rewritten in between (README "Security model").
 */
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { FerryError } from '../errors.ts';
import { domainPaths, type DomainConfig } from './config.ts';

export interface StoragePolicy {
  pools: string[];
  blockDevices: string[];
  saveDir: string;
}

/** A pool's own real path (a pool may itself sit behind a symlink, e.g. /srv → /data/srv). */
function realPools(pools: string[]): string[] {
  return pools.map((p) => {
    try {
      return fs.realpathSync(p);
    } catch {
      return path.resolve(p);
    }
  });
}

function inside(p: string, dirs: string[]): boolean {
  return dirs.some((d) => p.startsWith(d.endsWith('/') ? d : d + '/'));
}

/**
 * Checks one file a domain needs. `what` names it in messages; `pools` are the pools'
 * real paths (computed once per domain by the caller).
 */
export function checkFile(p: string, policy: StoragePolicy, what: string, pools = realPools(policy.pools)): void {
  if (typeof p !== 'string' || !path.isAbsolute(p) || path.normalize(p) !== p)
    throw new FerryError('PATH_NOT_ALLOWED', `${what} ${JSON.stringify(p)} must be an absolute, normalized path`);
  const device = policy.blockDevices.includes(p);
  if (!device && !inside(p, policy.pools) && !inside(p, pools)) {
    throw new FerryError(
      'PATH_NOT_ALLOWED',
      `${what} ${p} is outside the storage pools (${policy.pools.join(', ')}); move it into a pool or add one to storage.pools in ferryd.json`,
    );
  }
  let st: fs.Stats;
  try {
    st = fs.lstatSync(p);
  } catch {
    throw new FerryError('DISK_NOT_FOUND', `${what} ${p} does not exist`);
  }
  let real: string;
  try {
    real = fs.realpathSync(p);
  } catch {
    throw new FerryError('DISK_NOT_FOUND', `${what} ${p} does not resolve`);
  }
  if (real !== p)
    throw new FerryError('PATH_NOT_ALLOWED', `${what} ${p} is, or goes through, a symlink (to ${real}); name the file by its real path`);
  if (!device && !inside(real, pools)) throw new FerryError('PATH_NOT_ALLOWED', `${what} ${p} resolves outside the storage pools`);
  if (device ? !st.isBlockDevice() : !st.isFile())
    throw new FerryError(
      'PATH_NOT_ALLOWED',
      `${what} ${p} is not a ${device ? 'block device' : 'regular file'}${st.isBlockDevice() ? ' (block devices need storage.blockDevices)' : ''}`,
    );
}

/**
 * The backing files a qcow2 image names, as qemu-img reads them (without QEMU's lock),
 * each with its format (what QEMU is told when it gets the file as a descriptor).
 */
export function backingImages(p: string, qemuImg = 'qemu-img'): { path: string; format: string }[] {
  let out: string;
  try {
    out = execFileSync(qemuImg, ['info', '--output=json', '--backing-chain', '-U', p], {
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: 10000,
    }).toString();
  } catch (e) {
    const err = e as { stderr?: Buffer; message: string };
    throw new FerryError('CONFIG_INVALID', `Cannot read the qcow2 image ${p}: ${err.stderr?.toString().trim() || err.message}`);
  }
  // One entry per image, top first; each names its backing file and that file's format.
  const chain = JSON.parse(out) as {
    'full-backing-filename'?: string;
    'backing-filename'?: string;
    'backing-filename-format'?: string;
    format?: string;
  }[];
  const out2: { path: string; format: string }[] = [];
  for (const [i, img] of chain.entries()) {
    const b = img['full-backing-filename'] ?? img['backing-filename'];
    if (typeof b !== 'string' || !b.length) break;
    out2.push({ path: b, format: img['backing-filename-format'] ?? chain[i + 1]?.format ?? 'raw' });
  }
  return out2;
}

/** A qcow2 disk's backing chain (top first), each level checked against the policy. */
export function checkedBackingImages(
  disk: string,
  policy: StoragePolicy,
  what: string,
  pools = realPools(policy.pools),
): { path: string; format: string }[] {
  const chain = backingImages(disk);
  for (const b of chain) checkFile(b.path, policy, `${what}: backing file of ${disk}`, pools);
  return chain;
}

/**
 * Every file of a domain, and every qcow2 backing file, against the policy. A start
 * passes `backing: false`: its spawn reads and checks the chain it opens (one qemu-img run).
 */
export function checkDomainFiles(c: DomainConfig, policy: StoragePolicy, host: string, opts: { backing?: boolean } = {}): void {
  const pools = realPools(policy.pools);
  for (const p of domainPaths(c)) checkFile(p, policy, `Domain "${c.name}" on ${host}: file`, pools);
  if (opts.backing === false) return;
  for (const d of c.disks) if (d.format === 'qcow2') checkedBackingImages(d.path, policy, `Domain "${c.name}" on ${host}`, pools);
}

/**
 * A save file's path. `file` is a bare name (in the save directory) or, with anyPath
 * from the local socket, an absolute path.
 */
export function resolveSaveFile(file: string, policy: StoragePolicy, opts: { anyPath?: boolean; local: boolean }): string {
  if (!file.startsWith('/')) {
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$/.test(file))
      throw new FerryError('PATH_NOT_ALLOWED', `Save file name ${JSON.stringify(file)} must be a plain file name`);
    fs.mkdirSync(policy.saveDir, { recursive: true, mode: 0o700 });
    return path.join(policy.saveDir, file);
  }
  if (path.normalize(file) !== file) throw new FerryError('PATH_NOT_ALLOWED', `Save file ${file} must be a normalized absolute path`);
  const dir = path.dirname(file);
  const saveDirs = [policy.saveDir, ...realPools([policy.saveDir])];
  if (saveDirs.includes(dir)) return file;
  if (!opts.local)
    throw new FerryError(
      'PATH_NOT_ALLOWED',
      `Save file ${file} is outside the save directory ${policy.saveDir}; remote callers name a file there (a bare name)`,
    );
  if (!opts.anyPath)
    throw new FerryError(
      'PATH_NOT_ALLOWED',
      `Save file ${file} is outside the save directory ${policy.saveDir}; pass --any-path to use it (local root only)`,
    );
  return file;
}

/**
 * A new, empty disk image (`migrate --copy-storage` fills it): qcow2 by qemu-img, over
 * the same backing file where the source has one (only the top is copied), or a sparse
 * raw file. Never over an existing file; the directory is made if missing (0700).
 */
export function createImage(p: string, format: 'raw' | 'qcow2', virtualSize: number, backing?: { path: string; format: string }): void {
  fs.mkdirSync(path.dirname(p), { recursive: true, mode: 0o700 });
  if (fs.existsSync(p))
    throw new FerryError('MIGRATION_DEST_STORAGE', `${p} exists already on this host; remove it, or move the domain elsewhere`);
  try {
    if (format === 'raw') {
      const fd = fs.openSync(p, fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_WRONLY | fs.constants.O_NOFOLLOW, 0o600);
      try {
        fs.ftruncateSync(fd, virtualSize);
      } finally {
        fs.closeSync(fd);
      }
    } else {
      execFileSync(
        'qemu-img',
        ['create', '-q', '-f', 'qcow2', ...(backing ? ['-b', backing.path, '-F', backing.format] : []), p, String(virtualSize)],
        { stdio: ['ignore', 'ignore', 'pipe'] },
      );
      fs.chmodSync(p, 0o600);
    }
  } catch (e) {
    if (e instanceof FerryError) throw e;
    fs.rmSync(p, { force: true });
    throw new FerryError(
      'MIGRATION_DEST_STORAGE',
      `Cannot create ${p}: ${(e as { stderr?: Buffer }).stderr?.toString().trim() || (e as Error).message}`,
    );
  }
}

/** Bytes an unprivileged writer may still use in `dir` (its filesystem's available blocks). */
export function freeBytes(dir: string): number {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = fs.statfsSync(dir);
  return st.bavail * st.bsize;
}
