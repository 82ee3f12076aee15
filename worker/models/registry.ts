/**
 * The model families weft runs, and the rank-local model built from one: lookup by Hugging Face architecture,
 * then the family's layout table walked once to take every weight (each checked against the layout's shape
 * and format before it reaches the engine). Norms are kept as stored (the engine reads any float dtype). The
 * KV cache is allocated here, once: `kvBlocks` blocks of `kvBlockSize` positions of `kvDtype` (core/kv-block-table.ts).
 */
import type { ModelSpec } from '../../core/model-spec.ts';
import { ropeInvFreq } from '../../core/model-spec.ts';
import type { ShardPlan } from '../../core/shard-plan.ts';
import { dense, denseDType, formatBytes, formatName, quantizedFormat, sameFormat, scalesShape, type QuantizedFormat } from '../../core/weight-format.ts';
import { bf16Bits } from '../../core/weight-quantize.ts';
import { WeftError } from '../../core/errors.ts';
import { kvNativeDtype, type KvCacheLayout } from '../../core/kv-block-table.ts';
import type { CollectivePlan } from '../collectives/collectives.ts';
import type { HostTensor, ShardTensor } from '../weights/layout.ts';
import type { LayoutContext, ModelFamily } from './family.ts';
import type { AttentionWeights, FeedForward, LlamaModel } from './llama.ts';
import { llamaFamily } from './llama-family.ts';
import { mixtralFamily } from './mixtral-family.ts';
import { float32Tensor, type Ops, type Tensor } from './ops.ts';

/** Every family weft runs; a new one is a module and a line here. */
export const FAMILIES: readonly ModelFamily[] = [llamaFamily, mixtralFamily];

export interface RankModel {
  readonly model: LlamaModel<AttentionWeights>;
  readonly feedForward: FeedForward<AttentionWeights>;
  /** What the forward's collectives carry, for `Collectives.prepare`: the logits gather's vocab columns per rank. */
  readonly collectivePlan: CollectivePlan;
}

/**
 * The KV cache's sizes and element type (a KvCacheLayout serves): `kvBlocks` blocks per layer (core/kv-block-table.ts:
 * today one per sequence, plus a padding block on CUDA) of `kvBlockSize` positions.
 */
export type BuildOptions = Pick<KvCacheLayout, 'kvBlocks' | 'kvBlockSize' | 'kvDtype'>;

/** Gives the engine tensor for one tensor of the rank's layout (its name, shape and expected format). */
export type WeightSource = (expected: ShardTensor) => Tensor;

/** The family module serving `spec.architecture`; WEFT_UNSUPPORTED_MODEL naming the architectures weft runs otherwise. */
export function familyOf(spec: Pick<ModelSpec, 'architecture'>): ModelFamily {
  const family = FAMILIES.find((f) => f.architectures.includes(spec.architecture));
  if (!family) {
    const supported = FAMILIES.flatMap((f) => f.architectures).join(', ');
    throw new WeftError('WEFT_UNSUPPORTED_MODEL', `architecture ${spec.architecture} is not supported; weft runs ${supported}`);
  }
  return family;
}

/** Rank `rank`'s slices and the formats its tensors take: the checkpoint's dtype, projections quantized if the spec says so. */
export function layoutContext(spec: ModelSpec, plan: ShardPlan, rank: number): LayoutContext {
  const shard = plan.ranks[rank];
  if (!Number.isInteger(rank) || shard === undefined || shard.rank !== rank) {
    throw new WeftError('WEFT_BAD_SHARD', `rank ${rank} is not in the shard plan (tp=${plan.tp}: ranks 0..${plan.tp - 1})`);
  }
  const matrixFormat = spec.quantization ? quantizedFormat(spec.quantization) : dense(spec.dtype);
  return { spec, shard, matrixFormat, denseFormat: dense(spec.dtype) };
}

/** Weights read from the checkpoint (loadShard), uploaded one by one; each host copy is dropped once uploaded. */
export function hostWeights(ops: Ops, rank: number, weights: Map<string, HostTensor>): WeightSource {
  return (expected) => {
    const host = weights.get(expected.name);
    if (!host) throw new WeftError('WEFT_BAD_WEIGHTS', `rank ${rank}: tensor ${expected.name} was not loaded`);
    checkHostTensor(rank, expected, host);
    weights.delete(expected.name);
    if (host.format.kind === 'dense') return ops.upload(host.data, denseDType(host.format, expected.name), [...host.shape]);
    return uploadQuantized(ops, host.format, host.shape, host.data, host.scales!);
  };
}

/**
 * hostWeights' uploads done ahead, in the layout's order, the event loop given a turn after each tensor: a worker
 * putting 20+ GB on its device stays responsive to the coordinator's heartbeat watch (`weft serve` declares a rank
 * silent for 4 s dead), where buildRankModel's one synchronous pass held the loop for longer (Mixtral-8x7B's 8
 * layers, 22.6 GB, on an H200). The same checks, before each upload; the source hands each tensor out once.
 */
export async function uploadWeights(ops: Ops, spec: ModelSpec, plan: ShardPlan, rank: number, weights: Map<string, HostTensor>): Promise<WeightSource> {
  const fromHost = hostWeights(ops, rank, weights);
  const uploaded = new Map<string, Tensor>();
  for (const t of familyOf(spec).layout(layoutContext(spec, plan, rank))) {
    if (t.aliasOf !== null) continue;
    uploaded.set(t.name, fromHost(t));
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
  return (expected) => {
    const t = uploaded.get(expected.name);
    if (!t) throw new WeftError('WEFT_BAD_WEIGHTS', `rank ${rank}: tensor ${expected.name} was not uploaded`);
    uploaded.delete(expected.name);
    return t;
  };
}

/** A quantized weight: its bf16 scales, then its values holding them (the scales tensor lives as long as the weight). */
function uploadQuantized(ops: Ops, format: QuantizedFormat, shape: readonly number[], data: Uint8Array, scales: Uint8Array): Tensor {
  const scalesTensor = ops.upload(scales, format.scales, scalesShape(format, shape));
  return ops.uploadQuantized(data, format.kind === 'int8' ? 'i8' : 'i4', [...shape], scalesTensor);
}

/** The one check before the native upload: shape, format and byte counts (values, scales) against what the layout expects. */
function checkHostTensor(rank: number, expected: ShardTensor, host: HostTensor): void {
  const sameShape = host.shape.length === expected.shape.length && host.shape.every((d, i) => d === expected.shape[i]);
  if (!sameShape || !sameFormat(host.format, expected.format)) {
    throw new WeftError(
      'WEFT_BAD_WEIGHTS',
      `rank ${rank}: tensor ${expected.name} is ${formatName(host.format)} [${host.shape.join(', ')}], the layout expects ${formatName(expected.format)} [${expected.shape.join(', ')}]`,
    );
  }
  const bytes = formatBytes(expected.format, expected.shape, expected.name);
  if (host.data.byteLength !== bytes) {
    throw new WeftError('WEFT_BAD_WEIGHTS', `rank ${rank}: tensor ${expected.name} holds ${host.data.byteLength} bytes, its ${formatName(expected.format)} [${expected.shape.join(', ')}] takes ${bytes}`);
  }
  const scalesBytes = expected.format.kind === 'dense' ? 0 : scalesShape(expected.format, expected.shape).reduce((a, d) => a * d, 1) * 2;
  if ((host.scales?.byteLength ?? 0) !== scalesBytes) {
    throw new WeftError('WEFT_BAD_WEIGHTS', `rank ${rank}: tensor ${expected.name} has ${host.scales?.byteLength ?? 0} bytes of scales, its ${formatName(expected.format)} [${expected.shape.join(', ')}] takes ${scalesBytes}`);
  }
}

/** Random weights of the real shapes and formats, made on the device (benchmarks need no checkpoint). */
export function randomWeights(ops: Ops, seed: number): WeightSource {
  let counter = 0;
  return ({ name, shape, format }) => {
    if (format.kind !== 'dense') return randomQuantized(ops, format, shape, seed + counter++);
    const isNorm = shape.length === 1;
    // Norm weights near 1 and matrices with unit-scale rows keep activations finite over many layers.
    return ops.randomUniform(denseDType(format, name), [...shape], seed + counter++, isNorm ? 1 : 1 / Math.sqrt(shape.at(-1) ?? 1));
  };
}

/**
 * Random codes (uniform over every code) with one scale per tensor, so dequantized rows have unit-scale norms as
 * the dense random weights do. Made on the host (no device op makes integer codes); a xorshift stream per seed.
 */
function randomQuantized(ops: Ops, format: QuantizedFormat, shape: readonly number[], seed: number): Tensor {
  const data = new Uint8Array(formatBytes(format, shape, 'random'));
  const words = new Uint32Array(data.buffer, 0, data.length >> 2);
  let x = (seed * 2654435761 + 1) >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
  const k = shape.at(-1)!;
  const scaleBits = bf16Bits(1 / Math.sqrt(k) / (format.kind === 'int8' ? 127 : 7));
  const scales = new Uint16Array(scalesShape(format, shape).reduce((a, d) => a * d, 1)).fill(scaleBits);
  return uploadQuantized(ops, format, shape, data, new Uint8Array(scales.buffer));
}

export function buildRankModel(ops: Ops, spec: ModelSpec, plan: ShardPlan, rank: number, take: WeightSource, options: BuildOptions): RankModel {
  const family = familyOf(spec);
  const ctx = layoutContext(spec, plan, rank);
  const tensors = new Map<string, Tensor>();
  for (const t of family.layout(ctx)) tensors.set(t.name, t.aliasOf === null ? take(t) : tensors.get(t.aliasOf)!);
  const weight = (name: string): Tensor => {
    const t = tensors.get(name);
    if (!t) throw new WeftError('WEFT_BAD_WEIGHTS', `the ${family.name} layout has no tensor ${name}`);
    return t;
  };
  const layers = Array.from({ length: spec.nLayers }, (_, i) => family.layer(weight, ctx, i));
  const cacheShape = [options.kvBlocks, plan.nKvHeadsPerRank, options.kvBlockSize, spec.headDim];
  const model: LlamaModel<AttentionWeights> = {
    spec,
    plan,
    shard: ctx.shard,
    embed: weight('embed'),
    layers,
    norm: weight('norm'),
    lmHead: weight('lmHead'),
    invFreq: float32Tensor(ops, ropeInvFreq(spec)),
    kvCache: layers.map(() => ({ k: ops.zeros(kvNativeDtype(options.kvDtype), cacheShape), v: ops.zeros(kvNativeDtype(options.kvDtype), cacheShape) })),
  };
  const collectivePlan = { gatherWidths: plan.ranks.map((r) => r.vocab.end - r.vocab.start) };
  return { model, feedForward: family.feedForward, collectivePlan };
}

/** Free every tensor the model holds now (device memory is not something the garbage collector sees). */
export function disposeRankModel({ model }: RankModel): void {
  const tensors: Tensor[] = [model.embed, model.norm, model.lmHead, model.invFreq, ...model.kvCache.flatMap((c) => [c.k, c.v])];
  tensors.push(...(model.sparq?.layers.flatMap((l) => [l.kT, l.vSum]) ?? []));
  const isTensor = (value: unknown): value is Tensor => typeof (value as Tensor | null)?.dispose === 'function';
  for (const layer of model.layers) {
    for (const value of Object.values(layer)) {
      if (isTensor(value)) tensors.push(value);
      else if (typeof value === 'object' && value !== null) tensors.push(...Object.values(value).filter(isTensor)); // stacked experts
    }
  }
  tensors.forEach((t) => t.dispose());
}
