#!/usr/bin/env node
// Builds native/build/weft.node with CMake: `node native/build.mjs` (npm's install and build:native scripts).
//   WEFT_CUDA=1  also build the CUDA backend (-DWEFT_CUDA=ON; needs nvcc; cuBLAS is loaded at run time).
//   --cuda-compile-check  only compile every native/src/cuda source with nvcc -c (no link, no GPU, no cuBLAS)
//                into native/build/cuda-check/, then build and run the host checks (native/test/host-*.cu: host code
//                against the kernels' headers), exiting 1 on the first failure: a CI check on hosts with nvcc.
// Configures once and then only rebuilds (CMake's incremental build); reconfigures when its arguments change.
// Exits 1 with a one-line message when a tool is missing or the build fails.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const nativeDir = path.dirname(fileURLToPath(import.meta.url));
const buildDir = path.join(nativeDir, 'build');
const output = path.join(buildDir, 'weft.node');
const require = createRequire(import.meta.url);

function fail(message) {
  console.error(`weft: ${message}`);
  process.exit(1);
}

/** The first line of `command --version`, or null when it cannot run. */
function toolVersion(command) {
  const r = spawnSync(command, ['--version'], { encoding: 'utf8' });
  return r.error || r.status !== 0 ? null : (r.stdout.split('\n')[0] ?? '').trim();
}

function headerDirs() {
  try {
    // node-addon-api's include_dir is relative to the working directory at require time.
    return { nodeApi: require('node-api-headers').include_dir, addonApi: path.resolve(require('node-addon-api').include_dir) };
  } catch (err) {
    fail(`cannot find node-api-headers / node-addon-api (${err.message.split('\n')[0]}); run \`npm install\` first`);
  }
}

function checkTools(cuda) {
  const cmake = toolVersion('cmake');
  if (!cmake) fail('cmake not found on PATH; install CMake >= 3.19 (e.g. `apt-get install cmake`) and run `npm run build:native` again');
  const [major, minor] = (cmake.match(/(\d+)\.(\d+)/) ?? []).slice(1).map(Number);
  if (!(major > 3 || (major === 3 && minor >= 19))) fail(`${cmake} is too old; weft needs CMake >= 3.19`);
  const compilers = process.env.CXX ? [process.env.CXX] : ['c++', 'g++', 'clang++'];
  if (!compilers.some((c) => toolVersion(c))) {
    fail(`no C++ compiler found (tried ${compilers.join(', ')}); install one (e.g. \`apt-get install g++\`) or set CXX`);
  }
  if (!cuda) return [];
  const nvcc = process.env.CUDACXX ?? (toolVersion('nvcc') ? 'nvcc' : '/usr/local/cuda/bin/nvcc');
  if (!toolVersion(nvcc)) fail(`WEFT_CUDA=1 but nvcc was not found (tried ${nvcc}); install the CUDA toolkit or set CUDACXX`);
  return nvcc === 'nvcc' ? [] : [`-DCMAKE_CUDA_COMPILER=${nvcc}`];
}

function run(args, what) {
  const r = spawnSync('cmake', args, { stdio: 'inherit' });
  if (r.error) fail(`${what} could not start: ${r.error.message}`);
  if (r.status !== 0) fail(`${what} failed (cmake exited ${r.status ?? r.signal}); see the output above`);
}

/** Compiles each .cu (and the .cc files of the CUDA backend, as host code) with nvcc -c, in parallel. */
async function cudaCompileCheck() {
  const { readdirSync, mkdirSync } = await import('node:fs');
  const { spawn } = await import('node:child_process');
  const nvcc = process.env.CUDACXX ?? (toolVersion('nvcc') ? 'nvcc' : '/usr/local/cuda/bin/nvcc');
  if (!toolVersion(nvcc)) fail(`--cuda-compile-check: nvcc was not found (tried ${nvcc}); install the CUDA toolkit or set CUDACXX`);
  const src = path.join(nativeDir, 'src');
  const outDir = path.join(buildDir, 'cuda-check'); // inside native/build/, which git ignores
  mkdirSync(outDir, { recursive: true });
  const files = [
    ...readdirSync(path.join(src, 'cuda')).filter((f) => /\.(cu|cc)$/.test(f)).map((f) => path.join(src, 'cuda', f)),
    path.join(nativeDir, 'test', 'ops-check.cc'),
  ];
  // The flags of the CMake build: C++17, Hopper sm_90a, no fast math.
  const flags = ['-std=c++17', '-gencode', 'arch=compute_90a,code=sm_90a', '-O3', '-Xcompiler=-Wall', `-I${src}`];
  const compile = (file) => new Promise((resolve) => {
    const out = path.join(outDir, `${path.basename(file)}.o`);
    const child = spawn(nvcc, [...flags, ...(file.endsWith('.cc') ? ['-x', 'c++'] : []), '-c', file, '-o', out], { stdio: ['ignore', 'pipe', 'pipe'] });
    let text = '';
    child.stdout.on('data', (d) => (text += d));
    child.stderr.on('data', (d) => (text += d));
    child.on('error', (err) => resolve({ file, ok: false, text: err.message }));
    child.on('close', (code) => resolve({ file, ok: code === 0, text }));
  });
  const jobs = typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
  const results = [];
  for (let i = 0; i < files.length; i += jobs) results.push(...(await Promise.all(files.slice(i, i + jobs).map(compile))));
  for (const r of results) if (r.text.trim()) process.stderr.write(`${path.relative(process.cwd(), r.file)}:\n${r.text}`);
  const failed = results.filter((r) => !r.ok);
  if (failed.length) fail(`--cuda-compile-check: ${failed.length} of ${results.length} files failed to compile: ${failed.map((r) => path.basename(r.file)).join(', ')}`);
  console.log(`weft: --cuda-compile-check: ${results.length} files compiled with ${nvcc} (sm_90a) into ${path.relative(process.cwd(), outDir) || outDir}`);
  // Host checks: what a kernel sizes from host-side plans, checked over whole ranges of shapes without a GPU.
  const testDir = path.join(nativeDir, 'test');
  for (const name of readdirSync(testDir).filter((f) => /^host-.*\.cu$/.test(f))) {
    const exe = path.join(outDir, name.replace(/\.cu$/, ''));
    const built = spawnSync(nvcc, [...flags, path.join(testDir, name), '-o', exe], { stdio: 'inherit' });
    if (built.status !== 0) fail(`--cuda-compile-check: the host check ${name} failed to build`);
    const ran = spawnSync(exe, [], { stdio: 'inherit' });
    const status = ran.status ?? ran.signal;
    if (ran.status !== 0) fail(`--cuda-compile-check: the host check ${name} failed (exit ${status})`);
  }
  process.exit(0);
}

if (process.argv.includes('--cuda-compile-check')) await cudaCompileCheck();

const cuda = ['1', 'on', 'true', 'yes'].includes((process.env.WEFT_CUDA ?? '').toLowerCase());
const extra = checkTools(cuda);
const dirs = headerDirs();
const configureArgs = [
  '-S', nativeDir, '-B', buildDir,
  '-DCMAKE_BUILD_TYPE=Release',
  `-DWEFT_CUDA=${cuda ? 'ON' : 'OFF'}`,
  `-DNODE_API_HEADERS_DIR=${dirs.nodeApi}`,
  `-DNODE_ADDON_API_DIR=${dirs.addonApi}`,
  ...extra,
];

// Configure only when there is no cache or the arguments changed (then start from a fresh cache, so that a
// moved checkout or a switch of WEFT_CUDA never meets stale cached values).
const stamp = path.join(buildDir, 'weft-configure.json');
const stampText = JSON.stringify(configureArgs);
const configured = existsSync(path.join(buildDir, 'CMakeCache.txt')) && existsSync(stamp) && readFileSync(stamp, 'utf8') === stampText;
if (!configured) {
  rmSync(path.join(buildDir, 'CMakeCache.txt'), { force: true });
  rmSync(path.join(buildDir, 'CMakeFiles'), { recursive: true, force: true });
  rmSync(stamp, { force: true });
  run(configureArgs, 'cmake configure');
  writeFileSync(stamp, stampText);
}
const jobs = typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
run(['--build', buildDir, '--parallel', String(jobs)], 'cmake build');

// Load what was built, so a broken binary fails here rather than in the first test.
try {
  const info = require(output).nativeInfo();
  console.log(`weft: built ${path.relative(process.cwd(), output) || output} (version ${info.version}, cuda: ${info.cuda})`);
} catch (err) {
  fail(`built ${output} but it does not load: ${String(err.message).split('\n')[0]}`);
}
