/**
 * The paged KV cache end to end on the CPU with the hf-tiny llama, loaded in-process under the scheduler: paged
 * layouts (blocks of 16 and 5, ragged prompt lengths) draw the tokens and give the log-probs of one block per
 * sequence; a pool too small for every sequence preempts and recomputes instead of failing, and each stream still
 * gets exactly the tokens of an unpreempted run (same seeds), with no token repeated or missing.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Scheduler } from '../../coordinator/scheduler.ts';
import { WeftMetrics } from '../../coordinator/metrics.ts';
import { maxAbsDiff, readReference } from '../helpers/fixtures.ts';
import { PAGED_MAX_CONTEXT as MAX_CONTEXT, pagedScheduler as tinyScheduler, runPaged as run, type TinyRequest as Request } from '../helpers/tiny-scheduler.ts';

const reference = readReference('llama-tiny');

/**
 * Prompts of ragged lengths around the block edges of 5 and 16 (3, 5, 6, 15, 16, 17, 21 tokens), greedy and
 * sampled with seeds, each for `maxNewTokens`.
 */
function requests(maxNewTokens: number): Request[] {
  const text = reference.prompts[2]!;
  return [3, 5, 6, 15, 16, 17, 21].map((length, i) => ({
    prompt: text.slice(i, i + length),
    sampling: i % 2 === 0 ? { maxNewTokens, ignoreEos: true } : { maxNewTokens, ignoreEos: true, temperature: 0.9, topK: 40, seed: 100 + i },
  }));
}

test('paged layouts (blocks of 16 and 5, ragged lengths) draw the tokens and give the log-probs of one block per sequence', async () => {
  const batch = requests(20);
  const oneBlock = await tinyScheduler({ kvSlots: batch.length });
  const expected = await run(oneBlock.scheduler, batch);
  const scores = (s: Scheduler) => Promise.all(batch.map(({ prompt }, i) => s.submitScore([...prompt, ...expected[i]!], false)));
  const expectedScores = await scores(oneBlock.scheduler);
  for (const kvBlockSize of [16, 5]) {
    const paged = await tinyScheduler({ kvSlots: batch.length, kvBlockSize, kvCacheTokens: batch.length * MAX_CONTEXT });
    assert.deepEqual(await run(paged.scheduler, batch), expected, `blocks of ${kvBlockSize}`);
    const got = await scores(paged.scheduler);
    got.forEach((score, i) => {
      const diff = maxAbsDiff(score.logprobs.slice(1) as number[], expectedScores[i]!.logprobs.slice(1) as number[]);
      assert.ok(diff < 1e-5, `blocks of ${kvBlockSize}, prompt ${i}: log-probs differ by ${diff}`);
    });
    assert.equal(paged.preemptions(), 0);
    assert.equal(paged.kvCache.blocksInUse, 0);
  }
});

test('a full pool preempts instead of failing: every stream gets exactly the tokens of an unpreempted run', async () => {
  const batch = requests(30); // up to 51 positions each: 11 to 13 blocks of 4, seven sequences, a pool of 16
  const expected = await run((await tinyScheduler({ kvSlots: batch.length })).scheduler, batch);
  for (const [kvBlockSize, prefixCaching] of [[4, false], [16, false], [4, true]] as const) {
    const paged = await tinyScheduler({ kvSlots: batch.length, kvBlockSize, kvCacheTokens: MAX_CONTEXT }, prefixCaching);
    assert.deepEqual(await run(paged.scheduler, batch), expected, `blocks of ${kvBlockSize}, prefix caching ${prefixCaching}`);
    assert.ok(paged.preemptions() > 0, `blocks of ${kvBlockSize}: a pool of one context preempts`);
    assert.equal(paged.scheduler.preemptions, paged.preemptions());
    assert.equal(paged.kvCache.blocksInUse, 0, 'every block came back');
    console.log(`# blocks of ${kvBlockSize}, a pool of ${MAX_CONTEXT} positions, ${batch.length} streams, prefix caching ${prefixCaching}: ${paged.preemptions()} preemptions, ${paged.prefix.hit} of ${paged.prefix.queried} prompt tokens cached`);
  }
});

test('prefix caching: prompts sharing a prefix reuse its blocks, and a hit draws the tokens of a miss', async () => {
  const text = reference.prompts[2]!;
  const shared = text.slice(0, 18); // a "system prompt": 4 full blocks of 4, 1 of 16
  const batch: Request[] = [1, 2, 3, 6, 0].map((extra, i) => ({
    prompt: [...shared, ...text.slice(20 + i, 20 + i + extra)],
    sampling: i % 2 === 0 ? { maxNewTokens: 12, ignoreEos: true } : { maxNewTokens: 12, ignoreEos: true, temperature: 0.9, seed: 7 + i },
  }));
  const expected = await run((await tinyScheduler({ kvSlots: batch.length })).scheduler, batch);
  for (const kvBlockSize of [4, 16]) {
    const cache = await tinyScheduler({ kvSlots: batch.length, kvBlockSize, kvCacheTokens: 8 * MAX_CONTEXT }, true);
    // the first computes the shared prefix (a miss); the others, sent after it, find its blocks
    const [first] = await run(cache.scheduler, batch.slice(0, 1));
    assert.equal(cache.prefix.hit, 0, 'the first is a miss');
    const rest = await run(cache.scheduler, batch.slice(1));
    assert.deepEqual([first, ...rest], expected, `blocks of ${kvBlockSize}: a hit gives the tokens of a miss`);
    const full = Math.floor(shared.length / kvBlockSize) * kvBlockSize;
    assert.ok(cache.prefix.hit >= (batch.length - 1) * full - kvBlockSize, `blocks of ${kvBlockSize}: ${cache.prefix.hit} tokens hit`);
    // the same requests again: their prompts (and generated tokens, registered at the end) are cached
    const hitBefore = cache.prefix.hit;
    assert.deepEqual(await run(cache.scheduler, batch), expected, `blocks of ${kvBlockSize}, again`);
    assert.ok(cache.prefix.hit > hitBefore);
    assert.equal(cache.kvCache.blocksInUse, 0, 'shared blocks come back when their last sequence ends');
    console.log(`# prefix caching, blocks of ${kvBlockSize}: ${cache.prefix.hit} of ${cache.prefix.queried} prompt tokens hit`);
  }
});

test('metrics: preemptions and prefix-cache lookups are counted under their vLLM names', async () => {
  const metrics = new WeftMetrics('m');
  const value = async (name: string) => Number(new RegExp(`^${name}\\{model_name="m"\\} (\\S+)$`, 'm').exec(await metrics.text())?.[1]);
  assert.deepEqual([await value('weft_num_preemptions_total'), await value('weft_prefix_cache_queries_total'), await value('weft_prefix_cache_hits_total')], [0, 0, 0]);
  metrics.observer.preempted!();
  metrics.observer.prefixCache!(20, 16);
  metrics.observer.prefixCache!(5, 0);
  assert.deepEqual([await value('weft_num_preemptions_total'), await value('weft_prefix_cache_queries_total'), await value('weft_prefix_cache_hits_total')], [1, 25, 16]);
});
