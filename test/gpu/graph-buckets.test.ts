/**
 * Decode graphs above 8 rows on CUDA (worker/runner.ts GRAPH_BUCKETS): decode batches of 9 to 200 sequences run
 * as the graph of their bucket (captured on first use, padded rows in the padding block; bf16 weights go through
 * the cuBLAS GEMM) and draw the greedy tokens the same steps draw eagerly. Mixtral's graphs stop at 8 rows with bf16
 * experts (grouped on the host above) and at 64 with quantized ones (the device's expert GEMV, 8 pairs an expert a
 * pass).
 * Skips, saying why, without a CUDA build or a GPU.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine } from '../../worker/native.ts';
import { readModelSpec, withQuantizeAtLoad } from '../../core/model-spec.ts';
import { planShards } from '../../core/shard-plan.ts';
import { loadShard } from '../../worker/weights/load-shard.ts';
import { buildRankModel, hostWeights } from '../../worker/models/registry.ts';
import { soloCollectives } from '../../worker/collectives/collectives.ts';
import { StepRunner } from '../../worker/runner.ts';
import { graphBucketFor } from '../../worker/step-sizes.ts';
import { kvCacheLayout } from '../../core/kv-block-table.ts';
import type { StepBatch } from '../../core/worker-protocol.ts';
import { fixtureDir } from '../helpers/fixtures.ts';
import { gpuSkipReason } from '../helpers/cluster.ts';

const skip = gpuSkipReason();
if (skip) console.log(`# GPU suite skipped: ${skip}`);

const SEQUENCES = 200;
const CONTEXT = 32;
const BLOCK = 16;
const ARENA = 1 << 30;

async function cudaRunner(name: string, graphs: boolean, quantize?: 'int8'): Promise<StepRunner> {
  const dir = fixtureDir(name);
  const spec = withQuantizeAtLoad(readModelSpec(dir), quantize);
  const plan = planShards(spec, 1);
  const kv = kvCacheLayout({ kvSlots: 256, maxContext: CONTEXT, kvBlockSize: BLOCK, kvCacheTokens: 256 * CONTEXT, device: 'cuda' });
  const engine = createEngine({ backend: 'cuda', arenaBytes: ARENA });
  const model = buildRankModel(engine, spec, plan, 0, hostWeights(engine, 0, await loadShard(dir, spec, plan, 0)), kv);
  return new StepRunner(engine, soloCollectives(), model, kv, { graphs, arenaBytes: ARENA });
}

const blocksOf = (s: number): number[] => [2 * s, 2 * s + 1];
const greedy = (n: number) => ({ temperature: Array(n).fill(0), topK: Array(n).fill(0), topP: Array(n).fill(1), uniform: Array(n).fill(0) });

/** Every sequence's 3-token prompt in one eager step; then decode steps of the first sequences, each at its next position. */
function prefill(vocab: number): StepBatch {
  const tokens = Array.from({ length: SEQUENCES * 3 }, (_, t) => (t * 7919 + 1) % vocab);
  const tokenSeq = tokens.map((_, t) => Math.floor(t / 3));
  return { tokens, positions: tokens.map((_, t) => t % 3), tokenSeq, kvBlockTable: Array.from({ length: SEQUENCES }, (_, s) => blocksOf(s)), logitRows: Array.from({ length: SEQUENCES }, (_, s) => 3 * s + 2), sample: greedy(SEQUENCES) };
}
function decode(tokens: readonly number[], positions: readonly number[]): StepBatch {
  const n = tokens.length;
  const rows = Array.from({ length: n }, (_, i) => i);
  return { tokens: [...tokens], positions: positions.slice(0, n), tokenSeq: rows, kvBlockTable: rows.map(blocksOf), logitRows: rows, sample: greedy(n) };
}

const cases = [['llama-tiny'], ['llama-tiny-bf16'], ['mixtral-tiny'], ['mixtral-tiny', 'int8']] as const;
for (const [name, quantize] of cases)
  test(`${name}${quantize ? ` ${quantize}` : ''}: decode batches of 9 to 200 rows run as graphs of their bucket and draw the eager steps' tokens`, { skip }, async () => {
    const vocab = readModelSpec(fixtureDir(name)).vocabSize;
    const graphRunner = await cudaRunner(name, true, quantize);
    const eagerRunner = await cudaRunner(name, false, quantize);
    assert.equal(graphRunner.maxGraphBatch, name.startsWith('mixtral') ? (quantize ? 64 : 8) : 256);
    const first = (await eagerRunner.step(prefill(vocab))).tokens!;
    assert.deepEqual((await graphRunner.step(prefill(vocab))).tokens, first);
    let agree = 0, total = 0;
    // each step feeds both runners the eager runner's tokens, so their inputs stay the same
    const next = Array<number>(SEQUENCES).fill(3); // each sequence's next position
    for (const rows of [9, 12, 40, 130, 200, 130]) {
      const batch = decode(first.slice(0, rows), next);
      for (let i = 0; i < rows; i++) next[i]!++;
      const eager = (await eagerRunner.step(batch)).tokens!;
      const graph = (await graphRunner.step(batch)).tokens!;
      assert.equal(graph.length, rows);
      agree += graph.filter((token, i) => token === eager[i]).length;
      total += rows;
      const bucket = graphBucketFor(rows, graphRunner.maxGraphBatch);
      if (bucket !== null) assert.ok(graphRunner.timeGraphReplay(bucket, 1) > 0, `the graph of bucket ${bucket} was captured`);
      else assert.throws(() => graphRunner.timeGraphReplay(2 * graphRunner.maxGraphBatch, 1), /no decode graph/, 'past the largest bucket a batch runs eagerly');
      first.splice(0, rows, ...eager);
    }
    // padding changes the GEMM's shape (its summation order may differ in the last bits): near-ties may flip
    console.log(`# ${name}${quantize ? ` ${quantize}` : ''}: ${agree} of ${total} greedy tokens agree between graph and eager decode steps`);
    assert.ok(agree >= 0.98 * total, `${agree} of ${total} agree`);
  });
