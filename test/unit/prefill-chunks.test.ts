/**
 * How a long eager step is split and how large the CUDA step arena is made (worker/runner.ts), on the CPU:
 * chunks of near-equal length, a 1024-token prompt of a 7-8B model in one step at the worker's arena, and
 * an arena estimate that covers every tensor a step of the hf-tiny models makes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine, type Engine, type Tensor } from '../../worker/native.ts';
import { readModelSpec } from '../../core/model-spec.ts';
import { planShards } from '../../core/shard-plan.ts';
import { loadShard } from '../../worker/weights/load-shard.ts';
import { buildRankModel, hostWeights } from '../../worker/models/registry.ts';
import { soloCollectives } from '../../worker/collectives/collectives.ts';
import { StepRunner } from '../../worker/runner.ts';
import { chunkRanges, DEFAULT_ARENA_BYTES, eagerStepBytesPerToken, graphArenaTokens, keptStepTokens, maxGraphBatch, maxStepTokens, PREFILL_STEP_TOKENS, stepArenaBytes, stepBytesPerToken, workerArenaBytes } from '../../worker/step-sizes.ts';
import { kvCacheLayout } from '../../core/kv-block-table.ts';
import { presetSpec } from '../../bench/presets.ts';
import { fixtureDir } from '../helpers/fixtures.ts';

test('chunks: the fewest of at most the limit, contiguous, lengths differing by at most one', () => {
  assert.deepEqual(chunkRanges(1024, 951), [{ start: 0, end: 512 }, { start: 512, end: 1024 }]);
  assert.deepEqual(chunkRanges(1024, 1024), [{ start: 0, end: 1024 }]);
  assert.deepEqual(chunkRanges(10, 3).map((c) => c.end - c.start), [3, 3, 2, 2]);
  assert.deepEqual(chunkRanges(1, 7), [{ start: 0, end: 1 }]);
  for (let tokens = 1; tokens <= 300; tokens += 7) {
    for (const limit of [1, 2, 5, 64, 99, 300]) {
      const chunks = chunkRanges(tokens, limit);
      const lengths = chunks.map((c) => c.end - c.start);
      assert.equal(chunks.length, Math.ceil(tokens / limit), `${tokens} over ${limit}`);
      assert.ok(chunks.every((c, i) => c.start === (i ? chunks[i - 1]!.end : 0)), `${tokens} over ${limit}: not contiguous`);
      assert.equal(chunks.at(-1)!.end, tokens);
      assert.ok(Math.max(...lengths) <= limit && Math.max(...lengths) - Math.min(...lengths) <= 1, `${tokens} over ${limit}: ${lengths.join(' + ')}`);
    }
  }
});

test('the arena sized for a prefill takes it in one step; small models keep the default arena', () => {
  for (const name of ['llama-2-7b', 'llama-3-8b', 'mistral-7b']) {
    const spec = presetSpec(name);
    for (const tp of [1, 2]) {
      const plan = planShards(spec, tp);
      const arena = stepArenaBytes(spec, plan, PREFILL_STEP_TOKENS);
      assert.ok(maxStepTokens(spec, plan, arena) >= PREFILL_STEP_TOKENS, `${name} tp${tp}: ${maxStepTokens(spec, plan, arena)} tokens in ${arena} bytes`);
      assert.ok(arena < 24 * 2 ** 30, `${name} tp${tp}: an arena of ${arena} bytes`);
    }
  }
  // bench/decode.ts's 16 GiB arena: Llama-2-7B's 1024-token prompt is one step (it was 951 + 73)
  const llama2 = presetSpec('llama-2-7b');
  assert.ok(maxStepTokens(llama2, planShards(llama2, 1), 16 * 2 ** 30) >= 1024);
  const tiny = readModelSpec(fixtureDir('llama-tiny'));
  assert.equal(stepArenaBytes(tiny, planShards(tiny, 1), PREFILL_STEP_TOKENS), DEFAULT_ARENA_BYTES);
});

test('the worker\'s arena: the whole prefill where the device has room beside the weights and KV cache, else what is left, at least the default', () => {
  const spec = presetSpec('llama-2-7b');
  const plan = planShards(spec, 1);
  const GiB = 2 ** 30;
  const graphTokens = graphArenaTokens(maxGraphBatch(spec, 256)); // decode graphs to 256 rows
  const wanted = stepArenaBytes(spec, plan, PREFILL_STEP_TOKENS, graphTokens);
  assert.equal(workerArenaBytes(spec, plan, 140 * GiB, 30 * GiB, graphTokens), wanted); // an H200 with a 7B model and 16 GiB of KV
  assert.equal(workerArenaBytes(spec, plan, 22 * GiB, 18 * GiB, graphTokens), DEFAULT_ARENA_BYTES); // a 24 GB card: as before
  assert.equal(workerArenaBytes(spec, plan, 10 * GiB, 14 * GiB, graphTokens), DEFAULT_ARENA_BYTES); // no room at all: as before
  const between = workerArenaBytes(spec, plan, 40 * GiB, 30 * GiB, graphTokens);
  assert.ok(between > DEFAULT_ARENA_BYTES && between < wanted && between <= 9 * GiB, `${between}`);
});

/** Rows of Llama-2-7B's decode graphs to 256 rows, as the product captures them. */
const GRAPHS_TO_256 = graphArenaTokens(maxGraphBatch(presetSpec('llama-2-7b'), 256));

test('a long eager step holds one layer\'s intermediates (releaseLayer): a 1024-token prefill adds ~1 GiB to a 7B arena, not ~14', () => {
  const spec = presetSpec('llama-2-7b');
  const plan = planShards(spec, 1);
  const prefill = stepArenaBytes(spec, plan, PREFILL_STEP_TOKENS, GRAPHS_TO_256) - stepArenaBytes(spec, plan, 0, GRAPHS_TO_256);
  assert.ok(prefill < 1.2 * 2 ** 30, `${prefill} bytes`);
  assert.ok(eagerStepBytesPerToken(spec, plan) < stepBytesPerToken(spec, plan) / 10, 'one layer and the residual, not 32 layers');
  // what fits is what the sizing asked for, beside the same graphs
  assert.ok(maxStepTokens(spec, plan, stepArenaBytes(spec, plan, 4096, GRAPHS_TO_256), GRAPHS_TO_256) >= 4096);
});

test('a step whose every layer fits the arena keeps them (releasing copies x for nothing); a longer one releases', () => {
  const spec = presetSpec('llama-2-7b');
  const plan = planShards(spec, 1);
  const GiB = 2 ** 30;
  // the bench's 16 GiB arena: a 1024-token prompt step keeps its layers, a 4096-token chunk could not
  assert.ok(keptStepTokens(spec, plan, 16 * GiB) >= 1024, `${keptStepTokens(spec, plan, 16 * GiB)}`);
  assert.ok(keptStepTokens(spec, plan, 16 * GiB) < 4096);
  assert.ok(maxStepTokens(spec, plan, 16 * GiB) > 10 * keptStepTokens(spec, plan, 16 * GiB), 'releasing holds one layer, not 32');
  // the product's arena, sized for releasing steps beside the graphs: its 1024-token steps release
  const arena = stepArenaBytes(spec, plan, PREFILL_STEP_TOKENS, GRAPHS_TO_256);
  assert.ok(keptStepTokens(spec, plan, arena, GRAPHS_TO_256) < PREFILL_STEP_TOKENS, `${keptStepTokens(spec, plan, arena, GRAPHS_TO_256)}`);
  assert.equal(keptStepTokens(spec, plan, DEFAULT_ARENA_BYTES / 2, GRAPHS_TO_256), 0, 'no room: none kept');
});

/** An hf-tiny model on a one-thread CPU engine, with a KV cache of one 64-position sequence. */
async function tinyModel(fixture: string) {
  const dir = fixtureDir(fixture);
  const spec = readModelSpec(dir);
  const plan = planShards(spec, 1);
  const kv = kvCacheLayout({ kvSlots: 1, maxContext: 64, device: 'cpu' });
  const engine = createEngine({ backend: 'cpu', threads: 1 });
  const model = buildRankModel(engine, spec, plan, 0, hostWeights(engine, 0, await loadShard(dir, spec, plan, 0)), kv);
  return { spec, plan, kv, engine, model };
}

test('the runner runs a long step as those chunks', async () => {
  const { kv, engine, model } = await tinyModel('llama-tiny');
  const stepTokens: number[] = []; // tokens of each forward, from the ids its embedding reads
  const seen = observed(engine, (method, args) => method === 'embedding' && stepTokens.push((args[1] as Tensor).shape[0]!));
  const rows = [...Array(30).keys()];
  await new StepRunner(seen, soloCollectives(), model, kv, { maxStepTokens: 7 }).step({ tokens: rows, positions: rows, tokenSeq: rows.map(() => 0), kvBlockTable: [[0]], logitRows: [29], sample: { temperature: [0], topK: [0], topP: [1], uniform: [0] } });
  assert.deepEqual(stepTokens, [6, 6, 6, 6, 6]);
});

/** The engine with `seen` called after each of its calls. */
function observed(engine: Engine, seen: (method: string, args: unknown[], result: unknown) => unknown): Engine {
  return new Proxy(engine, {
    get(target, key, receiver) {
      const value = Reflect.get(target, key, receiver) as unknown;
      if (typeof value !== 'function') return value;
      return (...args: unknown[]) => {
        const result = (value as (...a: unknown[]) => unknown).apply(target, args);
        seen(String(key), args, result);
        return result;
      };
    },
  });
}

/** Bytes of every tensor the engine hands out (op outputs, uploads) while `run` goes. */
async function bytesMade(engine: Engine, run: (counted: Engine) => Promise<unknown>): Promise<number> {
  let bytes = 0;
  const count = (value: unknown): void => {
    if (value && typeof value === 'object' && 'shape' in value && 'dtype' in value) {
      const t = value as Tensor;
      bytes += t.shape.reduce((a, b) => a * b, 1) * (t.dtype === 'f16' || t.dtype === 'bf16' ? 2 : 4);
    } else if (value && typeof value === 'object' && !ArrayBuffer.isView(value)) Object.values(value).forEach(count);
  };
  await run(observed(engine, (_method, _args, result) => count(result)));
  return bytes;
}

for (const fixture of ['llama-tiny', 'mixtral-tiny']) {
  test(`the arena estimate covers what a step of ${fixture} makes, every row a logit row`, async () => {
    const { spec, plan, kv, engine, model } = await tinyModel(fixture);
    const T = 48;
    const rows = [...Array(T).keys()];
    const batch = { tokens: rows.map((i) => (i * 7) % spec.vocabSize), positions: rows, tokenSeq: rows.map(() => 0), kvBlockTable: [[0]], logitRows: rows, fullLogprobs: true };
    const made = await bytesMade(engine, (counted) => new StepRunner(counted, soloCollectives(), model, kv).step(batch));
    assert.ok(made > 0.5 * T * stepBytesPerToken(spec, plan), `${made} bytes made: the estimate is not near what the step makes`);
    assert.ok(made <= T * stepBytesPerToken(spec, plan), `${made} bytes made, ${T * stepBytesPerToken(spec, plan)} estimated`);
  });
}
