/**
 * Migration phases: one union per side, one exhaustive transition function each.
 * Abandon is legal in any phase before the point of no return, as in Cloud
 * Hypervisor's receiver; the point of no return is named, as in xl's migrate.
 *
 * Source:  begin → prepare → perform → switchover → finish → confirmed
 *            └────────┴─────────┴──────────┴──► abandoned            (before finish, the point of no return)
 *          finish ──dest-abandoned──► abandoned  (only on the destination's word that it never resumed)
 *          finish ──dest-running──► postcopy ──postcopy-done──► confirmed
 *            (post-copy: the guest runs on the destination while this QEMU still serves the
 *             pages it has not sent; its QEMU must live until the stream completes, and the
 *             copy here is never resumed: no abandon from postcopy)
 *
 * Destination: begun → prepared → finishing → finished → confirmed
 *                └────────┴──────────┴──► abandoned
 *   (from finishing only on `resume-failed`: QEMU refused to run the guest here and
 *    says it is not running, so it never ran here and the source may take it back)
 *
 * `finish` (source) / `finishing` (destination) is the point of no return: from there
 * the guest may already run on the destination, so the source must never resume its
 * copy unless the destination says, in so many words, that it abandoned.
 */
import { FerryError } from '../errors.ts';

/** The relocation protocol's version: with its messages, in api/relocation.ts. */
export { PROTOCOL_VERSION } from '../api/relocation.ts';

export type SourcePhase = 'begin' | 'prepare' | 'perform' | 'switchover' | 'finish' | 'postcopy' | 'confirmed' | 'abandoned';
export type DestPhase = 'begun' | 'prepared' | 'finishing' | 'finished' | 'confirmed' | 'abandoned';

export type SourceEvent =
  | { type: 'dest-accepted' } // Begin answered: pre-flight passed
  | { type: 'dest-prepared' } // Prepare answered: destination QEMU listens
  | { type: 'stream-started' } // migrate issued
  | { type: 'stream-completed' } // QEMU: completed; source guest stopped, destination holds the state
  | { type: 'finish-sent' } // asking the destination to resume: point of no return
  | { type: 'dest-finished' } // the destination runs the guest
  | { type: 'dest-running' } // the destination runs the guest, fetching the pages still here (post-copy)
  | { type: 'postcopy-done' } // the post-copy stream ended: every page reached the destination, or the destination is gone
  | { type: 'abandon'; reason: string }
  | { type: 'dest-abandoned'; reason: string };

export type DestEvent =
  | { type: 'prepared' }
  | { type: 'resuming' }
  | { type: 'resumed' }
  | { type: 'confirmed' }
  | { type: 'abandon'; reason: string }
  | { type: 'resume-failed'; reason: string };

export class IllegalPhaseError extends FerryError {
  constructor(side: 'source' | 'destination', from: string, event: string) {
    super('MIGRATION_ILLEGAL_PHASE', `Migration ${side}: ${event} is not allowed in phase ${from}`, { side, from, event });
  }
}

export function sourceTransition(p: SourcePhase, e: SourceEvent): SourcePhase {
  const bad = (): never => {
    throw new IllegalPhaseError('source', p, e.type);
  };
  switch (e.type) {
    case 'dest-accepted':
      return p === 'begin' ? 'prepare' : bad();
    case 'dest-prepared':
      return p === 'prepare' ? 'perform' : bad();
    case 'stream-started':
      return p === 'perform' ? 'perform' : bad();
    case 'stream-completed':
      return p === 'perform' ? 'switchover' : bad();
    case 'finish-sent':
      return p === 'switchover' ? 'finish' : bad();
    case 'dest-finished':
      return p === 'finish' ? 'confirmed' : bad();
    case 'dest-running':
      return p === 'finish' ? 'postcopy' : bad();
    case 'postcopy-done':
      return p === 'postcopy' ? 'confirmed' : bad();
    case 'abandon':
      return p === 'begin' || p === 'prepare' || p === 'perform' || p === 'switchover' ? 'abandoned' : bad();
    case 'dest-abandoned':
      return p === 'finish' ? 'abandoned' : bad();
    default: {
      const never: never = e;
      throw new FerryError('INTERNAL', `unknown source event ${JSON.stringify(never)}`);
    }
  }
}

export function destTransition(p: DestPhase, e: DestEvent): DestPhase {
  const bad = (): never => {
    throw new IllegalPhaseError('destination', p, e.type);
  };
  switch (e.type) {
    case 'prepared':
      return p === 'begun' ? 'prepared' : bad();
    case 'resuming':
      return p === 'prepared' ? 'finishing' : bad();
    case 'resumed':
      return p === 'finishing' ? 'finished' : bad();
    case 'confirmed':
      return p === 'finished' ? 'confirmed' : bad();
    case 'abandon':
      return p === 'begun' || p === 'prepared' ? 'abandoned' : bad();
    case 'resume-failed':
      return p === 'finishing' ? 'abandoned' : bad();
    default: {
      const never: never = e;
      throw new FerryError('INTERNAL', `unknown destination event ${JSON.stringify(never)}`);
    }
  }
}

export function sourceCanAbandon(p: SourcePhase): boolean {
  return p === 'begin' || p === 'prepare' || p === 'perform' || p === 'switchover';
}
