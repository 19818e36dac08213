/**
 * The source's requests to the destination: each answer checked against the protocol's
 * schema (api/relocation.ts) before anything acts on it, so a malformed answer is
 * MIGRATION_PROTOCOL at the door, not a wrong value deep in a phase.
 */
import type { ApiClient } from '../api/client.ts';
import type { Params } from '../api/schema.ts';
import { checkAnswer, type RelocationAction, type RelocationAnswers } from '../api/relocation.ts';

export async function ask<A extends RelocationAction>(
  client: ApiClient,
  action: A,
  params: Params<A>,
  opts: { timeoutMs: number; attachment?: Buffer },
): Promise<RelocationAnswers[A]> {
  const r = await client.request(action, params as Record<string, unknown>, opts.timeoutMs, opts.attachment);
  return checkAnswer(action, r, client.peerName() ?? 'the destination');
}
