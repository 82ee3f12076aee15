/**
 * Model family → the rank-local model built from loaded slices. Weights go to the engine in their stored
 * dtype; norms are kept as stored too (the engine reads any float dtype). The KV cache is allocated here,
 * once, for `kvSlots` sequences of up to `maxContext` tokens.
 */
import type { ModelSpec } from '../../coordinator/model-spec.ts';
import { ropeInvFreq } from '../../coordinator/model-spec.ts';
import type { ShardPlan } from '../../coordinator/shard-plan.ts';
import type { HostTensor } from '../weights/load-shard.ts';
import { WeftError } from '../../coordinator/errors.ts';
import { denseFeedForward, type AttentionWeights, type DenseFeedForward, type FeedForward, type LlamaModel } from './llama.ts';
import { moeFeedForward, type MixtralLayer } from './mixtral.ts';
import { float32Tensor, type Ops, type Tensor } from './ops.ts';

export interface RankModel {
  readonly model: LlamaModel<AttentionWeights>;
  readonly feedForward: FeedForward<AttentionWeights>;
}

export interface BuildOptions {
  readonly kvSlots: number;
  readonly maxContext: number;
}

export function buildRankModel(ops: Ops, spec: ModelSpec, plan: ShardPlan, rank: number, weights: Map<string, HostTensor>, options: BuildOptions): RankModel {
  const take = (name: string): Tensor => {
    const host = weights.get(name);
    if (!host) throw new WeftError('WEFT_BAD_WEIGHTS', `rank ${rank}: tensor ${name} was not loaded`);
    weights.delete(name); // drop the host copy as soon as the engine holds it
    return ops.upload(host.data, host.dtype, [...host.shape]);
  };
  const dense = (prefix: string): DenseFeedForward => ({ w13: take(`${prefix}.w13`), w2: take(`${prefix}.w2`) });
  const shard = plan.ranks[rank];
  if (!shard) throw new WeftError('WEFT_BAD_SHARD', `rank ${rank} is outside the plan's ${plan.tp} ranks`);

  const layers = Array.from({ length: spec.nLayers }, (_, i) => {
    const attention: AttentionWeights = {
      attnNorm: take(`layers.${i}.attnNorm`),
      wqkv: take(`layers.${i}.wqkv`),
      wo: take(`layers.${i}.wo`),
      ffnNorm: take(`layers.${i}.ffnNorm`),
    };
    if (spec.family === 'mixtral') {
      const layer: MixtralLayer = {
        ...attention,
        router: take(`layers.${i}.router`),
        experts: Array.from({ length: spec.nExperts }, (_, e) => dense(`layers.${i}.experts.${e}`)),
        nExpertsPerToken: spec.nExpertsPerToken,
      };
      return layer;
    }
    return { ...attention, ...dense(`layers.${i}`) };
  });

  const cacheShape = [options.kvSlots, plan.nKvHeadsPerRank, options.maxContext, spec.headDim];
  const model: LlamaModel<AttentionWeights> = {
    spec,
    plan,
    shard,
    embed: take('embed'),
    layers,
    norm: take('norm'),
    lmHead: take('lmHead'),
    invFreq: float32Tensor(ops, ropeInvFreq(spec)),
    kvCache: layers.map(() => ({ k: ops.zeros('f32', cacheShape), v: ops.zeros('f32', cacheShape) })),
  };
  const feedForward = (spec.family === 'mixtral' ? moeFeedForward : denseFeedForward) as FeedForward<AttentionWeights>;
  return { model, feedForward };
}
