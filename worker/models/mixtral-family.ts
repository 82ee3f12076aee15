/**
 * Mixtral: Llama's embedding and attention rows, then per layer the router and this rank's experts stacked
 * [nHeld, ...]: each held expert's gate and up rows (of its intermediate slice), then its down columns. With
 * expert parallelism a rank holds whole experts; without, every expert cut along its intermediate dimension.
 * The router is held in f32 (mixtral.ts says why).
 */
import { cols, len, rows, tensor, whole, widenedToF32, type ShardTensor } from '../weights/layout.ts';
import { defineFamily, perLayer, type LayoutContext } from './family.ts';
import { attentionTensors, attentionWeights, embeddingTensors } from './llama-family.ts';
import { moeFeedForward, type MixtralLayer } from './mixtral.ts';

function expertTensors({ spec, shard, matrixFormat, denseFormat }: LayoutContext, i: number): ShardTensor[] {
  const { hidden, ffnDim, nExperts } = spec;
  const moe = `model.layers.${i}.block_sparse_moe.`;
  const held = Array.from({ length: len(shard.experts) }, (_, e) => `${moe}experts.${shard.experts.start + e}.`);
  const f = shard.expertFfn;
  return [
    widenedToF32(tensor(`layers.${i}.router`, [nExperts, hidden], denseFormat, [whole(`${moe}gate.weight`, [nExperts, hidden])])),
    tensor(`layers.${i}.experts.w13`, [held.length, 2 * len(f), hidden], matrixFormat, held.flatMap((ex) => [rows(`${ex}w1.weight`, [ffnDim, hidden], f), rows(`${ex}w3.weight`, [ffnDim, hidden], f)])),
    tensor(`layers.${i}.experts.w2`, [held.length, hidden, len(f)], matrixFormat, held.map((ex) => cols(`${ex}w2.weight`, [hidden, ffnDim], f))),
  ];
}

export const mixtralFamily = defineFamily<MixtralLayer>({
  name: 'mixtral',
  architectures: ['MixtralForCausalLM'],
  layout: (ctx) => [...embeddingTensors(ctx), ...perLayer(ctx.spec, (i) => [...attentionTensors(ctx, i), ...expertTensors(ctx, i)])],
  layer: (weight, { spec, shard }, i) => ({
    ...attentionWeights(weight, i),
    router: weight(`layers.${i}.router`),
    experts: { w13: weight(`layers.${i}.experts.w13`), w2: weight(`layers.${i}.experts.w2`), first: shard.experts.start },
    nExpertsPerToken: spec.nExpertsPerToken,
  }),
  feedForward: moeFeedForward,
});
