/**
 * Sample groups (coordinator/sample-group.ts): the sequences of one prompt prefill it once and share its whole
 * blocks (KvBlockTable.fork); each draws the tokens it would draw alone with its seed, through preemption and
 * cancellation, and the blocks all come back. A chi-square test over the first tokens of two samples of one
 * prompt: their joint distribution is the product of the model's (independent samples), at significance 0.001.
 * Then the same through weft (a spawned CPU worker, the tiny Llama): n samples of one prompt decode with
 * bifurcated attention and give each sample the tokens of its seed run alone.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Scheduler } from '../../coordinator/scheduler.ts';
import { SequenceState, type GenerationEvent } from '../../coordinator/generate.ts';
import { parseSamplingParams } from '../../coordinator/sampling-params.ts';
import { drawFrom } from '../../coordinator/speculative.ts';
import { KvBlockTable } from '../../core/kv-block-table.ts';
import { checkKvPositions, type StepBatch } from '../../core/step-batch.ts';
import { startCluster } from '../../coordinator/cluster.ts';
import { fixtureDir, readReference } from '../helpers/fixtures.ts';

const B = 4;
const MAX_CONTEXT = 32;
const pool = (kvSlots: number, kvBlocks: number): KvBlockTable => new KvBlockTable({ kvSlots, maxContext: MAX_CONTEXT, kvBlockSize: B, kvBlocks, paddingBlock: null, kvDtype: 'f32' });
const PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]; // 10 tokens: two whole blocks shareable, the tail recomputed

function sequence(seed: number, maxNewTokens: number, prompt = PROMPT): SequenceState {
  const params = parseSamplingParams({ maxNewTokens, ignoreEos: true, seed, temperature: 1 }, { maxContext: MAX_CONTEXT, promptLength: prompt.length, vocabSize: 100 });
  return new SequenceState(prompt, params, [], { push: (id) => `<${id}>`, flush: () => '' });
}
async function drain(events: AsyncIterable<GenerationEvent>): Promise<number[]> {
  const tokens: number[] = [];
  for await (const e of events) if (e.type === 'token') tokens.push(e.token);
  return tokens;
}
/** A model whose every row draws from `p` with the row's uniform (fed tokens need no value); records each batch. */
function drawingStep(batches: StepBatch[], p: readonly number[]): (batch: StepBatch) => Promise<{ tokens: number[] }> {
  return async (batch) => {
    batches.push(batch);
    checkKvPositions(batch, B);
    await new Promise((r) => setImmediate(r));
    return { tokens: batch.sample!.uniform.map((u) => drawFrom(p, u)) };
  };
}
const UNIFORM_100 = Array.from({ length: 100 }, () => 0.01);

test('fork: whole blocks shared and counted, the new sequence grows in blocks of its own, shared blocks free with their last sequence', () => {
  const kv = pool(4, 8);
  const parent = kv.allocate(10); // blocks 0, 1, 2
  const { id, shared } = kv.fork(parent, 9); // 9 positions: two whole blocks
  assert.equal(shared, 8);
  assert.deepEqual(kv.blocks(id), [0, 1]);
  kv.grow(id, 12);
  assert.deepEqual(kv.blocks(id), [0, 1, 3]);
  assert.equal(kv.blocksInUse, 4);
  kv.free(parent);
  assert.equal(kv.blocksInUse, 3, 'the shared blocks stay while the fork holds them');
  kv.free(id);
  assert.equal(kv.blocksInUse, 0);
  assert.equal(kv.fork(kv.allocate(3), 3).shared, 0, 'a partial block is never shared');
});

test('n samples of one prompt: one prefill, the others fork its blocks and recompute the tail; each draws its seed\'s tokens', async () => {
  const run = async (groups: boolean, seeds: number[]): Promise<{ tokens: number[][]; batches: StepBatch[] }> => {
    const batches: StepBatch[] = [];
    const kvCache = pool(8, 32);
    const scheduler = new Scheduler({ kvCache, maxQueue: 8, step: drawingStep(batches, UNIFORM_100), sampleGroups: groups });
    const tokens = await Promise.all(seeds.map((seed) => drain(scheduler.submitGenerate(sequence(seed, 6)).events)));
    assert.equal(kvCache.blocksInUse, 0, 'every block came back');
    return { tokens, batches };
  };
  const seeds = [40, 41, 42, 43];
  const grouped = await run(true, seeds);
  const alone = await Promise.all(seeds.map(async (seed) => (await run(false, [seed])).tokens[0]!));
  assert.deepEqual(grouped.tokens, alone);
  // the first step prefills the prompt once; the next feeds the three others the 2 tokens past the shared blocks
  const [first, second] = grouped.batches;
  assert.equal(first!.tokens.length, PROMPT.length);
  const leaderBlocks = first!.kvBlockTable[0]!.slice(0, 2);
  const forked = second!.kvBlockTable.filter((row) => row[0] === leaderBlocks[0] && row[1] === leaderBlocks[1]);
  assert.equal(forked.length, 4, 'the leader and three samples hold the prompt\'s two blocks');
  assert.equal(second!.tokens.length, 1 + 3 * 2, 'the leader\'s decode token and each sample\'s 2 tail tokens');
});

test('after the KV allocator is replaced (a pool sized at load), samples fork from the new one', async () => {
  const batches: StepBatch[] = [];
  const scheduler = new Scheduler({ kvCache: pool(8, 8), maxQueue: 8, step: drawingStep(batches, UNIFORM_100) }, true);
  const kvCache = pool(8, 32);
  scheduler.replaceKvCache(kvCache);
  scheduler.resume();
  const tokens = await Promise.all([40, 41, 42, 43].map((seed) => drain(scheduler.submitGenerate(sequence(seed, 6)).events)));
  for (const got of tokens) assert.equal(got.length, 6);
  assert.equal(batches[1]!.tokens.length, 1 + 3 * 2, 'the three samples forked the leader\'s prompt blocks');
  assert.equal(kvCache.blocksInUse, 0, 'every block came back to the new pool');
});

test('samples waiting for their group\'s prompt to go out are not refused by a full queue (--max-queue 0)', async () => {
  const kvCache = pool(8, 32);
  const scheduler = new Scheduler({ kvCache, maxQueue: 0, step: drawingStep([], UNIFORM_100) });
  const tokens = await Promise.all([1, 2, 3, 4].map((seed) => drain(scheduler.submitGenerate(sequence(seed, 3)).events)));
  for (const got of tokens) assert.equal(got.length, 3);
});

test('a preempted or cancelled member: the others go on with their tokens, the blocks all come back', async () => {
  const seeds = [7, 8, 9];
  const expected = await Promise.all(
    seeds.map(async (seed) => drain(new Scheduler({ kvCache: pool(4, 32), maxQueue: 4, step: drawingStep([], UNIFORM_100) }).submitGenerate(sequence(seed, 12)).events)),
  );
  // 10 blocks: the prompt's 2 + 3 x 3 private blocks of 22 positions do not fit, so the youngest is preempted
  let preempted = 0;
  const small = pool(3, 10);
  const scheduler = new Scheduler({ kvCache: small, maxQueue: 4, step: drawingStep([], UNIFORM_100), observer: { preempted: () => preempted++ } });
  const tokens = await Promise.all(seeds.map((seed) => drain(scheduler.submitGenerate(sequence(seed, 12)).events)));
  assert.deepEqual(tokens, expected);
  assert.ok(preempted > 0, 'the pool preempted a member');
  assert.equal(small.blocksInUse, 0);
  // cancel the first (the one that prefilled) once the others forked: they finish with their tokens
  const kvCache = pool(4, 32);
  const cancelling = new Scheduler({ kvCache, maxQueue: 4, step: drawingStep([], UNIFORM_100) });
  const handles = seeds.map((seed) => cancelling.submitGenerate(sequence(seed, 12)));
  const firstDone = (async () => {
    const got: number[] = [];
    try {
      for await (const e of handles[0]!.events) if (e.type === 'token' && got.push(e.token) === 2) handles[0]!.cancel();
    } catch {
      // cancelled
    }
    return got;
  })();
  const rest = await Promise.all(handles.slice(1).map((h) => drain(h.events)));
  assert.deepEqual(await firstDone, expected[0]!.slice(0, 2));
  assert.deepEqual(rest, expected.slice(1));
  assert.equal(kvCache.blocksInUse, 0);
});

test('two samples of one prompt are independent draws of the model (chi-square, 24 df, p = 0.001)', async () => {
  const V = 5;
  const CRITICAL_24_DF_P001 = 51.18;
  const p = [0.4, 0.1, 0.25, 0.05, 0.2];
  const counts = new Float64Array(V * V);
  const same = new Float64Array(V * V); // the pairs a group that handed its first draw to every sample would give
  const rounds = 3000;
  const kvCache = pool(256, 1024);
  const scheduler = new Scheduler({ kvCache, maxQueue: 256, step: drawingStep([], p) });
  for (let r = 0; r < rounds; r += 100) {
    const pairs = await Promise.all(
      Array.from({ length: Math.min(100, rounds - r) }, (_, i) => {
        const seed = 1000 * (r + i); // a request's samples take seed + j, as OpenAI n does (choicesOf)
        return Promise.all([0, 1].map((j) => drain(scheduler.submitGenerate(sequence(seed + j, 1)).events)));
      }),
    );
    for (const pair of pairs) {
      const a = pair[0]![0]!, b = pair[1]![0]!;
      counts[a * V + b]!++;
      same[a * V + a]!++;
    }
  }
  const chi = (observed: Float64Array): number => {
    let sum = 0;
    for (let x = 0; x < V; x++)
      for (let y = 0; y < V; y++) {
        const expected = rounds * p[x]! * p[y]!;
        sum += (observed[x * V + y]! - expected) ** 2 / expected;
      }
    return sum;
  };
  assert.ok(chi(counts) < CRITICAL_24_DF_P001, `chi-square ${chi(counts).toFixed(1)} exceeds ${CRITICAL_24_DF_P001}`);
  assert.ok(chi(same) > CRITICAL_24_DF_P001, 'the test tells apart samples that share their draw');
  assert.equal(kvCache.blocksInUse, 0);
});

test('through weft: n samples of one prompt decode with bifurcated attention and each gets its seed\'s tokens', async () => {
  const prompt = readReference('llama-tiny').prompts[1]!.slice(0, 11);
  const cluster = await startCluster({ modelDir: fixtureDir('llama-tiny'), threads: 1, maxContext: 64, kvBlockSize: 4, kvCacheTokens: 512 });
  try {
    const generate = async (seed: number, temperature: number): Promise<number[]> => {
      const tokens: number[] = [];
      for await (const event of cluster.generate({ promptIds: prompt, sampling: { maxNewTokens: 12, ignoreEos: true, temperature, seed } })) if (event.type === 'token') tokens.push(event.token);
      return tokens;
    };
    const seeds = [3, 4, 5, 6];
    const together = await Promise.all(seeds.map((seed) => generate(seed, 1)));
    const alone: number[][] = [];
    for (const seed of seeds) alone.push(await generate(seed, 1));
    assert.deepEqual(together, alone);
    assert.ok(new Set(together.map((t) => t.join())).size > 1, 'the samples differ (a real sampling test)');
    // greedy: n copies of the one greedy sequence
    const greedy = await Promise.all(seeds.map((seed) => generate(seed, 0)));
    for (const tokens of greedy) assert.deepEqual(tokens, greedy[0]);
    assert.deepEqual(await generate(0, 0), greedy[0]);
    assert.equal(cluster.stats().kvBlocksUsed, 0);
  } finally {
    await cluster.close();
  }
});
