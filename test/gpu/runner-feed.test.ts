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

test('a logit bias on CUDA (a decode-shaped step, run eagerly: no graph takes a bias) draws what the CPU draws', { skip }, async () => {
  const name = 'llama-tiny';
  const dir = fixtureDir(name);
  const spec = readModelSpec(dir);
  const plan = planShards(spec, 1);
  const cpuKv = kvCacheLayout({ kvSlots: 4, maxContext: 32, device: 'cpu' });
  const cpuEngine = createEngine({ backend: 'cpu', threads: 1 });
  const cpu = new StepRunner(cpuEngine, soloCollectives(), buildRankModel(cpuEngine, spec, plan, 0, hostWeights(cpuEngine, 0, await loadShard(dir, spec, plan, 0)), cpuKv), cpuKv);
  const cuda = await cudaRunner(name);
  const prompts = [[1, 17, 42, 99], [1, 5, 8]];
  const greedy = (n: number) => ({ temperature: Array(n).fill(0), topK: Array(n).fill(0), topP: Array(n).fill(1), uniform: Array(n).fill(0.5) });
  const prefill = {
    tokens: prompts.flat(),
    positions: prompts.flatMap((p) => p.map((_, i) => i)),
    tokenSeq: prompts.flatMap((p, s) => p.map(() => s)),
    kvBlockTable: [[0], [1]],
    logitRows: [3, 6],
    sample: greedy(2),
    logitBias: { rows: [0, 1], ids: [7, 300], values: [100, 100] },
  };
  const [a, b] = [await cpu.step(prefill), await cuda.step(prefill)];
  assert.deepEqual(a.tokens, [7, 300]);
  assert.deepEqual(b.tokens, a.tokens);
  // one token a sequence, in order: a graph's shape, but biased, so eager; -100 bans each row's unbiased choice
  const decode = { tokens: [7, 300], positions: [4, 3], tokenSeq: [0, 1], kvBlockTable: [[0], [1]], logitRows: [0, 1], sample: greedy(2) };
  const unbiased = (await cpu.step(decode)).tokens!;
  const banned = { ...decode, logitBias: { rows: [0, 1], ids: unbiased, values: [-100, -100] } };
  const [c, d] = [await cpu.step(banned), await cuda.step(banned)];
  assert.ok(c.tokens!.every((t, i) => t !== unbiased[i]), 'the CPU draws around the ban');
  assert.deepEqual(d.tokens, c.tokens);
});
