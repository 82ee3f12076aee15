/**
 * Published model shapes for benchmarks with random weights, as the config.json each checkpoint ships
 * (parsed by the same code as a real model directory).
 */
import { parseModelConfig, type ModelSpec } from '../core/model-spec.ts';

const llamaBase = {
  hidden_act: 'silu',
  hidden_size: 4096,
  num_hidden_layers: 32,
  num_attention_heads: 32,
  rms_norm_eps: 1e-5,
  torch_dtype: 'bfloat16',
  bos_token_id: 1,
  eos_token_id: 2,
  tie_word_embeddings: false,
};

export const PRESETS: Record<string, Record<string, unknown>> = {
  'llama-2-7b': { ...llamaBase, architectures: ['LlamaForCausalLM'], model_type: 'llama', num_key_value_heads: 32, intermediate_size: 11008, vocab_size: 32000, max_position_embeddings: 4096, rope_theta: 10000 },
  'llama-3-8b': {
    ...llamaBase,
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    num_key_value_heads: 8,
    intermediate_size: 14336,
    vocab_size: 128256,
    max_position_embeddings: 8192,
    rope_theta: 500000,
    bos_token_id: 128000,
    eos_token_id: 128001,
  },
  'mistral-7b': { ...llamaBase, architectures: ['MistralForCausalLM'], model_type: 'mistral', num_key_value_heads: 8, intermediate_size: 14336, vocab_size: 32000, max_position_embeddings: 32768, rope_theta: 1000000, sliding_window: null },
  'mixtral-8x7b': {
    ...llamaBase,
    architectures: ['MixtralForCausalLM'],
    model_type: 'mixtral',
    num_key_value_heads: 8,
    intermediate_size: 14336,
    vocab_size: 32000,
    max_position_embeddings: 32768,
    rope_theta: 1000000,
    num_local_experts: 8,
    num_experts_per_tok: 2,
    sliding_window: null,
  },
};

export function presetSpec(name: string, overrides: Record<string, unknown> = {}): ModelSpec {
  const config = PRESETS[name];
  if (!config) throw new Error(`unknown preset ${name}; known: ${Object.keys(PRESETS).join(', ')}`);
  return parseModelConfig({ ...config, ...overrides }, `preset ${name}`);
}
