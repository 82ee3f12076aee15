// --prefill-attention int8|fp8 per cluster (core/prefill-attention.ts): refused with the values named where it cannot
// apply; a CPU cluster at tp 2 (GQA fixture: 8 query heads, 2 KV heads, head dim 16) started with it scores a
// prompt longer than 64 tokens (one prompt step, quantized) within a stated tolerance of the exact cluster,
// a prompt of at most 64 tokens exactly as it (steps that short stay exact), and decodes the same greedy tokens.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startCluster, type Cluster } from '../../coordinator/cluster.ts';
import { commandConfig } from '../../coordinator/config.ts';
import { flagsOf } from '../helpers/cli.ts';
import { checkPrefillAttention } from '../../core/prefill-attention.ts';
import { fixtureDir } from '../helpers/fixtures.ts';
import { withCluster } from '../helpers/with-cluster.ts';

test('checkPrefillAttention: cuda head dims 64 and 128 only, not beside SparQ; exact and the cpu take any model', () => {
  assert.throws(() => checkPrefillAttention('int8', { headDim: 96 }, 'cuda'), /--prefill-attention int8 on cuda serves head dimensions 64 and 128; this model has 96/);
  assert.throws(() => checkPrefillAttention('fp8', { headDim: 128 }, 'cuda', 'sparq'), /--prefill-attention fp8 does not combine with --attention sparq/);
  checkPrefillAttention('fp8', { headDim: 128 }, 'cuda');
  checkPrefillAttention('int8', { headDim: 16 }, 'cpu');
  checkPrefillAttention('exact', { headDim: 96 }, 'cuda', 'sparq');
  assert.throws(() => checkPrefillAttention('int8', { headDim: 16 }, 'cpu', 'dense', -1), /--prefill-attention-slots must be a whole number >= 0, got -1/);
  assert.throws(() => checkPrefillAttention('int8', { headDim: 16 }, 'cpu', 'dense', 1.5), /got 1.5/);
  checkPrefillAttention('fp8', { headDim: 16 }, 'cpu', 'dense', 0);
});

test('--prefill-attention parses exact, int8 and fp8 (default exact) and refuses other values', () => {
  assert.equal(commandConfig('serve', flagsOf(['--model', '/m']), {}).prefillAttention, 'exact');
  assert.equal(commandConfig('serve', flagsOf(['--model', '/m', '--prefill-attention', 'fp8']), {}).prefillAttention, 'fp8');
  assert.equal(commandConfig('serve', flagsOf(['--model', '/m']), { WEFT_PREFILL_ATTENTION: 'int8' }).prefillAttention, 'int8');
  assert.throws(() => commandConfig('serve', flagsOf(['--model', '/m', '--prefill-attention', 'int4']), {}), /prefill-attention/);
});

const withTinyCluster = <T>(options: Record<string, unknown>, body: (cluster: Cluster) => Promise<T>): Promise<T> =>
  withCluster({ modelDir: fixtureDir('llama3-tiny'), tp: 2, threads: 1, ...options }, body);

const prompt = (n: number) => Array.from({ length: n }, (_, i) => (i * 37 + 11) % 200);
const logprobs = async (cluster: Cluster, n: number) => (await cluster.score(prompt(n))).logprobs;
const greedy = async (cluster: Cluster) => {
  for await (const event of cluster.generate({ promptIds: prompt(100), sampling: { maxNewTokens: 12, ignoreEos: true } })) if (event.type === 'done') return event.tokens;
  throw new Error('no done event');
};

// The prompt's log-probs (down to -8.6 on this model, head dim 16). Measured: int8 max 0.039 and mean 0.0087,
// fp8 max 0.15 and mean 0.034; about 2x that is allowed.
const LOGPROB_TOLERANCE = { int8: { max: 0.08, mean: 0.02 }, fp8: { max: 0.3, mean: 0.07 } } as const;

test('a cluster with --prefill-attention int8 / fp8 (tp 2, GQA): near exact on a long prompt, exact on a short one, same greedy tokens', async () => {
  const exact = await withTinyCluster({}, async (c) => ({ long: await logprobs(c, 100), short: await logprobs(c, 40), tokens: await greedy(c) }));
  for (const mode of ['int8', 'fp8'] as const) {
    const sage = await withTinyCluster({ prefillAttention: mode }, async (c) => ({ long: await logprobs(c, 100), short: await logprobs(c, 40), tokens: await greedy(c) }));
    assert.deepEqual(sage.short, exact.short, `${mode}: a 40-token prompt is one step of <= 64 tokens, attended exactly`);
    const deviations = sage.long.map((lp, i) => Math.abs((lp ?? 0) - (exact.long[i] ?? 0))); // null: the first token
    const max = Math.max(...deviations), mean = deviations.reduce((a, d) => a + d, 0) / deviations.length;
    assert.ok(max > 0 && max <= LOGPROB_TOLERANCE[mode].max && mean <= LOGPROB_TOLERANCE[mode].mean, `${mode}: log-prob deviation max ${max}, mean ${mean}`);
    assert.deepEqual(sage.tokens, exact.tokens, `${mode}: greedy tokens after a 100-token prompt`);
  }
});

// A prompt in 70-token steps (three of the 200 tokens scored): with a slot (the default) its later steps keep its first
// step's K mean (worker/models/sage-state.ts), with --prefill-attention-slots 0 each step takes its own; both near exact.
test('a cluster with --prefill-attention int8 keeps a prompt\'s quantized blocks across its steps unless --prefill-attention-slots 0', async () => {
  const exact = await withTinyCluster({}, (c) => logprobs(c, 200));
  const chunked = { prefillAttention: 'int8', maxNumBatchedTokens: 70, kvSlots: 4 };
  const kept = await withTinyCluster(chunked, (c) => logprobs(c, 200));
  const anew = await withTinyCluster({ ...chunked, prefillAttentionSlots: 0 }, (c) => logprobs(c, 200));
  assert.deepEqual(kept.slice(0, 70), anew.slice(0, 70), 'the first step is the same either way');
  assert.notDeepEqual(kept.slice(70), anew.slice(70), 'the later steps: the kept mean against their own');
  for (const [name, lps] of [['kept', kept], ['anew', anew]] as const) {
    const deviations = lps.map((lp, i) => Math.abs((lp ?? 0) - (exact[i] ?? 0)));
    assert.ok(Math.max(...deviations) <= LOGPROB_TOLERANCE.int8.max, `${name}: max ${Math.max(...deviations)}`);
  }
});

test('a cluster refuses --prefill-attention beside --attention sparq before it starts', async () => {
  await assert.rejects(startCluster({ modelDir: fixtureDir('llama3-tiny'), tp: 1, threads: 1, prefillAttention: 'int8', attention: 'sparq', sparqR: 2, sparqK: 8 }), /does not combine with --attention sparq/);
});
