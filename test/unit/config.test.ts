/**
 * The configuration module: defaults by where an option is used, environment mirrors, values refused with the
 * option and the value named, frozen results, argv written back, and the README's option table kept equal to
 * the declarations.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { OPTIONS, apiConfig, argvFor, clusterOptionsOf, commandConfig, declarationsOf, flagMirrors, readEnvironment, workerEnvironment, workerStartOf } from '../../coordinator/config.ts';
import { README, optionsTable, readmeTable } from '../../coordinator/config/readme.ts';
import { DEFAULT_MODEL_DIR } from '../../coordinator/config/options.ts';
import { isWeftError } from '../../core/errors.ts';
import type { WorkerOptions } from '../../worker/main.ts';
import { flagsOf } from '../helpers/cli.ts';

const model = { modelDir: '/models/m' } as const;
const refused = (pattern: RegExp) => (err: unknown) => isWeftError(err) && err.code === 'WEFT_BAD_REQUEST' && pattern.test(err.message);

test('defaults depend on where an option is used', () => {
  const generate = commandConfig('generate', { modelDir: '/m', prompt: 'hi' }, {});
  assert.deepEqual([generate.tp, generate.device, generate.kvSlots, generate.maxContext, generate.maxNewTokens, generate.temperature, generate.seed], [1, 'cpu', 16, 4096, 16, 0, undefined]);
  // a sequence costs a block-table row, the KV pool is what costs memory: more slots where batches pay (cuda)
  assert.deepEqual([generate.kvBlockSize, generate.kvCacheTokens, commandConfig('generate', { modelDir: '/m', prompt: 'hi', device: 'cuda' }, {}).kvSlots], [16, undefined, 256]);
  // SparQ reads a block's key columns as runs of B positions: its clusters default to blocks of 64; a given size wins
  assert.deepEqual([commandConfig('serve', { modelDir: '/m', attention: 'sparq' }, {}).kvBlockSize, commandConfig('serve', { modelDir: '/m', attention: 'sparq', kvBlockSize: '16' }, {}).kvBlockSize, commandConfig('serve', { modelDir: '/m' }, { WEFT_ATTENTION: 'sparq', WEFT_KV_BLOCK_SIZE: '32' }).kvBlockSize], [64, 16, 32]);
  assert.ok(Number.isInteger(generate.threads) && generate.threads >= 1);
  const serve = commandConfig('serve', { modelDir: '/m' }, {});
  assert.deepEqual([serve.rpcPort, serve.httpPort, serve.heartbeatTimeoutMs, serve.recover, serve.joinTimeoutMs], [5555, 8000, 4000, true, 60_000]);
  assert.equal(commandConfig('serve', { modelDir: '/m', workers: 'external', workerPort: '7000' }, {}).joinTimeoutMs, 120_000);
  const cluster = apiConfig('cluster', model);
  assert.deepEqual([cluster.heartbeatTimeoutMs, cluster.recover, cluster.maxQueue, cluster.workers], [30_000, false, 64, 'spawn']);
  const server = apiConfig('server', {});
  assert.deepEqual([server.rpcPort, server.httpPort, server.recover], [0, 0, true]);
  const launch = commandConfig('launch', { modelDir: '/m', gpus: '4,5,6' }, { WEFT_HOME: '/srv/weft' });
  assert.deepEqual([launch.device, launch.tp, launch.home, launch.name], ['cuda', 3, '/srv/weft', 'default']);
});

test('an environment mirror sets an option when its flag is absent; the flag wins; empty is unset', () => {
  assert.equal(commandConfig('serve', { modelDir: '/m' }, { WEFT_API_KEY: 'from-env' }).apiKey, 'from-env');
  assert.equal(commandConfig('serve', { modelDir: '/m', apiKey: 'from-flag' }, { WEFT_API_KEY: 'from-env' }).apiKey, 'from-flag');
  assert.equal(commandConfig('serve', { modelDir: '/m' }, { WEFT_API_KEY: '' }).apiKey, undefined);
  assert.equal(apiConfig('server', {}).apiKey, undefined, 'code-given options never read the environment');
  const environment = readEnvironment({ WEFT_NCCL_LIBRARY: '/opt/nccl/libnccl.so.2', WEFT_WORKER_STDERR: 'inherit' });
  assert.deepEqual([environment.ncclLibrary, environment.workerStderr, environment.workerSecret], ['/opt/nccl/libnccl.so.2', 'inherit', undefined]);
  assert.equal(readEnvironment({}).ncclLibrary, 'libnccl.so.2');
});

test('every flag of weft serve has an environment mirror: it sets the option, the flag wins, a bad value names the variable', () => {
  const flagged = declarationsOf('serve').filter(([, decl]) => decl.flag !== undefined);
  assert.deepEqual(flagged.filter(([, decl]) => decl.env === undefined).map(([key]) => key), []);
  const env = { WEFT_TP: '2', WEFT_HTTP_PORT: '9000', WEFT_EXPERT_PARALLEL: '1', WEFT_DRAFT: '/d', WEFT_REQUEST_TIMEOUT: '500', WEFT_WORKERS: 'external', WEFT_WORKER_PORT: '7001' };
  const serve = commandConfig('serve', { modelDir: '/m' }, env);
  assert.deepEqual([serve.tp, serve.httpPort, serve.expertParallel, serve.draftModelDir, serve.requestTimeoutMs, serve.workers, serve.workerPort], [2, 9000, true, '/d', 500, 'external', 7001]);
  assert.equal(commandConfig('serve', { modelDir: '/m', tp: '4' }, env).tp, 4, 'the flag wins');
  assert.equal(commandConfig('serve', {}, { WEFT_MODEL: '/from-env' }).modelDir, '/from-env', 'a required option can come from its variable');
  assert.throws(() => commandConfig('serve', { modelDir: '/m' }, { WEFT_TP: 'two' }), refused(/^WEFT_TP must be an integer >= 1, got "two"$/));
  assert.throws(() => commandConfig('serve', { modelDir: '/m' }, { WEFT_HTTP_PORT: '99999' }), refused(/^WEFT_HTTP_PORT must be an integer in \[0, 65535\], got "99999"$/));
  assert.doesNotThrow(() => commandConfig('serve', { modelDir: '/m', tp: '1' }, { WEFT_TP: 'two' }), 'a variable the flag overrides is not read');
  assert.deepEqual(flagMirrors(['tp', 'apiKey', 'home', 'recover']), ['WEFT_TP', 'WEFT_API_KEY'], 'mirrors of flags only');
});

test('--prompt and --prompt-ids together are refused, naming both; score takes no draft model', () => {
  assert.throws(() => commandConfig('generate', { modelDir: '/m', prompt: 'hi', promptIds: '1,2' }, {}), refused(/^--prompt and --prompt-ids were both given: give one of them$/));
  assert.deepEqual(declarationsOf('score').filter(([key]) => key.startsWith('draft') || key === 'speculateK'), []);
  assert.ok(declarationsOf('generate').some(([key]) => key === 'draftModelDir'));
});

test('the worker secret: the file wins over WEFT_WORKER_SECRET', () => {
  const file = join(mkdtempSync(join(tmpdir(), 'weft-config-')), 'secret');
  writeFileSync(file, 'from-file\n');
  const base = { coordinator: 'tcp://127.0.0.1:6000', rank: '0', world: '1' };
  assert.equal(commandConfig('worker', base, { WEFT_WORKER_SECRET: 'from-env' }).workerSecret, 'from-env');
  assert.equal(commandConfig('worker', { ...base, workerSecretFile: file }, { WEFT_WORKER_SECRET: 'from-env' }).workerSecret, 'from-file');
  assert.throws(() => commandConfig('worker', { ...base, workerSecretFile: `${file}.missing` }, {}), refused(/--worker-secret-file .*missing/));
  assert.equal(commandConfig('worker', base, { WEFT_WORKER_SECRET_FILE: file, WEFT_WORKER_SECRET: 'from-env' }).workerSecret, 'from-file', 'so does the file its variable names');
});

test('a bad value is refused where it enters, naming the option and the value', () => {
  assert.throws(() => commandConfig('generate', { modelDir: '/m', prompt: 'hi', tp: 'x' }, {}), refused(/^--tp must be an integer >= 1, got "x"$/));
  assert.throws(() => commandConfig('generate', { modelDir: '/m', prompt: 'hi', tp: '1.5' }, {}), refused(/--tp .*"1\.5"/));
  assert.throws(() => commandConfig('generate', { modelDir: '/m', promptIds: '1,2,x' }, {}), refused(/--prompt-ids .*"1,2,x" \(entry 2 is "x"\)/));
  assert.throws(() => commandConfig('generate', { modelDir: '/m', prompt: 'hi', device: 'tpu' }, {}), refused(/--device must be one of cpu, cuda, got "tpu"/));
  assert.throws(() => commandConfig('serve', { modelDir: '/m', rpcPort: '70000' }, {}), refused(/--rpc-port must be an integer in \[0, 65535\], got "70000"/));
  assert.throws(() => commandConfig('generate', { modelDir: '/m', prompt: 'hi' }, { WEFT_WORKER_STDERR: 'loud' }), refused(/^WEFT_WORKER_STDERR must be one of tail, inherit, got "loud"$/));
  assert.throws(() => commandConfig('launch', { modelDir: '/m', name: '../x' }, {}), refused(/--name must be letters/));
  assert.throws(() => apiConfig('cluster', { ...model, tp: 0 }), refused(/^tp must be an integer >= 1, got 0$/));
  assert.throws(() => apiConfig('cluster', { ...model, tp: '2' }), refused(/^tp must be an integer >= 1, got "2"$/));
  assert.throws(() => apiConfig('cluster', { ...model, draft: { modelDir: '/d', k: 17 } }), refused(/^draft\.k must be an integer in \[1, 16\], got 17$/));
  assert.throws(() => apiConfig('cluster', { modelDir: '' }), refused(/^modelDir must be a non-empty string/));
});

test('timeouts past 2^31-1 ms (where a Node timer fires at once) are refused, naming the limit', () => {
  const limit = /must be an integer number of ms in \[0, 2147483647\] \(2\^31-1, the longest a timer can wait\)/;
  assert.throws(() => commandConfig('serve', { modelDir: '/m', requestTimeoutMs: '2147483648' }, {}), refused(new RegExp(`^--request-timeout ${limit.source}, got "2147483648"$`)));
  assert.throws(() => apiConfig('cluster', { ...model, requestTimeoutMs: 2 ** 31 }), refused(new RegExp(`^requestTimeoutMs ${limit.source}`)));
  assert.throws(() => apiConfig('cluster', { ...model, heartbeatTimeoutMs: 1e12 }), refused(/^heartbeatTimeoutMs must be .*\[100, 2147483647\]/));
  assert.equal(commandConfig('serve', { modelDir: '/m', requestTimeoutMs: '2147483647' }, {}).requestTimeoutMs, 2 ** 31 - 1);
});

test('--allowed-hosts and --cors-origins: comma lists (lower-cased, trimmed), mirrored by WEFT_ALLOWED_HOSTS / WEFT_CORS_ORIGINS', () => {
  const serve = commandConfig('serve', { modelDir: '/m', allowedHosts: 'Weft.Internal, *' }, { WEFT_CORS_ORIGINS: 'http://App.example:3000,https://b.example' });
  assert.deepEqual(serve.allowedHosts, ['weft.internal', '*']);
  assert.deepEqual(serve.corsOrigins, ['http://app.example:3000', 'https://b.example']);
  assert.deepEqual(commandConfig('serve', { modelDir: '/m' }, { WEFT_ALLOWED_HOSTS: 'a.example' }).allowedHosts, ['a.example']);
  assert.deepEqual([commandConfig('serve', { modelDir: '/m' }, {}).allowedHosts, commandConfig('serve', { modelDir: '/m' }, {}).corsOrigins], [undefined, undefined]);
  assert.deepEqual(apiConfig('server', { corsOrigins: ['*'] }).corsOrigins, ['*']);
  assert.throws(() => commandConfig('serve', { modelDir: '/m', allowedHosts: 'a.example,,b' }, {}), refused(/^--allowed-hosts must be a comma-separated list of non-empty names, got "a\.example,,b" \(entry 1 is ""\)$/));
  assert.throws(() => apiConfig('server', { allowedHosts: 'a.example' }), refused(/^allowedHosts must be a comma-separated list/));
});

test('required options, options that need another, and checks across options', () => {
  // the commands fall back on the built-in model; code that embeds weft names its model
  for (const command of ['generate', 'score', 'serve', 'launch'] as const)
    assert.equal(commandConfig(command, command === 'generate' ? { prompt: 'hi' } : command === 'score' ? { ids: '1,2' } : {}, {}).modelDir, DEFAULT_MODEL_DIR, command);
  assert.ok(existsSync(join(DEFAULT_MODEL_DIR, 'model.safetensors')), 'the built-in model ships');
  assert.throws(() => apiConfig('cluster', {}), refused(/^modelDir is required$/));
  assert.throws(() => commandConfig('generate', { modelDir: '/m' }, {}), refused(/--prompt or --prompt-ids/));
  assert.throws(() => commandConfig('generate', { modelDir: '/m', prompt: 'hi', draftTp: '2' }, {}), refused(/^--draft-tp is only used with --draft$/));
  assert.throws(() => apiConfig('cluster', { ...model, draft: { modelDir: '/d', tp: 2, gpus: [0] } }), refused(/1 GPUs for a draft TP degree of 2/));
  assert.throws(() => commandConfig('worker', { coordinator: 'tcp://h:1', rank: '2', world: '2' }, {}), refused(/--rank 2 must be below --world 2/));
  assert.throws(() => commandConfig('launch', { modelDir: '/m', tp: '2', gpus: '0,1,2' }, {}), refused(/--gpus lists 3 GPUs for --tp 2/));
  assert.doesNotThrow(() => commandConfig('launch', { modelDir: '/m', tp: '2', gpus: '0,1,2', device: 'cpu' }, {}), 'GPUs do not matter on the CPU');
  assert.throws(() => commandConfig('serve', { modelDir: '/m', workers: 'external' }, {}), refused(/--workers external needs a fixed --worker-port/));
  const noDraft = apiConfig('cluster', model);
  assert.deepEqual([noDraft.draftTp, noDraft.speculateK], [undefined, undefined]);
  const draft = apiConfig('cluster', { ...model, draft: { modelDir: '/d', gpus: [2, 3] } });
  assert.deepEqual([draft.draftModelDir, draft.draftTp, draft.speculateK, draft.draftGpus], ['/d', 2, 4, [2, 3]]);
});

test('a configuration is frozen', () => {
  const config = commandConfig('generate', { modelDir: '/m', prompt: 'hi' }, {});
  assert.ok(Object.isFrozen(config));
  assert.throws(() => ((config as { tp: number }).tp = 2), TypeError);
  assert.ok(Object.isFrozen(apiConfig('cluster', model)));
  assert.ok(Object.isFrozen(readEnvironment({})));
});

test('argv written from a configuration reads back as the same configuration', () => {
  const worker = commandConfig('worker', { coordinator: 'tcp://127.0.0.1:6000', rank: '1', world: '4', parentPid: '77' }, {});
  const argv = argvFor('worker', worker);
  assert.equal(argv[0], 'worker');
  assert.ok(!argv.includes('--collective-host'), 'values at their default are left to the process');
  assert.deepEqual(commandConfig('worker', flagsOf(argv.slice(1)), {}), worker);
  const serve = commandConfig('serve', { modelDir: '/m', tp: '2', expertParallel: true, draftModelDir: '/d', draftGpus: '1', kvSlots: '8' }, {});
  assert.deepEqual(commandConfig('serve', flagsOf(argvFor('serve', serve).slice(1)), {}), serve);
});

test('startCluster options from a command, the draft nested as ClusterOptions has it', () => {
  const config = commandConfig('generate', { modelDir: '/m', prompt: 'hi', tp: '2', draftModelDir: '/d', speculateK: '3' }, {});
  const options = clusterOptionsOf(config);
  assert.deepEqual(options.draft, { modelDir: '/d', tp: 1, k: 3 });
  assert.equal(options.tp, 2);
  assert.equal(options.prompt, undefined, 'only what startCluster takes');
  assert.deepEqual(apiConfig('cluster', options), apiConfig('cluster', { modelDir: '/m', tp: 2, draft: { modelDir: '/d', k: 3 } }));
});

test("a spawned worker's environment and start options", () => {
  const env = workerEnvironment('s3cret');
  assert.equal(env.NCCL_NVLS_ENABLE, '0');
  assert.equal(env.WEFT_WORKER_SECRET, 's3cret');
  assert.equal(workerEnvironment(null).WEFT_WORKER_SECRET, undefined);
  const config = commandConfig('worker', { coordinator: 'tcp://127.0.0.1:6000', rank: '0', world: '2' }, { WEFT_WORKER_SECRET: 'k', WEFT_NCCL_LIBRARY: '/x/libnccl.so' });
  // what `weft worker` hands the worker entry must fit worker/main.ts's options (checked by the compiler here)
  const start: WorkerOptions = workerStartOf(config);
  assert.deepEqual(start, { coordinator: 'tcp://127.0.0.1:6000', rank: 0, world: 2, collectiveHost: '127.0.0.1', coordinatorTimeoutMs: 15_000, ncclLibrary: '/x/libnccl.so', secret: 'k' });
});

test("README's option table is the declarations' (regenerate: node --import tsx coordinator/config/readme.ts)", () => {
  const readme = readFileSync(README, 'utf8');
  assert.equal(readmeTable(readme), optionsTable());
  assert.equal(optionsTable().split('\n').length, 4 + Object.keys(OPTIONS).length, 'one row per declared option');
});

test('every flag and WEFT_ variable the README names for running weft is declared', () => {
  const readme = readFileSync(README, 'utf8');
  // the sections on running weft (the build and test sections name build variables)
  const running = readme.slice(readme.indexOf('## Run it'), readme.indexOf('## On GPUs')).replace(readmeTable(readme)!, '');
  // the declared flags, and the one the program itself has (coordinator/cli.ts)
  const flags = new Set([...Object.values(OPTIONS).flatMap((d) => ('flag' in d ? [d.flag as string] : [])), '--version']);
  const variables = new Set(Object.values(OPTIONS).flatMap((d) => ('env' in d ? [d.env as string] : [])));
  const named = [...running.matchAll(/(?<![\w-])--[a-z][a-z0-9-]*/g)].map((m) => m[0]);
  assert.ok(named.length > 20, 'the sections were found');
  assert.deepEqual(named.filter((f) => !flags.has(f)), []);
  assert.deepEqual([...running.matchAll(/WEFT_[A-Z_]+(?!\w|:)/g)].map((m) => m[0]).filter((v) => !variables.has(v)), []);
});
