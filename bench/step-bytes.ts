/**
 * The bytes one decode step must read, and the time that takes at a measured read bandwidth (the floor every
 * decode figure is set beside): the weights (Mixtral: only the experts a batch can route to) and the KV cache
 * the step attends over. Shared by bench/decode.ts (in-process) and bench/product.ts (weft generate / serve).
 */
import type { ModelSpec } from '../core/model-spec.ts';
import type { ShardPlan } from '../core/shard-plan.ts';
import { shardLayout, type ShardTensor } from '../worker/weights/load-shard.ts';
import { storedBytes } from '../core/weight-format.ts';

export interface StepBytes {
  /** every weight of the rank but the embedding table (a step reads B rows of it, negligible) */
  readonly weightBytes: number;
  /** the Mixtral experts' share of weightBytes (0 for a dense model) */
  readonly expertBytes: number;
  /** weights a step of `batch` sequences reads */
  activeWeightBytes(batch: number): number;
  /** K and V of `batch` sequences of `context` positions each */
  kvBytes(batch: number, context: number): number;
  /** activeWeightBytes + kvBytes */
  bytesPerStep(batch: number, context: number): number;
}

/** `kvElementBytes`: bytes per K or V element of the cache (core/kv-block-table.ts kvDtypeBytes). */
export function stepBytes(spec: ModelSpec, plan: ShardPlan, rank: number, kvElementBytes: number): StepBytes {
  const elementBytes = spec.dtype === 'f32' ? 4 : 2;
  // quantized projections: their values and scales (storedBytes); dense tensors at the checkpoint's dtype
  const tensorBytes = (t: ShardTensor): number => (t.format.kind === 'dense' ? t.shape.reduce((a, b) => a * b, 1) * elementBytes : storedBytes(t.format, t.shape, t.name));
  const layout = shardLayout(spec, plan, rank);
  // the LM head counted once, by its own rows, whether or not it aliases the embedding
  const weightBytes = layout.filter((t) => t.name !== 'embed').reduce((sum, t) => sum + tensorBytes(t), 0);
  const expertBytes = layout.filter((t) => t.name.includes('.experts.')).reduce((sum, t) => sum + tensorBytes(t), 0);
  // Mixtral reads only the experts its router picks: nExpertsPerToken of nExperts per layer and token
  // (batch 1; a batch reads the union of its rows' choices, at most all of them).
  const activeWeightBytes = (batch: number): number =>
    weightBytes - expertBytes + (spec.nExperts ? expertBytes * Math.min(1, (batch * spec.nExpertsPerToken) / spec.nExperts) : 0);
  const kvBytes = (batch: number, context: number): number => spec.nLayers * batch * context * plan.nKvHeadsPerRank * spec.headDim * kvElementBytes * 2;
  return { weightBytes, expertBytes, activeWeightBytes, kvBytes, bytesPerStep: (batch, context) => activeWeightBytes(batch) + kvBytes(batch, context) };
}

/** Milliseconds to read `bytes` at `bandwidthGBs` (GB/s, 1e9 bytes). */
export function floorMs(bytes: number, bandwidthGBs: number): number {
  return (bytes / (bandwidthGBs * 1e9)) * 1e3;
}
