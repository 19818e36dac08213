/** The plan's input for an idle 1 GiB guest over a 300 MiB/s link, which unit tests vary field by field. */
import type { PlanInput } from '../migration/plan.ts';

const MiB = 1048576;
export const IDLE_1G: PlanInput = {
  ramBytes: 1024 * MiB,
  dirtyBytesPerS: 1 * MiB,
  linkBytesPerS: 300 * MiB,
  linkFrom: 'test',
  maxDowntimeMs: 300,
  timeoutS: 90,
  spareCores: 1,
  postcopyAllowed: true,
  strategy: 'auto',
};
