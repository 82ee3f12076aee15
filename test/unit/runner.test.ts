/**
 * StepRunner on the CPU backend: a long step split into chunks (as the CUDA step arena requires) gives
 * the same log-probs, samples and scores as one step. The model is the hf-tiny llama, loaded in-process.
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
import { fixtureDir, maxAbsDiff, readReference } from '../helpers/fixtures.ts';

test('a step run in chunks equals the step run whole', async () => {
  const dir = fixtureDir('llama-tiny');
  const spec = readModelSpec(dir);
  const plan = planShards(spec, 1);
  const engine = createEngine({ backend: 'cpu', threads: 1 });
  const model = buildRankModel(engine, spec, plan, 0, hostWeights(engine, 0, await loadShard(dir, spec, plan, 0)), { kvBlocks: 2, kvBlockSize: 64 });
  const whole = new StepRunner(engine, soloCollectives(), model);
  const chunked = new StepRunner(engine, soloCollectives(), model, { maxStepTokens: 7 });
  const prompt = readReference('llama-tiny').prompts[2]!.slice(0, 30);
  const rows = [29, 3, 15, 8]; // out of order, spread over several chunks
  const batch = {
    tokens: prompt,
    slots: prompt.map(() => 0),
    positions: prompt.map((_, i) => i),
    logitRows: rows,
    scoreIds: rows.map((r) => prompt[r + 1] ?? 0),
    sample: { temperature: [0, 0.8, 0, 1.2], topK: [0, 5, 0, 0], topP: [1, 0.9, 1, 1], uniform: [0.1, 0.5, 0.7, 0.3] },
    fullLogprobs: true,
  };
  const a = await whole.step(batch);
  const b = await chunked.step(batch);
  assert.deepEqual(b.tokens, a.tokens);
  assert.ok(maxAbsDiff(b.logprobs!, a.logprobs!) < 1e-5);
  const fa = new Float32Array(a.fullLogprobs!.slice().buffer);
  const fb = new Float32Array(b.fullLogprobs!.slice().buffer);
  assert.equal(fb.length, rows.length * spec.vocabSize);
  assert.ok(maxAbsDiff(fb, fa) < 1e-5, `full log-probs differ by ${maxAbsDiff(fb, fa)}`);
});
