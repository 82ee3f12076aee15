/**
 * Checks of a running cluster against the Hugging Face reference of an hf-tiny fixture (test/fixtures/hf-tiny):
 * full log-probs of every prompt within a tolerance, and greedy continuations equal to HF's, where a bf16 path may
 * part from HF only at a near-tie. Shared by the GPU suites that start clusters on CUDA.
 */
import assert from 'node:assert/strict';
import type { Cluster } from '../../coordinator/cluster.ts';
import { maxAbsDiff, readReference, referenceLogprobs } from '../helpers/fixtures.ts';
import { greedy } from '../helpers/cluster.ts';

export { greedy };

/** Every prompt's log-probs (cluster.score, full rows) within `tolerance` of HF's, at every position. */
export async function assertLogprobsMatch(cluster: Cluster, model: string, tolerance: number): Promise<void> {
  const reference = readReference(model);
  for (let i = 0; i < reference.prompts.length; i++) {
    const expected = await referenceLogprobs(model, i);
    const { full } = await cluster.score(reference.prompts[i]!, { full: true });
    full!.forEach((row, r) => {
      const err = maxAbsDiff(row, expected[r]!);
      assert.ok(err < tolerance, `prompt ${i} position ${r}: max abs error ${err}`);
    });
  }
}

/**
 * Greedy continuations (decode through CUDA graphs) equal HF's. With `tolerance` >= 0.01 (bf16 paths) they may part
 * at a near-tie: there HF's token and ours must be within the tolerance in our own scoring of that position, and
 * the comparison stops because the texts diverge.
 */
export async function assertGreedyMatches(cluster: Cluster, model: string, tolerance: number): Promise<void> {
  const reference = readReference(model);
  for (let i = 0; i < reference.prompts.length; i++) {
    const expected = reference.greedy[i]!;
    const actual = await greedy(cluster, reference.prompts[i]!, expected.length);
    const first = actual.findIndex((t, j) => t !== expected[j]);
    if (first < 0 || tolerance < 0.01) {
      assert.deepEqual(actual, expected, `prompt ${i}`);
      continue;
    }
    const { full } = await cluster.score([...reference.prompts[i]!, ...expected.slice(0, first)], { full: true });
    const row = full!.at(-1)!;
    const gap = Math.abs(row[expected[first]!]! - row[actual[first]!]!);
    assert.ok(gap < tolerance, `prompt ${i} token ${first}: ours ${actual[first]}, HF ${expected[first]}, log-prob gap ${gap} is not a near-tie`);
  }
}
