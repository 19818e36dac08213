/**
 * The cluster's baseline CPU: the most capable named model every live host can give a
 * guest, as vSphere's EVC picks one for a cluster. QEMU's query-cpu-model-baseline
 * exists for s390x only, so it is computed here from what each host publishes (the
 * models its QEMU, accelerator and ceiling allow: qemu/probe.ts) and the models'
 * features. A domain with "cpu": "cluster" gets it when it starts, and keeps it for life.
 */
export interface CpuHost {
  name: string;
  cpuModels: string[] | null;
  cpuModel: string;
}

export interface Baseline {
  model: string;
  features: string[];
  /** Models every host can give, most capable first. */
  common: string[];
  /** For each host, how many models it can give. */
  hosts: { name: string; models: number }[];
}

/** Versioned aliases ("Nehalem-v1") rank after the plain name of the same features. */
const versioned = (m: string): number => (/-v\d+$/.test(m) ? 1 : 0);

export function baseline(hosts: CpuHost[], features: Record<string, string[]>): Baseline | null {
  if (!hosts.length) return null;
  const sets = hosts.map((h) => new Set(h.cpuModels ?? [h.cpuModel]));
  const common = [...sets[0]]
    .filter((m) => sets.every((s) => s.has(m)) && features[m])
    .sort((a, b) => features[b].length - features[a].length || versioned(a) - versioned(b) || a.localeCompare(b));
  if (!common.length) return null;
  return {
    model: common[0],
    features: features[common[0]],
    common,
    hosts: hosts.map((h, i) => ({ name: h.name, models: sets[i].size })),
  };
}
