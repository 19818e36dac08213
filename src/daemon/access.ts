/**
 * Who gets in on the TLS port, and how many: hostsAllow matching, connection caps and
 * rate-limited refusal logs. Pure logic, so that it is unit-tested without sockets.
 *
 * hostsAllow entries are `NAME` or `NAME@ADDRESS/PREFIX`:
 *   NAME     a regular expression matched against the WHOLE certificate name (CN):
 *            `host1` admits host1 only, never evilhost1x; `host[0-9]+` admits host7.
 *   @CIDR    optionally, the connection must also come from that IPv4 subnet
 *            (`host[0-9]+@198.19.0.0/24`). A bare address is /32.
 * The certificate is the identity; an address alone never admits anyone.
 */
import net from 'node:net';
import { isValidIpv4Cidr } from '../domain/config.ts';

export interface AllowRule {
  name: RegExp;
  subnet?: net.BlockList;
}

/** Parses hostsAllow; returns the rules, or the first entry's problem. */
export function parseHostsAllow(patterns: string[]): { rules: AllowRule[] } | { error: string } {
  const rules: AllowRule[] = [];
  for (const p of patterns) {
    const at = p.lastIndexOf('@');
    const namePart = at >= 0 ? p.slice(0, at) : p;
    const addrPart = at >= 0 ? p.slice(at + 1) : undefined;
    // Old configs anchored their own patterns (^host1$); anchoring twice changes nothing.
    const body = namePart.replace(/^\^/, '').replace(/\$$/, '');
    let name: RegExp;
    try {
      name = new RegExp(`^(?:${body})$`);
    } catch {
      return { error: `not a regular expression: ${namePart}` };
    }
    if (!body) return { error: `empty name pattern in "${p}"` };
    let subnet: AllowRule['subnet'];
    if (addrPart !== undefined) {
      if (!isValidIpv4Cidr(addrPart)) return { error: `"${addrPart}" in "${p}" is not an IPv4 address or subnet` };
      const [a, len] = addrPart.split('/');
      subnet = new net.BlockList();
      subnet.addSubnet(a, len === undefined ? 32 : Number(len), 'ipv4');
    }
    rules.push({ name, subnet });
  }
  return { rules };
}

export function hostsAllowMatch(rules: AllowRule[], name: string | undefined, address: string | undefined): boolean {
  if (!name) return false;
  const addr = address?.replace(/^::ffff:/, '');
  return rules.some((r) => {
    if (!r.name.test(name)) return false;
    if (!r.subnet) return true;
    return !!addr && net.isIPv4(addr) && r.subnet.check(addr, 'ipv4');
  });
}

/** Counts open connections per remote address and in total; refuses over either cap. */
export class ConnectionLimiter {
  private perAddr = new Map<string, number>();
  private total = 0;
  constructor(
    readonly maxTotal: number,
    readonly maxPerAddress: number,
  ) {}

  /** Takes a slot, or says why not. Call release() exactly once per taken slot. */
  take(address: string): string | null {
    const n = this.perAddr.get(address) ?? 0;
    if (n >= this.maxPerAddress) return `${address} already has ${n} connections (limit ${this.maxPerAddress})`;
    if (this.total >= this.maxTotal) return `${this.total} connections open (limit ${this.maxTotal})`;
    this.perAddr.set(address, n + 1);
    this.total++;
    return null;
  }

  release(address: string): void {
    const n = this.perAddr.get(address) ?? 0;
    if (n <= 1) this.perAddr.delete(address);
    else this.perAddr.set(address, n - 1);
    this.total = Math.max(0, this.total - 1);
  }

  get open(): number {
    return this.total;
  }
}

/**
 * At most `burst` log lines per key in each `windowMs`; the rest are counted and
 * reported by the first line of the next window, so a flood cannot fill the disk
 * and nothing is hidden.
 */
export class RateLimitedLog {
  private windows = new Map<string, { start: number; n: number; suppressed: number }>();
  constructor(
    private readonly write: (fields: Record<string, unknown>) => void,
    readonly burst = 10,
    readonly windowMs = 10000,
    private readonly now = () => Date.now(),
  ) {}

  log(key: string, fields: Record<string, unknown>): boolean {
    const t = this.now();
    let w = this.windows.get(key);
    if (!w || t - w.start >= this.windowMs) {
      const suppressed = w?.suppressed ?? 0;
      w = { start: t, n: 0, suppressed: 0 };
      this.windows.set(key, w);
      if (this.windows.size > 1000) for (const [k, v] of this.windows) if (t - v.start >= this.windowMs) this.windows.delete(k);
      if (suppressed) fields = { ...fields, suppressedBefore: suppressed };
    }
    if (w.n >= this.burst) {
      w.suppressed++;
      return false;
    }
    w.n++;
    this.write(fields);
    return true;
  }
}
