// esbuild's options for the bundle in dist/: scripts/build.mjs builds with them, and
// src/cli/startup.test.ts walks the same bundle's import graph.
export const BUNDLE_OPTIONS = {
  entryPoints: { 'cli/main': 'src/cli/main.ts', 'daemon/main': 'src/daemon/main.ts', 'cluster/watchdog': 'src/cluster/watchdog.ts' },
  bundle: true,
  splitting: true,
  format: 'esm',
  platform: 'node',
  target: 'node20',
  packages: 'external',
};
