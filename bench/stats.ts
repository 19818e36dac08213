/** The benches' one summary of repeated runs: median, min, max, and how many. */
export interface Spread {
  median: number;
  min: number;
  max: number;
  n: number;
}

/** The middle value (the mean of the two middle ones for an even count); null for none. */
export function median(xs: number[]): number | null {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

export function spread(xs: number[]): Spread | null {
  const mid = median(xs);
  if (mid === null) return null;
  return { median: Math.round(mid), min: Math.round(Math.min(...xs)), max: Math.round(Math.max(...xs)), n: xs.length };
}

/**
 * How much faster a is than b when both ran once per round, interleaved: the median of
 * each round's a ÷ b. The machine's speed drifts between rounds (the same case can take
 * twice as long in one round as in the next), which a ratio of the two medians does
 * not cancel out. Null without aligned rounds.
 */
export function pairedRatio(a: number[] | undefined, b: number[] | undefined): number | null {
  if (!a?.length || a.length !== b?.length || b.some((x) => !(x > 0))) return null;
  return median(a.map((x, i) => x / b[i]));
}

/** A table cell: "median (min–max)", with a unit after the median. */
export const cell = (s: Spread | null, unit = ''): string => (s ? `${s.median}${unit} (${s.min}–${s.max})` : '-');

/** A run as the outcomes table reads it: its contender, how it ended, and ferry's note (policy; plan: STRATEGY: REASON: figures). */
export interface NotedRun {
  contender: string;
  outcome: string;
  note?: string;
}

/** Splits on "; " outside parentheses (a plan's figures hold "; " inside them). */
function statements(s: string): string[] {
  const out: string[] = [];
  let depth = 0;
  let from = 0;
  for (let i = 0; i < s.length; i++) {
    if (s[i] === '(') depth++;
    else if (s[i] === ')') depth = Math.max(0, depth - 1);
    else if (depth === 0 && s.startsWith('; ', i)) {
      out.push(s.slice(from, i));
      from = i + 2;
    }
  }
  out.push(s.slice(from));
  return out.map((x) => x.trim()).filter(Boolean);
}

/** A note's policy statements, and its plan's pick with the reason (the figures after it vary per run and stay in the JSON). */
export function parseNote(note: string): { policy: string[]; plan?: string } {
  const at = note.startsWith('plan: ') ? 0 : note.indexOf('; plan: ');
  if (at < 0) return { policy: statements(note) };
  const policy = at === 0 ? [] : statements(note.slice(0, at));
  const rest = note.slice(at === 0 ? 'plan: '.length : at + '; plan: '.length);
  const m = /^([a-z-]+): (.+?): \d/.exec(rest) ?? /^([a-z-]+): ([^(;]+)/.exec(rest);
  return { policy, plan: m ? `${m[1]}: ${m[2].trim()}` : rest };
}

/**
 * The outcomes and policy decisions of one scenario as table rows, one per contender
 * that has something to say: how its runs ended, each distinct policy statement once,
 * and each distinct plan pick once with how many runs it was.
 */
export function outcomeRows(title: string, runs: NotedRun[]): string[] {
  const rows: string[] = [];
  for (const contender of [...new Set(runs.map((r) => r.contender))]) {
    const mine = runs.filter((r) => r.contender === contender);
    const notes = mine.map((r) => r.note).filter((n): n is string => !!n && !/^libvirt's own job time/.test(n));
    if (!notes.length && mine.every((r) => r.outcome === 'succeeded')) continue;
    const ends = new Map<string, number>();
    for (const r of mine) ends.set(r.outcome, (ends.get(r.outcome) ?? 0) + 1);
    const policy = new Set<string>();
    const plans = new Map<string, number>();
    for (const n of notes) {
      const p = parseNote(n);
      for (const s of p.policy) policy.add(s);
      if (p.plan) plans.set(p.plan, (plans.get(p.plan) ?? 0) + 1);
    }
    const esc = (s: string): string => s.replace(/\|/g, '\\|');
    rows.push(
      `| ${esc(title)} | ${contender} | ${[...ends].map(([o, k]) => `${k} ${o}`).join(', ')} | ${esc([...policy].join('; ')) || '-'} | ${esc([...plans].map(([p, k]) => `${p} (${k}×)`).join('; ')) || '-'} |`,
    );
  }
  return rows;
}
