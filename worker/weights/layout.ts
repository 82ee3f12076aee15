/**
 * The vocabulary of a family's weight layout: which tensors a rank holds, in which format, and which slices of
 * which checkpoint tensors fill each one. Families write their layout as a table of these rows
 * (worker/models/*-family.ts); loadShard and the model builder walk it without knowing the family.
 */
import type { Range } from '../../core/shard-plan.ts';
import { dense, type WeightDType, type WeightFormat } from '../../core/weight-format.ts';

/** Where one part of a weft tensor comes from: a whole HF tensor, a row range, or a column range of a matrix. */
export interface SourceSlice {
  readonly hfName: string;
  readonly hfShape: readonly number[]; // the full tensor's shape the spec implies
  readonly cut: 'all' | 'rows' | 'cols';
  readonly range: Range | null; // rows or columns taken; null for 'all'
}

/** A tensor this rank holds: its parts' bytes are concatenated, in order (along dim 0). */
export interface ShardTensor {
  readonly name: string;
  readonly shape: readonly number[];
  readonly format: WeightFormat; // what the checkpoint must store and the engine receives
  readonly sources: readonly SourceSlice[];
  /** Same bytes as another tensor of the shard (tied LM head = embedding rows); read once, shared. */
  readonly aliasOf: string | null;
  /** The checkpoint's dtype when it is narrower than `format` (f32): the values are widened at load, exactly. */
  readonly widenedFrom?: WeightDType;
}

/** One tensor's bytes in host memory, raw little-endian, as loaded for one rank. */
export interface HostTensor {
  readonly format: WeightFormat;
  readonly shape: readonly number[];
  readonly data: Uint8Array;
  /** A quantized tensor's scales, raw bf16 [..., N, K / group] (scalesShape); null for a dense one. */
  readonly scales: Uint8Array | null;
}

export function tensor(name: string, shape: number[], format: WeightFormat, sources: SourceSlice[]): ShardTensor {
  return { name, shape, format, sources, aliasOf: null };
}
/**
 * A dense tensor held in f32 whatever the checkpoint stores (bf16 and f16 values widen exactly): for small
 * tensors whose products must not round their input to 16 bits, the Mixtral router (a near-tie of two experts'
 * logits flips the routing on a rounding).
 */
export function widenedToF32(t: ShardTensor): ShardTensor {
  if (t.format.kind !== 'dense' || t.format.dtype === 'f32') return t;
  return { ...t, format: dense('f32'), widenedFrom: t.format.dtype };
}
export function whole(hfName: string, hfShape: number[]): SourceSlice {
  return { hfName, hfShape, cut: 'all', range: null };
}
export function rows(hfName: string, hfShape: number[], range: Range): SourceSlice {
  return { hfName, hfShape, cut: 'rows', range };
}
export function cols(hfName: string, hfShape: number[], range: Range): SourceSlice {
  return { hfName, hfShape, cut: 'cols', range };
}
export function scale(r: Range, k: number): Range {
  return { start: r.start * k, end: r.end * k };
}
export function len(r: Range): number {
  return r.end - r.start;
}
