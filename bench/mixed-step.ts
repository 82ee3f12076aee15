/**
 * A mixed step, as chunked prefill builds it under load (coordinator/step-composer.ts): one decode row for each
 * running sequence, then a chunk of a long prompt. Times the step's attention in one layer and the whole forward
 * step, each with the decode rows named to attention (StepIndex.decodeRows: the decode kernel for them, the
 * prefill kernel for the chunk) and without (the whole step on the prefill kernel, where a 64-row tile of decode
 * rows walks each one's context in turn), beside the decode rows alone and the chunk alone:
 *
 *   node --import tsx bench/mixed-step.ts --model llama-2-7b --decode-rows 16 --decode-context 4096 --prompt-position 8192
 *
 * Random weights of the preset's shapes; the KV cache is left as allocated (zeros): the kernels' work does not
 * depend on the values, so only the times count. --prefill-attention fp8|int8 runs the chunk through the quantized
 * kernel (without a state slot: every step quantizes its prefix anew). Ends with one JSON line.
 */
import { Command } from 'commander';
import { createEngine, type Engine } from '../worker/native.ts';
import { planShards } from '../core/shard-plan.ts';
import { buildRankModel, randomWeights, type RankModel } from '../worker/models/registry.ts';
import { soloCollectives } from '../worker/collectives/collectives.ts';
import { stepIndexArrays, uploadIndex } from '../worker/runner.ts';
import { forward } from '../worker/models/llama.ts';
import { blocksFor, kvCacheLayout, type KvCacheLayout } from '../core/kv-block-table.ts';
import { checkPrefillAttention, sagePvType, type PrefillAttention } from '../core/prefill-attention.ts';
import type { StepBatch } from '../core/step-batch.ts';
import type { StepIndex } from '../worker/models/ops.ts';
import { presetSpec } from './presets.ts';

const opts = new Command('bench-mixed-step')
  .option('--model <name>', 'preset (bench/presets.ts)', 'llama-2-7b')
  .option('--decode-rows <n>', 'running sequences, one decode row each', '16')
  .option('--decode-context <n>', 'the position each decode row is fed at', '4096')
  .option('--prompt-position <n>', 'where the prompt chunk starts', '8192')
  .option('--chunk <n>', 'prompt tokens in the step (default: 1024 less the decode rows, the product\'s step budget)')
  .option('--prefill-attention <list>', 'exact, fp8, int8 (comma-separated)', 'exact,fp8')
  .option('--iterations <n>', 'timed runs of each variant', '10')
  .option('--device <name>', 'cpu or cuda', 'cuda')
  .option('--layers <n>', 'override the layer count (a cut model)')
  .parse()
  .opts<{ model: string; decodeRows: string; decodeContext: string; promptPosition: string; chunk?: string; prefillAttention: string; iterations: string; device: 'cpu' | 'cuda'; layers?: string }>();

const D = Number(opts.decodeRows), decodeContext = Number(opts.decodeContext), promptPosition = Number(opts.promptPosition);
const chunk = opts.chunk === undefined ? 1024 - D : Number(opts.chunk), iterations = Number(opts.iterations);
for (const [name, value, min] of [['--decode-rows', D, 1], ['--decode-context', decodeContext, 0], ['--prompt-position', promptPosition, 0], ['--chunk', chunk, 65], ['--iterations', iterations, 1]] as const)
  if (!Number.isInteger(value) || value < min) throw new Error(`${name} must be an integer >= ${min} (got ${value})`);
const modes = opts.prefillAttention.split(',').map((m) => m.trim()) as PrefillAttention[];

const engine = createEngine({ backend: opts.device, arenaBytes: 16 * 2 ** 30 });
const spec = presetSpec(opts.model, opts.layers ? { num_hidden_layers: Number(opts.layers) } : {});
const plan = planShards(spec, 1);
const B = 16;
// sequence i < D: a decode row at decodeContext; sequence D: the prompt, its chunk at promptPosition
const seqBlocks = [...Array(D).fill(blocksFor(decodeContext + 1, B)), blocksFor(promptPosition + chunk, B)] as number[];
const kvCacheTokens = seqBlocks.reduce((a, b) => a + b, 0) * B;
const kv: KvCacheLayout = kvCacheLayout({ kvSlots: D + 1, maxContext: Math.max(decodeContext + 1, promptPosition + chunk), device: opts.device, kvBlockSize: B, kvCacheTokens });
const built = buildRankModel(engine, spec, plan, 0, randomWeights(engine, 7), kv);
let next = 0;
const kvBlockTable = seqBlocks.map((n) => Array.from({ length: n }, () => next++));

/** The step's rows [from, to) of: D decode rows, then the chunk; its table holds the sequences they name. */
function batchOf(from: number, to: number): StepBatch {
  const rows = Array.from({ length: D + chunk }, (_, t) => (t < D ? { seq: t, pos: decodeContext } : { seq: D, pos: promptPosition + t - D })).slice(from, to);
  const first = rows[0]!.seq;
  return { tokens: rows.map((_, i) => (i * 31 + 7) % spec.vocabSize), positions: rows.map((r) => r.pos), tokenSeq: rows.map((r) => r.seq - first), kvBlockTable: kvBlockTable.slice(first, rows.at(-1)!.seq + 1), logitRows: [rows.length - 1] };
}

/** Median ms of `iterations` runs of `run` inside a step each (after one untimed run), the device synchronised. */
async function timed(e: Engine, run: () => Promise<unknown> | unknown): Promise<number> {
  const times: number[] = [];
  for (let i = 0; i <= iterations; i++) {
    e.beginStep();
    const started = performance.now();
    try {
      await run();
      e.synchronize();
    } finally {
      e.endStep();
    }
    if (i > 0) times.push(performance.now() - started);
  }
  return times.sort((a, b) => a - b)[Math.floor(times.length / 2)]!;
}

const variants = [
  { name: 'mixed, decode rows named', from: 0, to: D + chunk, named: true },
  { name: 'mixed, unnamed (before)', from: 0, to: D + chunk, named: false },
  { name: 'decode rows alone', from: 0, to: D, named: false },
  { name: 'chunk alone', from: D, to: D + chunk, named: false },
];
const results: Record<string, unknown>[] = [];
console.log(`${opts.model}: ${D} decode rows at ${decodeContext}, a ${chunk}-token chunk at ${promptPosition} (blocks of ${B}); median of ${iterations}`);
console.log('| prefill attention | variant | attention, one layer (ms) | forward step (ms) |\n|---|---|---|---|');
for (const mode of modes) {
  checkPrefillAttention(mode, spec, opts.device, 'dense');
  const model: RankModel = mode === 'exact' ? built : { ...built, model: { ...built.model, prefillAttention: mode } };
  const { nHeadsPerRank } = plan;
  const cache = model.model.kvCache[0]!;
  for (const v of variants) {
    const batch = batchOf(v.from, v.to), T = v.to - v.from;
    // uploaded before the timed steps (persistent tensors), so that the times hold the device's work only
    const step: StepIndex = { ...uploadIndex(engine, stepIndexArrays(batch, kv)), ...(v.named && { decodeRows: D }) };
    const q = engine.upload(new Uint8Array(new Float32Array(T * nHeadsPerRank * spec.headDim).fill(0.01).buffer), 'f32', [T, nHeadsPerRank * spec.headDim]);
    const scale = 1 / Math.sqrt(spec.headDim);
    const attentionMs = await timed(engine, () => mode === 'exact'
      ? engine.attention(q, cache.k, cache.v, step.tokenSeq, step.kvBlockTable, step.positions, nHeadsPerRank, scale, step.decodeRows)
      : engine.sageAttention(q, cache.k, cache.v, step.tokenSeq, step.kvBlockTable, step.positions, nHeadsPerRank, scale, sagePvType(mode), undefined, step.decodeRows));
    const stepMs = await timed(engine, () => forward(engine, soloCollectives(), model.model, model.feedForward, step));
    console.log(`| ${mode} | ${v.name} | ${attentionMs.toFixed(3)} | ${stepMs.toFixed(2)} |`);
    results.push({ model: opts.model, prefillAttention: mode, variant: v.name, decodeRows: D, decodeContext, chunk, promptPosition, attentionMs, stepMs });
  }
}
console.log(JSON.stringify({ bench: 'mixed-step', results }));
