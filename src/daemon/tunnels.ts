/**
 * L2 extension across segments. A domain whose network is another subnet on the host
 * it moves to takes its home segment along: one VXLAN per (domain, NIC) between the
 * hosts' migration addresses, bridged to the guest's tap on the away host.
 *
 *   home host H (the segment the NIC lives on)            away host T (another segment)
 *   brX ── fxVVVVVV ═══════ VXLAN VNI, UDP 4789 ═══════ fxVVVVVV ── fbVVVVVV ── guest tap
 *          FDB 00:00:00:00:00:00 → T (and U while         FDB 00:00:00:00:00:00 → H
 *          the guest moves on from T to U)
 *
 * The home end floods the segment's broadcasts (ARP) to every away host it lists and
 * learns the guest's MAC behind the tunnel from QEMU's announcement after the move.
 * The away bridge holds nothing but the tunnel and the guest's taps, so the guest sees
 * its home segment only. When the guest moves on, the home end lists the new host
 * before the stream and drops the old one after; when it comes back to its segment or
 * is shut down, both ends go.
 *
 * Records live in STATE/tunnels.json. Kernel devices outlive ferryd; `adopt` at start
 * re-creates whatever is missing (after a reboot) and drops away ends of domains that
 * are no longer here.
 *
 * VXLAN has no authentication and no encryption (this kernel has neither WireGuard nor
 * kernel TLS): anyone who can send UDP 4789 to a host could inject frames onto a
 * domain's segment. So while any tunnel exists, an nftables table of ferry's own
 * (inet ferry_vxlan) drops UDP 4789 from every address but the tunnels' remote ends,
 * which are peers the relocation protocol authenticated; it is rebuilt with every change
 * of the records and removed with the last tunnel. It does not hide the frames from
 * anyone on the path: keep the migration network private.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { FerryError } from '../errors.ts';
import { writeJsonAtomic } from '../util/fsx.ts';
import { linkExists } from './net.ts';
import type { Logger } from './log.ts';

import type { TunnelHome } from '../migration/host.ts';
import { VXLAN_UDP_PORT, vniFor, isIpv4 } from '../migration/preflight.ts';

export { vniFor };

export interface Tunnel {
  domain: string;
  uuid: string;
  nic: number;
  network: string;
  vni: number;
  /** home: the vxlan on the segment's own bridge; away: the per-domain bridge with its vxlan. */
  end: 'home' | 'away';
  device: string;
  bridge: string;
  /** This host's migration address (the tunnel's local end). */
  local: string;
  /** Where broadcasts go: the away hosts (home end), or the home host (away end). */
  remotes: string[];
  home: TunnelHome;
  since: string;
}

/** ferry's nftables table for the tunnels (see the header). */
export const FIREWALL_TABLE = 'ferry_vxlan';

const hex = (vni: number): string => vni.toString(16).padStart(6, '0');
export const tunnelDevice = (vni: number): string => `fx${hex(vni)}`;
export const awayBridge = (vni: number): string => `fb${hex(vni)}`;

function run(cmd: string, args: string[]): void {
  try {
    execFileSync(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (e) {
    throw new FerryError(
      'NETWORK_TUNNEL_FAILED',
      `${cmd} ${args.join(' ')}: ${(e as { stderr?: Buffer }).stderr?.toString().trim() || (e as Error).message}`,
    );
  }
}
const quiet = (cmd: string, args: string[]): void => {
  try {
    execFileSync(cmd, args, { stdio: 'ignore' });
  } catch {
    /* already gone */
  }
};

export class Tunnels {
  private recs: Tunnel[] = [];
  private readonly file: string;

  constructor(
    stateDir: string,
    private readonly local: string,
    private readonly log: Logger,
  ) {
    this.file = path.join(stateDir, 'tunnels.json');
    try {
      const raw = JSON.parse(fs.readFileSync(this.file, 'utf8')) as unknown;
      if (Array.isArray(raw)) this.recs = raw as Tunnel[];
    } catch {
      /* none yet */
    }
  }

  list(): Tunnel[] {
    return this.recs.map((t) => ({ ...t, remotes: [...t.remotes] }));
  }
  away(uuid: string, nic: number): Tunnel | undefined {
    return this.recs.find((t) => t.end === 'away' && t.uuid === uuid && t.nic === nic);
  }
  home(uuid: string, nic: number): Tunnel | undefined {
    return this.recs.find((t) => t.end === 'home' && t.uuid === uuid && t.nic === nic);
  }

  private save(): void {
    writeJsonAtomic(this.file, this.recs);
    this.firewall();
  }

  /** The nftables table that admits UDP 4789 only from the tunnels' remote ends (none: no table). */
  private firewall(): void {
    const peers = [...new Set(this.recs.flatMap((t) => t.remotes))].filter(isIpv4).sort();
    if (!peers.length) {
      quiet('nft', ['delete', 'table', 'inet', FIREWALL_TABLE]);
      return;
    }
    const script =
      [
        `table inet ${FIREWALL_TABLE} {}`,
        `delete table inet ${FIREWALL_TABLE}`,
        `table inet ${FIREWALL_TABLE} {`,
        `  set peers { type ipv4_addr; elements = { ${peers.join(', ')} } }`,
        '  chain input {',
        '    type filter hook input priority -10; policy accept;',
        `    udp dport ${VXLAN_UDP_PORT} ip saddr != @peers counter drop`,
        `    meta nfproto ipv6 udp dport ${VXLAN_UDP_PORT} counter drop`,
        '  }',
        '}',
      ].join('\n') + '\n';
    try {
      execFileSync('nft', ['-f', '-'], { input: script, stdio: ['pipe', 'ignore', 'pipe'] });
    } catch (e) {
      throw new FerryError(
        'NETWORK_TUNNEL_FAILED',
        `Cannot install the tunnels' firewall (nftables table ${FIREWALL_TABLE}): ${(e as { stderr?: Buffer }).stderr?.toString().trim() || (e as Error).message}; is nftables installed?`,
      );
    }
  }

  private clash(vni: number, uuid: string, nic: number): void {
    const other = this.recs.find((t) => t.vni === vni && !(t.uuid === uuid && t.nic === nic));
    if (other)
      throw new FerryError(
        'NETWORK_TUNNEL_FAILED',
        `VNI ${vni} of domain ${uuid} NIC ${nic} is already the tunnel of domain "${other.domain}" here; rename or re-create one of them (new uuid)`,
      );
  }

  /** The kernel side of one record; idempotent (adopt and creation share it). */
  private build(t: Tunnel): void {
    if (t.end === 'away' && !linkExists(t.bridge)) {
      run('ip', ['link', 'add', t.bridge, 'type', 'bridge', 'forward_delay', '0', 'stp_state', '0']);
      run('ip', ['link', 'set', t.bridge, 'up']);
    }
    if (!linkExists(t.bridge))
      throw new FerryError('NETWORK_NOT_FOUND', `Network "${t.network}": bridge ${t.bridge} does not exist on this host`);
    if (!linkExists(t.device)) {
      // learning stays on: the home end learns which away host holds the guest's MAC.
      run('ip', ['link', 'add', t.device, 'type', 'vxlan', 'id', String(t.vni), 'local', t.local, 'dstport', String(VXLAN_UDP_PORT)]);
      run('ip', ['link', 'set', t.device, 'master', t.bridge]);
      run('ip', ['link', 'set', t.device, 'up']);
    }
    for (const r of t.remotes) quiet('bridge', ['fdb', 'append', '00:00:00:00:00:00', 'dev', t.device, 'dst', r]);
  }

  private teardown(t: Tunnel): void {
    quiet('ip', ['link', 'del', t.device]);
    if (t.end === 'away') quiet('ip', ['link', 'del', t.bridge]);
  }

  /**
   * Away end for an incoming domain's NIC: its own bridge (the tap goes there) and the
   * vxlan to the home host. Returns the bridge. Replaces a stale end of the same NIC.
   */
  openAway(o: { domain: string; uuid: string; nic: number; network: string; home: TunnelHome }): string {
    if (!isIpv4(o.home.address))
      throw new FerryError('NETWORK_TUNNEL_FAILED', `tunnel home address ${String(o.home.address).slice(0, 64)} is not an IPv4 address`);
    this.clash(o.home.vni, o.uuid, o.nic);
    const old = this.away(o.uuid, o.nic);
    if (old) this.drop(old);
    const t: Tunnel = {
      domain: o.domain,
      uuid: o.uuid,
      nic: o.nic,
      network: o.network,
      vni: o.home.vni,
      end: 'away',
      device: tunnelDevice(o.home.vni),
      bridge: awayBridge(o.home.vni),
      local: this.local,
      remotes: [o.home.address],
      home: o.home,
      since: new Date().toISOString(),
    };
    this.recs.push(t);
    try {
      this.build(t);
      this.save();
    } catch (e) {
      this.drop(t);
      throw e;
    }
    this.log.info('tunnel away end open', { domain: t.domain, nic: t.nic, vni: t.vni, home: t.home.host });
    return t.bridge;
  }

  /** Drops every away end of a domain (it left, came home, or stopped). The home ends it listed are the caller's to retract. */
  closeAway(uuid: string): Tunnel[] {
    const gone = this.recs.filter((t) => t.end === 'away' && t.uuid === uuid);
    for (const t of gone) this.drop(t);
    if (gone.length) this.log.info('tunnel away ends closed', { domain: gone[0].domain, vnis: gone.map((t) => t.vni) });
    return gone;
  }

  /** Home end: the segment's bridge floods to `remote` too (created on the first one). */
  extendHome(
    o: { domain: string; uuid: string; nic: number; network: string; bridge: string; subnet: string; host: string },
    remote: string,
  ): Tunnel {
    if (!isIpv4(remote))
      throw new FerryError('NETWORK_TUNNEL_FAILED', `tunnel remote ${String(remote).slice(0, 64)} is not an IPv4 address`);
    const vni = vniFor(o.uuid, o.nic);
    this.clash(vni, o.uuid, o.nic);
    let t = this.home(o.uuid, o.nic);
    if (!t) {
      t = {
        domain: o.domain,
        uuid: o.uuid,
        nic: o.nic,
        network: o.network,
        vni,
        end: 'home',
        device: tunnelDevice(vni),
        bridge: o.bridge,
        local: this.local,
        remotes: [],
        home: { host: o.host, address: this.local, subnet: o.subnet, vni },
        since: new Date().toISOString(),
      };
      this.recs.push(t);
    }
    if (!t.remotes.includes(remote)) t.remotes.push(remote);
    try {
      this.build(t);
      this.save();
    } catch (e) {
      t.remotes = t.remotes.filter((r) => r !== remote);
      if (!t.remotes.length) this.drop(t);
      throw e;
    }
    this.log.info('tunnel home end extended', { domain: t.domain, nic: t.nic, vni: t.vni, remotes: t.remotes });
    return t;
  }

  /** Home end: stops flooding to `remote`; with nobody left, the tunnel goes. */
  retractHome(uuid: string, nic: number, remote: string): Tunnel | undefined {
    const t = this.home(uuid, nic);
    if (!t) return undefined;
    t.remotes = t.remotes.filter((r) => r !== remote);
    quiet('bridge', ['fdb', 'del', '00:00:00:00:00:00', 'dev', t.device, 'dst', remote]);
    if (!t.remotes.length) this.drop(t);
    else this.save();
    this.log.info('tunnel home end retracted', { domain: t.domain, nic: t.nic, vni: t.vni, remote, left: t.remotes });
    return t;
  }

  private drop(t: Tunnel): void {
    this.teardown(t);
    this.recs = this.recs.filter((x) => x !== t);
    try {
      this.save();
    } catch (e) {
      this.log.warn('tunnel records not saved', { error: String(e) });
    }
  }

  /**
   * At start: every recorded tunnel gets its devices back if they are missing; away ends
   * of domains no longer defined here (a crash between a move and its cleanup) go.
   */
  adopt(domainUuids: Set<string>): void {
    try {
      this.firewall();
    } catch (e) {
      this.log.error('tunnel firewall not restored', { error: String(e) });
    }
    for (const t of [...this.recs]) {
      if (t.end === 'away' && !domainUuids.has(t.uuid)) {
        this.log.warn('dropping the away end of a domain no longer here', { domain: t.domain, vni: t.vni });
        this.drop(t);
        continue;
      }
      try {
        this.build(t);
        this.log.info('tunnel adopted', { domain: t.domain, nic: t.nic, end: t.end, vni: t.vni, remotes: t.remotes });
      } catch (e) {
        this.log.error('tunnel not restored', { domain: t.domain, vni: t.vni, error: String(e) });
      }
    }
  }
}
