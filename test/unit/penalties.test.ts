/**
 * OpenAI's presence and frequency penalties, on the CPU backend: the parameters' ranges and spellings, the bias a
 * sequence's drawn tokens make (SequenceState.nextLogitBias), and a whole greedy generation through the cluster
 * checked token by token against the model's own log-softmax rows minus the penalties (an in-process forward over
 * the prompt and the tokens generated). A penalised sequence's steps are built only once the step before has
 * answered, so each draw counts every token before it.
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
import { parseSamplingParams } from '../../coordinator/sampling-params.ts';
import { SequenceState } from '../../coordinator/generate.ts';
import { isWeftError } from '../../core/errors.ts';
import { fixtureDir, readReference } from '../helpers/fixtures.ts';

const dir = fixtureDir('llama-tiny');
const reference = readReference('llama-tiny');
const limits = { maxContext: 512, promptLength: 4, vocabSize: 512 };

test('presence_penalty and frequency_penalty: numbers in [-2, 2], either spelling; 0 is none', () => {
  const p = parseSamplingParams({ presence_penalty: 0.5, frequencyPenalty: -2 }, limits);
  assert.deepEqual([p.presencePenalty, p.frequencyPenalty], [0.5, -2]);
  const none = parseSamplingParams({ presence_penalty: 0 }, limits);
  assert.equal('presencePenalty' in none, false);
  for (const [input, param] of [[{ presence_penalty: 2.5 }, 'presence_penalty'], [{ frequencyPenalty: '1' }, 'frequencyPenalty'], [{ frequency_penalty: -2.01 }, 'frequency_penalty']] as const)
    assert.throws(() => parseSamplingParams(input, limits), (e: unknown) => isWeftError(e) && e.param === param && e.message.includes(`sampling parameter ${param} must be`));
});

test("a sequence's next logit bias: its logit_bias, minus presence once and frequency per time for each token drawn", () => {
  const params = parseSamplingParams({ presence_penalty: 0.5, frequency_penalty: 0.25, logit_bias: { '9': 3, '4': -1 } }, limits);
  const seq = new SequenceState([1, 2, 3, 4], params, [], { push: () => '', flush: () => '' });
  assert.deepEqual(seq.nextLogitBias(), [[4, -1], [9, 3]], 'nothing drawn yet: the logit bias alone');
  for (const token of [7, 9, 7, 7]) seq.accept(token);
  assert.deepEqual(new Map(seq.nextLogitBias()), new Map([[4, -1], [9, 3 - 0.25 - 0.5], [7, -3 * 0.25 - 0.5]]));
  const plain = new SequenceState([1], parseSamplingParams({}, limits), [], { push: () => '', flush: () => '' });
  plain.accept(5);
  assert.equal(plain.nextLogitBias(), undefined, 'no bias, no penalties: none');
});

test('a greedy generation with penalties draws, at every token, the argmax of the model\'s log-probs minus the penalties of the tokens before it', async () => {
  const { startCluster } = await import('../../coordinator/cluster.ts');
  const prompt = reference.prompts[0]!;
  const [presence, frequency] = [0.8, 1.5];
  const cluster = await startCluster({ modelDir: dir, tp: 2, threads: 1 });
  let tokens: number[] = [];
  try {
    const handle = await cluster.submit({ promptIds: prompt, sampling: { maxNewTokens: 24, ignoreEos: true, presence_penalty: presence, frequency_penalty: frequency } });
    for await (const event of handle.events) if (event.type === 'done') tokens = event.tokens;
  } finally {
    await cluster.close();
  }
  assert.equal(tokens.length, 24);
  assert.notDeepEqual(tokens, reference.greedy[0]!.slice(0, 24), 'the penalties change what greedy decoding picks');
  // the oracle: one forward over prompt + tokens on the CPU, every row's log-softmax
  const spec = readModelSpec(dir);
  const plan = planShards(spec, 1);
  const kv = kvCacheLayout({ kvSlots: 1, maxContext: 128, device: 'cpu' });
  const engine = createEngine({ backend: 'cpu', threads: 1 });
  const runner = new StepRunner(engine, soloCollectives(), buildRankModel(engine, spec, plan, 0, hostWeights(engine, 0, await loadShard(dir, spec, plan, 0)), kv), kv);
  const all = [...prompt, ...tokens];
  const rows = tokens.map((_, i) => prompt.length - 1 + i);
  const result = await runner.step({ tokens: all, positions: all.map((_, i) => i), tokenSeq: all.map(() => 0), kvBlockTable: [[0]], logitRows: rows, scoreIds: rows.map(() => 0), fullLogprobs: true });
  const full = new Float32Array(result.fullLogprobs!.slice().buffer);
  const counts = new Map<number, number>();
  tokens.forEach((token, i) => {
    const scores = Array.from(full.subarray(i * spec.vocabSize, (i + 1) * spec.vocabSize), (lp, id) => lp - (counts.has(id) ? presence + frequency * counts.get(id)! : 0));
    const best = scores.indexOf(Math.max(...scores));
    assert.equal(token, best, `token ${i}: ${token} drawn, the penalised argmax is ${best} (margin ${(scores[best]! - scores[token]!).toFixed(6)})`);
    counts.set(token, (counts.get(token) ?? 0) + 1);
  });
});
