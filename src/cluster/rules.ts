/**
 * The placement rules in etcd: one key, /ferry/rules, holding every rule, so a new rule
 * is checked against all the others and written in one compare-and-swap (two operators
 * adding contradicting rules at once: the second one's write fails, it reads again and
 * is refused). Every ferryd follows the key (daemon/cluster.ts), so placement reads
 * rules from memory.
 */
import type { Etcd3 } from 'etcd3';
import { z } from 'zod';
import { FerryError } from '../errors.ts';
import { RULE_KINDS, type Rule } from '../placement/rules.ts';
import { casJson, getJson, type Versioned } from './etcd.ts';
import { ROOT } from './records.ts';

export const RULES_KEY = `${ROOT}rules`;

const name = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/, { error: 'must be 1-64 letters, digits, ".", "_" or "-"' });

/** One rule's shape: an API request's and a stored record's (placement/rules.ts checks its sense). */
export const RuleSchema = z
  .object({
    name,
    kind: z.enum(RULE_KINDS),
    domains: z.array(name).min(1).max(64),
    hosts: z.array(name).max(64).default([]),
    createdAt: z.string().optional(),
  })
  .strict();

const RulesSchema = z.array(RuleSchema).max(1000);

/** A rule as an operator asked for it (`rule.add`): its shape checked (RULE_INVALID), stamped with when. Its sense: placement/rules.ts checkRule. */
export function parseRuleRequest(raw: unknown): Rule {
  const p = RuleSchema.safeParse(raw);
  if (!p.success) {
    const i = p.error.issues[0];
    throw new FerryError('RULE_INVALID', `Invalid rule: ${i?.path.join('.') || 'rule'} ${i?.message ?? ''}`.trim());
  }
  return { ...p.data, createdAt: new Date().toISOString() };
}

export function parseRules(v: unknown, key: string): Rule[] {
  const r = RulesSchema.safeParse(v);
  if (!r.success)
    throw new FerryError('CLUSTER_BAD_RECORD', `etcd key ${key} does not hold placement rules: ${r.error.issues[0]?.message}`);
  return r.data;
}

/** Reads the rules (none yet: revision '0'). */
export async function readRules(etcd: Etcd3): Promise<Versioned<Rule[]>> {
  return (await getJson(etcd, RULES_KEY, parseRules)) ?? { key: RULES_KEY, value: [], modRevision: '0' };
}

/**
 * Changes the rules: `f` sees the current ones and returns the new list (or throws: then
 * nothing is written). Retried on a lost compare-and-swap, with `f` run again on what won.
 */
export async function updateRules(etcd: Etcd3, f: (rules: Rule[]) => Rule[]): Promise<Rule[]> {
  for (let attempt = 0; attempt < 5; attempt++) {
    const cur = await readRules(etcd);
    const next = f(cur.value);
    if ((await casJson(etcd, RULES_KEY, cur.modRevision, next)) !== null) return next;
  }
  throw new FerryError('CLUSTER_RECORD_CHANGED', 'The placement rules kept changing while this change was written; try again');
}
