/**
 * weft as a user installs it: `npm pack` (which compiles dist/ through `prepare`), the tarball installed into an
 * empty folder, then plain Node ESM importing the public API, a consumer's `tsc` (no tsx, no
 * allowImportingTsExtensions) on a file using the types and on README's examples, the examples marked `run`
 * compiled and run against hf-tiny on the CPU, and the installed `weft` command. tsx is removed from the
 * installed tree first: the package must not need it. The install skips install scripts (the addon build, a
 * minute of CMake) and takes the repository's built weft.node instead, built from the same sources; the
 * package's native sources are compared with the repository's. Skips, saying why, without npm or without a
 * registry for the tarball's dependencies. The lock-file checks need neither.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { fixtureDir, readReference } from '../helpers/fixtures.ts';

const SOTU_REFERENCE = fileURLToPath(new URL('../fixtures/sotu-llama/', import.meta.url));

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { name: string; version: string; dependencies: Record<string, string>; devDependencies: Record<string, string> };
const ADDON = join(ROOT, 'native', 'build', 'weft.node');
const TSC = join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
/** npm's answers when the registry (or the network) cannot be reached */
const OFFLINE = /\b(ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH|ENOTCACHED)\b/;

/** The environment without what an enclosing `npm test` adds, so nested npm commands act as a user's would. */
const env = Object.fromEntries(Object.entries(process.env).filter(([key]) => !/^npm_/i.test(key) && key !== 'INIT_CWD'));

/** `output`: stdout and stderr together (and why it could not start), for failure messages. */
function run(command: string, args: string[], cwd: string, timeoutMs: number): { status: number | null; stdout: string; output: string } {
  const r = spawnSync(command, args, { cwd, env, encoding: 'utf8', timeout: timeoutMs, maxBuffer: 64 << 20 });
  return { status: r.error ? null : r.status, stdout: r.stdout ?? '', output: `${r.error ? `${r.error.message}\n` : ''}${r.stdout ?? ''}${r.stderr ?? ''}` };
}

interface ReadmeExample {
  code: string;
  /** also run against hf-tiny (fence ```ts example run), not only typechecked (```ts example) */
  run: boolean;
  /** README line of the fence */
  line: number;
}

/** README's code blocks marked as examples: a fence of `ts example` or `ts example run`. */
function readmeExamples(readme: string): ReadmeExample[] {
  return [...readme.matchAll(/^```ts example( run)?\n([\s\S]*?)^```$/gm)].map((m) => ({
    code: m[2]!,
    run: m[1] !== undefined,
    line: readme.slice(0, m.index).split('\n').length,
  }));
}

const filesUnder = (dir: string): string[] => (readdirSync(dir, { recursive: true, withFileTypes: true }) as { isFile(): boolean; name: string; parentPath?: string; path: string }[])
  .filter((e) => e.isFile())
  .map((e) => join(e.parentPath ?? e.path, e.name).slice(dir.length + 1))
  .sort();

describe('the lock file', () => {
  const lock = JSON.parse(readFileSync(join(ROOT, 'package-lock.json'), 'utf8')) as {
    name: string;
    version: string;
    packages: Record<string, { name?: string; version?: string; dependencies?: Record<string, string>; devDependencies?: Record<string, string>; optionalDependencies?: Record<string, string> }>;
  };

  test("carries every locked package's optional dependencies, whatever the platform (npm ci works on all)", () => {
    const missing: string[] = [];
    for (const [path, entry] of Object.entries(lock.packages)) {
      for (const dep of Object.keys(entry.optionalDependencies ?? {})) {
        // node's lookup: the package's own node_modules, then each enclosing one up to the root
        const dirs = path.split('/node_modules/').map((_, i, parts) => parts.slice(0, parts.length - i).join('/node_modules/'));
        if (![...dirs.filter(Boolean), ''].some((dir) => lock.packages[`${dir ? `${dir}/` : ''}node_modules/${dep}`])) missing.push(`${path || '(root)'} -> ${dep}`);
      }
    }
    assert.deepEqual(missing, []);
    const optional = Object.keys(lock.packages).filter((p) => p.includes('@msgpackr-extract/'));
    assert.ok(optional.length >= 6, `msgpackr-extract's platform packages are locked: ${optional.join(', ')}`);
  });

  test("matches package.json (name, version, dependencies), so npm ci accepts it and npm install leaves it as it is", () => {
    const root = lock.packages['']!;
    assert.deepEqual([lock.name, lock.version, root.name, root.version], [pkg.name, pkg.version, pkg.name, pkg.version]);
    assert.deepEqual(root.dependencies, pkg.dependencies);
    assert.deepEqual(root.devDependencies, pkg.devDependencies);
  });
});

describe('the packed package, installed into an empty folder', () => {
  let dir = '';
  let app = '';
  let skip: string | null = null;

  before(() => {
    const npm = run('npm', ['--version'], ROOT, 30_000);
    if (npm.status !== 0) {
      skip = `npm cannot run here (${npm.output.trim().split('\n')[0]})`;
      return;
    }
    dir = mkdtempSync(join(tmpdir(), 'weft-package-'));
    const packed = run('npm', ['pack', '--pack-destination', dir, '--loglevel=error'], ROOT, 300_000);
    assert.equal(packed.status, 0, `npm pack failed:\n${packed.output}`);
    const tarball = readdirSync(dir).find((f) => f.endsWith('.tgz'));
    assert.ok(tarball, `npm pack wrote no tarball into ${dir}:\n${packed.output}`);
    app = join(dir, 'app');
    mkdirSync(app);
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'weft-consumer', private: true, type: 'module' }));
    const installed = run('npm', ['install', '--prefer-offline', '--fetch-retries=1', '--fetch-timeout=60000', '--ignore-scripts', '--no-audit', '--no-fund', '--loglevel=error', join(dir, tarball)], app, 300_000);
    if (installed.status !== 0 && OFFLINE.test(installed.output)) {
      skip = `the package registry cannot be reached for the tarball's dependencies (${installed.output.match(OFFLINE)![0]})`;
      return;
    }
    assert.equal(installed.status, 0, `npm install of the tarball failed:\n${installed.output}`);
    rmSync(join(app, 'node_modules', 'tsx'), { recursive: true, force: true });
  });

  after(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const installedPackage = (): string => join(app, 'node_modules', ...pkg.name.split('/'));
  /** The repository's weft.node in the installed package, where dist/worker/native.js looks; false without one. */
  const withAddon = (): boolean => {
    if (!existsSync(ADDON)) return false;
    mkdirSync(join(installedPackage(), 'native', 'build'), { recursive: true });
    cpSync(ADDON, join(installedPackage(), 'native', 'build', 'weft.node'));
    return true;
  };

  test('ships compiled JavaScript with declarations, the native sources and build script, and no TypeScript sources', (t) => {
    if (skip) return t.skip(skip);
    const files = filesUnder(installedPackage());
    const sources = files.filter((f) => f.endsWith('.ts') && !f.endsWith('.d.ts'));
    assert.deepEqual(sources, [], 'no .ts sources');
    for (const f of ['package.json', 'bin/weft.js', 'dist/coordinator/index.js', 'dist/coordinator/index.d.ts', 'dist/worker/main.js', 'dist/coordinator/text-thread.js', 'native/build.mjs', 'native/CMakeLists.txt', 'models/sotu-llama/model.safetensors', 'models/sotu-llama-draft/tokenizer.json'])
      assert.ok(files.includes(f), `${f} is in the package`);
    const nativeSources = files.filter((f) => f.startsWith('native/src/')).map((f) => f.slice('native/src/'.length));
    assert.deepEqual(nativeSources, filesUnder(join(ROOT, 'native', 'src')), 'every native source (the install script builds the addon from them)');
    assert.ok(!files.some((f) => f.startsWith('test/') || f.startsWith('native/build/')), 'no tests, no local build');
  });

  test('plain Node ESM imports the public API from the package name', (t) => {
    if (skip) return t.skip(skip);
    const script = `import * as weft from '${pkg.name}'; console.log(JSON.stringify({ resolved: import.meta.resolve('${pkg.name}'), kinds: Object.fromEntries(Object.entries(weft).map(([k, v]) => [k, typeof v])) }));`;
    const r = run(process.execPath, ['--input-type=module', '-e', script], app, 60_000);
    assert.equal(r.status, 0, r.output);
    const { resolved, kinds } = JSON.parse(r.stdout) as { resolved: string; kinds: Record<string, string> };
    assert.match(resolved, /\/dist\/coordinator\/index\.js$/);
    assert.deepEqual(kinds, { Cluster: 'function', WeftClient: 'function', WeftError: 'function', isWeftError: 'function', serve: 'function', startCluster: 'function' });
  });

  test("a consumer's tsc typechecks code using the types and README's examples, which the run ones then do", { timeout: 300_000 }, async (t) => {
    if (skip) return t.skip(skip);
    const examples = readmeExamples(readFileSync(join(ROOT, 'README.md'), 'utf8'));
    assert.ok(examples.length >= 2 && examples.some((e) => e.run), `README marks its examples (found ${examples.length})`);
    const src = join(app, 'src');
    mkdirSync(src);
    writeFileSync(join(src, 'use.ts'), [
      `import { startCluster, WeftClient, WeftError, isWeftError, type ClusterOptions, type GenerationEvent } from '${pkg.name}';`,
      `const options: ClusterOptions = { modelDir: 'model', tp: 2 };`,
      `// @ts-expect-error the types are real: a number is no model directory`,
      `const wrong: ClusterOptions = { modelDir: 1 };`,
      `const done = (e: GenerationEvent): boolean => e.type === 'done';`,
      `export const used = [startCluster, WeftClient, WeftError, isWeftError, options, wrong, done];`,
    ].join('\n'));
    examples.forEach((e, i) => writeFileSync(join(src, `readme-${i}.ts`), e.code));
    writeFileSync(join(app, 'tsconfig.json'), JSON.stringify({
      compilerOptions: {
        target: 'ES2022', module: 'NodeNext', moduleResolution: 'NodeNext', strict: true, skipLibCheck: false,
        outDir: 'out', rootDir: 'src', typeRoots: [join(ROOT, 'node_modules', '@types')], types: ['node'],
      },
      include: ['src'],
    }));
    const tsc = run(process.execPath, [TSC, '-p', 'tsconfig.json'], app, 240_000);
    assert.equal(tsc.status, 0, `tsc failed:\n${tsc.output}`);

    if (!withAddon()) return t.skip(`no ${ADDON} to run the examples with (npm run build:native)`);
    for (const [i, example] of examples.entries()) {
      if (!example.run) continue;
      // from the repository's root, as README runs them (relative model paths)
      const r = run(process.execPath, [join(app, 'out', `readme-${i}.js`)], ROOT, 120_000);
      assert.equal(r.status, 0, `README example ${i} (line ${example.line}) failed:\n${r.output}`);
      assert.ok(r.stdout.length > 0, `README example ${i} printed the generated text`);
    }
  });

  test("README's WeftClient example against a server of the package (its endpoint put in for 5555's)", { timeout: 180_000 }, async (t) => {
    if (skip) return t.skip(skip);
    const example = readmeExamples(readFileSync(join(ROOT, 'README.md'), 'utf8')).findIndex((e) => e.code.includes('WeftClient.connect'));
    assert.ok(example >= 0, 'README has a WeftClient example');
    const compiled = join(app, 'out', `readme-${example}.js`);
    if (!existsSync(compiled)) return t.skip('the examples were not compiled (the typecheck test failed or skipped)');
    if (!withAddon()) return t.skip(`no ${ADDON} (npm run build:native)`);
    const server = spawn(process.execPath, ['--input-type=module', '-e', [
      `import { serve } from '${pkg.name}';`,
      `const server = await serve({ modelDir: ${JSON.stringify(fixtureDir('llama-tiny'))}, tp: 1, rpcPort: 0, httpPort: 0 });`,
      `console.log(server.rpcEndpoint);`,
      `process.stdin.on('end', () => server.close()).resume();`,
    ].join('\n')], { cwd: app, env, stdio: ['pipe', 'pipe', 'pipe'] });
    let serverOutput = '';
    server.stderr.setEncoding('utf8').on('data', (d: string) => (serverOutput += d));
    try {
      const endpoint = await new Promise<string>((resolve, reject) => {
        let out = '';
        server.stdout.setEncoding('utf8').on('data', (d: string) => {
          out += d;
          if (out.includes('\n')) resolve(out.trim());
        });
        server.on('exit', (code) => reject(new Error(`the server exited (${code}) before it served: ${serverOutput}`)));
      });
      const code = readFileSync(compiled, 'utf8');
      assert.ok(code.includes('tcp://127.0.0.1:5555'), 'the example connects to 5555, as README serves');
      const local = join(app, 'out', 'readme-client.js');
      writeFileSync(local, code.replace('tcp://127.0.0.1:5555', endpoint));
      const r = run(process.execPath, [local], app, 60_000);
      assert.equal(r.status, 0, `the WeftClient example failed:\n${r.output}`);
      assert.ok(r.stdout.length > 0, 'it printed the generated text');
    } finally {
      server.stdin.end();
      await new Promise((resolve) => {
        const kill = setTimeout(() => server.kill('SIGKILL'), 15_000);
        server.once('exit', () => resolve(clearTimeout(kill)));
        if (server.exitCode !== null) resolve(clearTimeout(kill));
      });
    }
  });

  test('the installed weft command runs the compiled CLI: --version, and generate equal to Hugging Face at TP 2', { timeout: 120_000 }, (t) => {
    if (skip) return t.skip(skip);
    const bin = join(app, 'node_modules', '.bin', 'weft');
    const version = run(bin, ['--version'], app, 30_000);
    assert.equal(version.status, 0, version.output);
    assert.equal(version.stdout.trim(), pkg.version);
    if (!withAddon()) return t.skip(`no ${ADDON} (npm run build:native)`);
    const reference = readReference('llama-tiny');
    const r = run(bin, ['generate', '--model', fixtureDir('llama-tiny'), '--tp', '2', '--prompt-ids', reference.prompts[0]!.join(','), '--max-new-tokens', '6', '--ignore-eos', '--json'], app, 90_000);
    assert.equal(r.status, 0, r.output);
    assert.deepEqual((JSON.parse(r.stdout) as { tokens: number[] }).tokens, reference.greedy[0]!.slice(0, 6));
    // without --model: the built-in model, from the package's own models/
    const builtIn = run(bin, ['generate', '--prompt', 'The state of the Union is', '--max-new-tokens', '6', '--json'], app, 90_000);
    assert.equal(builtIn.status, 0, builtIn.output);
    assert.match(builtIn.output, /node_modules\/@weft-ai\/weft\/models\/sotu-llama/);
    assert.deepEqual((JSON.parse(builtIn.stdout) as { tokens: number[] }).tokens, readReference(SOTU_REFERENCE).greedy[0]!.slice(0, 6));
  });
});
