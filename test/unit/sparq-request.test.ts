// SparQ per cluster and per request: the sampling parameter `attention` is resolved against what the cluster serves
// (refused with the values named when it cannot), the step builder carries per-token r and k, and a CPU cluster at
// tp 2 (GQA fixture: 8 query heads, 2 KV heads, head dim 16) started with --attention sparq equals a dense cluster
// exactly where every sequence is no longer than k, differs where it is longer (scoring), attends generate's prompts
// exactly, and serves a dense request exactly.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Cluster } from '../../coordinator/cluster.ts';
import { parseSamplingParams } from '../../coordinator/sampling-params.ts';
import { StepBatchBuilder, GREEDY } from '../../coordinator/step-builder.ts';
import { DENSE_TOKEN } from '../../core/sparq.ts';
import { fixtureDir, maxAbsDiff } from '../helpers/fixtures.ts';
import { withCluster } from '../helpers/with-cluster.ts';

const spec = { headDim: 16, nHeads: 8, nKvHeads: 2 };
const limits = (sparq: { r: number; k: number } | null, device: 'cpu' | 'cuda' = 'cpu') => ({ maxContext: 64, promptLength: 4, vocabSize: 100, attention: { sparq, spec, device } });

test('attention in the sampling parameters: dense, sparq with the cluster defaults or its own r and k, refusals naming the values', () => {
  assert.deepEqual(parseSamplingParams({ attention: { mode: 'dense' } }, limits(null)).attention, { mode: 'dense' });
  assert.deepEqual(parseSamplingParams({ attention: { mode: 'sparq' } }, limits({ r: 4, k: 32 })).attention, { mode: 'sparq', r: 4, k: 32 });
  assert.deepEqual(parseSamplingParams({ attention: { mode: 'sparq', r: 8 } }, limits({ r: 4, k: 32 })).attention, { mode: 'sparq', r: 8, k: 32 });
  assert.equal(parseSamplingParams({}, limits({ r: 4, k: 32 })).attention, undefined);
  assert.throws(() => parseSamplingParams({ attention: { mode: 'sparq' } }, limits(null)), /attends densely; SparQ requests need a cluster started with --attention sparq/);
  assert.throws(() => parseSamplingParams({ attention: { mode: 'sparq', r: 17 } }, limits({ r: 4, k: 32 })), /SparQ r = 17 must be an integer from 1 to the model's head dimension 16/);
  assert.throws(() => parseSamplingParams({ attention: { mode: 'sparq', k: 0 } }, limits({ r: 4, k: 32 })), /SparQ k = 0 must be an integer >= 1/);
  assert.throws(() => parseSamplingParams({ attention: { mode: 'dense', r: 2 } }, limits({ r: 4, k: 32 })), /r and k apply to mode sparq only/);
  assert.throws(() => parseSamplingParams({ attention: { mode: 'fast' } }, limits({ r: 4, k: 32 })), /sampling parameter attention/);
  const wide = { ...limits({ r: 4, k: 32 }, 'cuda'), attention: { sparq: { r: 4, k: 32 }, spec: { headDim: 128, nHeads: 64, nKvHeads: 4 }, device: 'cuda' as const } };
  assert.throws(() => parseSamplingParams({ attention: { mode: 'sparq' } }, wide), /GQA groups of at most 8 .* this model has 16 and 128/);
});

test('the step builder carries each token\'s r and k (0: the cluster\'s), and no field when no request chose', () => {
  const plain = new StepBatchBuilder(16);
  plain.appendSampled([0], [1, 2], 0, GREEDY);
  assert.equal(plain.build().sparq, undefined);
  const mixed = new StepBatchBuilder(16);
  mixed.appendSampled([0], [1, 2], 0, GREEDY, null, { mode: 'sparq', r: 4, k: 8 });
  mixed.appendSampled([1], [3], 5, GREEDY);
  mixed.appendSampled([2], [4], 7, GREEDY, null, { mode: 'dense' });
  assert.deepEqual(mixed.build().sparq, { r: [4, 4, 0, DENSE_TOKEN.r], k: [8, 8, 0, DENSE_TOKEN.k] });
});

const withTinyCluster = <T>(options: Record<string, unknown>, body: (cluster: Cluster) => Promise<T>): Promise<T> =>
  withCluster({ modelDir: fixtureDir('llama3-tiny'), tp: 2, threads: 1, ...options }, body);

const prompt = Array.from({ length: 40 }, (_, i) => (i * 37 + 11) % 200);
const scores = (cluster: Cluster, attention?: unknown) => cluster.score(prompt, { full: true, ...(attention !== undefined && { attention }) }).then((r) => r.full!);
/** The first token generated after the whole 40-token prompt, and its log-prob. */
const firstToken = async (cluster: Cluster, sampling: Record<string, unknown> = {}) => {
  for await (const event of cluster.generate({ promptIds: prompt, sampling: { maxNewTokens: 1, ignoreEos: true, logprobs: 0, ...sampling } }))
    if (event.type === 'token') return { token: event.token, logprob: event.logprobs!.logprob };
  throw new Error('no token event');
};
const tokens = async (cluster: Cluster, sampling: Record<string, unknown>) => {
  for await (const event of cluster.generate({ promptIds: prompt.slice(0, 8), sampling: { maxNewTokens: 24, ignoreEos: true, ...sampling } })) if (event.type === 'done') return event.tokens;
  throw new Error('no done event');
};

test('a cluster with --attention sparq (tp 2, GQA): exact below k, approximate past it, dense per request', async () => {
  const dense = await withTinyCluster({}, async (c) => {
    await assert.rejects(scores(c, { mode: 'sparq' }), /score: attention: this cluster attends densely; SparQ requests need a cluster started with --attention sparq/);
    return { scores: await scores(c), tokens: await tokens(c, {}), first: await firstToken(c) };
  });
  const exact = await withTinyCluster({ attention: 'sparq', sparqR: 2, sparqK: 64 }, async (c) => ({ scores: await scores(c), tokens: await tokens(c, {}), denseTokens: await tokens(c, { attention: { mode: 'dense' } }) }));
  exact.scores.forEach((row, i) => assert.deepEqual(row, dense.scores[i], `position ${i}: every length <= k = 64 is attended exactly`));
  assert.deepEqual(exact.tokens, dense.tokens);
  assert.deepEqual(exact.denseTokens, dense.tokens);
  await withTinyCluster({ attention: 'sparq', sparqR: 4, sparqK: 8 }, async (c) => {
    const approx = await scores(c);
    const early = Math.max(...approx.slice(0, 8).map((row, i) => maxAbsDiff(row, dense.scores[i]!)));
    const late = Math.max(...approx.slice(8).map((row, i) => maxAbsDiff(row, dense.scores[i + 8]!)));
    assert.equal(early, 0, 'positions 0..7 (length <= k = 8) are exact');
    assert.ok(late > 1e-4, `past k the log-probs move (max abs diff ${late})`);
    // generate attends its prompt exactly (SparQ is a decode attention): the token after a 40-token prompt is dense's
    assert.deepEqual(await firstToken(c), dense.first, 'the first token after a prompt past k');
    assert.deepEqual(await tokens(c, { attention: { mode: 'dense' } }), dense.tokens, 'a dense request on a SparQ cluster');
    // scoring takes a request's attention too: dense, or SparQ with a k past the prompt, gives the dense rows
    (await scores(c, { mode: 'dense' })).forEach((row, i) => assert.deepEqual(row, dense.scores[i], `dense score, position ${i}`));
    (await scores(c, { mode: 'sparq', k: 64 })).forEach((row, i) => assert.deepEqual(row, dense.scores[i], `score at k = 64, position ${i}`));
    await assert.rejects(scores(c, { mode: 'sparq', r: 32 }), /SparQ r = 32 must be an integer from 1 to the model's head dimension 16/);
    await assert.rejects(scores(c, { mode: 'fast' }), /score: attention mode must be 'dense' or 'sparq'/);
    await assert.rejects(tokens(c, { attention: { mode: 'sparq', r: 32 } }), /SparQ r = 32 must be an integer from 1 to the model's head dimension 16/);
  });
  await assert.rejects(withTinyCluster({ attention: 'sparq', sparqR: 17 }, async () => {}), /SparQ r = 17/);
});
