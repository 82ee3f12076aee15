/**
 * Llama 2/3 and Mistral, top to bottom. Tensor parallelism is data: each rank holds the slices its
 * RankShard names (fused q/k/v and gate/up by rows, o and down by columns, a vocab range of the embedding
 * and the LM head), and the two all-reduces per layer are written where the math needs them.
 */
import type { ModelSpec } from '../../core/model-spec.ts';
import type { RankShard, ShardPlan } from '../../core/shard-plan.ts';
import type { Collectives } from '../collectives/collectives.ts';
import type { Ops, StepIndex, Tensor } from './ops.ts';
import { keepSparqState, sparqAttention, type SparqState } from './sparq.ts';
import { sagePvType, type PrefillAttention } from '../../core/prefill-attention.ts';
import { sageStateOf, type SageState } from './sage-state.ts';

export interface AttentionWeights {
  readonly attnNorm: Tensor; // [hidden]
  readonly wqkv: Tensor; // [(nHeadsPerRank + 2 nKvHeadsPerRank) headDim, hidden]
  readonly wo: Tensor; // [hidden, nHeadsPerRank headDim]
  readonly ffnNorm: Tensor; // [hidden]
}

export interface DenseFeedForward {
  readonly w13: Tensor; // [2 ffnPerRank, hidden]: gate rows, then up rows
  readonly w2: Tensor; // [hidden, ffnPerRank]
}

/** A rank's view of the model: its weights, its KV cache and the sizes it computes with. */
export interface LlamaModel<Layer extends AttentionWeights = AttentionWeights & DenseFeedForward> {
  readonly spec: ModelSpec;
  readonly plan: ShardPlan;
  readonly shard: RankShard;
  readonly embed: Tensor; // [vocabPerRank, hidden]
  readonly layers: readonly Layer[];
  readonly norm: Tensor; // [hidden]
  readonly lmHead: Tensor; // [vocabPerRank, hidden]
  readonly invFreq: Tensor; // [headDim / 2] f32, RoPE frequencies after scaling
  readonly kvCache: readonly { k: Tensor; v: Tensor }[]; // per layer [nBlocks, nKvHeadsPerRank, B, headDim] f32|bf16 (StepIndex)
  readonly sparq?: SparqState; // with --attention sparq: the transposed K and V block sums beside kvCache (sparq.ts)
  readonly prefillAttention?: Exclude<PrefillAttention, 'exact'>; // --prefill-attention int8|fp8: steps of prompts attend through sageAttention
  readonly sage?: SageState; // with prefillAttention: the prompts' quantized blocks kept across their steps (sage-state.ts)
}

/** The feed-forward of one block: dense SwiGLU here, a mixture of experts in mixtral.ts (it reads step.rowsInUse). */
export type FeedForward<Layer> = (ops: Ops, comm: Collectives, layer: Layer, x: Tensor, step: StepIndex) =>
  Promise<Tensor>;

export async function attention(ops: Ops, comm: Collectives, model: LlamaModel<AttentionWeights>, layerIndex: number, x: Tensor, step: StepIndex): Promise<Tensor> {
  const { headDim } = model.spec;
  const { nHeadsPerRank } = model.plan;
  const layer = model.layers[layerIndex]!;
  const cache = model.kvCache[layerIndex]!;
  const qkv = ops.matmul(x, layer.wqkv); // [T, (nH + 2 nKv) hd]
  // One kernel: q = rope(q heads); the cache gets rope(k heads) and the v heads at each token's block row.
  const q = ops.qkvRope(qkv, step.positions, model.invFreq, cache.k, cache.v, step.tokenSeq, step.kvBlockTable, nHeadsPerRank);
  const scale = 1 / Math.sqrt(headDim);
  // Dense attention; SparQ's approximation (each token with its r and k) when the model keeps SparQ's state; or, for
  // decode steps whose sequences share leading blocks, the bifurcated kernel that reads those blocks once per group.
  if (model.sparq && step.sparqExact) keepSparqState(ops, model.sparq, layerIndex, cache, step); // a step attended exactly
  const attended = model.sparq && !step.sparqExact
    ? sparqAttention(ops, model.sparq, layerIndex, cache, q, step, nHeadsPerRank, scale)
    : step.prefixGroups
      ? ops.attentionBifurcated(q, cache.k, cache.v, step.tokenSeq, step.kvBlockTable, step.positions, step.prefixGroups.tokenGroup, step.prefixGroups.groupShared, nHeadsPerRank, scale)
      : model.prefillAttention // quantized for prompt chunks; the engine keeps decode rows and short steps exact
        ? ops.sageAttention(q, cache.k, cache.v, step.tokenSeq, step.kvBlockTable, step.positions, nHeadsPerRank, scale, sagePvType(model.prefillAttention), sageStateOf(model.sage, layerIndex, step), step.decodeRows)
        : ops.attention(q, cache.k, cache.v, step.tokenSeq, step.kvBlockTable, step.positions, nHeadsPerRank, scale, step.decodeRows);
  return comm.allReduce(ops.matmul(attended, layer.wo));
}

export const denseFeedForward: FeedForward<DenseFeedForward> = async (ops, comm, layer, x) => {
  const hidden = ops.matmulSiluMul(x, layer.w13); // silu(x gate^T) * (x up^T): [T, ffnPerRank]
  return comm.allReduce(ops.matmul(hidden, layer.w2));
};

/**
 * One forward step over a ragged batch; returns the logits of `step.logitRows`, [R, vocab] on every rank.
 * Each residual add is fused with the RMSNorm that reads its result (`addRmsNorm` returns both), after the
 * all-reduce of the branch it adds: h = x + attention(attnNorm(x)), x = h + feedForward(ffnNorm(h)).
 */
export async function forward<Layer extends AttentionWeights>(
  ops: Ops,
  comm: Collectives,
  model: LlamaModel<Layer>,
  feedForward: FeedForward<Layer>,
  step: StepIndex,
): Promise<Tensor> {
  const eps = model.spec.rmsEps;
  const { layers } = model;
  // Vocab-parallel embedding: each rank fills the rows of ids in its range, zeros elsewhere; the sum is the lookup.
  // Each layer releases the step memory made from here but for x: a long step holds one layer's intermediates (step-sizes.ts)
  const mark = ops.layerMark();
  const embedded = await comm.allReduce(ops.embedding(model.embed, step.tokenIds, model.shard.vocab.start));
  let x = { sum: embedded, normed: ops.rmsNorm(embedded, layers[0]?.attnNorm ?? model.norm, eps) };
  for (let i = 0; i < layers.length; i++) {
    const layer = layers[i]!;
    const nextNorm = layers[i + 1]?.attnNorm ?? model.norm; // after the last layer: the final norm
    // h = x + attention(attnNorm(x)), with ffnNorm(h)
    const h = ops.addRmsNorm(x.sum, await attention(ops, comm, model, i, x.normed, step), layer.ffnNorm, eps);
    // x = h + feedForward(ffnNorm(h)), with the next layer's attnNorm(x)
    const out = ops.addRmsNorm(h.sum, await feedForward(ops, comm, layer, h.normed, step), nextNorm, eps);
    // only x outlives the layer, and the x it read goes too (a step that fits the arena keeps its layers instead)
    const [sum, normed] = step.keepLayers ? [out.sum, out.normed] : ops.releaseLayer(mark, [out.sum, out.normed]);
    x = { sum: sum!, normed: normed! };
  }
  // x.normed is norm(x) of every row (RMSNorm is per row); the LM head reads only the rows whose logits are wanted.
  const last = ops.gatherRows(x.normed, step.logitRows);
  return comm.allGatherCols(ops.matmul(last, model.lmHead));
}
