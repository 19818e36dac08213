/**
 * Every command pays for what cli/main.ts imports statically. zod, pino, etcd3,
 * prom-client and cockatiel each take tens of ms to load (zod about 0.1 s on the bench
 * host, more than node itself), so only the verbs that need them load them, lazily.
 * This walks the bundle's static import graph (esbuild's metafile, with scripts/build.mjs's
 * options) and names the chain that reaches one.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { BUNDLE_OPTIONS } from '../../scripts/bundle-options.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const HEAVY = ['zod', 'pino', 'etcd3', 'prom-client', 'cockatiel'];

/** For each heavy package the entry point loads at start-up, the chain of static imports that reaches it. */
async function heavyAtStart(entry: string): Promise<Record<string, string>> {
  const r = await build({
    ...BUNDLE_OPTIONS,
    entryPoints: [entry],
    absWorkingDir: ROOT,
    outdir: path.join(ROOT, 'dist-startup-test'),
    metafile: true,
    write: false,
    logLevel: 'silent',
  });
  const inputs = r.metafile.inputs;
  const parent = new Map<string, string | null>([[entry, null]]);
  const queue = [entry];
  while (queue.length) {
    const f = queue.shift()!;
    for (const i of inputs[f]?.imports ?? []) {
      if (i.kind !== 'import-statement' || parent.has(i.path)) continue;
      parent.set(i.path, f);
      queue.push(i.path);
    }
  }
  const found: Record<string, string> = {};
  for (const pkg of HEAVY) {
    const hit = [...parent.keys()].find((p) => p === pkg || p.startsWith(`${pkg}/`));
    if (!hit) continue;
    const chain: string[] = [];
    for (let c: string | null | undefined = hit; c; c = parent.get(c)) chain.unshift(c);
    found[pkg] = chain.join(' → ');
  }
  return found;
}

test('the CLI loads no zod, pino, etcd3, prom-client or cockatiel before a verb asks for it', async () => {
  assert.deepEqual(await heavyAtStart('src/cli/main.ts'), {});
  // The walk finds what is there: ferryd loads them all at start.
  const daemon = await heavyAtStart('src/daemon/main.ts');
  assert.deepEqual(Object.keys(daemon).sort(), [...HEAVY].sort(), JSON.stringify(daemon));
  assert.match(daemon.pino, /^src\/daemon\/main\.ts → .*pino$/);
});
