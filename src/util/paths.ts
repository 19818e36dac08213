/**
 * Where ferry's own files are. The same code runs from src/ (through tsx: tests,
 * bench) and bundled from dist/ (the CLI and ferryd), at different depths, so the
 * repository root is found by walking up to ferry's package.json.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

function findRoot(from: string): string {
  for (let d = from; ; d = path.dirname(d)) {
    try {
      if (JSON.parse(fs.readFileSync(path.join(d, 'package.json'), 'utf8')).name === 'ferry') return d;
    } catch {
      /* not here */
    }
    if (path.dirname(d) === d) throw new Error(`ferry's package.json not found above ${from}`);
  }
}

export const REPO_ROOT = findRoot(path.dirname(fileURLToPath(import.meta.url)));
