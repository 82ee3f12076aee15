/**
 * fp8 and int8 KV caches end to end on CUDA against the CPU backend with the same cache dtype (f32 weights, so the
 * KV rounding is the only approximation both share): both store the same codes (one rule, native/src/kv-quant.h;
 * ops-check compares the bytes), CUDA's decode attention folds the row scales in per row instead of per element
 * and its prefill rounds q, k, v, p to f16 (attention.cuh), and a rotated k may round to a neighbouring code where
 * the two rotations differ by an f32 rounding. Log-probs within 0.02 of the CPU's, greedy tokens equal.
 * Skips, saying why, without a CUDA build or a GPU.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { gpuSkipReason, greedy } from '../helpers/cluster.ts';
import { startCluster } from '../../coordinator/cluster.ts';
import { fixtureDir, maxAbsDiff, readReference } from '../helpers/fixtures.ts';

const skip = gpuSkipReason();
const model = 'llama-tiny';

for (const kvDtype of ['fp8', 'int8'] as const)
  describe(`${model} with a ${kvDtype} KV cache: CUDA as the CPU`, { skip }, () => {
    test('log-probs within 0.02 of the CPU backend\'s, greedy tokens equal', async () => {
      const reference = readReference(model);
      const clusters = await Promise.all((['cuda', 'cpu'] as const).map((device) => startCluster({ modelDir: fixtureDir(model), tp: 1, device, kvDtype })));
      try {
        for (let i = 0; i < reference.prompts.length; i++) {
          const [gpu, cpu] = await Promise.all(clusters.map((c) => c.score(reference.prompts[i]!, { full: true })));
          let worst = 0;
          gpu!.full!.forEach((row, r) => (worst = Math.max(worst, maxAbsDiff(row, cpu!.full![r]!))));
          assert.ok(worst < 0.02, `prompt ${i}: max abs log-prob difference ${worst}`);
          const [g, c] = await Promise.all(clusters.map((cluster) => greedy(cluster, reference.prompts[i]!, 24)));
          assert.deepEqual(g, c, `prompt ${i}: greedy tokens`);
        }
      } finally {
        await Promise.all(clusters.map((c) => c.close()));
      }
    });
  });
