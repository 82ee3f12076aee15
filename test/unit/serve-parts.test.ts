/**
 * Pieces of the server that need no process: the MessagePack pre-scan, the stop-string matcher, and the
 * scheduler's admission, batching, cancellation and deadlines against a fake step function.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { pack } from 'msgpackr';
import { checkMsgpack } from '../../core/msgpack-guard.ts';
import { StopMatcher } from '../../coordinator/api/http.ts';
import { Scheduler } from '../../coordinator/scheduler.ts';
import { SequenceState, type GenerationEvent } from '../../coordinator/generate.ts';
import { parseSamplingParams } from '../../coordinator/sampling-params.ts';
import { isWeftError } from '../../core/errors.ts';
import type { StepBatch } from '../../core/worker-protocol.ts';
import { KvBlockTable, kvCacheLayout } from '../../core/kv-block-table.ts';

/** A KV allocator of `kvSlots` one-block sequences; the KV block each token of a batch is written to. */
const kvCache = (kvSlots: number): KvBlockTable => new KvBlockTable(kvCacheLayout({ kvSlots, maxContext: 64, device: 'cpu' }));
const blocksOf = (batch: StepBatch): number[] => batch.tokenSeq.map((s, t) => batch.kvBlockTable[s]![Math.floor(batch.positions[t]! / 64)]!);

const rejects = (bytes: number[] | Buffer, pattern: RegExp): void =>
  assert.throws(() => checkMsgpack(Buffer.from(bytes)), (err: unknown) => isWeftError(err) && err.code === 'WEFT_PROTOCOL' && pattern.test(err.message));

test('msgpack pre-scan accepts plain values and rejects ext, lying lengths, deep nesting, non-string keys, trailing bytes', () => {
  for (const value of [{ v: 1, type: 'generate', id: 3, promptIds: [1, 2, 3], sampling: { temperature: 0.5 } }, [], 'x', null, 1.5, -7, Buffer.from([1, 2])])
    checkMsgpack(pack(value));
  rejects([0xdd, 0xff, 0xff, 0xff, 0xff], /array of 4294967295 entries/); // array32 claiming 2^32-1 elements
  rejects([0xdf, 0x00, 0x01, 0x00, 0x00, 0xa1, 0x61], /map of 65536 entries/);
  rejects([0xdb, 0x00, 0x10, 0x00, 0x00, 0x61], /bytes needed/); // str32 past the end
  rejects([0xd4, 0x72, 0x00], /ext type 0xd4/); // fixext (msgpackr record definitions are ext 0x72)
  rejects([0xc7, 0x01, 0x70, 0x00], /ext type 0xc7/);
  rejects(Buffer.alloc(100_000, 0x91), /nesting deeper than 32/); // 100,000-deep fixarray
  rejects(Buffer.from(Buffer.alloc(24_000 * 3).map((_, i) => [0xdc, 0x00, 0x01][i % 3]!)), /nesting deeper than 32/);
  rejects([0x81, 0x01, 0x02], /map key that is not a string/);
  rejects([0x01, 0x02], /1 bytes after the value/);
  rejects([0xc1], /0xc1/);
  rejects([], /1 bytes needed/);
});

test('stop strings: text before the stop is emitted, a possible prefix is held back, the stop ends the text', () => {
  const m = new StopMatcher(['END', '\n\n']);
  assert.deepEqual(m.push('hello E'), { text: 'hello ', stopped: false });
  assert.deepEqual(m.push('N'), { text: '', stopped: false });
  assert.deepEqual(m.push('Dx'), { text: '', stopped: true });
  const n = new StopMatcher(['END']);
  assert.deepEqual(n.push('EN'), { text: '', stopped: false });
  assert.deepEqual(n.push('ough'), { text: 'ENough', stopped: false });
  assert.equal(n.flush(), '');
});

const decoder = { push: (id: number) => `<${id}>`, flush: () => '' };
function sequence(maxNewTokens: number, prompt = [1, 2, 3]): SequenceState {
  return new SequenceState(prompt, parseSamplingParams({ maxNewTokens, ignoreEos: true, seed: 1 }, { maxContext: 64, promptLength: prompt.length, vocabSize: 100 }), [], decoder);
}
async function drain(events: AsyncIterable<GenerationEvent>): Promise<number[]> {
  const tokens: number[] = [];
  for await (const e of events) if (e.type === 'token') tokens.push(e.token);
  return tokens;
}

test('scheduler: decode steps of several sequences share one batch; the queue is bounded; cancel frees the slot', async () => {
  const batches: StepBatch[] = [];
  let release: (() => void) | null = null;
  const scheduler = new Scheduler({
    kvCache: kvCache(2),
    maxQueue: 1,
    step: async (batch) => {
      batches.push(batch);
      if (release === null) await new Promise<void>((r) => (release = r)); // hold the first step until the test says
      return { tokens: batch.logitRows.map((row) => batch.positions[row]! + 10) }; // token = position + 10
    },
  });
  const a = scheduler.submitGenerate(sequence(3));
  const b = scheduler.submitGenerate(sequence(3, [5, 6]));
  const c = scheduler.submitGenerate(sequence(2)); // waits for a slot
  assert.throws(() => scheduler.submitGenerate(sequence(1)), (err: unknown) => isWeftError(err) && err.code === 'WEFT_BUSY' && /queue holds 1/.test(err.message));
  assert.equal(scheduler.waiting, 1);
  await new Promise((r) => setTimeout(r, 10));
  (release as unknown as () => void)();
  const [ta, tb, tc] = await Promise.all([drain(a.events), drain(b.events), drain(c.events)]);
  assert.deepEqual(ta, [12, 13, 14]);
  assert.deepEqual(tb, [11, 12, 13]);
  assert.deepEqual(tc, [12, 13]);
  // the first step prefilled both prompts together (5 tokens, 2 logit rows); later steps carry one token per sequence
  assert.deepEqual(blocksOf(batches[0]!), [0, 0, 0, 1, 1]);
  assert.deepEqual(batches[0]!.logitRows, [2, 4]);
  assert.ok(batches.some((batch) => batch.tokens.length === 2 && new Set(blocksOf(batch)).size === 2), 'a decode step carried two sequences');
  assert.equal(scheduler.slotsInUse, 0);

  // cancel: the slot comes back at once and a queued request takes it
  const long = scheduler.submitGenerate(sequence(50));
  const long2 = scheduler.submitGenerate(sequence(50));
  const queued = scheduler.submitGenerate(sequence(1));
  long.cancel();
  await assert.rejects(drain(long.events), (err: unknown) => isWeftError(err) && err.code === 'WEFT_CANCELLED');
  assert.deepEqual(await drain(queued.events), [12]);
  long2.cancel();
  await assert.rejects(drain(long2.events), (err: unknown) => isWeftError(err) && err.code === 'WEFT_CANCELLED');
  assert.equal(scheduler.slotsInUse, 0);
});

test('scheduler: a deadline ends a request with WEFT_TIMEOUT; a failed step fails the running ones and reports it', async () => {
  let failures = 0;
  const scheduler = new Scheduler({
    kvCache: kvCache(1),
    maxQueue: 4,
    step: (batch) => (batch.positions[0] === 0 ? new Promise(() => undefined) : Promise.reject(new Error('boom'))),
    onStepFailure: () => failures++,
  });
  const slow = scheduler.submitGenerate(sequence(5), 50);
  await assert.rejects(drain(slow.events), (err: unknown) => isWeftError(err) && err.code === 'WEFT_TIMEOUT' && /50 ms/.test(err.message));
  assert.equal(scheduler.slotsInUse, 0);
  const failing = new Scheduler({ kvCache: kvCache(1), maxQueue: 1, step: () => Promise.reject(new Error('rank 1 died')), onStepFailure: () => failures++ });
  await assert.rejects(drain(failing.submitGenerate(sequence(2)).events), /rank 1 died/);
  assert.equal(failures, 1);
  assert.equal(failing.slotsInUse, 0);
  scheduler.failAll(new Error('closed'));
});
