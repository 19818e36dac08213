/**
 * The automatic balancer's cluster-wide setting and its holds, in etcd:
 *
 *   /ferry/balance        {mode, threshold, holdSeconds, intervalSeconds}: one setting for
 *                         the whole cluster (`ferry cluster balance --auto on|off`), so every
 *                         ferryd balances with the same threshold and none fights another
 *   /ferry/held/DOMAIN    a domain the balancer moved: written before the move, under a lease
 *                         of holdSeconds, so etcd itself ends the hold (no clocks compared)
 *
 * Every ferryd follows both (daemon/cluster.ts) and balances only its own domains
 * (daemon/balancer.ts).
 */
import type { Etcd3 } from 'etcd3';
import { z } from 'zod';
import { etcdCall } from './etcd.ts';
import { ROOT, parser } from './records.ts';
import type { BalanceSettings, Hold } from '../placement/balance.ts';

export type { BalanceSettings, Hold };

export const BALANCE_KEY = `${ROOT}balance`;
export const HELD = `${ROOT}held/`;

export const BalanceSettingsSchema: z.ZodType<BalanceSettings> = z
  .object({
    mode: z.enum(['off', 'auto']),
    /** Percentage points from the fleet's mean a host may be before the balancer moves a domain off it. */
    threshold: z.number().int().min(1).max(100),
    /** A domain the balancer moved stays put this long. */
    holdSeconds: z.number().int().min(0).max(86400),
    /** How often each ferryd looks. */
    intervalSeconds: z.number().int().min(5).max(3600),
  })
  .strict();

/** Off until an operator turns it on: moving domains unasked is the operator's call. */
export const BALANCE_DEFAULTS: BalanceSettings = { mode: 'off', threshold: 20, holdSeconds: 600, intervalSeconds: 30 };

export const parseBalanceSettings = parser(BalanceSettingsSchema, "balancer's setting");

export async function writeBalanceSettings(etcd: Etcd3, s: BalanceSettings): Promise<void> {
  await etcdCall(`writing ${BALANCE_KEY}`, () => etcd.put(BALANCE_KEY).value(JSON.stringify(s)).exec());
}

export const HoldSchema: z.ZodType<Hold> = z.object({
  domain: z.string(),
  from: z.string(),
  to: z.string(),
  at: z.string(),
  holdSeconds: z.number().int().nonnegative(),
});

export const parseHold = parser(HoldSchema, 'balancer hold');

/** Holds DOMAIN for holdSeconds under a lease of its own: etcd deletes the key when it runs out. */
export async function hold(etcd: Etcd3, h: Hold): Promise<void> {
  if (h.holdSeconds <= 0) return;
  const g = await etcdCall('granting a hold lease', () => etcd.leaseClient.leaseGrant({ TTL: h.holdSeconds, ID: 0 }));
  await etcdCall(`writing ${HELD}${h.domain}`, () => etcd.put(`${HELD}${h.domain}`).value(JSON.stringify(h)).lease(String(g.ID)).exec());
}
