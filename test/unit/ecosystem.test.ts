/** The pm2 ecosystem `weft launch` writes: one app per rank pinned to its GPU, the coordinator's serve flags, the draft. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { buildEcosystem, CONFIG_EXIT_CODE, type EcosystemConfig } from '../../deploy/ecosystem.ts';

const base: EcosystemConfig = {
  name: 'c1',
  modelDir: '/models/target',
  tp: 2,
  device: 'cuda',
  gpus: [2, 3],
  host: '127.0.0.1',
  rpcPort: 5555,
  httpPort: 8000,
  workerPort: 6000,
  dir: '/tmp/weft/c1',
  node: '/usr/bin/node',
  weftBin: '/opt/weft/bin/weft.js',
};

test('one fork-mode app per rank, pinned to its GPU, plus the coordinator; config errors stop restarts', () => {
  const { apps } = buildEcosystem(base);
  assert.deepEqual(apps.map((a) => a.name), ['weft-c1-coordinator', 'weft-c1-rank-0', 'weft-c1-rank-1']);
  assert.deepEqual(apps.slice(1).map((a) => a.env.CUDA_VISIBLE_DEVICES), ['2', '3']);
  assert.ok(apps.every((a) => a.exec_mode === 'fork' && a.namespace === 'weft-c1' && a.stop_exit_codes.includes(CONFIG_EXIT_CODE)));
  assert.equal(CONFIG_EXIT_CODE, 78);
  assert.ok(!apps[0]!.args.includes('--draft'));
});

test('a draft model reaches the coordinator with its TP degree and GPUs', () => {
  const { apps } = buildEcosystem({ ...base, draft: { modelDir: '/models/draft', gpus: [4], tp: 1 } });
  const args = apps[0]!.args;
  const after = (flag: string): string | undefined => args[args.indexOf(flag) + 1];
  assert.equal(after('--draft'), '/models/draft');
  assert.equal(after('--draft-tp'), '1');
  assert.equal(after('--draft-gpus'), '4');
  assert.equal(apps.length, 3, "draft workers are the coordinator's children, not pm2 apps");
});
