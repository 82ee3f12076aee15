/**
 * Mixtral: Llama's blocks with a sparse mixture-of-experts feed-forward. Every rank holds every expert cut
 * along its intermediate dimension, so a layer costs one all-reduce and all ranks work on every token; or,
 * with expert parallelism, whole experts split across ranks, and the same all-reduce adds the ranks' parts.
 * The router follows Hugging Face: softmax over all experts in fp32, top-k, weights renormalised to sum 1.
 */
import type { AttentionWeights, FeedForward } from './llama.ts';
import type { Tensor } from './ops.ts';

export interface MixtralLayer extends AttentionWeights {
  readonly router: Tensor; // [nExperts, hidden]
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
export const moeFeedForward: FeedForward<MixtralLayer> = async (ops, comm, layer, x) => {
  const { experts, weights } = ops.routeTopK(ops.matmul(x, layer.router), layer.nExpertsPerToken); // [T, k] each
  const gateUp = ops.expertMatmul(x, layer.experts.w13, experts, layer.experts.first); // [T k, 2 F]
  const down = ops.siluMulExpertMatmul(gateUp, layer.experts.w2, experts, layer.experts.first); // [T k, hidden]
  return comm.allReduce(ops.combineExperts(down, weights));
};
