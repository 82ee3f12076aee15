/**
 * Quantized prefill attention (--prefill-attention), the setting both processes share: 'exact' (the default), or
 * SageAttention-style 'int8' (int8 Q K^T with K smoothed by its mean, P V in f16) or 'fp8' (P V in e4m3 as well).
 * It applies to steps of more than 64 tokens that are not decode batches; decode is untouched (the algorithm:
 * native/src/cuda/attention-sage.cuh). Checked once against the model and the other options before a cluster
 * starts.
 */
import { WeftError } from './errors.ts';
import type { ModelSpec } from './model-spec.ts';

export type PrefillAttention = 'exact' | 'int8' | 'fp8';

/**
 * Prompts per rank that keep their quantized blocks across their steps at once (--prefill-attention-slots; the
 * state: worker/models/sage-state.ts). One: the step composer gives a step's budget to the prompts in admission
 * order, so one long prompt at a time runs in chunks; a slot of Llama-2-7B at 32K positions is 8.6 GB (fp8).
 */
export const DEFAULT_PREFILL_ATTENTION_SLOTS = 1;

/** The CUDA kernels' head dimensions (sage_head_dim_supported). */
const CUDA_HEAD_DIMS: readonly number[] = [64, 128];

/** Refuse (WEFT_BAD_CONFIG) a quantized prefill attention this model or these options cannot use, naming the values. */
export function checkPrefillAttention(mode: PrefillAttention, spec: Pick<ModelSpec, 'headDim'>, device: 'cpu' | 'cuda', attention: 'dense' | 'sparq' = 'dense', slots = DEFAULT_PREFILL_ATTENTION_SLOTS): void {
  if (!Number.isSafeInteger(slots) || slots < 0) throw new WeftError('WEFT_BAD_CONFIG', `--prefill-attention-slots must be a whole number >= 0, got ${slots}`);
  if (mode === 'exact') return;
  if (device === 'cuda' && !CUDA_HEAD_DIMS.includes(spec.headDim))
    throw new WeftError('WEFT_BAD_CONFIG', `--prefill-attention ${mode} on cuda serves head dimensions ${CUDA_HEAD_DIMS.join(' and ')}; this model has ${spec.headDim}`);
  // SparQ's model attends every step itself (and its cuda steps are at most 64 tokens): the option would do nothing
  if (attention === 'sparq') throw new WeftError('WEFT_BAD_CONFIG', `--prefill-attention ${mode} does not combine with --attention sparq, which attends every step itself; use one of them`);
}

/** The P V operand type the engine's sageAttention takes for a quantized mode. */
export function sagePvType(mode: Exclude<PrefillAttention, 'exact'>): 'f16' | 'fp8' {
  return mode === 'fp8' ? 'fp8' : 'f16';
}
