/**
 * How one weight tensor is stored: its format travels with the tensor (in a family's layout, in a loaded host
 * tensor) instead of one dtype for the whole model, so that a quantized projection can sit beside dense norms.
 * Checked once in TypeScript against what the layout expects, before the bytes reach the engine.
 */
import { WeftError } from './errors.ts';

export type WeightDType = 'f32' | 'f16' | 'bf16';

/** Plain floating-point values, as the checkpoint stores them (weft does not convert weights). */
export interface DenseFormat {
  readonly kind: 'dense';
  readonly dtype: WeightDType;
}

/**
 * Grouped integer quantization: the slot quantized projections will fill, declared so that every place that
 * handles a format already has to say what it does with one. Nothing produces it yet, and every consumer
 * refuses it (`denseDType`, `formatBytes`). Intended meaning: w [N, K] holds int8 values, or int4 packed two
 * per byte along K, and a scales tensor [N, K / groupSize] of `scales` beside it (the family's layout names
 * both); value = q * scale of its group.
 */
export interface QuantizedFormat {
  readonly kind: 'int8' | 'int4';
  readonly groupSize: number;
  readonly scales: WeightDType;
}

export type WeightFormat = DenseFormat | QuantizedFormat;

const DTYPE_BYTES: Readonly<Record<WeightDType, number>> = { f32: 4, f16: 2, bf16: 2 };

export function dense(dtype: WeightDType): DenseFormat {
  return { kind: 'dense', dtype };
}

export function dtypeBytes(dtype: WeightDType): number {
  return DTYPE_BYTES[dtype];
}

/** 'bf16' for a dense format; 'int4 (groups of 128, bf16 scales)' for a quantized one. For messages. */
export function formatName(format: WeightFormat): string {
  return format.kind === 'dense' ? format.dtype : `${format.kind} (groups of ${format.groupSize}, ${format.scales} scales)`;
}

export function sameFormat(a: WeightFormat, b: WeightFormat): boolean {
  return formatName(a) === formatName(b);
}

/** The dtype the engine uploads a tensor as; `what` names the tensor when the format is one weft cannot run yet. */
export function denseDType(format: WeightFormat, what: string): WeightDType {
  if (format.kind !== 'dense') throw new WeftError('WEFT_UNSUPPORTED_MODEL', `${what}: weights in ${formatName(format)} are not supported yet`);
  return format.dtype;
}

/** Bytes a tensor of this format and shape occupies in host memory. */
export function formatBytes(format: WeightFormat, shape: readonly number[], what: string): number {
  return shape.reduce((a, d) => a * d, 1) * dtypeBytes(denseDType(format, what));
}
