/**
 * Model family → the rank-local model built from loaded slices. Weights go to the engine in their stored
 * dtype; norms are kept as stored too (the engine reads any float dtype). The KV cache is allocated here,
 * once: `kvBlocks` blocks of `kvBlockSize` positions (core/kv-block-table.ts).
 */
import type { ModelSpec } from '../../core/model-spec.ts';
import { ropeInvFreq } from '../../core/model-spec.ts';
import type { ShardPlan } from '../../core/shard-plan.ts';
import { shardLayout, type HostTensor } from '../weights/load-shard.ts';
import { WeftError } from '../../core/errors.ts';
import { denseFeedForward, type AttentionWeights, type DenseFeedForward, type FeedForward, type LlamaModel } from './llama.ts';
import { moeFeedForward, type MixtralLayer } from './mixtral.ts';
import { float32Tensor, type Ops, type Tensor } from './ops.ts';

export interface RankModel {
  readonly model: LlamaModel<AttentionWeights>;
  readonly feedForward: FeedForward<AttentionWeights>;
}

export interface BuildOptions {
  readonly kvBlocks: number;
  readonly kvBlockSize: number;
}

/** Gives the engine tensor for one weft-named weight of this rank. */
export type WeightSource = (name: string) => Tensor;

/** Weights read from the checkpoint (loadShard), uploaded one by one; each host copy is dropped once uploaded. */
export function hostWeights(ops: Ops, rank: number, weights: Map<string, HostTensor>): WeightSource {
  return (name) => {
    const host = weights.get(name);
    if (!host) throw new WeftError('WEFT_BAD_WEIGHTS', `rank ${rank}: tensor ${name} was not loaded`);
    weights.delete(name);
    return ops.upload(host.data, host.dtype, [...host.shape]);
  };
}

/** Random weights of the real shapes, made on the device (benchmarks need no checkpoint). */
export function randomWeights(ops: Ops, spec: ModelSpec, plan: ShardPlan, rank: number, seed: number): WeightSource {
  const shapes = new Map(shardLayout(spec, plan, rank).map((t) => [t.name, t.shape]));
  let counter = 0;
  return (name) => {
    const shape = shapes.get(name);
    if (!shape) throw new WeftError('WEFT_BAD_WEIGHTS', `no tensor ${name} in the layout of ${spec.architecture}`);
    const isNorm = shape.length === 1;
    // Norm weights near 1 and matrices with unit-scale rows keep activations finite over many layers.
    const tensor = ops.randomUniform(spec.dtype, [...shape], seed + counter++, isNorm ? 1 : 1 / Math.sqrt(shape.at(-1) ?? 1));
    return tensor;
  };
}

export function buildRankModel(ops: Ops, spec: ModelSpec, plan: ShardPlan, rank: number, take: WeightSource, options: BuildOptions): RankModel {
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
        experts: { w13: take(`layers.${i}.experts.w13`), w2: take(`layers.${i}.experts.w2`), first: shard.experts.start },
        nExpertsPerToken: spec.nExpertsPerToken,
      };
      return layer;
    }
    return { ...attention, ...dense(`layers.${i}`) };
  });

  const embed = take('embed');
  const cacheShape = [options.kvBlocks, plan.nKvHeadsPerRank, options.kvBlockSize, spec.headDim];
  const model: LlamaModel<AttentionWeights> = {
    spec,
    plan,
    shard,
    embed,
    layers,
    norm: take('norm'),
    lmHead: spec.tieWordEmbeddings ? embed : take('lmHead'),
    invFreq: float32Tensor(ops, ropeInvFreq(spec)),
    kvCache: layers.map(() => ({ k: ops.zeros('f32', cacheShape), v: ops.zeros('f32', cacheShape) })),
  };
  const feedForward = (spec.family === 'mixtral' ? moeFeedForward : denseFeedForward) as FeedForward<AttentionWeights>;
  return { model, feedForward };
}

/** Free every tensor the model holds now (device memory is not something the garbage collector sees). */
export function disposeRankModel({ model }: RankModel): void {
  const tensors: Tensor[] = [model.embed, model.norm, model.lmHead, model.invFreq, ...model.kvCache.flatMap((c) => [c.k, c.v])];
  const isTensor = (value: unknown): value is Tensor => typeof (value as Tensor | null)?.dispose === 'function';
  for (const layer of model.layers) {
    for (const value of Object.values(layer)) {
      if (isTensor(value)) tensors.push(value);
      else if (typeof value === 'object' && value !== null) tensors.push(...Object.values(value).filter(isTensor)); // stacked experts
    }
  }
  tensors.forEach((t) => t.dispose());
}
