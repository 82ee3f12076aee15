/**
 * Per-row log-probs on CUDA: a decode step that runs as a CUDA graph (topLogprobs read after the replay from the
 * graph's logits and draw) answers what the same step run eagerly with its full log-softmax rows says, and rows
 * that ask nothing answer null. Skips, saying why, without a CUDA build or a GPU.
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
import type { StepBatch } from '../../core/step-batch.ts';
import { fixtureDir, readReference } from '../helpers/fixtures.ts';
import { gpuSkipReason } from '../helpers/cluster.ts';

const skip = gpuSkipReason();
if (skip) console.log(`# GPU suite skipped: ${skip}`);

const dir = fixtureDir('llama-tiny');

async function cudaRunner(): Promise<{ runner: StepRunner; vocab: number }> {
  const spec = readModelSpec(dir);
  const plan = planShards(spec, 1);
  const kv = kvCacheLayout({ kvSlots: 4, maxContext: 32, device: 'cuda' });
  const engine = createEngine({ backend: 'cuda', arenaBytes: 256 << 20 });
  const model = buildRankModel(engine, spec, plan, 0, hostWeights(engine, 0, await loadShard(dir, spec, plan, 0)), kv);
  return { runner: new StepRunner(engine, soloCollectives(), model, kv), vocab: spec.vocabSize };
}

test('a graph decode step rates its draw as the eager step\'s log-softmax does', { skip }, async () => {
  const [a, b] = [await cudaRunner(), await cudaRunner()];
  const prompts = readReference('llama-tiny').prompts.slice(1).map((p) => p.slice(0, 10)); // prompts of at least 10 tokens
  const prefill: StepBatch = {
    tokens: [...prompts[0]!, ...prompts[1]!],
    positions: [...prompts[0]!.keys(), ...prompts[1]!.keys()],
    tokenSeq: [...prompts[0]!.map(() => 0), ...prompts[1]!.map(() => 1)],
    kvBlockTable: [[0], [1]],
    logitRows: [9, 19],
    sample: { temperature: [0, 0], topK: [0, 0], topP: [1, 1], uniform: [0, 0] },
  };
  const first = await a.runner.step(prefill);
  assert.deepEqual((await b.runner.step(prefill)).tokens, first.tokens);
  let tokens = first.tokens!;
  for (let position = 10; position < 13; position++) {
    const decode: StepBatch = {
      tokens,
      positions: [position, position],
      tokenSeq: [0, 1],
      kvBlockTable: [[0], [1]],
      logitRows: [0, 1],
      sample: { temperature: [0, 0], topK: [0, 0], topP: [1, 1], uniform: [0.3, 0.7] }, // greedy: the eager path samples on the host, by the same rule
    };
    const graph = await a.runner.step({ ...decode, topLogprobs: [5, -1] }); // a graph step (bucket 2)
    const eager = await b.runner.step({ ...decode, scoreIds: [0, 0], fullLogprobs: true }); // eager: full rows
    assert.deepEqual(graph.tokens, eager.tokens);
    const row = new Float32Array(eager.fullLogprobs!.slice().buffer).subarray(0, a.vocab);
    const order = Array.from(row.keys()).sort((x, y) => row[y]! - row[x]! || x - y).slice(0, 5);
    const got = graph.tokenLogprobs![0]!;
    assert.deepEqual(got.topIds, order);
    assert.ok(Math.abs(got.logprob - row[graph.tokens![0]!]!) < 1e-5, `${got.logprob} vs ${row[graph.tokens![0]!]}`);
    got.topLogprobs.forEach((v, j) => assert.ok(Math.abs(v - row[order[j]!]!) < 1e-5));
    assert.equal(graph.tokenLogprobs![1], null);
    tokens = graph.tokens!;
  }
});
