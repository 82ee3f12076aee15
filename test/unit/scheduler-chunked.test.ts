/**
 * Chunked prefill under a step token budget (--max-num-batched-tokens): every running stream's decode token is in
 * every step while a long prompt is admitted in chunks, chunks give the tokens of whole prompts, and budgets that
 * cannot carry the decode rows are refused. Also the runner's choice of decode graph bucket (worker/runner.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Scheduler, checkMaxNumBatchedTokens, defaultMaxNumBatchedTokens } from '../../coordinator/scheduler.ts';
import { SequenceState, type GenerationEvent } from '../../coordinator/generate.ts';
import { parseSamplingParams } from '../../coordinator/sampling-params.ts';
import { KvBlockTable } from '../../core/kv-block-table.ts';
import { checkKvPositions, stepBatchSchema, type StepBatch } from '../../core/step-batch.ts';
import { readModelSpec } from '../../core/model-spec.ts';
import { planShards } from '../../core/shard-plan.ts';
import { commandConfig } from '../../coordinator/config.ts';
import { eagerStepBytesPerToken, GRAPH_BUCKETS, graphArenaTokens, graphBucketFor, maxGraphBatch, maxStepTokens, PREFILL_STEP_TOKENS, stepArenaBytes, stepBytesPerToken, workerArenaBytes } from '../../worker/step-sizes.ts';
import { runRequests, tinyScheduler, type TinyRequest } from '../helpers/tiny-scheduler.ts';
import { fixtureDir, readReference } from '../helpers/fixtures.ts';

const B = 4;
const MAX_CONTEXT = 64;

function sequence(prompt: number[], maxNewTokens: number): SequenceState {
  const params = parseSamplingParams({ maxNewTokens, ignoreEos: true, seed: 1 }, { maxContext: MAX_CONTEXT, promptLength: prompt.length, vocabSize: 100 });
  return new SequenceState(prompt, params, [], { push: (id) => `<${id}>`, flush: () => '' });
}
async function drain(events: AsyncIterable<GenerationEvent>): Promise<number[]> {
  const tokens: number[] = [];
  for await (const e of events) if (e.type === 'token') tokens.push(e.token);
  return tokens;
}

for (const scheduleAhead of [true, false]) {
  test(`a long prompt admitted while streams decode is chunked and never stalls them (scheduling ahead ${scheduleAhead})`, async () => {
    const budget = 8;
    const kvCache = new KvBlockTable({ kvSlots: 4, maxContext: MAX_CONTEXT, kvBlockSize: B, kvBlocks: 64, paddingBlock: null, kvDtype: 'f32' });
    const batches: StepBatch[] = [];
    let started!: () => void;
    const twoDecoding = new Promise<void>((resolve) => (started = resolve));
    const step = async (batch: StepBatch) => {
      batches.push(batch);
      if (batches.length === 3) started();
      await new Promise((r) => setImmediate(r));
      return { tokens: batch.logitRows.map((row) => batch.positions[row]! + 10) };
    };
    const scheduler = new Scheduler({ kvCache, maxQueue: 4, step, maxNumBatchedTokens: budget, scheduleAhead });
    const a = scheduler.submitGenerate(sequence([1, 2, 3], 40));
    const b = scheduler.submitGenerate(sequence([4, 5], 40));
    await twoDecoding; // a and b are decoding
    const from = batches.length;
    const longPrompt = Array.from({ length: 45 }, (_, i) => 20 + i);
    const long = scheduler.submitGenerate(sequence(longPrompt, 3));
    const [ta, tb, tl] = await Promise.all([drain(a.events), drain(b.events), drain(long.events)]);
    assert.equal(ta.length, 40);
    assert.equal(tb.length, 40);
    // the long prompt's first token follows its last position; then decode tokens
    assert.deepEqual(tl, [54, 55, 56]);
    // sequences by the first block of their row: a has block 0, b block 1, the long prompt neither
    const firstBlocks = (batch: StepBatch) => batch.kvBlockTable.map((blocks) => blocks[0]!);
    const longChunks: number[][] = [];
    for (const batch of batches.slice(from)) {
      assert.deepEqual(stepBatchSchema.parse(batch), batch);
      checkKvPositions(batch, B);
      assert.ok(batch.tokens.length <= budget, `a step of ${batch.tokens.length} tokens, over the budget of ${budget}`);
      const rows = firstBlocks(batch);
      const longRow = rows.findIndex((block) => block !== 0 && block !== 1);
      if (longRow < 0) continue;
      const positions = batch.positions.filter((_, t) => batch.tokenSeq[t] === longRow);
      if (positions[0]! >= longPrompt.length) continue; // its decode steps
      longChunks.push(positions);
      // while the long prompt is prefilled, each step carries a's and b's decode tokens, one each
      for (const block of [0, 1]) assert.equal(batch.tokenSeq.filter((s) => rows[s] === block).length, 1, `step ${JSON.stringify(rows)}: stream of block ${block} is missing`);
    }
    // 45 positions in chunks of at most 8 - 2, in order, with no gap
    assert.deepEqual(longChunks.flat(), longPrompt.map((_, i) => i));
    assert.ok(longChunks.length >= Math.ceil(45 / 6), `${longChunks.length} chunks`);
    assert.ok(longChunks.every((chunk) => chunk.length <= 6));
    assert.equal(kvCache.blocksInUse, 0);
  });
}

test('a step of prompt chunks alone asks for a logit row nobody owns, and the prompt still draws its own token', async () => {
  const kvCache = new KvBlockTable({ kvSlots: 2, maxContext: MAX_CONTEXT, kvBlockSize: B, kvBlocks: 32, paddingBlock: null, kvDtype: 'f32' });
  const batches: StepBatch[] = [];
  const step = async (batch: StepBatch) => {
    batches.push(batch);
    return { tokens: batch.logitRows.map((row) => batch.positions[row]! + 10) };
  };
  const scheduler = new Scheduler({ kvCache, maxQueue: 4, step, maxNumBatchedTokens: 4 });
  assert.deepEqual(await drain(scheduler.submitGenerate(sequence(Array.from({ length: 10 }, (_, i) => i + 1), 2)).events), [19, 20]);
  // 10 prompt tokens in chunks of 4, 4, 2: only the last samples for the sequence
  assert.deepEqual(batches.map((batch) => batch.positions), [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10]]);
  assert.deepEqual(batches.map((batch) => batch.logitRows), [[3], [3], [1], [0]]);
});

const reference = readReference('llama-tiny');

test('chunked prefill draws the tokens of whole prompts (greedy and seeded, prefix caching on and off)', async () => {
  const text = reference.prompts[2]!;
  const requests: TinyRequest[] = [3, 17, 30, 9, 24].map((length, i) => ({
    prompt: text.slice(i, i + length),
    sampling: i % 2 === 0 ? { maxNewTokens: 12, ignoreEos: true } : { maxNewTokens: 12, ignoreEos: true, temperature: 0.9, topK: 40, seed: 50 + i },
  }));
  const sizes = { kvSlots: requests.length, maxContext: MAX_CONTEXT, kvBlockSize: B, kvCacheTokens: 8 * MAX_CONTEXT };
  const whole = await tinyScheduler(sizes, { maxNumBatchedTokens: 1024 });
  const expected = await runRequests(whole.scheduler, requests, MAX_CONTEXT);
  assert.ok(whole.batches.some((batch) => batch.tokens.length >= 30), 'the unchunked run takes a whole prompt in one step');
  for (const prefixCaching of [false, true]) {
    const chunked = await tinyScheduler(sizes, { maxNumBatchedTokens: 7, prefixCaching });
    assert.deepEqual(await runRequests(chunked.scheduler, requests, MAX_CONTEXT), expected, `prefix caching ${prefixCaching}`);
    assert.ok(chunked.batches.every((batch) => batch.tokens.length <= 7));
    assert.equal(chunked.kvCache.blocksInUse, 0);
  }
});

test('step token budgets that cannot carry the decode rows are refused, naming the values', async () => {
  assert.equal(defaultMaxNumBatchedTokens(16), 1024);
  assert.equal(defaultMaxNumBatchedTokens(2048), 2048);
  assert.throws(() => checkMaxNumBatchedTokens(0, 4), /--max-num-batched-tokens must be a positive integer, got 0/);
  assert.throws(() => checkMaxNumBatchedTokens(2.5, 1), /positive integer, got 2.5/);
  assert.throws(() => checkMaxNumBatchedTokens(63, 64), /--max-num-batched-tokens 63 is below --kv-slots 64/);
  assert.doesNotThrow(() => checkMaxNumBatchedTokens(64, 64));
  const kvCache = new KvBlockTable({ kvSlots: 8, maxContext: 16, kvBlockSize: B, kvBlocks: 8, paddingBlock: null, kvDtype: 'f32' });
  assert.throws(() => new Scheduler({ kvCache, maxQueue: 1, step: async () => ({}), maxNumBatchedTokens: 4 }), (err: Error & { code?: string }) => err.code === 'WEFT_BAD_CONFIG' && /below --kv-slots 8/.test(err.message));
  // the CLI's default follows --kv-slots; a value below it is refused by the cluster before anything starts
  assert.equal(commandConfig('serve', { kvSlots: '2000' }, {}).maxNumBatchedTokens, 2000);
  assert.equal(commandConfig('serve', { device: 'cuda' }, {}).maxNumBatchedTokens, 1024);
  assert.throws(() => commandConfig('serve', { maxNumBatchedTokens: '0' }, {}), /max-num-batched-tokens/);
});

test('decode graph buckets: powers of two to 128, then 192 and 256; a batch runs in the smallest that holds it', () => {
  assert.deepEqual([...GRAPH_BUCKETS], [1, 2, 4, 8, 16, 32, 64, 128, 192, 256]);
  const cases: [number, number | null][] = [[1, 1], [3, 4], [8, 8], [9, 16], [33, 64], [64, 64], [65, 128], [129, 192], [192, 192], [193, 256], [256, 256], [257, null], [0, null]];
  for (const [rows, bucket] of cases) assert.equal(graphBucketFor(rows, 256), bucket, `${rows} rows`);
  // graphs stop at the largest bucket the runner has: past it a batch runs eagerly
  assert.equal(graphBucketFor(9, 8), null);
  assert.equal(graphBucketFor(100, 128), 128);
  const dense = { nExpertsPerToken: 0 };
  assert.equal(maxGraphBatch(dense, 256), 256);
  assert.equal(maxGraphBatch(dense, 100), 128);
  assert.equal(maxGraphBatch(dense, 4), 4);
  assert.equal(maxGraphBatch(dense, 1000), 256);
  assert.equal(maxGraphBatch({ nExpertsPerToken: 2 }, 256), 8, 'bf16 expert matmuls above 8 rows are not capturable');
  const int8 = { kind: 'int8', groupSize: 'channel', atLoad: true } as const;
  assert.equal(maxGraphBatch({ nExpertsPerToken: 2, quantization: int8 }, 256), 64, 'quantized ones above 64');
  assert.equal(maxGraphBatch({ nExpertsPerToken: 2, quantization: int8 }, 12), 16);
  assert.equal(maxGraphBatch({ nExpertsPerToken: 2, quantization: int8 }, 40), 64);
  // the graphs' regions take half the arena at most: a small arena keeps the smaller buckets
  assert.equal(graphArenaTokens(256), 703);
  assert.equal(maxGraphBatch(dense, 256, 2 * 703), 256);
  assert.equal(maxGraphBatch(dense, 256, 2 * 703 - 1), 192);
  assert.equal(maxGraphBatch(dense, 256, 14), 4);
  assert.equal(maxGraphBatch(dense, 256, 13), 2);
  assert.equal(maxGraphBatch(dense, 256, 1), 0);
});

test('the step arena holds a whole 1024-token step beside the decode graphs of every bucket to 256 (Llama-2-7B)', () => {
  const spec = readModelSpec(fixtureDir('llama-tiny'));
  const llama2 = { ...spec, nLayers: 32, hidden: 4096, headDim: 128, nHeads: 32, nKvHeads: 32, ffn: 11008, vocabSize: 32000, nExpertsPerToken: 0 };
  const plan = planShards(llama2, 1);
  const graphs = graphArenaTokens(maxGraphBatch(llama2, 256));
  const arena = stepArenaBytes(llama2, plan, PREFILL_STEP_TOKENS, graphs);
  assert.ok(maxStepTokens(llama2, plan, arena, graphs) >= PREFILL_STEP_TOKENS);
  // graphs keep every layer's intermediates (a capture releases nothing); the eager step one layer's
  assert.ok(arena >= PREFILL_STEP_TOKENS * eagerStepBytesPerToken(llama2, plan) + graphs * stepBytesPerToken(llama2, plan));
  const GiB = 2 ** 30;
  assert.equal(workerArenaBytes(llama2, plan, 140 * GiB, 80 * GiB, graphs), arena, 'an H200 holds it');
  assert.ok(workerArenaBytes(llama2, plan, 140 * GiB, 80 * GiB, graphs) > workerArenaBytes(llama2, plan, 140 * GiB, 80 * GiB), 'the graphs add to the arena');
});
