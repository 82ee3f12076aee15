/**
 * The step as a value: the wire batch's schema (lengths, tokenSeq, block rows), the position check against the
 * KV block size, and the one builder the scheduler and speculative decoding make batches with.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { checkKvPositions, stepBatchSchema, type StepBatch } from '../../core/step-batch.ts';
import { GREEDY, StepBatchBuilder, sampledWith } from '../../coordinator/step-builder.ts';
import { isWeftError } from '../../core/errors.ts';

const weftError = (code: string, pattern: RegExp) => (err: unknown) => isWeftError(err) && err.code === code && pattern.test(err.message);
const schemaRefuses = (batch: unknown, pattern: RegExp): void => {
  const parsed = stepBatchSchema.safeParse(batch);
  assert.equal(parsed.success, false, 'the schema accepted a bad batch');
  assert.match(parsed.error!.issues.map((i) => i.message).join('; '), pattern);
};

test('builder: sequences with their blocks, sampled rows in order', () => {
  const builder = new StepBatchBuilder(64);
  builder.appendSampled([3], [11, 12, 13], 0, sampledWith({ temperature: 0.7, topK: 5, topP: 0.9 }, 0.25));
  builder.appendSampled([0], [14], 9, GREEDY);
  assert.equal(builder.size, 4);
  const batch = builder.build();
  assert.deepEqual(batch, {
    tokens: [11, 12, 13, 14],
    positions: [0, 1, 2, 9],
    tokenSeq: [0, 0, 0, 1],
    kvBlockTable: [[3], [0]],
    logitRows: [2, 3],
    sample: { temperature: [0.7, 0], topK: [5, 0], topP: [0.9, 1], uniform: [0.25, 0] },
  });
  assert.deepEqual(stepBatchSchema.parse(batch), batch);
});

test('builder: a row\'s logit bias becomes the batch\'s (row, id, value) triples; the schema checks them', () => {
  const builder = new StepBatchBuilder(64);
  builder.appendSampled([0], [11, 12], 0, GREEDY);
  builder.appendSampled([1], [13], 0, sampledWith({ temperature: 0, topK: 0, topP: 1, logitBias: [[4, -100], [9, 5]] }, 0.5));
  const batch = builder.build();
  assert.deepEqual(batch.logitBias, { rows: [1, 1], ids: [4, 9], values: [-100, 5] });
  assert.equal(stepBatchSchema.safeParse(batch).success, true);
  schemaRefuses({ ...batch, logitBias: { rows: [2], ids: [4], values: [1] } }, /logitBias row past the 2 logit rows/);
  schemaRefuses({ ...batch, logitBias: { rows: [0, 1], ids: [4], values: [1, 2] } }, /logitBias rows, ids and values must have equal lengths \(2, 1, 2\)/);
  const { sample: _sample, ...unsampled } = batch;
  schemaRefuses({ ...unsampled, scoreIds: [1, 2] }, /logitBias needs sampled rows/);
  const plain = new StepBatchBuilder(64);
  plain.appendSampled([0], [1], 0, GREEDY);
  assert.equal(plain.build().logitBias, undefined, 'no bias, no field');
});

test('builder: scored rows and full log-probs; several blocks per sequence (paged sizes)', () => {
  const builder = new StepBatchBuilder(4);
  const start = builder.append([5, 9], [1, 2, 3, 4, 5, 6], 1); // positions 1..6 over blocks 5 (0..3) and 9 (4..7)
  builder.logits(start + 1, { scoreId: 3 });
  builder.logits(start + 4, { scoreId: 6 });
  const batch = builder.build({ fullLogprobs: true });
  assert.deepEqual(batch, { tokens: [1, 2, 3, 4, 5, 6], positions: [1, 2, 3, 4, 5, 6], tokenSeq: [0, 0, 0, 0, 0, 0], kvBlockTable: [[5, 9]], logitRows: [1, 4], scoreIds: [3, 6], fullLogprobs: true });
  checkKvPositions(batch, 4);
  assert.equal(builder.logitRowCount, 2);
});

test('builder refuses: a position past the blocks, a logit row outside the batch, an empty step, mixed rows', () => {
  const builder = new StepBatchBuilder(4);
  assert.throws(() => builder.append([2], [1, 2, 3], 2), weftError('WEFT_BAD_REQUEST', /position 4 is past the 1 KV blocks of 4 positions/));
  assert.throws(() => builder.append([], [1], 0), weftError('WEFT_BAD_REQUEST', /position 0 is past the 0 KV blocks/));
  assert.equal(builder.size, 0, 'a refused append adds nothing');
  assert.throws(() => builder.build(), weftError('WEFT_PROTOCOL', /needs tokens and logit rows \(got 0 tokens, 0 logit rows\)/));
  builder.append([2], [1, 2], 0);
  assert.throws(() => builder.logits(2, { sample: GREEDY }), weftError('WEFT_PROTOCOL', /logit row 2 is outside the batch's 2 tokens/));
  builder.logits(0, { sample: GREEDY });
  builder.logits(1, { scoreId: 4 });
  assert.throws(() => builder.build(), weftError('WEFT_PROTOCOL', /1 of 2 logit rows are sampled: all or none must be/));
});

test('schema refuses: a bad tokenSeq, unequal lengths, a sequence without blocks; checkKvPositions a position past its blocks', () => {
  const good: StepBatch = { tokens: [1, 2], positions: [0, 5], tokenSeq: [0, 1], kvBlockTable: [[0], [1]], logitRows: [1] };
  assert.equal(stepBatchSchema.safeParse(good).success, true);
  schemaRefuses({ ...good, tokenSeq: [0, 2] }, /token 1: tokenSeq 2 is past the 2 rows of kvBlockTable/);
  schemaRefuses({ ...good, tokenSeq: [0] }, /tokens, positions and tokenSeq must have equal lengths \(2, 2, 1\)/);
  schemaRefuses({ ...good, kvBlockTable: [[0], []] }, /expected at least 1 block id/);
  // each array's elements, checked in one loop (the first bad one named with its index)
  const issue = (batch: unknown): string => stepBatchSchema.safeParse(batch).error!.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ');
  assert.equal(issue({ ...good, tokens: [1, 2.5] }), 'tokens.1: expected an integer >= 0, got 2.5');
  assert.equal(issue({ ...good, positions: [-1, 5] }), 'positions.0: expected an integer >= 0, got -1');
  assert.equal(issue({ ...good, kvBlockTable: [[0], [1, '2']] }), 'kvBlockTable.1.1: expected an integer >= 0, got string');
  assert.equal(issue({ ...good, kvBlockTable: [] }), 'kvBlockTable: expected at least 1 element');
  assert.equal(issue({ ...good, logitRows: 'all' }), 'logitRows: expected an array');
  assert.equal(issue({ ...good, topLogprobs: [21] }), 'topLogprobs.0: expected an integer in [-1, 20], got 21');
  assert.equal(issue({ ...good, sample: { temperature: [NaN], topK: [0], topP: [1], uniform: [0.5] } }), 'sample.temperature.0: expected a finite number, got NaN');
  assert.equal(issue({ ...good, feed: [null, -1] }), 'feed.0: expected an integer >= -1, got null');
  schemaRefuses({ ...good, slots: [0, 1] }, /Unrecognized key: "slots"/);
  checkKvPositions(good, 8);
  assert.throws(() => checkKvPositions(good, 4), weftError('WEFT_BAD_REQUEST', /batch token 1: position 5 is past the 1 KV blocks of 4 positions its sequence \(row 1\) owns/));
  assert.throws(() => checkKvPositions({ ...good, tokenSeq: [0, 7] }, 8), weftError('WEFT_BAD_REQUEST', /past the 0 KV blocks/));
});
