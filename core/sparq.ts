/**
 * SparQ approximate decode attention, the setting both processes share: `r` of a head's `headDim` query components
 * pick the key columns that approximate every score, `k` positions get the exact attention (the algorithm:
 * native/src/cuda/attention-sparq.cuh). Checked once against the model before a cluster starts, and per request.
 */
import { WeftError } from './errors.ts';
import type { ModelSpec } from './model-spec.ts';

export interface SparqSetting {
  readonly r: number; // query components (key columns) scored, 1..headDim
  readonly k: number; // positions attended exactly, >= 1; a sequence no longer than k is attended exactly
}

/** The per-token values a step sends for a token attended densely: every position selected. */
export const DENSE_TOKEN: SparqSetting = { r: 1, k: 2 ** 30 };

/** The CUDA kernels keep a GQA group's query heads in registers (kSparqMaxGroup) and a head in shared memory (kMaxHd). */
const CUDA_MAX_GROUP = 8;
const CUDA_MAX_HEAD_DIM = 256;

/** Refuse (WEFT_BAD_REQUEST, or `code`) a setting SparQ cannot serve for this model on this device, naming the values. */
export function checkSparqSetting(setting: SparqSetting, spec: Pick<ModelSpec, 'headDim' | 'nHeads' | 'nKvHeads'>, device: 'cpu' | 'cuda', code: 'WEFT_BAD_REQUEST' | 'WEFT_BAD_CONFIG' = 'WEFT_BAD_REQUEST'): void {
  const { r, k } = setting;
  if (!Number.isInteger(r) || r < 1 || r > spec.headDim) throw new WeftError(code, `SparQ r = ${r} must be an integer from 1 to the model's head dimension ${spec.headDim}`);
  if (!Number.isInteger(k) || k < 1) throw new WeftError(code, `SparQ k = ${k} must be an integer >= 1`);
  const group = spec.nHeads / spec.nKvHeads;
  if (device === 'cuda' && (group > CUDA_MAX_GROUP || spec.headDim > CUDA_MAX_HEAD_DIM))
    throw new WeftError(code, `SparQ on cuda serves GQA groups of at most ${CUDA_MAX_GROUP} query heads per KV head and head dimensions of at most ${CUDA_MAX_HEAD_DIM}; this model has ${group} and ${spec.headDim}`);
}
