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
 * Weight-only integer quantization of a projection [N, K] (or stacked experts [El, N, K]): int8 values [N, K], or
 * int4 packed two per byte along K ([N, K / 2] bytes: byte j holds column 2j in its low nibble and 2j + 1 in its
 * high nibble, each as the unsigned code value + 8, values -8..7), and scales [N, K / groupSize] of `scales`
 * beside it; value = q * scale of its group. Symmetric: scale = max |w| of the group / 127 (int8) or / 7 (int4),
 * rounded to the scales' dtype first, q = round(w / scale) clamped to -127..127 or -8..7. `groupSize` counts
 * columns of the tensor the format describes; 'channel' is one group spanning each row (scales [N, 1]).
 */
export interface QuantizedFormat {
  readonly kind: 'int8' | 'int4';
  readonly groupSize: number | 'channel';
  readonly scales: WeightDType;
}

/** The group sizes a grouped checkpoint may use (along K; 'channel' is the other choice). */
export const GROUP_SIZES: readonly number[] = [32, 64, 128, 256];

/**
 * A model's quantization (ModelSpec.quantization): what its projections are, and whether the checkpoint holds
 * them quantized (config.json's `quantization` block) or dense, quantized by each rank as it loads (`--quantize`).
 */
export interface WeightQuantization {
  readonly kind: 'int8' | 'int4';
  readonly groupSize: number | 'channel';
  readonly atLoad: boolean;
  /**
   * The LM head in the projections' format too (config.json's `quantization.lm_head`, or `--quantize-lm-head`), as
   * gpt-fast quantizes it: at one token it is the largest single read of a step (Llama-3-8B's 128256 x 4096 bf16
   * rows are 1.05 GB). Absent or false: dense, as GPTQ/AWQ checkpoints keep it.
   */
  readonly lmHead?: boolean;
  /** A GPTQ/AWQ checkpoint (config.json's quantization_config): its packed tensors become `kind` as each rank loads them */
  readonly packed?: PackedInt4Config;
}

/** How a GPTQ or AWQ checkpoint packs its 4-bit projections (core/packed-int4.ts reads them). */
export interface PackedInt4Config {
  readonly method: 'gptq' | 'awq';
  /** input columns per group; 'channel' (group_size -1): one group spans K */
  readonly groupSize: number | 'channel';
  /** added to a stored zero point (GPTQ v1 stores z - 1) */
  readonly zeroOffset: 0 | 1;
  /** GPTQ's sym: every zero point is 8, so the projections are int4 as they stand */
  readonly symmetric: boolean;
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
  if (format.kind === 'dense') return format.dtype;
  const groups = format.groupSize === 'channel' ? 'per channel' : `groups of ${format.groupSize}`;
  return `${format.kind} (${groups}, ${format.scales} scales)`;
}

/** The format of a quantized projection, bf16 scales. */
export function quantizedFormat(q: Pick<WeightQuantization, 'kind' | 'groupSize'>): QuantizedFormat {
  return { kind: q.kind, groupSize: q.groupSize, scales: 'bf16' };
}

export function sameFormat(a: WeightFormat, b: WeightFormat): boolean {
  return formatName(a) === formatName(b);
}

/** The dtype the engine uploads a tensor as; `what` names the tensor when the format is one weft cannot run yet. */
export function denseDType(format: WeightFormat, what: string): WeightDType {
  if (format.kind !== 'dense') throw new WeftError('WEFT_UNSUPPORTED_MODEL', `${what}: weights in ${formatName(format)} are not supported yet`);
  return format.dtype;
}

/** Bytes a tensor of this format and shape occupies in host memory (a quantized one's values; scales apart). */
export function formatBytes(format: WeightFormat, shape: readonly number[], what: string): number {
  const numel = shape.reduce((a, d) => a * d, 1);
  if (format.kind === 'int8') return numel;
  if (format.kind === 'int4') return numel / 2;
  return numel * dtypeBytes(denseDType(format, what));
}

/** Scales [..., N, K / groupSize] of a quantized tensor [..., N, K] (one column per row for 'channel'). */
export function scalesShape(format: QuantizedFormat, shape: readonly number[]): number[] {
  const k = shape.at(-1)!;
  return [...shape.slice(0, -1), format.groupSize === 'channel' ? 1 : k / format.groupSize];
}

/** Bytes of the values and of the scales of a tensor: what a rank reads and holds for it. */
export function storedBytes(format: WeightFormat, shape: readonly number[], what: string): number {
  const values = formatBytes(format, shape, what);
  if (format.kind === 'dense') return values;
  return values + scalesShape(format, shape).reduce((a, d) => a * d, 1) * dtypeBytes(format.scales);
}

/**
 * Why a grouped quantization cannot take these input widths (the K of each projection as one rank holds it,
 * named): a group must lie inside one rank's columns, and int4 needs an even K. Empty when it fits.
 */
export function groupProblems(q: Pick<WeightQuantization, 'kind' | 'groupSize'>, widths: Readonly<Record<string, number>>): string[] {
  const problems: string[] = [];
  for (const [name, k] of Object.entries(widths)) {
    if (q.groupSize !== 'channel' && k % q.groupSize !== 0) problems.push(`${name} has ${k} input columns, not a multiple of group size ${q.groupSize}`);
    else if (q.kind === 'int4' && k % 2 !== 0) problems.push(`${name} has ${k} input columns, odd (int4 packs two per byte)`);
  }
  return problems;
}

/** The group sizes (GROUP_SIZES, then 'channel') whose groups fit these widths, for refusals. */
export function workingGroupSizes(kind: WeightQuantization['kind'], widths: Readonly<Record<string, number>>): string {
  const sizes = [...GROUP_SIZES, 'channel' as const].filter((groupSize) => groupProblems({ kind, groupSize }, widths).length === 0);
  return sizes.length > 0 ? sizes.join(', ') : 'none';
}
