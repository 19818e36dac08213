/**
 * The capped backoff of both waits past the point of no return: asking the destination
 * about Finish (settle.ts) and resuming a broken post-copy stream (postcopy.ts).
 */
import type { SourceJob } from '../jobs.ts';
import type { OutgoingSide } from './run.ts';

/**
 * Past the point of no return, D is asked again after 0.5 s, then twice as long each
 * time up to 5 s, forever; `ferry migrate` waits for the first 30 s of that.
 */
export const FINISH_RETRY_FIRST_MS = 500;
export const FINISH_RETRY_CAP_MS = 5000;
export const FINISH_ASK_FOREGROUND_MS = 30000;

/** How a wait goes on: until when, from which try, and the words for its log and the job. */
export interface Retrying {
  deadline: number;
  first: number;
  warning: string;
  prefix: string;
}

/**
 * `attempt` answers a result, or in words why there is none yet. Each miss is shown on
 * the job (`waiting`: `ferry jobs`, the progress output) and logged at the first and
 * every tenth try; the next try comes after 0.5 s, doubling up to 5 s. Null once that
 * try would fall after the deadline.
 */
export async function keepTrying<T>(
  s: OutgoingSide,
  j: SourceJob,
  how: Retrying,
  attempt: () => Promise<T | string>,
): Promise<{ value: T; attempts: number } | null> {
  let delay = Math.min(FINISH_RETRY_FIRST_MS * 2 ** (how.first - 1), FINISH_RETRY_CAP_MS);
  for (let n = how.first; ; n++) {
    const r = await attempt();
    if (typeof r !== 'string') {
      j.waiting = undefined;
      return { value: r, attempts: n };
    }
    const nextTryAt = Date.now() + delay;
    j.waiting = { since: j.waiting?.since ?? Date.now(), attempts: n, lastError: how.prefix + r, nextTryAt };
    if (n === 1 || n % 10 === 0) s.log.warn(how.warning, { jobId: j.jobId, domain: j.domain, attempts: n, error: r });
    s.host.emit('migration.waiting', { domain: j.domain, jobId: j.jobId, role: 'source', peer: j.peer.name, ...j.waiting });
    if (nextTryAt > how.deadline) return null;
    await new Promise((res) => setTimeout(res, delay));
    delay = Math.min(delay * 2, FINISH_RETRY_CAP_MS);
  }
}
