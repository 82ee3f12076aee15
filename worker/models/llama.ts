/**
 * Llama 2/3 and Mistral, top to bottom. Tensor parallelism is data: each rank holds the slices its
 * RankShard names (fused q/k/v and gate/up by rows, o and down by columns, a vocab range of the embedding
 * and the LM head), and the two all-reduces per layer are written where the math needs them.
 */
import type { ModelSpec } from '../../coordinator/model-spec.ts';
import type { RankShard, ShardPlan } from '../../coordinator/shard-plan.ts';
import type { Collectives } from '../collectives/collectives.ts';
import type { Ops, StepIndex, Tensor } from './ops.ts';

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
  readonly kvCache: readonly { k: Tensor; v: Tensor }[]; // per layer [kvSlots, nKvHeadsPerRank, maxContext, headDim] f32
}

/** The feed-forward of one block: dense SwiGLU here, a mixture of experts in mixtral.ts. */
export type FeedForward<Layer> = (ops: Ops, comm: Collectives, layer: Layer, x: Tensor) => Promise<Tensor>;

export async function attention(ops: Ops, comm: Collectives, model: LlamaModel<AttentionWeights>, layerIndex: number, x: Tensor, step: StepIndex): Promise<Tensor> {
  const { headDim } = model.spec;
  const { nHeadsPerRank, nKvHeadsPerRank } = model.plan;
  const layer = model.layers[layerIndex]!;
  const cache = model.kvCache[layerIndex]!;
  const qkv = ops.matmul(x, layer.wqkv); // [T, (nH + 2 nKv) hd]
  const qEnd = nHeadsPerRank * headDim;
  const kEnd = qEnd + nKvHeadsPerRank * headDim;
  const q = ops.rope(ops.sliceCols(qkv, 0, qEnd), step.positions, model.invFreq, headDim);
  const k = ops.rope(ops.sliceCols(qkv, qEnd, kEnd), step.positions, model.invFreq, headDim);
  const v = ops.sliceCols(qkv, kEnd, kEnd + nKvHeadsPerRank * headDim);
  ops.writeKv(cache.k, cache.v, k, v, step.slots, step.positions);
  const attended = ops.attention(q, cache.k, cache.v, step.slots, step.positions, nHeadsPerRank, 1 / Math.sqrt(headDim));
  return comm.allReduce(ops.matmul(attended, layer.wo));
}

export const denseFeedForward: FeedForward<DenseFeedForward> = async (ops, comm, layer, x) => {
  const hidden = ops.siluMul(ops.matmul(x, layer.w13)); // [T, ffnPerRank]
  return comm.allReduce(ops.matmul(hidden, layer.w2));
};

/** One forward step over a ragged batch; returns the logits of `step.logitRows`, [R, vocab] on every rank. */
export async function forward<Layer extends AttentionWeights>(
  ops: Ops,
  comm: Collectives,
  model: LlamaModel<Layer>,
  feedForward: FeedForward<Layer>,
  step: StepIndex,
): Promise<Tensor> {
  const eps = model.spec.rmsEps;
  // Vocab-parallel embedding: each rank fills the rows of ids in its range, zeros elsewhere; the sum is the lookup.
  let x = await comm.allReduce(ops.embedding(model.embed, step.tokenIds, model.shard.vocab.start));
  for (let i = 0; i < model.layers.length; i++) {
    const layer = model.layers[i]!;
    const h = ops.add(x, await attention(ops, comm, model, i, ops.rmsNorm(x, layer.attnNorm, eps), step));
    x = ops.add(h, await feedForward(ops, comm, layer, ops.rmsNorm(h, layer.ffnNorm, eps)));
  }
  // Normalise only the rows whose logits are wanted (RMSNorm is per row).
  const last = ops.rmsNorm(ops.gatherRows(x, step.logitRows), model.norm, eps);
  return comm.allGatherCols(ops.matmul(last, model.lmHead));
}
