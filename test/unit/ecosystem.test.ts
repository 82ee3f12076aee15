/** The pm2 ecosystem `weft launch` writes: one app per rank pinned to its GPU, the coordinator's serve flags, the draft. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { buildEcosystem, CONFIG_EXIT_CODE, type EcosystemConfig } from '../../deploy/ecosystem.ts';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { commandConfig } from '../../coordinator/config.ts';
import { flagsOf } from '../helpers/cli.ts';

const dir = mkdtempSync(join(tmpdir(), 'weft-ecosystem-'));
writeFileSync(join(dir, 'worker.secret'), 's3cret\n');

const base: EcosystemConfig = {
  name: 'c1',
  dir,
  node: '/usr/bin/node',
  weftBin: '/opt/weft/bin/weft.js',
  gpus: [2, 3],
  socketDir: null,
  serve: { modelDir: '/models/target', tp: 2, device: 'cuda', host: '127.0.0.1', rpcPort: 5555, httpPort: 8000, workerPort: 6000, kvSlots: 8 },
};

test('one fork-mode app per rank, pinned to its GPU, plus the coordinator; config errors stop restarts', () => {
  const { apps } = buildEcosystem(base);
  assert.deepEqual(apps.map((a) => a.name), ['weft-c1-coordinator', 'weft-c1-rank-0', 'weft-c1-rank-1']);
  assert.deepEqual(apps.slice(1).map((a) => a.env.CUDA_VISIBLE_DEVICES), ['2', '3']);
  assert.ok(apps.slice(1).every((a) => a.env.NCCL_NVLS_ENABLE === '0'));
  assert.ok(apps.every((a) => a.exec_mode === 'fork' && a.namespace === 'weft-c1' && a.stop_exit_codes.includes(CONFIG_EXIT_CODE)));
  assert.equal(CONFIG_EXIT_CODE, 78);
  assert.ok(!apps[0]!.args.includes('--draft'));
});

test('the argv written for each process reads back as the options it was built from', () => {
  const { apps } = buildEcosystem(base);
  assert.deepEqual(apps.map((a) => a.args.slice(0, 2)), [['/opt/weft/bin/weft.js', 'serve'], ['/opt/weft/bin/weft.js', 'worker'], ['/opt/weft/bin/weft.js', 'worker']]);
  const serve = commandConfig('serve', flagsOf(apps[0]!.args.slice(2)), {});
  assert.equal(serve.modelDir, '/models/target');
  assert.equal(serve.tp, 2);
  assert.equal(serve.device, 'cuda');
  assert.equal(serve.kvSlots, 8);
  assert.equal(serve.workers, 'external');
  assert.equal(serve.workerPort, 6000);
  assert.equal(serve.workerSecret, 's3cret', 'the coordinator reads the secret file');
  const worker = commandConfig('worker', flagsOf(apps[2]!.args.slice(2)), {});
  assert.deepEqual([worker.coordinator, worker.rank, worker.world, worker.workerSecret], ['tcp://127.0.0.1:6000', 1, 2, 's3cret']);
});

test("by default the workers reach the coordinator over ipc:// in the cluster's socket directory", () => {
  const { apps } = buildEcosystem({ ...base, socketDir: '/run/user/1000/weft-abc123', serve: { ...base.serve, workerPort: undefined } });
  const serve = commandConfig('serve', flagsOf(apps[0]!.args.slice(2)), {});
  assert.equal(serve.workerSocketDir, '/run/user/1000/weft-abc123');
  assert.equal(serve.workerPort, 0, 'no TCP port');
  for (const app of apps.slice(1)) assert.equal(commandConfig('worker', flagsOf(app.args.slice(2)), {}).coordinator, 'ipc:///run/user/1000/weft-abc123/worker.sock');
  assert.throws(() => buildEcosystem({ ...base, serve: { ...base.serve, workerPort: undefined } }), /a socket directory or a fixed worker port/);
});

test('a draft model reaches the coordinator with its TP degree and GPUs', () => {
  const { apps } = buildEcosystem({ ...base, serve: { ...base.serve, draftModelDir: '/models/draft', draftGpus: [4], draftTp: 1 } });
  const args = apps[0]!.args;
  const after = (flag: string): string | undefined => args[args.indexOf(flag) + 1];
  assert.equal(after('--draft'), '/models/draft');
  assert.equal(after('--draft-tp'), '1');
  assert.equal(after('--draft-gpus'), '4');
  assert.equal(apps.length, 3, "draft workers are the coordinator's children, not pm2 apps");
});

test('the HTTP allow-lists given to weft launch reach the coordinator it writes', () => {
  const { apps } = buildEcosystem({ ...base, serve: { ...base.serve, allowedHosts: ['weft.example.org'], corsOrigins: ['https://app.example.org'] } });
  const serve = commandConfig('serve', flagsOf(apps[0]!.args.slice(2)), {});
  assert.deepEqual(serve.allowedHosts, ['weft.example.org']);
  assert.deepEqual(serve.corsOrigins, ['https://app.example.org']);
  const launch = commandConfig('launch', flagsOf(['--model', '/m', '--allowed-hosts', 'a.example,b.example']), {});
  assert.deepEqual(launch.allowedHosts, ['a.example', 'b.example']);
});

test("launch's environment reaches the coordinator (pm2 passes it on) only for the serve options launch does not take", () => {
  const { apps } = buildEcosystem(base);
  // pm2 starts each app with the launching process's environment, the app's env laid over it
  const launcherEnv = { WEFT_MAX_CONTEXT: '128', WEFT_TP: '4', WEFT_WORKER_SOCKET_DIR: '/tmp/elsewhere', WEFT_API_KEY: 'k', WEFT_REQUEST_TIMEOUT: '900' };
  const serve = commandConfig('serve', flagsOf(apps[0]!.args.slice(2)), { ...launcherEnv, ...apps[0]!.env });
  assert.deepEqual([serve.maxContext, serve.tp, serve.workerSocketDir], [4096, 2, undefined], 'what launch resolved is not overridden by a variable');
  assert.deepEqual([serve.apiKey, serve.requestTimeoutMs], ['k', 900], 'a serve option launch has no flag for comes from the environment');
});

test("launch's KV pool, step budget and attention options reach the coordinator's serve flags", async () => {
  const { servingKnobs, LAUNCH_SERVING_KNOBS } = await import('../../deploy/launch.ts');
  const launchConfig = commandConfig('launch', flagsOf(['--model', '/m', '--kv-cache-tokens', '4096', '--gpu-memory-fraction', '0.5', '--max-num-batched-tokens', '2048', '--attention', 'sparq', '--sparq-r', '8', '--sparq-k', '64']), {});
  const knobs = servingKnobs(launchConfig);
  assert.deepEqual(Object.keys(knobs).sort(), [...LAUNCH_SERVING_KNOBS].sort());
  const { apps } = buildEcosystem({ ...base, serve: { ...base.serve, ...knobs } });
  const serve = commandConfig('serve', flagsOf(apps[0]!.args.slice(2)), {});
  assert.deepEqual([serve.kvCacheTokens, serve.gpuMemoryFraction, serve.maxNumBatchedTokens, serve.attention, serve.sparqR, serve.sparqK], [4096, 0.5, 2048, 'sparq', 8, 64]);
});
