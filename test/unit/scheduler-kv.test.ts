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
/** A step function that answers position + 10 at every logit row, recording each batch. */
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
  const scheduler = new Scheduler({ kvCache, maxQueue: 4, step: recordingStep(batches) });
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

test('paged: a sequence the pool cannot grow ends with WEFT_BUSY and gives its blocks back; one past the context is refused at once', async () => {
  const kvCache = paged(2, 2);
  const scheduler = new Scheduler({ kvCache, maxQueue: 4, step: recordingStep([]) });
  // both need a second block for position 4, in the same step: a asks first and finds none; its block goes to b
  const a = scheduler.submitGenerate(sequence([1, 2, 3], 4));
  const b = scheduler.submitGenerate(sequence([1, 2, 3], 4));
  await assert.rejects(drain(a.events), (err: unknown) => isWeftError(err) && err.code === 'WEFT_BUSY' && /sequence 0 needs 1 more blocks for 5 tokens, 0 are free/.test(err.message));
  assert.deepEqual(await drain(b.events), [12, 13, 14, 15]);
  assert.equal(kvCache.sequences, 0);
  assert.equal(kvCache.blocksFree, 2);
  await assert.rejects(scheduler.submitScore(Array.from({ length: 17 }, (_, i) => i), false), (err: unknown) => isWeftError(err) && err.code === 'WEFT_BAD_REQUEST' && /17 tokens exceeds the KV cache's context of 16/.test(err.message));
  scheduler.failAll(new Error('closed'));
});
