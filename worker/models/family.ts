/**
 * A model family as a module: the Hugging Face architectures it serves, its weight layout (the tensors a rank
 * holds, their formats and the checkpoint slices that fill them, per the shard plan), how a layer of the rank
 * model is built from those tensors, and its feed-forward. worker/models/registry.ts lists the families;
 * adding one is a module like llama-family.ts and a line there (plus its config.json defaults in
 * core/model-spec.ts, which the coordinator reads without loading worker code).
 */
import type { ModelFamilyName, ModelSpec } from '../../core/model-spec.ts';
import type { RankShard } from '../../core/shard-plan.ts';
import type { WeightFormat } from '../../core/weight-format.ts';
import type { ShardTensor } from '../weights/layout.ts';
import type { AttentionWeights, FeedForward } from './llama.ts';
import type { Tensor } from './ops.ts';

/** What a layout is computed from: the model, this rank's slices, and the format each kind of tensor takes. */
export interface LayoutContext {
  readonly spec: ModelSpec;
  readonly shard: RankShard;
  /** projection matrices (q/k/v/o, MLP, experts; the LM head with quantization.lmHead): what a quantized checkpoint quantizes */
  readonly matrixFormat: WeightFormat;
  /** embedding, norms, router, and the LM head unless quantization.lmHead: dense in every checkpoint weft reads */
  readonly denseFormat: WeightFormat;
}

export interface ModelFamily<Layer extends AttentionWeights = AttentionWeights> {
  readonly name: ModelFamilyName;
  /** HF `architectures` names this module runs */
  readonly architectures: readonly string[];
  /** This rank's tensors in load order, named the weft way ('embed', 'norm', 'lmHead', 'layers.<i>.<part>'). Pure. */
  layout(ctx: LayoutContext): ShardTensor[];
  /** Layer i of the rank model, from the engine tensors of the layout's names. */
  layer(weight: (name: string) => Tensor, ctx: LayoutContext, i: number): Layer;
  readonly feedForward: FeedForward<Layer>;
}

/** A family as the registry holds it: its layer type is its own business (its builder and feed-forward agree on it). */
export function defineFamily<Layer extends AttentionWeights>(family: ModelFamily<Layer>): ModelFamily {
  return family as unknown as ModelFamily;
}

/** The layout rows of every layer, layer by layer. */
export function perLayer(spec: ModelSpec, rows: (i: number) => ShardTensor[]): ShardTensor[] {
  return Array.from({ length: spec.nLayers }, (_, i) => rows(i)).flat();
}
