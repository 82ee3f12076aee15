/**
 * Per-row log-probs in a step (StepBatch.topLogprobs) on the CPU backend, against the same step's full log-softmax
 * rows: sampled rows rate the drawn token, scored rows the scored id, rows at -1 answer null; the eager-ahead path
 * (sampled only, the draw left on the device) and a chunked step answer the same. Plus the scheduler's wiring:
 * the step builder's per-row asks and SamplingParams.logprobs' range.
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
import { stepBatchSchema, type StepBatch, type TokenLogprobs } from '../../core/step-batch.ts';
import { StepBatchBuilder } from '../../coordinator/step-builder.ts';
import { parseSamplingParams } from '../../coordinator/sampling-params.ts';
import { fixtureDir, readReference } from '../helpers/fixtures.ts';

const kv = kvCacheLayout({ kvSlots: 2, maxContext: 64, device: 'cpu' });
const dir = fixtureDir('llama-tiny');
const spec = readModelSpec(dir);
const plan = planShards(spec, 1);
const engine = createEngine({ backend: 'cpu', threads: 1 });
const model = buildRankModel(engine, spec, plan, 0, hostWeights(engine, 0, await loadShard(dir, spec, plan, 0)), kv);
const prompt = readReference('llama-tiny').prompts[2]!.slice(0, 20);

/** The row's log-softmax from the step's fullLogprobs, and what topLogprobs should say of token `id` with k alternatives. */
function expected(full: Float32Array, row: number, id: number, k: number): TokenLogprobs {
  const values = full.subarray(row * spec.vocabSize, (row + 1) * spec.vocabSize);
  const order = Array.from(values.keys()).sort((a, b) => values[b]! - values[a]! || a - b).slice(0, k);
  return { logprob: values[id]!, topIds: order, topLogprobs: order.map((i) => values[i]!) };
}

function assertClose(got: TokenLogprobs | null | undefined, want: TokenLogprobs, what: string): void {
  assert.ok(got, `${what}: no log-probs`);
  assert.deepEqual(got.topIds, want.topIds, `${what}: alternatives`);
  assert.ok(Math.abs(got.logprob - want.logprob) < 1e-5, `${what}: ${got.logprob} vs ${want.logprob}`);
  got.topLogprobs.forEach((v, j) => assert.ok(Math.abs(v - want.topLogprobs[j]!) < 1e-5, `${what}: alternative ${j}`));
}

const base = {
  tokens: prompt,
  positions: prompt.map((_, i) => i),
  tokenSeq: prompt.map(() => 0),
  kvBlockTable: [[0]],
  logitRows: [19, 4, 11],
};

test('scored and sampled rows rate their token with k alternatives; rows at -1 answer null; chunked the same', async () => {
  const batch: StepBatch = {
    ...base,
    scoreIds: [7, prompt[5]!, 300],
    sample: { temperature: [0, 1, 0.7], topK: [0, 0, 3], topP: [1, 0.9, 1], uniform: [0.2, 0.6, 0.9] },
    fullLogprobs: true,
    topLogprobs: [3, -1, 0],
  };
  stepBatchSchema.parse(batch);
  for (const runner of [new StepRunner(engine, soloCollectives(), model, kv), new StepRunner(engine, soloCollectives(), model, kv, { maxStepTokens: 6 })]) {
    const result = await runner.step(batch);
    const full = new Float32Array(result.fullLogprobs!.slice().buffer);
    // with both sampled and scored rows, the sampled token is the one rated
    assertClose(result.tokenLogprobs![0], expected(full, 0, result.tokens![0]!, 3), 'row 0');
    assert.equal(result.tokenLogprobs![1], null);
    assertClose(result.tokenLogprobs![2], expected(full, 2, result.tokens![2]!, 0), 'row 2');
  }
  // scored only: the score id is rated
  const { sample: _s, ...scored } = batch;
  const result = await new StepRunner(engine, soloCollectives(), model, kv).step(scored);
  const full = new Float32Array(result.fullLogprobs!.slice().buffer);
  assertClose(result.tokenLogprobs![0], expected(full, 0, 7, 3), 'scored row 0');
  assertClose(result.tokenLogprobs![2], expected(full, 2, 300, 0), 'scored row 2');
});

test('a sampled-only step (its draw left on the device) answers the same log-probs; none asked, none answered', async () => {
  const sample = { temperature: [0, 1, 0], topK: [0, 0, 0], topP: [1, 1, 1], uniform: [0.2, 0.6, 0.9] };
  const runner = new StepRunner(engine, soloCollectives(), model, kv);
  const ahead = await runner.step({ ...base, sample, topLogprobs: [2, 2, -1] });
  const reference = await runner.step({ ...base, sample, fullLogprobs: true, scoreIds: [0, 0, 0] });
  assert.deepEqual(ahead.tokens, reference.tokens);
  const full = new Float32Array(reference.fullLogprobs!.slice().buffer);
  assertClose(ahead.tokenLogprobs![0], expected(full, 0, ahead.tokens![0]!, 2), 'row 0');
  assertClose(ahead.tokenLogprobs![1], expected(full, 1, ahead.tokens![1]!, 2), 'row 1');
  assert.equal(ahead.tokenLogprobs![2], null);
  assert.equal((await runner.step({ ...base, sample })).tokenLogprobs, undefined);
});

test('the step builder asks per row only when one row does; the batch schema checks the asks', () => {
  const sample = { temperature: 0, topK: 0, topP: 1, uniform: 0 };
  const plain = new StepBatchBuilder(64);
  plain.appendSampled([0], [1, 2], 0, sample);
  assert.equal(plain.build().topLogprobs, undefined);
  const asked = new StepBatchBuilder(64);
  asked.appendSampled([0], [1, 2], 0, sample);
  asked.appendSampled([1], [3], 0, sample, 5);
  assert.deepEqual(asked.build().topLogprobs, [-1, 5]);
  const bad = (batch: unknown): boolean => !stepBatchSchema.safeParse(batch).success;
  assert.ok(bad({ ...base, scoreIds: [0, 0, 0], topLogprobs: [1, 1] }), 'one per logit row');
  assert.ok(bad({ ...base, scoreIds: [0, 0, 0], topLogprobs: [21, 1, 1] }), 'k <= 20');
  assert.ok(bad({ ...base, topLogprobs: [1, 1, 1] }), 'needs sampled or scored rows');
});

test('SamplingParams.logprobs: an integer in [0, 20], top_logprobs its snake_case spelling; absent by default', () => {
  const limits = { maxContext: 64, promptLength: 3, vocabSize: 512 };
  assert.equal(parseSamplingParams({}, limits).logprobs, undefined);
  assert.equal(parseSamplingParams({ logprobs: 0 }, limits).logprobs, 0);
  assert.equal(parseSamplingParams({ top_logprobs: 20 }, limits).logprobs, 20);
  assert.throws(() => parseSamplingParams({ logprobs: 21 }, limits), /sampling parameter logprobs must be in \[0, 20\], got 21/);
  assert.throws(() => parseSamplingParams({ logprobs: 1.5 }, limits), /sampling parameter logprobs must be an integer/);
});

test('with a draft model (speculative decoding) a request for log-probs, a logit bias or penalties is refused, naming the parameter', async () => {
  const { startCluster } = await import('../../coordinator/cluster.ts');
  const cluster = await startCluster({ modelDir: dir, tp: 1, threads: 1, draft: { modelDir: fixtureDir('llama-tiny-bf16'), tp: 1, k: 2 } });
  try {
    await assert.rejects(cluster.submit({ promptIds: prompt, sampling: { logprobs: 1 } }), (err: Error & { code?: string }) => err.code === 'WEFT_BAD_REQUEST' && /logprobs is not supported with speculative decoding/.test(err.message));
    for (const [sampling, param] of [[{ logit_bias: { '3': 5 } }, 'logit_bias'], [{ presence_penalty: 0.5 }, 'presence_penalty'], [{ frequencyPenalty: 1 }, 'frequency_penalty']] as const)
      await assert.rejects(cluster.submit({ promptIds: prompt, sampling }), (err: Error & { code?: string; param?: string }) => err.code === 'WEFT_BAD_REQUEST' && err.param === param && new RegExp(`${param} is not supported with speculative decoding`).test(err.message));
    const handle = await cluster.submit({ promptIds: prompt, sampling: { maxNewTokens: 2, ignoreEos: true } });
    for await (const event of handle.events) if (event.type === 'done') assert.equal(event.tokens.length, 2, 'without log-probs it serves');
  } finally {
    await cluster.close();
  }
});
