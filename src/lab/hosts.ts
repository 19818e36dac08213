/**
 * The lab's hosts as the CLI finds them: `ferry lab up` writes their names, API sockets
 * and addresses to the lab's state file, and `-H host1` (cli/targets.ts), the dashboard
 * and the console follower read them here.
 */
import fs from 'node:fs';

export const LAB_STATE_FILE = process.env.FERRY_LAB_STATE ?? '/var/lib/ferry-lab/lab.json';

export interface LabHostRef {
  name: string;
  apiSocket: string;
  address: string;
}

/** The running lab's hosts; none when there is no lab (or its state file is unreadable). */
export function labHosts(): LabHostRef[] {
  try {
    const s = JSON.parse(fs.readFileSync(LAB_STATE_FILE, 'utf8'));
    return Array.isArray(s.hosts) ? s.hosts : [];
  } catch {
    return [];
  }
}
