/**
 * reliability.md G12: no executable serialization anywhere in weft's own code. A static check over the sources:
 * no eval or Function constructor, one msgpackr configuration (plain maps, no records, no structured clone,
 * no extension types) in core/wire.ts, and no socket decode that skips wire.decode's pre-scan.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('../../', import.meta.url));
function sources(dir: string): string[] {
  return readdirSync(join(root, dir)).flatMap((name) => {
    const path = join(root, dir, name);
    if (statSync(path).isDirectory()) return sources(relative(root, path));
    return /\.(ts|mjs|js)$/.test(name) ? [path] : [];
  });
}
const files = ['core', 'coordinator', 'worker', 'deploy', 'bin'].flatMap(sources);

test('no eval, no Function constructor', () => {
  assert.ok(files.length > 20, `found ${files.length} source files`);
  for (const file of files) {
    const text = readFileSync(file, 'utf8');
    assert.doesNotMatch(text, /\beval\s*\(|new\s+Function\s*\(/, relative(root, file));
  }
});

test('one msgpackr configuration, and every unpack goes through the pre-scanned decode', () => {
  const packers = files.filter((f) => /new\s+(Packr|Unpackr)\s*\(/.test(readFileSync(f, 'utf8')));
  assert.deepEqual(packers.map((f) => relative(root, f)), ['core/wire.ts']);
  const wire = readFileSync(join(root, 'core/wire.ts'), 'utf8');
  assert.match(wire, /new Packr\(\{ useRecords: false, structuredClone: false, moreTypes: false, mapsAsObjects: true, int64AsType: 'number' \}\)/);
  assert.match(wire, /export function decode[\s\S]*?checkMsgpack\(frame\);[\s\S]*?packr\.unpack/, 'decode pre-scans before unpacking');
  for (const file of files) {
    const text = readFileSync(file, 'utf8');
    if (file.endsWith('wire.ts')) continue;
    assert.doesNotMatch(text, /\.unpack\(|from 'msgpackr'/, `${relative(root, file)} decodes MessagePack outside wire.ts`);
  }
});
