/**
 * The decode pipeline on CUDA (test/helpers/feed-scenario.ts): steps launched back to back, decode tokens fed from
 * the previous step's draw on the device through the decode graphs, draw what the same steps draw one at a time
 * with every token given. Skips, saying why, without a CUDA build or a GPU.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine } from '../../worker/native.ts';
import { readModelSpec } from '../../core/model-spec.ts';
import { planShards } from '../../core/shard-plan.ts';
import { loadShard } from '../../worker/weights/load-shard.ts';
import { buildRankModel, hostWeights } from '../../worker/models/registry.ts';
import { soloCollectives } from '../../worker/collectives/collectives.ts';
import { StepRunner } from '../../worker/runner.ts';
import { kvCacheLayout } from '../../core/kv-block-table.ts';
import { FIXTURE_MODELS, fixtureDir } from '../helpers/fixtures.ts';
import { feedScenario } from '../helpers/feed-scenario.ts';
import { gpuSkipReason } from '../helpers/cluster.ts';

const skip = gpuSkipReason();
if (skip) console.log(`# GPU suite skipped: ${skip}`);

async function cudaRunner(name: string): Promise<StepRunner> {
  const dir = fixtureDir(name);
  const spec = readModelSpec(dir);
  const plan = planShards(spec, 1);
  const kv = kvCacheLayout({ kvSlots: 4, maxContext: 32, device: 'cuda' });
  const engine = createEngine({ backend: 'cuda', arenaBytes: 256 << 20 });
  const model = buildRankModel(engine, spec, plan, 0, hostWeights(engine, 0, await loadShard(dir, spec, plan, 0)), kv);
  return new StepRunner(engine, soloCollectives(), model, kv);
}

for (const name of FIXTURE_MODELS.filter((n) => n.startsWith('llama') || n.startsWith('mixtral')))
  test(`${name}: fed decode steps on CUDA draw the tokens of the same steps given one at a time`, { skip }, async () => {
    const { fed, given } = await feedScenario(await cudaRunner(name), await cudaRunner(name));
    assert.deepEqual(fed, given);
  });
