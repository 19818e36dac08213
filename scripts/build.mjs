#!/usr/bin/env node
// Bundles the CLI and ferryd into dist/ with esbuild, so neither transpiles
// TypeScript at start-up (tsx costs ~450 ms per command). Code splitting keeps what
// a verb imports lazily (`await import(...)`) out of the start-up path.
// Run by `npm ci` (prepare), scripts/setup.sh and .ci/run; about a tenth of a second.
import { build } from 'esbuild';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { BUNDLE_OPTIONS } from './bundle-options.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const out = path.join(root, 'dist');
fs.rmSync(out, { recursive: true, force: true });
await build({
  ...BUNDLE_OPTIONS,
  absWorkingDir: root,
  outdir: out,
  sourcemap: 'linked',
  logLevel: 'warning',
});
// The bundle's sources, so a stale dist/ can be told from a fresh one (bin/*.mjs).
fs.writeFileSync(path.join(out, 'BUILT'), `${new Date().toISOString()}\n`);
