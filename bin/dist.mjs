// Locates a file of the bundle, or says how to make it.
import fs from 'node:fs';
export function dist(rel) {
  const u = new URL(`../dist/${rel}`, import.meta.url);
  if (!fs.existsSync(u)) {
    process.stderr.write('ferry: INTERNAL: dist/ is not built; run `npm run build` (or `npm run setup`) in the repository\n');
    process.exit(70);
  }
  return u.href;
}
