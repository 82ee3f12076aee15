/**
 * The outside oracle: every hf-tiny model, at TP = 1, 2 and 4, against what Hugging Face transformers
 * computed (fp32, TF32 off). Real worker processes, real ZeroMQ collectives.
 * Tolerance: the fixtures' README states that a correct fp32 implementation stays under 1e-3 max abs error
 * on logits; log-probs differ from logits by one logsumexp per row, itself accurate to ~1e-6 in fp32.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startCluster, type Cluster } from '../../coordinator/cluster.ts';
import { greedy } from '../helpers/cluster.ts';
import { FIXTURE_MODELS, fixtureDir, maxAbsDiff, readReference, referenceLogprobs } from '../helpers/fixtures.ts';

const LOGPROB_TOLERANCE = 1e-3;

for (const model of FIXTURE_MODELS) {
  describe(`${model} matches Hugging Face`, () => {
    const reference = readReference(model);
    const tp1Logprobs: Float32Array[][] = [];
    for (const tp of [1, 2, 4]) {
      describe(`TP=${tp}`, () => {
        let cluster: Cluster;
        before(async () => {
          cluster = await startCluster({ modelDir: fixtureDir(model), tp, threads: 1 });
        });
        after(async () => cluster?.close());

        test('log-probs of every position within 1e-3', async () => {
          for (let i = 0; i < reference.prompts.length; i++) {
            const expected = await referenceLogprobs(model, i);
            const { full, logprobs } = await cluster.score(reference.prompts[i]!, { full: true });
            assert.ok(full, 'full log-probs returned');
            assert.equal(full.length, expected.length);
            full.forEach((row, r) => {
              const err = maxAbsDiff(row, expected[r]!);
              assert.ok(err < LOGPROB_TOLERANCE, `prompt ${i} position ${r}: max abs error ${err}`);
            });
            // the scored entries are the same numbers, picked at the next token
            logprobs.slice(1).forEach((lp, r) => assert.ok(Math.abs(lp! - expected[r]![reference.prompts[i]![r + 1]!]!) < LOGPROB_TOLERANCE));
            if (tp === 1) tp1Logprobs[i] = full;
            else if (tp1Logprobs[i]) full.forEach((row, r) => assert.ok(maxAbsDiff(row, tp1Logprobs[i]![r]!) < 1e-4, `TP=${tp} vs TP=1, prompt ${i} position ${r}`));
          }
        });

        test('greedy tokens identical', async () => {
          for (let i = 0; i < reference.prompts.length; i++) {
            assert.deepEqual(await greedy(cluster, reference.prompts[i]!, 24), reference.greedy[i], `prompt ${i}`);
          }
        });
      });
    }
  });
}

describe('mixtral-tiny with expert parallelism (whole experts per rank) matches Hugging Face', () => {
  const reference = readReference('mixtral-tiny');
  for (const tp of [2, 4]) {
    test(`TP=${tp}: log-probs within 1e-3, greedy tokens identical`, async () => {
      const cluster = await startCluster({ modelDir: fixtureDir('mixtral-tiny'), tp, threads: 1, expertParallel: true });
      try {
        assert.equal(cluster.plan.expertParallel, true);
        assert.deepEqual(cluster.plan.ranks.map((r) => [r.experts.start, r.experts.end]), Array.from({ length: tp }, (_, r) => [(r * 4) / tp, ((r + 1) * 4) / tp]));
        for (let i = 0; i < reference.prompts.length; i++) {
          const expected = await referenceLogprobs('mixtral-tiny', i);
          const { full } = await cluster.score(reference.prompts[i]!, { full: true });
          full!.forEach((row, r) => assert.ok(maxAbsDiff(row, expected[r]!) < LOGPROB_TOLERANCE, `prompt ${i} position ${r}`));
          assert.deepEqual(await greedy(cluster, reference.prompts[i]!, 24), reference.greedy[i], `prompt ${i}`);
        }
      } finally {
        await cluster.close();
      }
    });
  }
});
