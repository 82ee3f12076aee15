/**
 * Mixtral: Llama's blocks with a sparse mixture-of-experts feed-forward. Every rank holds every expert cut
 * along its intermediate dimension, so a layer costs one all-reduce and all ranks work on every token; or,
 * with expert parallelism, whole experts split across ranks, and the same all-reduce adds the ranks' parts.
 * The router follows Hugging Face: softmax over all experts in fp32, top-k, weights renormalised to sum 1.
 */
import type { Collectives } from '../collectives/collectives.ts';
import type { AttentionWeights, DenseFeedForward, FeedForward } from './llama.ts';
import { float32Tensor, int32Tensor, type Ops, type Tensor } from './ops.ts';

export interface MixtralLayer extends AttentionWeights {
  readonly router: Tensor; // [nExperts, hidden]
  /** every expert cut to this rank's slice of the intermediate dimension; or, with expert parallelism, whole experts for this rank's share and null for the rest */
  readonly experts: readonly (DenseFeedForward | null)[];
  readonly nExpertsPerToken: number;
}

export interface Routing {
  /** per expert: the batch rows routed to it and their weights */
  readonly rows: number[][];
  readonly weights: number[][];
}

/** Top-k routing of each row of `routerLogits` [T, nExperts] (row-major), exactly as Hugging Face computes it. */
export function route(routerLogits: Float32Array, nExperts: number, topK: number): Routing {
  const rows: number[][] = Array.from({ length: nExperts }, () => []);
  const weights: number[][] = Array.from({ length: nExperts }, () => []);
  const nTokens = routerLogits.length / nExperts;
  for (let t = 0; t < nTokens; t++) {
    const logits = routerLogits.subarray(t * nExperts, (t + 1) * nExperts);
    const max = Math.max(...logits);
    const probs = Array.from(logits, (l) => Math.exp(l - max));
    const total = probs.reduce((a, b) => a + b, 0);
    // Highest probability first; ties go to the lower expert index, as torch.topk does on CPU.
    const chosen = probs.map((p, e) => ({ p: p / total, e })).sort((a, b) => b.p - a.p || a.e - b.e).slice(0, topK);
    const chosenTotal = chosen.reduce((a, c) => a + c.p, 0);
    for (const { p, e } of chosen) {
      rows[e]!.push(t);
      weights[e]!.push(p / chosenTotal);
    }
  }
  return { rows, weights };
}

export const moeFeedForward: FeedForward<MixtralLayer> = async (ops: Ops, comm: Collectives, layer, x) => {
  const [nTokens = 0, hidden = 0] = x.shape;
  const routing = route(ops.download(ops.matmul(x, layer.router)) as Float32Array, layer.experts.length, layer.nExpertsPerToken);
  const out = ops.zeros('f32', [nTokens, hidden]);
  layer.experts.forEach((expert, e) => {
    const rows = routing.rows[e]!;
    if (!expert || rows.length === 0) return; // another rank's expert, or one no token chose: never read
    const rowIndex = int32Tensor(ops, rows);
    const hiddenState = ops.siluMul(ops.matmul(ops.gatherRows(x, rowIndex), expert.w13));
    ops.scatterAddRows(out, ops.matmul(hiddenState, expert.w2), rowIndex, float32Tensor(ops, routing.weights[e]!));
  });
  return comm.allReduce(out);
};
