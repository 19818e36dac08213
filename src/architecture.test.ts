/**
 * The folders are the architecture, and data flows one way: cli → (api) → daemon →
 * migration → qemu → qmp, with domain/ the model beneath them all. This reads every
 * source file's relative imports and fails on an import that goes up a layer, and on an
 * import cycle between files (tests excluded: they may reach anywhere).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const SRC = path.dirname(fileURLToPath(import.meta.url));

/** Higher imports lower (or its own folder), never the other way. */
const LAYER: Record<string, number> = {
  '.': 0,
  util: 0, // errors.ts, version.ts, helpers
  domain: 1, // the model: configs, states
  placement: 1, // pure: where a domain may go (rules, CPU baseline, balancer); every placement reads it
  api: 2,
  tls: 2,
  qmp: 2, // the wire contracts: the API's types and client, certificates, QMP
  qemu: 3,
  migration: 4,
  cluster: 4, // etcd: membership, ownership records, HA manager (daemon/cluster.ts wires it; migration/ sees it only through MigrationHost)
  daemon: 5,
  lab: 6,
  // Test support: doubles for unit tests, and the memory-pattern checker (which
  // `ferry lab verify` uses too). Only tests import the doubles (checked below).
  testing: 6,
  cli: 7,
};

function sources(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) return sources(p);
    return e.name.endsWith('.ts') && !e.name.endsWith('.test.ts') ? [p] : [];
  });
}

/** Relative imports and re-exports, type-only ones included (a type is a dependency too). */
function importsOf(file: string): string[] {
  const text = fs.readFileSync(file, 'utf8');
  const out: string[] = [];
  for (const m of text.matchAll(/(?:^|\n)\s*(?:import|export)\s[^;]*?from\s+'(\.[^']+)'/g))
    out.push(path.resolve(path.dirname(file), m[1]));
  for (const m of text.matchAll(/import\(\s*'(\.[^']+)'\s*\)/g)) out.push(path.resolve(path.dirname(file), m[1]));
  return out;
}

const folderOf = (file: string): string => {
  const rel = path.relative(SRC, file);
  return rel.includes(path.sep) ? rel.split(path.sep)[0] : '.';
};

test('every source folder has a layer', () => {
  const folders = new Set(sources(SRC).map(folderOf));
  for (const f of folders) assert.ok(f in LAYER, `src/${f}/ has no layer in architecture.test.ts: place it`);
});

/** Imports that go up a layer (or sideways between two folders of the same layer). */
function upward(edges: [string, string][]): string[] {
  const out: string[] = [];
  for (const [f, t] of edges) {
    const from = folderOf(f),
      to = folderOf(t);
    if (from !== to && LAYER[to] !== 0 && LAYER[to] >= LAYER[from])
      out.push(`${path.relative(SRC, f)} → ${path.relative(SRC, t)} (${from} ${LAYER[from]} → ${to} ${LAYER[to]})`);
  }
  return out;
}

/** Every cycle a depth-first walk meets, as a chain of files. */
function cycles(graph: Map<string, string[]>): string[] {
  const state = new Map<string, 'open' | 'done'>();
  const found: string[] = [];
  const visit = (f: string, trail: string[]): void => {
    if (state.get(f) === 'done') return;
    if (state.get(f) === 'open') {
      found.push([...trail.slice(trail.indexOf(f)), f].map((x) => path.relative(SRC, x)).join(' → '));
      return;
    }
    state.set(f, 'open');
    for (const t of graph.get(f) ?? []) visit(t, [...trail, f]);
    state.set(f, 'done');
  };
  for (const f of graph.keys()) visit(f, []);
  return found;
}

test('no import goes up a layer (cli → api → daemon → migration → qemu → qmp; domain beneath)', () => {
  const edges = sources(SRC).flatMap((f) => importsOf(f).map((t): [string, string] => [f, t]));
  assert.ok(edges.length > 100, `the parser found ${edges.length} imports`);
  assert.deepEqual(upward(edges), []);
});

test('no import cycle between source files', () => {
  const files = sources(SRC);
  assert.deepEqual(cycles(new Map(files.map((f) => [f, importsOf(f).filter((t) => files.includes(t))]))), []);
});

test('test doubles (testing/, except the pattern checker) are imported by tests only', () => {
  const doubles = (t: string): boolean => folderOf(t) === 'testing' && path.basename(t) !== 'checker.ts';
  const edges = sources(SRC).flatMap((f) =>
    importsOf(f)
      .filter(doubles)
      .map((t) => `${path.relative(SRC, f)} → ${path.relative(SRC, t)}`),
  );
  assert.deepEqual(
    edges.filter((e) => !e.startsWith('testing/')),
    [],
  );
  assert.ok(fs.existsSync(path.join(SRC, 'testing', 'fakes.ts')), 'the doubles live in src/testing/');
});

test('the rules catch what they are for: an upward import, a sideways one, a cycle', () => {
  const f = (rel: string): string => path.join(SRC, rel);
  assert.equal(upward([[f('qemu/argv.ts'), f('daemon/host.ts')]]).length, 1);
  assert.equal(upward([[f('qmp/client.ts'), f('api/protocol.ts')]]).length, 1);
  assert.equal(
    upward([
      [f('daemon/host.ts'), f('qemu/argv.ts')],
      [f('qemu/argv.ts'), f('errors.ts')],
    ]).length,
    0,
  );
  assert.deepEqual(
    cycles(
      new Map([
        [f('a.ts'), [f('b.ts')]],
        [f('b.ts'), [f('c.ts')]],
        [f('c.ts'), [f('a.ts')]],
      ]),
    ),
    ['a.ts → b.ts → c.ts → a.ts'],
  );
});
