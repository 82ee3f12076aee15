// The paged KV cache through a cluster (a spawned worker, the CPU backend): 64 concurrent short streams all
// finish with their tokens; the time to first token and the throughput are printed (the bound asserted is wide:
// a shared 2-core machine). A small pool (--kv-cache-tokens of one context) preempts and still gives every
// stream the tokens of an unpreempted run, through the worker's init (the layout reaches it).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startCluster, type Cluster } from '../../coordinator/cluster.ts';
import { fixtureDir, readReference } from '../helpers/fixtures.ts';

const STREAMS = 64;
const NEW_TOKENS = 16;
const prompt = readReference('llama-tiny').prompts[1]!.slice(0, 8);

/** `STREAMS` streams at once, each its own seed; their tokens and times to first token (s), and the wall time (s). */
async function streams(cluster: Cluster): Promise<{ tokens: number[][]; ttft: number[]; seconds: number }> {
  const started = performance.now();
  const ttft: number[] = [];
  const tokens = await Promise.all(
    Array.from({ length: STREAMS }, async (_, i) => {
      const submitted = performance.now();
      const got: number[] = [];
      for await (const event of cluster.generate({ promptIds: prompt, sampling: { maxNewTokens: NEW_TOKENS, ignoreEos: true, temperature: 1, seed: i } })) {
        if (event.type !== 'token') continue;
        if (got.length === 0) ttft.push((performance.now() - submitted) / 1000);
        got.push(event.token);
      }
      return got;
    }),
  );
  return { tokens, ttft, seconds: (performance.now() - started) / 1000 };
}

const percentile = (values: number[], p: number): number => [...values].sort((a, b) => a - b)[Math.min(values.length - 1, Math.ceil((p / 100) * values.length) - 1)]!;

test(`${STREAMS} concurrent short streams on the paged cache all finish; TTFT p50/p99 and tok/s printed; a pool of one context preempts and gives the same tokens`, async () => {
  const roomy = await startCluster({ modelDir: fixtureDir('llama-tiny'), threads: 1, maxContext: 64 });
  let expected: number[][];
  try {
    const { tokens, ttft, seconds } = await streams(roomy);
    expected = tokens;
    for (const got of tokens) assert.equal(got.length, NEW_TOKENS);
    const p50 = percentile(ttft, 50);
    const p99 = percentile(ttft, 99);
    console.log(`# ${STREAMS} streams of ${prompt.length} + ${NEW_TOKENS} tokens, --kv-slots ${roomy.info().kvSlots}: TTFT p50 ${p50.toFixed(3)} s, p99 ${p99.toFixed(3)} s; ${((STREAMS * NEW_TOKENS) / seconds).toFixed(0)} tok/s over ${seconds.toFixed(2)} s`);
    assert.ok(p99 < 10, `TTFT p99 ${p99} s`);
    assert.equal(roomy.stats().kvBlocksUsed, 0);
  } finally {
    await roomy.close();
  }
  // 64 positions in blocks of 4 for up to 16 sequences of 24 positions (6 blocks each): preemption
  let preempted = 0;
  const small = await startCluster({ modelDir: fixtureDir('llama-tiny'), threads: 1, maxContext: 64, kvBlockSize: 4, kvCacheTokens: 64, observer: { preempted: () => preempted++ } });
  try {
    const { tokens } = await streams(small);
    assert.deepEqual(tokens, expected, 'the same tokens with a pool that preempts');
    assert.ok(preempted > 0, 'a pool of one context preempts');
    console.log(`# the same ${STREAMS} streams in a pool of 64 positions (blocks of 4): ${preempted} preemptions`);
  } finally {
    await small.close();
  }
});
