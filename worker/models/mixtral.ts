/**
 * Mixtral: Llama's blocks with a sparse mixture-of-experts feed-forward. Every rank holds every expert cut
 * along its intermediate dimension, so a layer costs one all-reduce and all ranks work on every token; or,
 * with expert parallelism, whole experts split across ranks, and the same all-reduce adds the ranks' parts.
 * The router follows Hugging Face: softmax over all experts in fp32, top-k, weights renormalised to sum 1.
 * Its logits are computed in fp32 too, the weight held in f32 whatever the checkpoint stores (it is tiny): with
 * a 16-bit weight, a prefill step's product would round x to it first (tensor cores), and where two experts'
 * logits nearly tie that rounding alone flips the choice, moving that token's output far more than any other
 * rounding of the layer does.
 */
import type { AttentionWeights, FeedForward } from './llama.ts';
import type { Tensor } from './ops.ts';

export interface MixtralLayer extends AttentionWeights {
  readonly router: Tensor; // [nExperts, hidden] f32 (widened at load from a bf16/f16 checkpoint)
  readonly experts: {
    readonly w13: Tensor; // [nHeld, 2 expertFfnPerRank, hidden]: each held expert's gate rows, then its up rows
    readonly w2: Tensor; // [nHeld, hidden, expertFfnPerRank]
    readonly first: number; // global index of the first held expert (all experts are held without expert parallelism)
  };
  readonly nExpertsPerToken: number;
}

/**
 * Router, then each token's k experts. All on the device: the router's choice only decides which expert
 * weights the expert matmuls read, so decode steps stay one CUDA graph. Rows routed to experts held by
 * other ranks come out zero here and arrive through the all-reduce.
 */
export const moeFeedForward: FeedForward<MixtralLayer> = async (ops, comm, layer, x, step) => {
  // [T, k] each; a graph step's padding rows choose no expert (else all would choose the same ones, each read again)
  const { experts, weights } = ops.routeTopK(ops.matmul(x, layer.router), layer.nExpertsPerToken, step.rowsInUse);
  const gateUp = ops.expertMatmul(x, layer.experts.w13, experts, layer.experts.first); // [T k, 2 F]
  const down = ops.siluMulExpertMatmul(gateUp, layer.experts.w2, experts, layer.experts.first); // [T k, hidden]
  return comm.allReduce(ops.combineExperts(down, weights));
};
