/**
 * Llama 2/3 and Mistral: embedding, per layer attention (fused q/k/v rows, o columns) and a dense SwiGLU MLP
 * (fused gate/up rows, down columns), vocab-parallel embedding and LM head. The attention and embedding rows
 * are shared with the families built on Llama's blocks (mixtral-family.ts).
 */
import { len, rows, cols, scale, tensor, whole, type ShardTensor } from '../weights/layout.ts';
import { defineFamily, perLayer, type LayoutContext } from './family.ts';
import { denseFeedForward, type AttentionWeights, type DenseFeedForward } from './llama.ts';
import type { Tensor } from './ops.ts';

/**
 * embed, norm, lmHead: the vocab rows of this rank. A tied LM head is the embedding's bytes; a quantized one
 * (quantization.lmHead) takes the projections' format, and when tied (quantized at load) reads the embedding's rows.
 */
export function embeddingTensors({ spec, shard, matrixFormat, denseFormat }: LayoutContext): ShardTensor[] {
  const { hidden, vocabSize } = spec;
  const vocabRows = len(shard.vocab);
  const embedRows = rows('model.embed_tokens.weight', [vocabSize, hidden], shard.vocab);
  const quantizedHead = spec.quantization?.lmHead === true;
  const headRows = spec.tieWordEmbeddings ? embedRows : rows('lm_head.weight', [vocabSize, hidden], shard.vocab);
  const lmHead = tensor('lmHead', [vocabRows, hidden], quantizedHead ? matrixFormat : denseFormat, [headRows]);
  return [
    tensor('embed', [vocabRows, hidden], denseFormat, [embedRows]),
    tensor('norm', [hidden], denseFormat, [whole('model.norm.weight', [hidden])]),
    spec.tieWordEmbeddings && !quantizedHead ? { ...lmHead, aliasOf: 'embed' } : lmHead,
  ];
}

/** Layer i's norms and attention: this rank's query heads and kv heads, q/k/v fused by rows, o cut by columns. */
export function attentionTensors({ spec, shard, matrixFormat, denseFormat }: LayoutContext, i: number): ShardTensor[] {
  const { hidden, headDim: hd } = spec;
  const hf = `model.layers.${i}.`;
  const at = `layers.${i}.`;
  const qRows = scale(shard.qHeads, hd);
  const kvRows = scale(shard.kvHeads, hd);
  return [
    tensor(`${at}attnNorm`, [hidden], denseFormat, [whole(`${hf}input_layernorm.weight`, [hidden])]),
    tensor(`${at}ffnNorm`, [hidden], denseFormat, [whole(`${hf}post_attention_layernorm.weight`, [hidden])]),
    tensor(`${at}wqkv`, [len(qRows) + 2 * len(kvRows), hidden], matrixFormat, [
      rows(`${hf}self_attn.q_proj.weight`, [spec.nHeads * hd, hidden], qRows),
      rows(`${hf}self_attn.k_proj.weight`, [spec.nKvHeads * hd, hidden], kvRows),
      rows(`${hf}self_attn.v_proj.weight`, [spec.nKvHeads * hd, hidden], kvRows),
    ]),
    tensor(`${at}wo`, [hidden, len(qRows)], matrixFormat, [cols(`${hf}self_attn.o_proj.weight`, [hidden, spec.nHeads * hd], qRows)]),
  ];
}

export function attentionWeights(weight: (name: string) => Tensor, i: number): AttentionWeights {
  const at = `layers.${i}.`;
  return { attnNorm: weight(`${at}attnNorm`), wqkv: weight(`${at}wqkv`), wo: weight(`${at}wo`), ffnNorm: weight(`${at}ffnNorm`) };
}

/** Layer i's MLP: gate and up rows of this rank's intermediate slice fused, down cut by the same columns. */
function mlpTensors({ spec, shard, matrixFormat }: LayoutContext, i: number): ShardTensor[] {
  const { hidden, ffnDim } = spec;
  const hf = `model.layers.${i}.mlp.`;
  const ffn = shard.ffn;
  return [
    tensor(`layers.${i}.w13`, [2 * len(ffn), hidden], matrixFormat, [rows(`${hf}gate_proj.weight`, [ffnDim, hidden], ffn), rows(`${hf}up_proj.weight`, [ffnDim, hidden], ffn)]),
    tensor(`layers.${i}.w2`, [hidden, len(ffn)], matrixFormat, [cols(`${hf}down_proj.weight`, [hidden, ffnDim], ffn)]),
  ];
}

export const llamaFamily = defineFamily<AttentionWeights & DenseFeedForward>({
  name: 'llama',
  architectures: ['LlamaForCausalLM', 'MistralForCausalLM'],
  layout: (ctx) => [...embeddingTensors(ctx), ...perLayer(ctx.spec, (i) => [...attentionTensors(ctx, i), ...mlpTensors(ctx, i)])],
  layer: (weight, _ctx, i) => ({ ...attentionWeights(weight, i), w13: weight(`layers.${i}.w13`), w2: weight(`layers.${i}.w2`) }),
  feedForward: denseFeedForward,
});
