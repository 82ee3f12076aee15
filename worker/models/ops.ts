/**
 * The operation set model code is written against: the native engine (CPU or CUDA backend, same surface)
 * plus a few conveniences for building small index tensors. Model files import only this and the
 * collectives interface.
 */
import type { Engine, Tensor } from '../native.ts';

export type Ops = Engine;
export type { Tensor };

export function int32Tensor(ops: Ops, values: readonly number[] | Int32Array, shape: number[] = [values.length]): Tensor {
  const array = values instanceof Int32Array ? values : Int32Array.from(values);
  return ops.upload(new Uint8Array(array.buffer, array.byteOffset, array.byteLength), 'i32', shape);
}

export function float32Tensor(ops: Ops, values: readonly number[] | Float32Array, shape: number[] = [values.length]): Tensor {
  const array = values instanceof Float32Array ? values : Float32Array.from(values);
  return ops.upload(new Uint8Array(array.buffer, array.byteOffset, array.byteLength), 'f32', shape);
}

/**
 * The per-step index tensors every layer reads. The KV cache per layer is a pool of blocks, k and v
 * [nBlocks, nKvHeadsPerRank, B, headDim] f32 (B positions per block, the caches' dim 2); a sequence owns a
 * list of blocks, one row of `kvBlockTable`: block j of the sequence holds its positions [j B, (j + 1) B), so
 * token t's position p lives in block kvBlockTable[tokenSeq[t]][p / B], row p % B. One block per sequence
 * (B = maxContext, a table [S, 1]) is the special case; a paged cache changes only the allocator.
 */
export interface StepIndex {
  readonly tokenIds: Tensor; // [T] i32
  readonly positions: Tensor; // [T] i32
  readonly tokenSeq: Tensor; // [T] i32: the row of kvBlockTable of each token's sequence
  readonly kvBlockTable: Tensor; // [S, maxBlocksPerSeq] i32: physical block ids per sequence
  readonly logitRows: Tensor; // [R] i32: batch rows whose logits the step returns
  readonly sparqR: Tensor; // [T] i32: SparQ's r per token (read only by a model with SparQ state; core/sparq.ts)
  readonly sparqK: Tensor; // [T] i32: SparQ's k per token (2^30: exact)
  /** [S, 3] i32: each table row's Sage state slot (sage-state.ts), on eager steps of a model that keeps the state */
  readonly sageSlots?: Tensor;
  /** every token attended exactly: a model with SparQ's state keeps it and takes the dense kernels (runner.ts) */
  readonly sparqExact?: boolean;
  /** decode steps whose sequences share leading KV blocks: attention reads them once per group (worker/prefix-groups.ts) */
  readonly prefixGroups?: PrefixGroups;
  /** the step's every layer fits the step arena: the forward keeps them rather than release each (Engine.releaseLayer) */
  readonly keepLayers?: boolean;
  /** the first rows, each its sequence's only one (leadingDecodeRows): attention runs them as a decode batch */
  readonly decodeRows?: number;
  /** [1] i32, graph steps: the batch's real rows; the rest pad it to its bucket and choose no expert (routeTopK) */
  readonly rowsInUse?: Tensor;
}

/**
 * How many rows at the start of a step are each their sequence's only row: a mixed step's decode rows, which the
 * step composer puts before the prompt chunks. Attention gives them the decode kernel (Engine.attention's
 * decodeRows), where a prefill tile of 64 of them would walk each one's whole context in turn.
 */
export function leadingDecodeRows(tokenSeq: readonly number[]): number {
  const rows = new Map<number, number>();
  for (const s of tokenSeq) rows.set(s, (rows.get(s) ?? 0) + 1);
  let n = 0;
  while (n < tokenSeq.length && rows.get(tokenSeq[n]!) === 1) n++;
  return n;
}

/** Engine.attentionBifurcated's descriptors. */
export interface PrefixGroups {
  readonly tokenGroup: Tensor; // [T] i32: each token's group, -1 for none
  readonly groupShared: Tensor; // [G] i32: positions [0, groupShared[g]) group g's members share
}
