/**
 * The scheduler against the KV allocator with paged sizes (blocks of 4 positions from a shared pool): nothing
 * but the allocator's sizes differ from today's one-block layout. Admission waits for blocks, sequences grow
 * block by block, no block serves two sequences in a step, and every block comes back.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Scheduler } from '../../coordinator/scheduler.ts';
import { SequenceState, type GenerationEvent } from '../../coordinator/generate.ts';
import { parseSamplingParams } from '../../coordinator/sampling-params.ts';
import { KvBlockTable } from '../../core/kv-block-table.ts';
import { checkKvPositions, stepBatchSchema, type StepBatch } from '../../core/step-batch.ts';
import { isWeftError } from '../../core/errors.ts';

const B = 4;
const paged = (kvSlots: number, kvBlocks: number): KvBlockTable => new KvBlockTable({ kvSlots, maxContext: 16, kvBlockSize: B, kvBlocks, paddingBlock: null, kvDtype: 'f32' });
function sequence(prompt: number[], maxNewTokens: number): SequenceState {
  const params = parseSamplingParams({ maxNewTokens, ignoreEos: true, seed: 1 }, { maxContext: 16, promptLength: prompt.length, vocabSize: 100 });
  return new SequenceState(prompt, params, [], { push: (id) => `<${id}>`, flush: () => '' });
}
async function drain(events: AsyncIterable<GenerationEvent>): Promise<number[]> {
  const tokens: number[] = [];
  for await (const e of events) if (e.type === 'token') tokens.push(e.token);
  return tokens;
}
/** A step function that answers position + 10 at every logit row (fed tokens need no value), recording each batch. */
function recordingStep(batches: StepBatch[]): (batch: StepBatch) => Promise<{ tokens: number[] }> {
  return async (batch) => {
    batches.push(batch);
    await new Promise((r) => setImmediate(r));
    return { tokens: batch.logitRows.map((row) => batch.positions[row]! + 10) };
  };
}

test('paged: admission waits for free blocks, sequences grow block by block, every block comes back', async () => {
  const kvCache = paged(3, 4);
  const batches: StepBatch[] = [];
  // one step at a time, so that the order of blocks is exact (scheduling ahead: the next test)
  const scheduler = new Scheduler({ kvCache, maxQueue: 4, step: recordingStep(batches), scheduleAhead: false });
  const a = scheduler.submitGenerate(sequence([1, 2, 3], 6)); // positions 0..7: two blocks by the end
  const b = scheduler.submitGenerate(sequence([1, 2, 3, 4, 5], 2)); // two blocks from the start
  const c = scheduler.submitGenerate(sequence([1, 2, 3, 4, 5, 6], 1)); // two blocks: waits for b's
  assert.equal(scheduler.waiting, 1);
  assert.equal(kvCache.blocksFree, 1);
  const [ta, tb, tc] = await Promise.all([drain(a.events), drain(b.events), drain(c.events)]);
  assert.deepEqual(ta, [12, 13, 14, 15, 16, 17]);
  assert.deepEqual(tb, [14, 15]);
  assert.deepEqual(tc, [15]);
  // a: block 0, growing into block 2 at position 4; b: blocks 1 and 2, then c gets 3 (free from the start) and 1
  assert.deepEqual(
    batches.map((batch) => batch.kvBlockTable),
    [[[0], [1, 2]], [[0], [1, 2]], [[0, 2], [3, 1]], [[0, 2]], [[0, 2]], [[0, 2]]],
  );
  for (const batch of batches) {
    assert.deepEqual(stepBatchSchema.parse(batch), batch);
    checkKvPositions(batch, B);
    const blocks = batch.kvBlockTable.flat();
    assert.equal(new Set(blocks).size, blocks.length, `a block served two sequences in one step: ${JSON.stringify(batch.kvBlockTable)}`);
  }
  assert.equal(kvCache.sequences, 0);
  assert.equal(kvCache.blocksFree, 4);
});

test('paged, scheduling ahead: decode steps are fed from the step before, tokens and blocks as one step at a time', async () => {
  const kvCache = paged(3, 4);
  const batches: StepBatch[] = [];
  const scheduler = new Scheduler({ kvCache, maxQueue: 4, step: recordingStep(batches) });
  const a = scheduler.submitGenerate(sequence([1, 2, 3], 6));
  const b = scheduler.submitGenerate(sequence([1, 2, 3, 4, 5], 2));
  const c = scheduler.submitGenerate(sequence([1, 2, 3, 4, 5, 6], 1));
  const [ta, tb, tc] = await Promise.all([drain(a.events), drain(b.events), drain(c.events)]);
  assert.deepEqual(ta, [12, 13, 14, 15, 16, 17]);
  assert.deepEqual(tb, [14, 15]);
  assert.deepEqual(tc, [15]);
  // a's second to sixth tokens were fed on the workers; b's token budget ends with its second token, so no step
  // is sent past it (no overshoot for a known budget)
  const fed = batches.filter((batch) => batch.feed?.some((from) => from >= 0));
  assert.ok(fed.length >= 4, `expected fed decode steps, got ${JSON.stringify(batches.map((x) => x.feed ?? null))}`);
  // a fed token continues the sequence whose row it names in the step before: same first block, next position
  batches.forEach((batch, i) =>
    batch.feed?.forEach((from, t) => {
      if (from < 0) return;
      const prev = batches[i - 1]!;
      const prevToken = prev.logitRows[from]!;
      assert.equal(batch.positions[t], prev.positions[prevToken]! + 1, `step ${i} token ${t}`);
      assert.equal(batch.kvBlockTable[batch.tokenSeq[t]!]![0], prev.kvBlockTable[prev.tokenSeq[prevToken]!]![0], `step ${i} token ${t}`);
    }),
  );
  for (const batch of batches) {
    assert.deepEqual(stepBatchSchema.parse(batch), batch);
    checkKvPositions(batch, B);
    const blocks = batch.kvBlockTable.flat();
    assert.equal(new Set(blocks).size, blocks.length, `a block served two sequences in one step: ${JSON.stringify(batch.kvBlockTable)}`);
  }
  // every sampled row: a (6 tokens) + b (2) + c (1), none past a token budget
  assert.equal(batches.reduce((n, batch) => n + batch.logitRows.length, 0), 9);
  assert.equal(kvCache.sequences, 0);
  assert.equal(kvCache.blocksFree, 4);
});

test('paged: a sequence the pool cannot grow preempts a younger one, which is recomputed with the same tokens; one past the context is refused at once', async () => {
  for (const scheduleAhead of [false, true]) {
    const kvCache = paged(2, 3);
    const batches: StepBatch[] = [];
    let preempted = 0;
    const scheduler = new Scheduler({ kvCache, maxQueue: 4, step: recordingStep(batches), scheduleAhead, observer: { preempted: () => preempted++ } });
    // b is admitted beside a with a block to spare (a's next); at position 4 a takes it and b waits for its second;
    // at position 8 a needs a third block: it takes b's, and b waits in the queue to be recomputed
    const a = scheduler.submitGenerate(sequence([1, 2, 3], 8));
    const b = scheduler.submitGenerate(sequence([1, 2, 3], 4));
    const [ta, tb] = await Promise.all([drain(a.events), drain(b.events)]);
    assert.deepEqual(ta, [12, 13, 14, 15, 16, 17, 18, 19]);
    assert.deepEqual(tb, [12, 13, 14, 15], 'the recomputed sequence goes on with the tokens of an unpreempted run');
    assert.equal(preempted, 1);
    assert.equal(scheduler.preemptions, 1);
    // b's recompute: its prompt and the tokens it had, from position 0, sampling the token after them
    const recompute = batches.find((batch) => batch.kvBlockTable.length === 1 && batch.tokens.length > 3)!;
    assert.deepEqual(recompute.tokens.slice(0, 3), [1, 2, 3]);
    assert.deepEqual(recompute.positions, recompute.tokens.map((_, i) => i));
    for (const batch of batches) {
      checkKvPositions(batch, B);
      const blocks = batch.kvBlockTable.flat();
      assert.equal(new Set(blocks).size, blocks.length, `a block served two sequences in one step: ${JSON.stringify(batch.kvBlockTable)}`);
    }
    assert.equal(kvCache.sequences, 0);
    assert.equal(kvCache.blocksFree, 3);
    await assert.rejects(scheduler.submitScore(Array.from({ length: 17 }, (_, i) => i), false), (err: unknown) => isWeftError(err) && err.code === 'WEFT_BAD_REQUEST' && /17 tokens exceeds the KV cache's context of 16/.test(err.message));
    scheduler.failAll(new Error('closed'));
  }
});

test('paged: a sequence is admitted only with a free block left for each running generation that will grow; none that will not', async () => {
  for (const [maxNewTokens, admitted] of [[8, 2], [1, 3]] as const) {
    const kvCache = paged(4, 3);
    const batches: StepBatch[] = [];
    const scheduler = new Scheduler({ kvCache, maxQueue: 4, step: recordingStep(batches) });
    // each prompt takes one block; 8 new tokens need three blocks in all, 1 new token none past the first
    const streams = [0, 1, 2].map(() => scheduler.submitGenerate(sequence([1, 2, 3], maxNewTokens)));
    assert.deepEqual([scheduler.slotsInUse, scheduler.waiting], [admitted, 3 - admitted], `${maxNewTokens} new tokens`);
    const tokens = await Promise.all(streams.map((stream) => drain(stream.events)));
    assert.ok(tokens.every((t) => t.length === maxNewTokens));
    assert.equal(kvCache.blocksFree, 3);
  }
});

test('scheduling ahead: a stop token costs at most one step for its row and no token after it; a cancel frees blocks at once and sends nothing more', async () => {
  const kvCache = paged(2, 8);
  const batches: StepBatch[] = [];
  const scheduler = new Scheduler({ kvCache, maxQueue: 4, step: recordingStep(batches) });
  // recordingStep draws position + 10: a stop token of 15 ends `a` at position 5, its third token
  const stopping = (() => {
    const params = parseSamplingParams({ maxNewTokens: 10, stopTokenIds: [15], seed: 1 }, { maxContext: 16, promptLength: 3, vocabSize: 100 });
    return new SequenceState([1, 2, 3], params, [], { push: (id) => `<${id}>`, flush: () => '' });
  })();
  const a = scheduler.submitGenerate(stopping);
  const b = scheduler.submitGenerate(sequence([1, 2, 3], 10));
  const seen: number[] = [];
  const bEvents = (async () => {
    for await (const e of b.events) {
      if (e.type !== 'token') continue;
      seen.push(e.token);
      if (seen.length === 3) {
        const before = kvCache.blocksFree;
        b.cancel();
        assert.ok(kvCache.blocksFree > before, 'a cancelled sequence gives its blocks back at once');
      }
    }
  })();
  const bCancelled = assert.rejects(bEvents, (err: unknown) => isWeftError(err) && err.code === 'WEFT_CANCELLED');
  const aTokens = await drain(a.events);
  await bCancelled;
  assert.deepEqual(aTokens, [12, 13, 14]); // the stop token ends it without a token event
  assert.deepEqual(seen, [12, 13, 14]);
  // a's rows: the prompt (position 2) and positions 3..5, plus at most one step past its stop token (position 6)
  const aBlock = batches[0]!.kvBlockTable[0]![0];
  const aRows = batches.flatMap((batch) => batch.positions.filter((_, t) => batch.kvBlockTable[batch.tokenSeq[t]!]![0] === aBlock));
  assert.ok(Math.max(...aRows) <= 6, `a ran to position ${Math.max(...aRows)}`);
  assert.equal(kvCache.sequences, 0);
  assert.equal(kvCache.blocksFree, 8);
});
