// --kv-dtype end to end on the CPU backend: the option reaches the workers in init, they allocate bf16 caches,
// and the model's outputs stay within the stated tolerance of Hugging Face (f32 KV: 1e-3, test/oracle).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startCluster } from '../../coordinator/cluster.ts';
import { greedy } from '../helpers/cluster.ts';
import { fixtureDir, maxAbsDiff, readReference, referenceLogprobs } from '../helpers/fixtures.ts';

test('a cluster with --kv-dtype bf16: the worker allocates bf16 caches; log-probs within 0.03 of Hugging Face, greedy tokens equal', async () => {
  // Stored k and v carry up to 2^-9 relative error (8 significant bits); every layer's attention output
  // inherits about that, and the log-probs here lie in [-9.5, -3.5], so errors up to 9.5 * 2^-9 = 0.019 are the
  // scale to expect. Measured on the hf-tiny fixtures (CPU, bf16 KV): 0.0075 to 0.0165 max abs against HF's
  // fp32 (f32 KV: < 1e-3); 0.03 bounds the worst fixture (llama3-tiny, this one) with ~2x margin.
  const model = 'llama3-tiny';
  const cluster = await startCluster({ modelDir: fixtureDir(model), tp: 2, threads: 1, kvDtype: 'bf16' });
  try {
    const reference = readReference(model);
    for (let i = 0; i < reference.prompts.length; i++) {
      const expected = await referenceLogprobs(model, i);
      const { full } = await cluster.score(reference.prompts[i]!, { full: true });
      let worst = 0;
      full!.forEach((row, r) => (worst = Math.max(worst, maxAbsDiff(row, expected[r]!))));
      assert.ok(worst < 0.03, `prompt ${i}: max abs log-prob error ${worst}`);
      assert.ok(worst > 1e-3, `prompt ${i}: error ${worst} is as small as f32 KV's; did the worker get bf16 caches?`);
      assert.deepEqual(await greedy(cluster, reference.prompts[i]!, 24), reference.greedy[i], `prompt ${i}`);
    }
  } finally {
    await cluster.close();
  }
});
