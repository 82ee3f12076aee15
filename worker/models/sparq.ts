/**
 * SparQ's state beside a rank's paged KV cache, allocated only when the cluster runs with `--attention sparq`:
 * per layer kT [kvBlocks, nKvHeadsPerRank, headDim, kvBlockSize] (K transposed within each block, the cache's dtype,
 * so r key columns of a block are r contiguous runs) and vSum [kvBlocks, nKvHeadsPerRank, headDim] f32 (each full
 * block's V row sum, so the mean of V costs a 1/kvBlockSize share of the V reads and follows shared prefix blocks).
 * Both are kept by `sparqAppend` after qkvRope wrote the step's rows.
 */
import { WeftError } from '../../core/errors.ts';
import { checkSparqSetting, type SparqSetting } from '../../core/sparq.ts';
import type { ModelSpec } from '../../core/model-spec.ts';
import type { ShardPlan } from '../../core/shard-plan.ts';
import type { KvCacheLayout } from '../../core/kv-block-table.ts';
import type { Ops, StepIndex, Tensor } from './ops.ts';

export interface SparqState {
  readonly setting: SparqSetting; // the cluster's r and k, for tokens whose step names none
  readonly layers: readonly { readonly kT: Tensor; readonly vSum: Tensor }[];
}

/** The CUDA kernels serve steps of at most this many tokens (kSparqMaxTokens): longer steps run in chunks of it. */
export const SPARQ_MAX_STEP_TOKENS = 64;

export function allocateSparqState(ops: Ops, spec: ModelSpec, plan: ShardPlan, kv: Pick<KvCacheLayout, 'kvBlocks' | 'kvBlockSize' | 'kvDtype'>, setting: SparqSetting): SparqState {
  checkSparqSetting(setting, spec, ops.backend, 'WEFT_BAD_CONFIG');
  const nKv = plan.nKvHeadsPerRank;
  // the transposed K has the cache's element type: f32 or bf16 (cluster-plan.ts refuses SparQ with an fp8/int8 cache)
  if (kv.kvDtype !== 'f32' && kv.kvDtype !== 'bf16') throw new WeftError('WEFT_BAD_CONFIG', `SparQ reads f32 or bf16 KV caches, not ${kv.kvDtype}`);
  const kvDtype = kv.kvDtype;
  const layers = Array.from({ length: spec.nLayers }, () => ({
    kT: ops.zeros(kvDtype, [kv.kvBlocks, nKv, spec.headDim, kv.kvBlockSize]),
    vSum: ops.zeros('f32', [kv.kvBlocks, nKv, spec.headDim]),
  }));
  return { setting, layers };
}

/** Bytes of SparQ's state per layer: a second K and the block sums (for the arena and memory budgets). */
export function sparqBytesPerLayer(spec: Pick<ModelSpec, 'headDim'>, nKvHeadsPerRank: number, kv: Pick<KvCacheLayout, 'kvBlocks' | 'kvBlockSize'>, kvDtypeBytes: number): number {
  return kv.kvBlocks * nKvHeadsPerRank * spec.headDim * (kv.kvBlockSize * kvDtypeBytes + 4);
}

/** The state takes the step's new rows (every step does, whichever kernel attends it). */
export function keepSparqState(ops: Ops, state: SparqState, layerIndex: number, cache: { k: Tensor; v: Tensor }, step: StepIndex): { kT: Tensor; vSum: Tensor } {
  const { kT, vSum } = state.layers[layerIndex]!;
  ops.sparqAppend(kT, vSum, cache.k, cache.v, step.tokenSeq, step.kvBlockTable, step.positions);
  return { kT, vSum };
}

/**
 * The attention of one layer with SparQ: the state takes the step's new rows, then each token attends with its
 * own r and k (step.sparqR, step.sparqK; a token of length <= k exactly). q [T, nHeadsPerRank headDim] f32.
 */
export function sparqAttention(ops: Ops, state: SparqState, layerIndex: number, cache: { k: Tensor; v: Tensor }, q: Tensor, step: StepIndex, nHeads: number, scale: number): Tensor {
  const { kT, vSum } = keepSparqState(ops, state, layerIndex, cache, step);
  return ops.sparqAttention(q, cache.k, cache.v, kT, vSum, step.tokenSeq, step.kvBlockTable, step.positions, step.sparqR, step.sparqK, nHeads, scale);
}
