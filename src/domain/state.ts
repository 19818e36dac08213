/**
 * A domain's lifecycle: one discriminated union and one exhaustive transition function.
 *
 *            start                 pause
 *   defined ───────► running ◄──────────► paused
 *      ▲               │   ▲    resume      │
 *      │  start        │   │                │
 *   shutoff ◄──────────┴───┼────────────────┘   stopped (shutdown, destroy, save, migrated)
 *      ▲                   │ abandon
 *      │ stopped     migrating-out ◄── migrate-out (from running or paused)
 *      │
 *   crashed ◄── crash (QEMU died without being asked to)
 *
 *   incoming ──incoming-done──► running | paused      (destination side of a migration)
 *
 * The daemon applies every change through `transition`, so an illegal move (say,
 * unpausing a shut-off domain) is a typed DOMAIN_BAD_STATE error, not a silent no-op.
 */
import { FerryError } from '../errors.ts';

/** fenced: cluster mode stopped it because this host lost its lease (its HA copy may run elsewhere now). */
export type StopReason = 'shutdown' | 'destroyed' | 'saved' | 'migrated' | 'poweroff' | 'fenced';

export type DomainState =
  | { kind: 'defined' }
  | { kind: 'running'; pid: number; domid: number; since: number }
  | { kind: 'paused'; pid: number; domid: number; since: number }
  | { kind: 'shutoff'; reason: StopReason; at: number }
  | { kind: 'crashed'; reason: string; at: number }
  /** Source side: QEMU still runs here (a live migration keeps the guest running). */
  | { kind: 'migrating-out'; pid: number; domid: number; since: number; jobId: string; wasRunning: boolean }
  /** Destination side: QEMU waits for the incoming stream; the guest has not run here yet. */
  | { kind: 'incoming'; pid: number; domid: number; since: number; jobId: string };

export type DomainEvent =
  | { type: 'start'; pid: number; domid: number; at: number }
  | { type: 'pause'; at: number }
  | { type: 'resume'; at: number }
  | { type: 'stopped'; reason: StopReason; at: number }
  | { type: 'crash'; reason: string; at: number }
  | { type: 'migrate-out'; jobId: string; at: number }
  | { type: 'migrate-out-abandoned'; at: number; running: boolean }
  | { type: 'incoming'; pid: number; domid: number; jobId: string; at: number }
  | { type: 'incoming-done'; running: boolean; at: number };

export type StateKind = DomainState['kind'];

export class IllegalTransitionError extends FerryError {
  constructor(
    readonly from: StateKind,
    readonly event: DomainEvent['type'],
    domain?: string,
  ) {
    super('DOMAIN_BAD_STATE', `${domain ? `Domain "${domain}": ` : ''}cannot ${event} while ${describeKind(from)}`, { from, event });
  }
}

export function describeKind(k: StateKind): string {
  switch (k) {
    case 'defined':
      return 'defined (never started)';
    case 'running':
      return 'running';
    case 'paused':
      return 'paused';
    case 'shutoff':
      return 'shut off';
    case 'crashed':
      return 'crashed';
    case 'migrating-out':
      return 'migrating out';
    case 'incoming':
      return 'receiving a migration';
  }
}

/** True while a QEMU process belongs to the domain on this host. */
export function hasProcess(s: DomainState): s is Extract<DomainState, { pid: number }> {
  return s.kind === 'running' || s.kind === 'paused' || s.kind === 'migrating-out' || s.kind === 'incoming';
}

export function transition(s: DomainState, e: DomainEvent, domain?: string): DomainState {
  const illegal = (): never => {
    throw new IllegalTransitionError(s.kind, e.type, domain);
  };
  switch (e.type) {
    case 'start':
      // A fresh QEMU may only appear where none is running.
      if (s.kind === 'defined' || s.kind === 'shutoff' || s.kind === 'crashed')
        return { kind: 'running', pid: e.pid, domid: e.domid, since: e.at };
      return illegal();
    case 'pause':
      if (s.kind === 'running') return { kind: 'paused', pid: s.pid, domid: s.domid, since: s.since };
      return illegal();
    case 'resume':
      if (s.kind === 'paused') return { kind: 'running', pid: s.pid, domid: s.domid, since: s.since };
      return illegal();
    case 'stopped':
      // "migrated" is the only way out of migrating-out that ends the process here;
      // the other reasons stop a domain that runs or is paused (or clear a crash).
      if (e.reason === 'migrated') return s.kind === 'migrating-out' ? { kind: 'shutoff', reason: 'migrated', at: e.at } : illegal();
      // Fencing stops a domain whatever it was doing, a move out included (the move then fails).
      if (e.reason === 'fenced' && s.kind === 'migrating-out') return { kind: 'shutoff', reason: 'fenced', at: e.at };
      if (s.kind === 'running' || s.kind === 'paused') return { kind: 'shutoff', reason: e.reason, at: e.at };
      if (s.kind === 'crashed' && e.reason === 'destroyed') return { kind: 'shutoff', reason: 'destroyed', at: e.at };
      if (s.kind === 'incoming' && e.reason === 'destroyed') return { kind: 'shutoff', reason: 'destroyed', at: e.at };
      return illegal();
    case 'crash':
      if (hasProcess(s)) return { kind: 'crashed', reason: e.reason, at: e.at };
      return illegal();
    case 'migrate-out':
      if (s.kind === 'running' || s.kind === 'paused')
        return { kind: 'migrating-out', pid: s.pid, domid: s.domid, since: s.since, jobId: e.jobId, wasRunning: s.kind === 'running' };
      return illegal();
    case 'migrate-out-abandoned':
      if (s.kind === 'migrating-out')
        return e.running
          ? { kind: 'running', pid: s.pid, domid: s.domid, since: s.since }
          : { kind: 'paused', pid: s.pid, domid: s.domid, since: s.since };
      return illegal();
    case 'incoming':
      if (s.kind === 'defined') return { kind: 'incoming', pid: e.pid, domid: e.domid, since: e.at, jobId: e.jobId };
      return illegal();
    case 'incoming-done':
      if (s.kind === 'incoming')
        return e.running
          ? { kind: 'running', pid: s.pid, domid: s.domid, since: e.at }
          : { kind: 'paused', pid: s.pid, domid: s.domid, since: e.at };
      return illegal();
    default: {
      const never: never = e;
      throw new FerryError('INTERNAL', `unknown domain event ${JSON.stringify(never)}`);
    }
  }
}
