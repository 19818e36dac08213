/**
 * Where each domain of a host being evacuated goes, and when it is done: pure, so it is
 * unit-tested and `ferry host evacuate --plan` shows exactly what the real run does.
 *
 * Order: small and quiet first (least RAM, then least dirtied): they free a slot fast and
 * rarely fail, so the long moves start with the most known. Each domain goes to the
 * compatible host with the most memory left after what was already assigned to it
 * (spreading the load; every domain moves once). Compatible: not in maintenance, the
 * same CPU model, every network the domain's NICs name, enough free memory. A shut-off
 * domain (evacuate --include-stopped) moves as its definition: it needs no memory now.
 */

export interface Candidate {
  name: string;
  freeMiB: number;
  cpuModel: string;
  networks: string[];
  maintenance: boolean;
}
export interface Leaving {
  name: string;
  memoryMiB: number;
  networks: string[];
  cpuModel: string;
  dirtyRateMBps?: number | null;
  /** Shut off: only its definition moves, so it needs no free memory now (it goes after the running ones). */
  stopped?: boolean;
}
export interface Assignment {
  domain: string;
  to: string | null;
  why: string;
}

export function place(domains: Leaving[], candidates: Candidate[]): Assignment[] {
  const left = new Map(candidates.map((c) => [c.name, c.freeMiB]));
  const order = [...domains].sort(
    (a, b) =>
      Number(!!a.stopped) - Number(!!b.stopped) ||
      a.memoryMiB - b.memoryMiB ||
      (a.dirtyRateMBps ?? 0) - (b.dirtyRateMBps ?? 0) ||
      a.name.localeCompare(b.name),
  );
  return order.map((d) => {
    const need = d.stopped ? 0 : d.memoryMiB;
    const why: string[] = [];
    const fit = candidates.filter((c) => {
      if (c.maintenance) {
        why.push(`${c.name} is in maintenance`);
        return false;
      }
      if (c.cpuModel !== d.cpuModel) {
        why.push(`${c.name} runs CPU model ${c.cpuModel}, not ${d.cpuModel}`);
        return false;
      }
      const miss = d.networks.filter((n) => !c.networks.includes(n));
      if (miss.length) {
        why.push(`${c.name} lacks network ${miss.join(', ')}`);
        return false;
      }
      if ((left.get(c.name) ?? 0) < need) {
        why.push(`${c.name} has ${left.get(c.name) ?? 0} MiB free, needs ${need}`);
        return false;
      }
      return true;
    });
    if (!fit.length)
      return {
        domain: d.name,
        to: null,
        why: candidates.length ? why.join('; ') : 'no other host to move to (--to, or "peers" in ferryd.json)',
      };
    const best = fit.reduce((a, b) => ((left.get(b.name) ?? 0) > (left.get(a.name) ?? 0) ? b : a));
    left.set(best.name, (left.get(best.name) ?? 0) - need);
    return {
      domain: d.name,
      to: best.name,
      why: d.stopped
        ? `shut off: its definition moves (to the host with the most memory left, ${left.get(best.name) ?? 0} MiB)`
        : `most memory left (${(left.get(best.name) ?? 0) + need} MiB free before it)`,
    };
  });
}

/**
 * The whole evacuation's time: moves to one destination run `parallel` at a time, each
 * destination in parallel with the others; each move takes its predicted time (the
 * autopilot's plan), in the order given. The makespan of that schedule, ms.
 */
export function makespanMs(moves: { to: string; ms: number }[], parallel: number): number {
  const lanes = new Map<string, number[]>();
  let end = 0;
  for (const m of moves) {
    const l = lanes.get(m.to) ?? Array.from({ length: Math.max(1, parallel) }, () => 0);
    lanes.set(m.to, l);
    const i = l.indexOf(Math.min(...l));
    l[i] += m.ms;
    end = Math.max(end, l[i]);
  }
  return end;
}
