/** The benches' one summary of repeated runs: median, min, max, and how many. */
export interface Spread {
  median: number;
  min: number;
  max: number;
  n: number;
}

export function spread(xs: number[]): Spread | null {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
  return { median: Math.round(mid), min: Math.round(s[0]), max: Math.round(s[s.length - 1]), n: s.length };
}

/** A table cell: "median (min–max)", with a unit after the median. */
export const cell = (s: Spread | null, unit = ''): string => (s ? `${s.median}${unit} (${s.min}–${s.max})` : '-');
