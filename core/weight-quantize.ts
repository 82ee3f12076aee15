/**
 * The arithmetic of weight-only quantization (core/weight-format.ts QuantizedFormat), shared by `weft quantize`
 * (coordinator/quantize.ts) and quantization at load (worker/weights/quantize-at-load.ts): symmetric per group,
 * scale = max |w| / 127 (int8) or / 7 (int4) rounded to bf16 first, q = round(w / scale) clamped; dequantized
 * value = q * scale in fp32, which is what every backend computes with.
 */
import type { QuantizedFormat, WeightDType } from './weight-format.ts';

/** The checkpoint tensors quantized: the attention and MLP projections, and Mixtral's experts (not router, embedding, LM head). */
const PROJECTION = /\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$/;

export function isProjection(hfName: string): boolean {
  return PROJECTION.test(hfName);
}

/** `<name>.weight` → `<name>.scales`, the tensor beside it. */
export function scalesName(weightName: string): string {
  return weightName.replace(/\.weight$/, '.scales');
}

/** A quantized matrix [rows, K]: values (int8 [rows, K] or int4 codes [rows, K / 2]) and scales [rows, K / group] bf16. */
export interface QuantizedMatrix {
  readonly data: Uint8Array;
  readonly scales: Uint8Array;
}

const QMAX = { int8: 127, int4: 7 } as const;

function groupOf(format: Pick<QuantizedFormat, 'groupSize'>, k: number): number {
  return format.groupSize === 'channel' ? k : format.groupSize;
}

/** values [rows, K] fp32 → quantized (groups along K; K a multiple of the group, even for int4). */
export function quantizeMatrix(values: Float32Array, rows: number, k: number, format: Pick<QuantizedFormat, 'kind' | 'groupSize'>): QuantizedMatrix {
  const group = groupOf(format, k);
  const nGroups = k / group;
  const qmax = QMAX[format.kind];
  const int4 = format.kind === 'int4';
  const data = new Uint8Array(int4 ? (rows * k) / 2 : rows * k);
  const scaleBits = new Uint16Array(rows * nGroups);
  const codes = new Int8Array(group);
  for (let r = 0; r < rows; r++) {
    for (let g = 0; g < nGroups; g++) {
      const start = r * k + g * group;
      let max = 0;
      for (let i = 0; i < group; i++) max = Math.max(max, Math.abs(values[start + i]!));
      const bits = bf16Bits(max / qmax);
      scaleBits[r * nGroups + g] = bits;
      const scale = bf16Value(bits);
      for (let i = 0; i < group; i++) {
        const q = scale > 0 ? Math.round(values[start + i]! / scale) : 0;
        codes[i] = Math.max(-qmax - (int4 ? 1 : 0), Math.min(qmax, q));
      }
      if (int4) for (let i = 0; i < group; i += 2) data[(start + i) / 2] = ((codes[i]! + 8) & 0xf) | (((codes[i + 1]! + 8) & 0xf) << 4);
      else for (let i = 0; i < group; i++) data[start + i] = codes[i]! & 0xff;
    }
  }
  return { data, scales: new Uint8Array(scaleBits.buffer) };
}

/** The fp32 values a quantized matrix [rows, K] stands for (q * scale): the reference every backend equals. */
export function dequantizeMatrix(m: QuantizedMatrix, rows: number, k: number, format: Pick<QuantizedFormat, 'kind' | 'groupSize'>): Float32Array {
  const group = groupOf(format, k);
  const nGroups = k / group;
  const scales = new Uint16Array(m.scales.buffer, m.scales.byteOffset, m.scales.byteLength / 2);
  const out = new Float32Array(rows * k);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < k; c++) {
      const i = r * k + c;
      const q = format.kind === 'int8' ? (m.data[i]! << 24) >> 24 : ((m.data[i >> 1]! >> ((i & 1) * 4)) & 0xf) - 8;
      out[i] = q * bf16Value(scales[r * nGroups + Math.floor(c / group)]!);
    }
  }
  return out;
}

/** Raw little-endian f32/f16/bf16 bytes → fp32. */
export function toFloat32(bytes: Uint8Array, dtype: WeightDType): Float32Array {
  if (dtype === 'f32') return new Float32Array(bytes.slice().buffer);
  const halves = new Uint16Array(bytes.slice().buffer);
  const out = new Float32Array(halves.length);
  for (let i = 0; i < halves.length; i++) out[i] = dtype === 'bf16' ? bf16Value(halves[i]!) : f16Value(halves[i]!);
  return out;
}

/** fp32 → the raw bytes of `dtype` (bf16 and f16 rounded to nearest even). */
export function fromFloat32(values: Float32Array, dtype: WeightDType): Uint8Array {
  if (dtype === 'f32') return new Uint8Array(values.slice().buffer);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = dtype === 'bf16' ? bf16Bits(values[i]!) : f16Bits(values[i]!);
  return new Uint8Array(out.buffer);
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** bf16 bits of x, rounded to nearest even (NaN stays NaN). */
export function bf16Bits(x: number): number {
  f32[0] = x;
  const b = u32[0]!;
  if ((b & 0x7fffffff) > 0x7f800000) return (b >>> 16) | 0x40;
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}

export function bf16Value(bits: number): number {
  u32[0] = bits << 16;
  return f32[0]!;
}

export function f16Value(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return sign * m * 2 ** -24;
  if (e === 31) return m ? NaN : sign * Infinity;
  return sign * (1 + m / 1024) * 2 ** (e - 15);
}

function f16Bits(x: number): number {
  // Only weights that came from f16 are written back as f16 (exactly representable): round via Math.fround steps.
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  const a = Math.abs(x);
  if (Number.isNaN(x)) return 0x7e00;
  if (a >= 65520) return sign | 0x7c00;
  if (a < 2 ** -14) return sign | Math.round(a / 2 ** -24);
  let e = Math.floor(Math.log2(a));
  let m = Math.round((a / 2 ** e - 1) * 1024);
  if (m === 1024) {
    m = 0;
    e += 1;
  }
  return sign | ((e + 15) << 10) | m;
}
