/** Host networking for domains: tap devices on the bridges named by ferryd's config. */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { FerryError } from '../errors.ts';

function ip(args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

export function linkExists(name: string): boolean {
  return fs.existsSync(`/sys/class/net/${name}`);
}

/** Creates a persistent tap on `bridge`, replacing a stale one of the same name. */
export function createTap(tap: string, bridge: string, network: string, ownerUid?: number): void {
  if (!linkExists(bridge)) throw new FerryError('NETWORK_NOT_FOUND', `Network "${network}": bridge ${bridge} does not exist on this host`);
  if (linkExists(tap)) deleteTap(tap);
  try {
    // Owned by the QEMU user, which then attaches to it without any privilege.
    ip(['tuntap', 'add', 'dev', tap, 'mode', 'tap', ...(ownerUid !== undefined ? ['user', String(ownerUid)] : [])]);
    ip(['link', 'set', tap, 'master', bridge]);
    ip(['link', 'set', tap, 'up']);
  } catch (e) {
    deleteTap(tap);
    throw new FerryError(
      'NETWORK_NOT_FOUND',
      `Cannot attach tap ${tap} to bridge ${bridge}: ${(e as { stderr?: Buffer }).stderr?.toString().trim() ?? e}`,
    );
  }
}

export function deleteTap(tap: string): void {
  if (!linkExists(tap)) return;
  try {
    ip(['link', 'del', tap]);
  } catch {
    /* already gone */
  }
}
