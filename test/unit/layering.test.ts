/**
 * The tree's seams, checked: core/ holds the plain data both processes share and imports only itself; the
 * worker never imports the coordinator; the coordinator reaches the worker only to start it (the worker entry,
 * loaded dynamically); and no module imports itself through others (a cycle), type-only imports included.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('../../', import.meta.url));
const TOP_LEVEL = ['core', 'coordinator', 'worker', 'deploy', 'bin'];
/** The one allowed edge from coordinator/ into worker/: loading the worker's entry to run it. */
const WORKER_ENTRY = 'worker/main.ts';

function sources(dir: string): string[] {
  return readdirSync(join(root, dir)).flatMap((name) => {
    const path = join(root, dir, name);
    if (statSync(path).isDirectory()) return sources(relative(root, path));
    return /\.(ts|js)$/.test(name) ? [relative(root, path)] : [];
  });
}

interface Edge {
  from: string;
  to: string;
  dynamic: boolean;
}

function importsOf(file: string): Edge[] {
  const text = readFileSync(join(root, file), 'utf8');
  const edges: Edge[] = [];
  const pattern = /(?:\bfrom\s+|\bimport\s*\(\s*|^\s*import\s+)(['"])(\.{1,2}\/[^'"]+)\1/gm;
  for (const match of text.matchAll(pattern)) {
    const to = relative(root, resolve(dirname(join(root, file)), match[2]!));
    edges.push({ from: file, to, dynamic: match[0].includes('(') });
  }
  return edges;
}

const files = TOP_LEVEL.flatMap(sources);
const edges = files.flatMap(importsOf);
const top = (file: string): string => file.split('/')[0]!;

test('core/ imports only core/', () => {
  const outside = edges.filter((e) => top(e.from) === 'core' && top(e.to) !== 'core');
  assert.deepEqual(outside.map((e) => `${e.from} -> ${e.to}`), []);
});

test('worker/ never imports coordinator/ or deploy/', () => {
  const bad = edges.filter((e) => top(e.from) === 'worker' && (top(e.to) === 'coordinator' || top(e.to) === 'deploy'));
  assert.deepEqual(bad.map((e) => `${e.from} -> ${e.to}`), []);
});

test('coordinator/ and deploy/ reach worker/ only to start it', () => {
  const bad = edges.filter((e) => (top(e.from) === 'coordinator' || top(e.from) === 'deploy') && top(e.to) === 'worker' && !(e.dynamic && e.to === WORKER_ENTRY));
  assert.deepEqual(bad.map((e) => `${e.from} -> ${e.to}`), []);
});

test('no import cycle', () => {
  const next = new Map<string, string[]>();
  for (const e of edges) next.set(e.from, [...(next.get(e.from) ?? []), e.to]);
  const state = new Map<string, 'open' | 'done'>();
  const cycles: string[] = [];
  const visit = (file: string, path: string[]): void => {
    if (state.get(file) === 'done') return;
    if (state.get(file) === 'open') {
      cycles.push([...path.slice(path.indexOf(file)), file].join(' -> '));
      return;
    }
    state.set(file, 'open');
    for (const to of next.get(file) ?? []) visit(to, [...path, file]);
    state.set(file, 'done');
  };
  for (const file of files) visit(file, []);
  assert.deepEqual(cycles, []);
});

test('the checks see the tree', () => {
  // A rename of a top-level folder or a change in import syntax must not make the checks above pass vacuously.
  assert.ok(files.length > 30, `found ${files.length} source files`);
  assert.ok(edges.length > 100, `found ${edges.length} imports`);
  assert.ok(edges.some((e) => e.from.startsWith('worker/') && e.to.startsWith('core/')), 'worker/ imports core/');
});
