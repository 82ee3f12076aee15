/**
 * How large steps, decode graphs and the step arena are: the batch buckets captured as CUDA graphs, the arena bytes
 * a step's intermediates take per token, the tokens an eager step may hold beside the graphs' regions, and how a
 * longer step is cut into chunks. Plain arithmetic on the model's and shard's sizes, shared by the runner, the
 * worker (which sizes its engine's arena) and the benches.
 */
import type { ModelSpec } from '../core/model-spec.ts';
import type { ShardPlan } from '../core/shard-plan.ts';

/**
 * Decode batch sizes captured as graphs; a batch runs padded up to the next one. Powers of two to 128: up to
 * there a 7B-class decode step reads its weights in the time its FLOPs take several times over (an H200 does
 * about 200 bf16 FLOPs per byte), so padding rows cost only their small per-row work. Past 128 the GEMMs turn
 * compute-bound, so padding costs time in proportion: 192 halves the worst padding between 128 and 256.
 */
export const GRAPH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 192, 256] as const;

/**
 * With experts, graphs stop where the expert matmuls leave the device: above 8 rows bf16 experts are grouped by expert
 * on the host (not capturable; cuBLAS a group, faster there than the device's vector kernel in passes: Mixtral 8 layers
 * at batch 12, H100, 1013-1106 tok/s eager against 677 in graphs), quantized ones above 64 (the native
 * kQuantExpertGemvMaxTokens: up to there their device GEMV reads each chosen expert once for every 8 of its pairs).
 */
const EXPERTS_MAX_GRAPH_BATCH = { dense: 8, quantized: 64 } as const;

/**
 * The largest decode graph a layout of `kvSlots` sequences uses: the bucket that holds them all (the last at
 * most; 8 with bf16 experts, 64 with quantized ones), and smaller where the graphs' regions would take more than
 * half of the tokens a step arena holds (`arenaTokenCount`; the rest is for eager steps); larger batches then run
 * eagerly.
 */
export function maxGraphBatch(spec: Pick<ModelSpec, 'nExpertsPerToken' | 'quantization'>, kvSlots: number, arenaTokenCount = Infinity): number {
  const experts = EXPERTS_MAX_GRAPH_BATCH[spec.quantization ? 'quantized' : 'dense'];
  const rows = spec.nExpertsPerToken > 0 ? Math.min(kvSlots, experts) : kvSlots;
  const wanted = GRAPH_BUCKETS.find((bucket) => bucket >= rows) ?? GRAPH_BUCKETS[GRAPH_BUCKETS.length - 1]!;
  const fits = GRAPH_BUCKETS.filter((bucket) => bucket <= wanted && graphArenaTokens(bucket) <= arenaTokenCount / 2);
  return fits.at(-1) ?? 0;
}

/** The bucket a decode batch of `rows` sequences runs in, with graphs up to `maxBatch` rows; null: it runs eagerly. */
export function graphBucketFor(rows: number, maxBatch: number): number | null {
  if (rows < 1) return null;
  const bucket = GRAPH_BUCKETS.find((b) => b >= rows) ?? null;
  return bucket !== null && bucket <= maxBatch ? bucket : null;
}

/** Rows of every decode graph up to `maxBatch`: each keeps its step's tensors in the step arena while it lives. */
export function graphArenaTokens(maxBatch: number): number {
  return GRAPH_BUCKETS.filter((bucket) => bucket <= maxBatch).reduce((sum, bucket) => sum + bucket, 0);
}

/** The sizes a step's intermediates follow. */
type StepSpec = Pick<ModelSpec, 'nLayers' | 'hidden' | 'headDim' | 'vocabSize' | 'nExpertsPerToken'>;
type StepPlan = Pick<ShardPlan, 'nHeadsPerRank' | 'nKvHeadsPerRank' | 'ffnPerRank'>;

/** Tokens a prefill step takes whole by default: the CUDA worker sizes its step arena for this many. */
export const PREFILL_STEP_TOKENS = 1024;

/** The step arena's default size (the engine's, EngineOptions.arenaBytes). */
export const DEFAULT_ARENA_BYTES = 4 * 2 ** 30;

/** Of the arena, what the steps' tensors (one eager step and the decode graphs' regions) may fill: the rest is headroom for what the count leaves out. */
const ARENA_FILL = 0.85;

/**
 * Step-arena bytes one token of one layer takes, counted from what the forward allocates per layer in f32:
 * q/k/v, q after rope, the attention output, the o and down projections and their all-reduces, the two
 * addRmsNorm pairs and their bf16 copies of the normed rows, gate/up and the SwiGLU product (with experts, for
 * each of its k pairs, plus the rows grouped by expert).
 */
function layerBytesPerToken(spec: StepSpec, plan: StepPlan): number {
  const qkvWidth = (plan.nHeadsPerRank + 2 * plan.nKvHeadsPerRank) * spec.headDim;
  const qWidth = plan.nHeadsPerRank * spec.headDim;
  const ffnWidth = spec.nExpertsPerToken > 0 ? spec.nExpertsPerToken * (6 * plan.ffnPerRank + 3 * spec.hidden) : 3 * plan.ffnPerRank;
  return 4 * (qkvWidth + 2 * qWidth + 9 * spec.hidden + ffnWidth);
}

/** Three vocabulary rows a token (the rank's logits, the gathered logits, log-softmax), as if every token were a logit row. */
const vocabBytesPerToken = (spec: StepSpec): number => 3 * 4 * spec.vocabSize;

/**
 * Step-arena bytes one token of a step that keeps every layer's intermediates takes: a captured decode graph's
 * (a capture releases nothing, Engine.releaseLayer), and an eager step of at most 16 rows on CUDA.
 */
export function stepBytesPerToken(spec: StepSpec, plan: StepPlan): number {
  return spec.nLayers * layerBytesPerToken(spec, plan) + vocabBytesPerToken(spec);
}

/**
 * Step-arena bytes one token of a long eager step takes: each layer's intermediates are released at its end
 * (worker/models/llama.ts), so one layer's, plus the embedding's rows, the residual x and its copy (six hidden
 * rows with their bf16 copies), and the vocabulary rows. Llama-2-7B: 0.85 MB a token against 12 MB kept.
 */
export function eagerStepBytesPerToken(spec: StepSpec, plan: StepPlan): number {
  return layerBytesPerToken(spec, plan) + 4 * 6 * spec.hidden + vocabBytesPerToken(spec);
}

/**
 * Of the arena, what kernels' scratch takes beside the counted tensors: Sage's quantized prefix (up to 512 MiB),
 * the attention's split partials (a 256-row decode graph at 32K contexts makes ~1.3 GB in its region).
 */
const SCRATCH_BYTES = 2 * 2 ** 30;

/**
 * Tokens one eager step may hold so that its intermediates fit a step arena of `arenaBytes` beside the regions
 * of decode graphs of `graphTokens` rows in all (graphArenaTokens) and the kernels' scratch.
 */
export function maxStepTokens(spec: StepSpec, plan: StepPlan, arenaBytes: number, graphTokens = 0): number {
  return Math.max(1, Math.floor(eagerRoom(spec, plan, arenaBytes, graphTokens) / eagerStepBytesPerToken(spec, plan)));
}

/**
 * Tokens an eager step may hold with every layer's intermediates kept. Up to these a step need not release its
 * layers, and does not: each release copies the residual x (a 7B model's 1024- and 4096-token prompts took 3%
 * longer with them, H200).
 */
export function keptStepTokens(spec: StepSpec, plan: StepPlan, arenaBytes: number, graphTokens = 0): number {
  return Math.max(0, Math.floor(eagerRoom(spec, plan, arenaBytes, graphTokens) / stepBytesPerToken(spec, plan)));
}

/** Arena bytes an eager step's tensors may take beside the graphs' regions and the kernels' scratch. */
function eagerRoom(spec: StepSpec, plan: StepPlan, arenaBytes: number, graphTokens: number): number {
  return ARENA_FILL * Math.max(0, arenaBytes - SCRATCH_BYTES) - graphTokens * stepBytesPerToken(spec, plan);
}

/** Tokens of steps that keep every layer's intermediates (decode graphs' regions) a step arena of `arenaBytes` holds. */
export function arenaTokens(spec: StepSpec, plan: StepPlan, arenaBytes: number): number {
  return Math.floor((ARENA_FILL * arenaBytes) / stepBytesPerToken(spec, plan));
}

/**
 * The step arena that takes an eager step of `tokens` tokens beside graphs of `graphTokens` rows and the
 * kernels' scratch, and never less than the engine's default.
 */
export function stepArenaBytes(spec: StepSpec, plan: StepPlan, tokens: number, graphTokens = 0): number {
  const tensors = tokens * eagerStepBytesPerToken(spec, plan) + graphTokens * stepBytesPerToken(spec, plan);
  const bytes = Math.ceil(tensors / ARENA_FILL) + SCRATCH_BYTES;
  return Math.max(DEFAULT_ARENA_BYTES, Math.ceil(bytes / 2 ** 20) * 2 ** 20);
}

/**
 * The step arena a CUDA worker asks for: a PREFILL_STEP_TOKENS-token prompt in one step when the device's free
 * memory before loading (`freeBytes`) holds it beside the rank's weights and KV cache (`residentBytes`) with a
 * tenth to spare; else what that leaves, and never less than the engine's default.
 */
export function workerArenaBytes(spec: StepSpec, plan: StepPlan, freeBytes: number, residentBytes: number, graphTokens = 0): number {
  const room = Math.floor((0.9 * (freeBytes - residentBytes)) / 2 ** 20) * 2 ** 20;
  return Math.max(DEFAULT_ARENA_BYTES, Math.min(stepArenaBytes(spec, plan, PREFILL_STEP_TOKENS, graphTokens), room));
}

/**
 * A step of `tokens` tokens as the fewest chunks of at most `maxTokens`, of near-equal length (the longer ones
 * first): 1024 over a limit of 951 is 512 + 512, not 951 + 73, so no chunk runs at a small matrix size.
 */
export function chunkRanges(tokens: number, maxTokens: number): { start: number; end: number }[] {
  const chunks = Math.ceil(tokens / maxTokens);
  const base = Math.floor(tokens / chunks), longer = tokens % chunks;
  const ranges: { start: number; end: number }[] = [];
  for (let i = 0, start = 0; i < chunks; i++) {
    const end = start + base + (i < longer ? 1 : 0);
    ranges.push({ start, end });
    start = end;
  }
  return ranges;
}
