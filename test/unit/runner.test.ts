/**
 * StepRunner on the CPU backend: a long step split into chunks (as the CUDA step arena requires) gives
 * the same log-probs, samples and scores as one step; the wire batch's block table becomes the step index,
 * and batches outside the KV layout are refused; with SparQ's state, an all-exact step takes the dense kernels and keeps
 * the state its own path would. The model is the hf-tiny llama, loaded in-process.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine } from '../../worker/native.ts';
import { readModelSpec } from '../../core/model-spec.ts';
import { planShards } from '../../core/shard-plan.ts';
import { loadShard } from '../../worker/weights/load-shard.ts';
import { buildRankModel, hostWeights } from '../../worker/models/registry.ts';
import { soloCollectives } from '../../worker/collectives/collectives.ts';
import { StepRunner, stepIndexArrays, uploadIndex } from '../../worker/runner.ts';
import { kvCacheLayout, type KvCacheLayout } from '../../core/kv-block-table.ts';
import { isWeftError } from '../../core/errors.ts';
import { fixtureDir, maxAbsDiff, readReference } from '../helpers/fixtures.ts';
import { feedScenario } from '../helpers/feed-scenario.ts';
import { allocateSparqState } from '../../worker/models/sparq.ts';
import { allocateSageState } from '../../worker/models/sage-state.ts';
import { DENSE_TOKEN } from '../../core/sparq.ts';
import { forward } from '../../worker/models/llama.ts';
import { int32Tensor, leadingDecodeRows } from '../../worker/models/ops.ts';
import type { Engine } from '../../worker/native.ts';
import type { RankModel } from '../../worker/models/registry.ts';
import type { StepBatch } from '../../core/worker-protocol.ts';

async function tinyModel(kv: KvCacheLayout) {
  const dir = fixtureDir('llama-tiny');
  const spec = readModelSpec(dir);
  const plan = planShards(spec, 1);
  const engine = createEngine({ backend: 'cpu', threads: 1 });
  const model = buildRankModel(engine, spec, plan, 0, hostWeights(engine, 0, await loadShard(dir, spec, plan, 0)), kv);
  return { engine, spec, model };
}

/** `engine` with a count of the calls of each of its methods. */
function counting(engine: Engine) {
  const calls = new Map<string, number>();
  const counted = new Proxy(engine, {
    get(target, key, receiver) {
      const value = Reflect.get(target, key, receiver) as unknown;
      if (typeof value !== 'function') return value;
      return (...args: unknown[]) => {
        calls.set(String(key), (calls.get(String(key)) ?? 0) + 1);
        return (value as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
  return { counted, calls };
}

/** The oracle of the SparQ tests: a step's logits with every token through sparqAttention (no runner routing). */
async function throughSparq(engine: Engine, model: RankModel, batch: StepBatch, kv: KvCacheLayout): Promise<Float32Array> {
  const index = uploadIndex(engine, stepIndexArrays(batch, kv, model.model.sparq!.setting));
  return new Float32Array(engine.download(await forward(engine, soloCollectives(), model.model, model.feedForward, index)).buffer);
}

const logSoftmax = (x: Float32Array): Float32Array => {
  const m = Math.max(...x), z = Math.log(x.reduce((s, v) => s + Math.exp(v - m), 0));
  return x.map((v) => v - m - z);
};

test('a step run in chunks equals the step run whole', async () => {
  const kv = kvCacheLayout({ kvSlots: 2, maxContext: 64, device: 'cpu' });
  const { engine, spec, model } = await tinyModel(kv);
  const whole = new StepRunner(engine, soloCollectives(), model, kv);
  const chunked = new StepRunner(engine, soloCollectives(), model, kv, { maxStepTokens: 7 });
  assert.equal(chunked.maxStepTokens, 7); // the cap, under the cpu's unbounded arena
  const prompt = readReference('llama-tiny').prompts[2]!.slice(0, 30);
  const rows = [29, 3, 15, 8]; // out of order, spread over several chunks
  const batch = {
    tokens: prompt,
    positions: prompt.map((_, i) => i),
    tokenSeq: prompt.map(() => 0),
    kvBlockTable: [[0]],
    logitRows: rows,
    scoreIds: rows.map((r) => prompt[r + 1] ?? 0),
    sample: { temperature: [0, 0.8, 0, 1.2], topK: [0, 5, 0, 0], topP: [1, 0.9, 1, 1], uniform: [0.1, 0.5, 0.7, 0.3] },
    fullLogprobs: true,
  };
  const a = await whole.step(batch);
  const b = await chunked.step(batch);
  assert.deepEqual(b.tokens, a.tokens);
  assert.ok(maxAbsDiff(b.logprobs!, a.logprobs!) < 1e-5);
  const fa = new Float32Array(a.fullLogprobs!.slice().buffer);
  const fb = new Float32Array(b.fullLogprobs!.slice().buffer);
  assert.equal(fb.length, rows.length * spec.vocabSize);
  assert.ok(maxAbsDiff(fb, fa) < 1e-5, `full log-probs differ by ${maxAbsDiff(fb, fa)}`);
});

test('a prompt in chunks draws and downloads only in the chunk that holds the row asked for: the chunks before it are queued without a wait', async () => {
  const kv = kvCacheLayout({ kvSlots: 1, maxContext: 64, device: 'cpu' });
  const { engine, model } = await tinyModel(kv);
  const prompt = readReference('llama-tiny').prompts[2]!.slice(0, 30);
  const batch = { tokens: prompt, positions: prompt.map((_, i) => i), tokenSeq: prompt.map(() => 0), kvBlockTable: [[0]], logitRows: [29], scoreIds: [5], topLogprobs: [2], sample: { temperature: [0], topK: [0], topP: [1], uniform: [0] } };
  const whole = await new StepRunner(engine, soloCollectives(), model, kv).step(batch);
  const { counted, calls } = counting(engine);
  const chunked = await new StepRunner(counted, soloCollectives(), model, kv, { maxStepTokens: 7 }).step(batch); // 5 chunks
  assert.equal(calls.get('attention'), 5 * model.model.spec.nLayers, 'not run as 5 chunks');
  assert.equal(calls.get('sample'), 1, 'a chunk without the asked row drew');
  assert.equal(calls.get('logprobs'), 1, 'a chunk without the asked row scored');
  assert.equal(calls.get('download'), 1, 'a chunk without the asked row downloaded');
  assert.deepEqual(chunked.tokens, whole.tokens);
  assert.ok(maxAbsDiff(chunked.logprobs!, whole.logprobs!) < 1e-5);
  assert.deepEqual(chunked.tokenLogprobs?.[0]?.topIds, whole.tokenLogprobs?.[0]?.topIds);
  assert.equal(chunked.tokenLogprobs?.[0]?.topIds.length, 2);
});

test('a prompt in chunks under --prefill-attention keeps a Sage state slot across them, as hand-given slots do', async () => {
  const kv = kvCacheLayout({ kvSlots: 1, maxContext: 256, device: 'cpu' });
  const { engine, spec, model: plain } = await tinyModel(kv);
  const model = { ...plain, model: { ...plain.model, prefillAttention: 'int8' as const } };
  const stateful = { ...model, model: { ...model.model, sage: allocateSageState(engine, spec, planShards(spec, 1), kv, 'f16') } };
  const prompt = Array.from({ length: 200 }, (_, i) => (i * 37 + 11) % spec.vocabSize);
  const batch = { tokens: prompt, positions: prompt.map((_, i) => i), tokenSeq: prompt.map(() => 0), kvBlockTable: [[0]], logitRows: [199], scoreIds: [5] };
  const { counted, calls } = counting(engine);
  const withState = new Proxy(counted, {
    get: (target, key, receiver) => key !== 'sageAttention' ? Reflect.get(target, key, receiver) : (...args: Parameters<Engine['sageAttention']>) => {
      if (args[9]) calls.set('with state', (calls.get('with state') ?? 0) + 1);
      return target.sageAttention(...args);
    },
  });
  const kept = await new StepRunner(withState, soloCollectives(), stateful, kv, { maxStepTokens: 70 }).step(batch); // 67, 67, 66
  assert.equal(calls.get('with state'), 3 * spec.nLayers, 'the three chunks, every layer');
  // the oracle: the same chunks through forward() with the slots given by hand (afresh, then vouched for what came before)
  const oracle = { ...model, model: { ...model.model, sage: allocateSageState(engine, spec, planShards(spec, 1), kv, 'f16') } };
  let logits: Float32Array | null = null;
  for (const [start, end, slots] of [[0, 67, [0, 1, 0]], [67, 134, [0, 0, 67]], [134, 200, [0, 0, 134]]] as const) {
    const chunk = { ...batch, tokens: prompt.slice(start, end), positions: batch.positions.slice(start, end), tokenSeq: batch.tokenSeq.slice(start, end), logitRows: [end - start - 1] };
    const index = uploadIndex(engine, stepIndexArrays(chunk, kv));
    const step = { ...index, sageSlots: int32Tensor(engine, [...slots], [1, 3]) };
    logits = new Float32Array(engine.download(await forward(engine, soloCollectives(), oracle.model, oracle.feedForward, step)).buffer);
  }
  assert.ok(Math.abs(kept.logprobs![0]! - logSoftmax(logits!)[5]!) < 1e-5, `runner ${kept.logprobs![0]}, oracle ${logSoftmax(logits!)[5]}`);
  const anew = await new StepRunner(engine, soloCollectives(), model, kv, { maxStepTokens: 70 }).step(batch);
  assert.notEqual(kept.logprobs![0], anew.logprobs![0], 'each chunk quantizing anew gives other log-probs (its own K mean)');
});

test('leadingDecodeRows: the rows before the first one whose sequence has several in the step', () => {
  assert.equal(leadingDecodeRows([3, 1, 0, 2, 2, 2]), 3);
  assert.equal(leadingDecodeRows([2, 1, 0]), 3, 'a decode batch');
  assert.equal(leadingDecodeRows([0, 0, 1]), 0, 'a prompt first');
  assert.equal(leadingDecodeRows([4, 1, 1, 5]), 1, 'a decode row after a prompt is not leading');
  assert.equal(leadingDecodeRows([]), 0);
});

test('a mixed step under --prefill-attention: its leading decode rows attend exactly (the exact model\'s log-probs, bit for bit), its prompt chunk is quantized', async () => {
  const kv = kvCacheLayout({ kvSlots: 3, maxContext: 256, device: 'cpu' });
  const { engine, spec, model: exact } = await tinyModel(kv);
  const sage = { ...exact, model: { ...exact.model, prefillAttention: 'int8' as const } };
  const ids = (n: number, salt: number) => Array.from({ length: n }, (_, i) => (i * 37 + salt) % spec.vocabSize);
  const table = [[0], [1], [2]];
  // two sequences' prompts (short steps: exact under either model), then a step with their decode rows and a third prompt
  const prompts = [{ tokens: ids(30, 3), positions: ids(30, 0).map((_, i) => i), tokenSeq: Array(30).fill(0), kvBlockTable: table, logitRows: [29], scoreIds: [1] },
    { tokens: ids(40, 5), positions: ids(40, 0).map((_, i) => i), tokenSeq: Array(40).fill(1), kvBlockTable: table, logitRows: [39], scoreIds: [1] }];
  const third = ids(100, 7);
  const mixed = { tokens: [11, 12, ...third], positions: [30, 40, ...third.map((_, i) => i)], tokenSeq: [0, 1, ...third.map(() => 2)], kvBlockTable: table, logitRows: [0, 1, 101], scoreIds: [5, 9, 5] };
  const run = async (model: RankModel, ops: Engine = engine) => {
    const runner = new StepRunner(ops, soloCollectives(), model, kv);
    for (const prompt of prompts) await runner.step(prompt);
    return (await runner.step(mixed)).logprobs!;
  };
  const { counted, calls } = counting(engine);
  const withRows = new Proxy(counted, {
    get: (target, key, receiver) => key !== 'sageAttention' ? Reflect.get(target, key, receiver) : (...args: Parameters<Engine['sageAttention']>) => {
      calls.set(`decodeRows ${args[10]}`, (calls.get(`decodeRows ${args[10]}`) ?? 0) + 1);
      return target.sageAttention(...args);
    },
  });
  const want = await run(exact), got = await run(sage, withRows);
  assert.equal(calls.get('decodeRows 2'), spec.nLayers, 'the mixed step names its two decode rows to every layer');
  assert.deepEqual(got.slice(0, 2), want.slice(0, 2), 'decode rows as the exact model');
  assert.notEqual(got[2], want[2], 'the prompt chunk quantized');
});

test('a logit bias moves the draw and not the log-probs: +100 forces a token, -100 bans the argmax; whole, in chunks and drawn on the device alike', async () => {
  const kv = kvCacheLayout({ kvSlots: 2, maxContext: 64, device: 'cpu' });
  const { engine, spec, model } = await tinyModel(kv);
  const whole = new StepRunner(engine, soloCollectives(), model, kv);
  const chunked = new StepRunner(engine, soloCollectives(), model, kv, { maxStepTokens: 7 });
  const prompt = readReference('llama-tiny').prompts[2]!.slice(0, 30);
  const rows = [29, 3, 15];
  const base = { tokens: prompt, positions: prompt.map((_, i) => i), tokenSeq: prompt.map(() => 0), kvBlockTable: [[0]], logitRows: rows };
  const greedy = { temperature: [0, 0, 0], topK: [0, 0, 0], topP: [1, 1, 1], uniform: [0.5, 0.5, 0.5] };
  // the oracle: each row's two most likely tokens, from the model's own log-probs
  const full = new Float32Array((await whole.step({ ...base, sample: greedy, fullLogprobs: true })).fullLogprobs!.slice().buffer);
  const ranked = rows.map((_, r) => [...full.subarray(r * spec.vocabSize, (r + 1) * spec.vocabSize)].map((v, id) => [v, id] as const).sort((a, b) => b[0] - a[0]));
  const [top0, second0] = [ranked[0]![0]![1], ranked[0]![1]![1]];
  const forced = ranked[2]![spec.vocabSize - 1]![1]; // row 2's least likely token
  const logitBias = { rows: [0, 2, 2], ids: [top0, forced, 0], values: [-100, 100, 0.5] };
  const batch = { ...base, sample: greedy, logitBias };
  const expected = [second0, ranked[1]![0]![1], forced];
  assert.deepEqual((await whole.step(batch)).tokens, expected, 'drawn on the device (a sample-only step)');
  assert.deepEqual((await chunked.step(batch)).tokens, expected, 'in chunks, each with its rows\' biases');
  const scored = await whole.step({ ...batch, scoreIds: [top0, 1, forced] });
  assert.deepEqual(scored.tokens, expected, 'the eager path (rows scored too)');
  const r0 = full.subarray(0, spec.vocabSize), r2 = full.subarray(2 * spec.vocabSize);
  assert.ok(maxAbsDiff(scored.logprobs!, [r0[top0]!, full[spec.vocabSize + 1]!, r2[forced]!]) < 1e-5, 'log-probs are the model\'s, unbiased');
  await assert.rejects(whole.step({ ...batch, logitBias: { rows: [0], ids: [spec.vocabSize], values: [1] } }), /logit bias 0: id 512 is outside the vocabulary of 512/);
});

test('the step index: tokens name their sequence\'s row of a padded block table; batches outside the KV layout are refused', async () => {
  // the cuda layout (a padding block, 2) on the cpu engine: no graphs, but the padding block is still never a sequence's
  const kv = kvCacheLayout({ kvSlots: 2, maxContext: 16, device: 'cuda' });
  const { engine, model } = await tinyModel(kv);
  const runner = new StepRunner(engine, soloCollectives(), model, kv);
  const batch = { tokens: [5, 6, 7], positions: [0, 1, 9], tokenSeq: [1, 1, 0], kvBlockTable: [[0], [1]], logitRows: [1, 2], sample: { temperature: [0, 0], topK: [0, 0], topP: [1, 1], uniform: [0, 0] } };
  const index = stepIndexArrays(batch, kv);
  assert.deepEqual(Array.from(index.tokenSeq.values), [1, 1, 0]);
  assert.deepEqual(Array.from(index.kvBlockTable.values), [0, 1]);
  assert.deepEqual(index.kvBlockTable.shape, [2, 1]);
  assert.deepEqual(Array.from(index.positions.values), [0, 1, 9]);
  assert.deepEqual(index.tokenIds.shape, [3]);
  assert.equal((await runner.step(batch)).tokens!.length, 2);
  const refused = (pattern: RegExp) => (err: unknown) => isWeftError(err) && err.code === 'WEFT_BAD_REQUEST' && pattern.test(err.message);
  await assert.rejects(runner.step({ ...batch, kvBlockTable: [[0], [3]] }), refused(/batch sequence 1: KV block 3 is outside the 3 blocks/));
  await assert.rejects(runner.step({ ...batch, kvBlockTable: [[2], [1]] }), refused(/batch sequence 0: KV block 2 is the padding block/));
  await assert.rejects(runner.step({ ...batch, positions: [0, 1, 16] }), refused(/batch token 2: position 16 is past the context of 16/));
  await assert.rejects(runner.step({ ...batch, tokenSeq: [1, 1, 2] }), refused(/batch token 2: position 9 is past the 0 KV blocks/));
  assert.throws(() => new StepRunner(engine, soloCollectives(), model, { ...kv, kvBlocks: 4 }), refused(/KV cache is \[3, \d+, 16, \d+\], the layout says 4 blocks of 16 positions/));
});

test('a paged KV layout (blocks of 4, scattered over the pool) gives the same log-probs as one block per sequence', async () => {
  const prompt = readReference('llama-tiny').prompts[2]!.slice(0, 13);
  const score = (kv: KvCacheLayout, tables: number[][]) => async () => {
    const { engine, model } = await tinyModel(kv);
    const runner = new StepRunner(engine, soloCollectives(), model, kv);
    // two sequences in one step: the prompt, and its first 6 tokens (the same positions, other blocks)
    const second = prompt.slice(0, 6);
    const rows = prompt.map((_, i) => i).slice(0, -1);
    const result = await runner.step({
      tokens: [...prompt, ...second],
      positions: [...prompt.map((_, i) => i), ...second.map((_, i) => i)],
      tokenSeq: [...prompt.map(() => 0), ...second.map(() => 1)],
      kvBlockTable: tables,
      logitRows: [...rows, prompt.length + 4],
      scoreIds: [...rows.map((r) => prompt[r + 1]!), second[5]!],
    });
    return result.logprobs!;
  };
  const oneBlock = await score(kvCacheLayout({ kvSlots: 2, maxContext: 16, device: 'cpu' }), [[1], [0]])();
  // 16 positions in blocks of 4: 4 blocks per sequence, out of order in a pool of 9 (blocks 0 and 5 unused)
  const paged = await score({ kvSlots: 2, maxContext: 16, kvBlockSize: 4, kvBlocks: 9, paddingBlock: null, kvDtype: 'f32' }, [[7, 2, 8, 4], [3, 6]])();
  assert.ok(maxAbsDiff(paged, oneBlock) < 1e-6, `paged log-probs differ by ${maxAbsDiff(paged, oneBlock)}`);
});

test('decode steps fed from the step before, launched without waiting, draw the tokens of the same steps with every token given', async () => {
  const kv = kvCacheLayout({ kvSlots: 4, maxContext: 32, device: 'cpu' });
  const a = await tinyModel(kv);
  const b = await tinyModel(kv);
  const { fed, given } = await feedScenario(new StepRunner(a.engine, soloCollectives(), a.model, kv), new StepRunner(b.engine, soloCollectives(), b.model, kv));
  assert.deepEqual(fed, given);
  assert.equal(fed.flat().length, 18);
});

test('a token fed from a row the previous step did not draw is refused, naming both', async () => {
  const kv = kvCacheLayout({ kvSlots: 2, maxContext: 16, device: 'cpu' });
  const { engine, model } = await tinyModel(kv);
  const runner = new StepRunner(engine, soloCollectives(), model, kv);
  const refused = (pattern: RegExp) => (err: unknown) => isWeftError(err) && err.code === 'WEFT_BAD_REQUEST' && pattern.test(err.message);
  const step = (feed: number[], position: number) => ({ tokens: [1], positions: [position], tokenSeq: [0], kvBlockTable: [[0]], logitRows: [0], feed, sample: { temperature: [0], topK: [0], topP: [1], uniform: [0] } });
  await assert.rejects(runner.step(step([0], 0)), refused(/batch token 0 is fed from logit row 0 of the previous step, which drew 0 tokens/));
  await runner.step(step([-1], 0));
  await assert.rejects(runner.step(step([1], 1)), refused(/batch token 0 is fed from logit row 1 of the previous step, which drew 1 token$/));
});

test('with SparQ, a step whose every token is exact takes the dense kernels, past SparQ\'s step cap, and keeps SparQ state as its own path would', async () => {
  const kv = kvCacheLayout({ kvSlots: 1, maxContext: 64, device: 'cpu' });
  const { engine, spec, model } = await tinyModel(kv);
  const plan = planShards(spec, 1);
  const withState = () => ({ ...model, model: { ...model.model, sparq: allocateSparqState(engine, spec, plan, kv, { r: 4, k: 8 }) } });
  const { counted, calls } = counting(engine);
  const viaFlag = withState(), viaSparq = withState();
  const prompt = readReference('llama-tiny').prompts[1]!.slice(0, 20);
  const n = prompt.length;
  const prefill = { tokens: prompt, positions: prompt.map((_, i) => i), tokenSeq: prompt.map(() => 0), kvBlockTable: [[0]], logitRows: [n - 1], scoreIds: [0], fullLogprobs: true, sparq: { r: prompt.map(() => DENSE_TOKEN.r), k: prompt.map(() => DENSE_TOKEN.k) } };
  // a cap of 7 tokens a step (as SparQ's 64 on cuda) binds SparQ's steps only: the exact prompt runs as one step
  const a = await new StepRunner(counted, soloCollectives(), viaFlag, kv, { maxStepTokens: 7 }).step(prefill);
  assert.equal(calls.get('sparqAttention') ?? 0, 0, 'the exact prompt went through sparqAttention');
  assert.equal(calls.get('sparqAppend'), spec.nLayers, 'every layer keeps SparQ state, once');
  assert.equal(calls.get('attention'), spec.nLayers, 'the exact prompt ran in chunks or off the dense kernel');
  // the same prompt with the cluster's k (8): chunks of 7, the first exact (positions 0-6), the others SparQ's
  calls.clear();
  const { sparq: _dense, ...withClusterK } = prefill;
  await new StepRunner(counted, soloCollectives(), withState(), kv, { maxStepTokens: 7 }).step(withClusterK);
  assert.deepEqual([calls.get('attention'), calls.get('sparqAttention'), calls.get('sparqAppend')], [spec.nLayers, 2 * spec.nLayers, 3 * spec.nLayers]);
  // the oracle: the same step index without the flag, so each layer attends through sparqAttention's exact path
  const logits = await throughSparq(engine, viaSparq, prefill, kv);
  const full = new Float32Array(a.fullLogprobs!.slice().buffer);
  assert.ok(maxAbsDiff(full, logSoftmax(logits)) < 1e-5, `prompt log-probs differ by ${maxAbsDiff(full, logSoftmax(logits))}`);
  // a decode token past k (length 21 > 8) is approximated from the state either path kept: the same log-probs
  const next = { tokens: [prompt[0]!], positions: [n], tokenSeq: [0], kvBlockTable: [[0]], logitRows: [0], scoreIds: [0], fullLogprobs: true };
  const da = await new StepRunner(engine, soloCollectives(), viaFlag, kv).step(next);
  const db = await new StepRunner(engine, soloCollectives(), viaSparq, kv).step(next);
  const fa = new Float32Array(da.fullLogprobs!.slice().buffer), fb = new Float32Array(db.fullLogprobs!.slice().buffer);
  assert.ok(maxAbsDiff(fa, fb) < 1e-6, `SparQ decode after the two prefills differs by ${maxAbsDiff(fa, fb)}`);
});

test('with SparQ, a step mixing exact tokens (a prompt sent dense) and SparQ ones runs as one chunk of each, as one SparQ step would', async () => {
  const kv = kvCacheLayout({ kvSlots: 2, maxContext: 64, device: 'cpu' });
  const { engine, spec, model } = await tinyModel(kv);
  const plan = planShards(spec, 1);
  const withState = () => ({ ...model, model: { ...model.model, sparq: allocateSparqState(engine, spec, plan, kv, { r: 4, k: 8 }) } });
  const split = withState(), whole = withState();
  const ids = readReference('llama-tiny').prompts[2]!; // 40 tokens
  const dense = (n: number) => ({ r: Array<number>(n).fill(DENSE_TOKEN.r), k: Array<number>(n).fill(DENSE_TOKEN.k) });
  // sequence 1 holds 12 positions (past k = 8) in both models
  const history = { tokens: ids.slice(0, 12), positions: [...Array(12).keys()], tokenSeq: Array<number>(12).fill(1), kvBlockTable: [[0], [1]], logitRows: [11], scoreIds: [0], sparq: dense(12) };
  await new StepRunner(engine, soloCollectives(), split, kv).step(history);
  await new StepRunner(engine, soloCollectives(), whole, kv).step(history);
  // then a step: sequence 0's 6-token prompt sent dense, and sequence 1's next token with the cluster's r and k
  const mixed = {
    tokens: [...ids.slice(20, 26), ids[12]!], positions: [0, 1, 2, 3, 4, 5, 12], tokenSeq: [0, 0, 0, 0, 0, 0, 1], kvBlockTable: [[0], [1]],
    logitRows: [5, 6], scoreIds: [0, 0], fullLogprobs: true, sparq: { r: [...dense(6).r, 0], k: [...dense(6).k, 0] },
  };
  const { counted, calls } = counting(engine);
  const a = await new StepRunner(counted, soloCollectives(), split, kv).step(mixed);
  assert.deepEqual([calls.get('attention'), calls.get('sparqAttention')], [spec.nLayers, spec.nLayers], 'one dense chunk and one SparQ chunk');
  // the oracle: the whole step through sparqAttention (the prompt's tokens on its exact path)
  const logits = await throughSparq(engine, whole, mixed, kv);
  const full = new Float32Array(a.fullLogprobs!.slice().buffer);
  const V = spec.vocabSize;
  const want = new Float32Array(2 * V);
  for (const row of [0, 1]) want.set(logSoftmax(logits.subarray(row * V, (row + 1) * V)), row * V);
  assert.ok(maxAbsDiff(full, want) < 1e-5, `split step's log-probs differ by ${maxAbsDiff(full, want)}`);
});
