/**
 * The 4-bit checkpoints users download (GPTQ without act-order, AWQ "gemm") read into weft's quantized format
 * (core/weight-format.ts): as each rank loads them (worker/weights/read-packed.ts), or once by `weft quantize`
 * (coordinator/convert-packed.ts). Both store, per
 * projection `<p>`, 4-bit codes q and zero points z packed eight to an int32, and f16 scales s, one per group of
 * input columns and output row: w = (q - z) s.
 *   - GPTQ: `<p>.qweight` [K / 8, N] (word r of column n holds input columns 8r .. 8r + 7, lowest nibble first),
 *     `<p>.qzeros` [G, N / 8] (word c holds rows 8c .. 8c + 7, lowest first), `<p>.scales` [G, N], `<p>.g_idx` [K]
 *     (each column's group). checkpoint_format "gptq" (v1) stores z - 1, "gptq_v2" z itself.
 *   - AWQ gemm: `<p>.qweight` [K, N / 8] and `<p>.qzeros` [G, N / 8], each word's eight rows in the nibble order
 *     0, 2, 4, 6, 1, 3, 5, 7 (nibble i holds row 8c + AWQ_ORDER[i]), `<p>.scales` [G, N].
 * Every z = 8 (symmetric) is weft's int4 exactly (its code is q); other zero points become int8 values q - z in the
 * same groups (exact, twice the bytes). The scales are rounded from f16 to weft's bf16 (relative 2^-9 at most).
 */
import { WeftError } from './errors.ts';
import type { WeightFiles } from './safetensors.ts';
import type { PackedInt4Config } from './weight-format.ts';
import type { QuantizedMatrix } from './weight-quantize.ts';

export type { PackedInt4Config };
import { bf16Bits, f16Value } from './weight-quantize.ts';

/** config.json's quantization_config → what the converter needs; refuses what it cannot convert exactly, by field. */
export function readPackedInt4Config(quant: unknown, source: string): PackedInt4Config {
  const bad = (why: string): never => {
    throw new WeftError('WEFT_UNSUPPORTED_MODEL', `${source}: quantization_config ${why}`);
  };
  if (typeof quant !== 'object' || quant === null || Array.isArray(quant)) return bad(`must be an object, got ${JSON.stringify(quant)}`);
  const q = quant as Record<string, unknown>;
  const method = q.quant_method;
  if (method !== 'gptq' && method !== 'awq') return bad(`quant_method ${JSON.stringify(method)} is not one weft converts (gptq, awq)`);
  if (q.bits !== 4) return bad(`bits ${JSON.stringify(q.bits)}: weft reads 4-bit ${method} checkpoints`);
  const group = q.group_size;
  if (group !== -1 && !(typeof group === 'number' && Number.isSafeInteger(group) && group >= 8 && group % 8 === 0)) {
    return bad(`group_size ${JSON.stringify(group)} must be -1 or a multiple of 8`);
  }
  if (method === 'awq') {
    const version = typeof q.version === 'string' ? q.version.toLowerCase() : 'gemm';
    if (version !== 'gemm') return bad(`version ${JSON.stringify(q.version)}: weft reads AWQ's "gemm" packing only`);
    if (q.zero_point === false) return bad('zero_point false is not supported (AWQ without zero points)');
    return { method, groupSize: group === -1 ? 'channel' : (group as number), zeroOffset: 0, symmetric: false };
  }
  const format = q.checkpoint_format ?? 'gptq';
  if (format !== 'gptq' && format !== 'gptq_v2') return bad(`checkpoint_format ${JSON.stringify(format)} is not gptq or gptq_v2`);
  return { method, groupSize: group === -1 ? 'channel' : (group as number), zeroOffset: format === 'gptq' ? 1 : 0, symmetric: q.sym !== false };
}

/** A projection's [N, K] from its stored qweight shape. */
export function packedDims(config: PackedInt4Config, qweightShape: readonly number[]): [number, number] {
  const [q0, q1] = qweightShape as [number, number];
  return config.method === 'gptq' ? [q1, q0 * 8] : [q1 * 8, q0];
}

/** The stored shapes of a projection [N, K]'s packed tensors (I32 codes and zeros, F16 scales). */
export function packedShapes(config: PackedInt4Config, n: number, k: number): { qweight: number[]; qzeros: number[]; scales: number[] } {
  const groups = config.groupSize === 'channel' ? 1 : k / config.groupSize;
  return { qweight: config.method === 'gptq' ? [k / 8, n] : [k, n / 8], qzeros: [groups, n / 8], scales: [groups, n] };
}

/**
 * Throws WEFT_BAD_WEIGHTS naming the first of `<prefix>`'s packed tensors (qweight, qzeros, scales) that is missing
 * from `files` or not the shape a [N, K] projection implies; `context` says what N and K come from, for the message.
 */
export function checkPackedShapes(prefix: string, config: PackedInt4Config, n: number, k: number, files: Pick<WeightFiles, 'tensor' | 'dir'>, context: string): void {
  for (const [part, shape] of Object.entries(packedShapes(config, n, k))) {
    const name = `${prefix}.${part}`;
    const entry = files.tensor(name);
    if (entry === undefined) throw new WeftError('WEFT_BAD_WEIGHTS', `${files.dir}: tensor "${name}" (${context}; ${config.method} checkpoint) is missing`);
    if (entry.shape.length !== shape.length || entry.shape.some((d, i) => d !== shape[i])) {
      throw new WeftError('WEFT_BAD_WEIGHTS', `${entry.file}: tensor "${name}" has shape [${entry.shape.join(', ')}], expected [${shape.join(', ')}] for a [${n}, ${k}] projection (${context}; ${config.method}, group size ${config.groupSize})`);
    }
  }
}

/** A projection's tensors as stored (little-endian bytes) with their shapes. */
export interface PackedTensors {
  readonly qweight: { readonly bytes: Uint8Array; readonly dtype: string; readonly shape: readonly number[] };
  readonly qzeros: { readonly bytes: Uint8Array; readonly dtype: string; readonly shape: readonly number[] };
  readonly scales: { readonly bytes: Uint8Array; readonly dtype: string; readonly shape: readonly number[] };
  readonly gIdx?: { readonly bytes: Uint8Array; readonly dtype: string; readonly shape: readonly number[] };
}

/** One projection in weft's orientation: codes q and zero points z (z per [N, G]), f16 scale bits [N, G]. */
export interface UnpackedInt4 {
  readonly n: number;
  readonly k: number;
  readonly groups: number;
  readonly codes: Uint8Array; // [N, K], 0..15
  readonly zeros: Uint8Array; // [N, G], with the format's offset added
  readonly scalesF16: Uint16Array; // [N, G]
}

// AWQ's nibble i holds row 8c + AWQ_ORDER[i]; so row 8c + j sits in nibble AWQ_NIBBLE[j].
const AWQ_NIBBLE = [0, 4, 1, 5, 2, 6, 3, 7] as const;

/** Unpacks `<prefix>`'s tensors, checking dtypes and shapes against each other and naming the tensor that is off. */
export function unpackInt4(prefix: string, t: PackedTensors, config: PackedInt4Config): UnpackedInt4 {
  const fail = (name: string, why: string): never => {
    throw new WeftError('WEFT_BAD_WEIGHTS', `${prefix}.${name}: ${why}`);
  };
  const shape = (s: readonly number[]) => `[${s.join(', ')}]`;
  for (const [name, tensor, dtype] of [['qweight', t.qweight, 'I32'], ['qzeros', t.qzeros, 'I32'], ['scales', t.scales, 'F16']] as const) {
    if (tensor.dtype !== dtype) fail(name, `dtype ${tensor.dtype}, expected ${dtype}`);
    if (tensor.shape.length !== 2) fail(name, `shape ${shape(tensor.shape)} is not 2-D`);
  }
  const gptq = config.method === 'gptq';
  const [n, k] = packedDims(config, t.qweight.shape);
  const group = config.groupSize === 'channel' ? k : config.groupSize;
  if (k % group !== 0) fail('qweight', `${k} input columns are not a multiple of group_size ${group}`);
  const groups = k / group;
  if (n % 8 !== 0) fail('qweight', `${n} output rows are not a multiple of 8 (eight zero points a word)`);
  const want = (name: 'qzeros' | 'scales', s: readonly number[], expected: readonly number[]) => {
    if (s[0] !== expected[0] || s[1] !== expected[1]) fail(name, `shape ${shape(s)}, expected ${shape(expected)} for qweight ${shape(t.qweight.shape)} and group_size ${group}`);
  };
  want('qzeros', t.qzeros.shape, [groups, n / 8]);
  want('scales', t.scales.shape, [groups, n]);

  const words = (b: Uint8Array) => new Int32Array(Uint8Array.from(b).buffer); // a copy (a Buffer's slice is a view), aligned
  const qweight = words(t.qweight.bytes);
  const qzeros = words(t.qzeros.bytes);
  const scales = new Uint16Array(Uint8Array.from(t.scales.bytes).buffer);
  if (t.gIdx) checkGroupIndex(prefix, t.gIdx, k, group);
  const nibble = (word: number, i: number) => (word >>> (4 * i)) & 0xf;
  const codes = new Uint8Array(n * k);
  for (let row = 0; row < n; row++) {
    for (let c = 0; c < k; c++) {
      codes[row * k + c] = gptq ? nibble(qweight[(c >> 3) * n + row]!, c & 7) : nibble(qweight[c * (n / 8) + (row >> 3)]!, AWQ_NIBBLE[row & 7]!);
    }
  }
  const zeros = new Uint8Array(n * groups);
  const scalesF16 = new Uint16Array(n * groups);
  for (let g = 0; g < groups; g++) {
    for (let row = 0; row < n; row++) {
      const word = qzeros[g * (n / 8) + (row >> 3)]!;
      zeros[row * groups + g] = nibble(word, gptq ? row & 7 : AWQ_NIBBLE[row & 7]!) + config.zeroOffset;
      scalesF16[row * groups + g] = scales[g * n + row]!;
    }
  }
  return { n, k, groups, codes, zeros, scalesF16 };
}

/** GPTQ's g_idx [K] must put column c in group c / group: weft's groups are contiguous columns (no act-order). */
export function checkGroupIndex(prefix: string, gIdx: { readonly bytes: Uint8Array; readonly dtype: string; readonly shape: readonly number[] }, k: number, group: number): void {
  const fail = (why: string): never => {
    throw new WeftError('WEFT_BAD_WEIGHTS', `${prefix}.g_idx: ${why}`);
  };
  if (gIdx.dtype !== 'I32' || gIdx.shape.length !== 1 || gIdx.shape[0] !== k) fail(`dtype ${gIdx.dtype} shape [${gIdx.shape.join(', ')}], expected I32 [${k}]`);
  const groups = new Int32Array(Uint8Array.from(gIdx.bytes).buffer);
  for (let c = 0; c < k; c++) {
    if (groups[c] !== Math.floor(c / group)) {
      fail(`column ${c} is in group ${groups[c]}, not ${Math.floor(c / group)}: act-order (desc_act) groups are not contiguous columns, which weft's are; quantize the model without act-order`);
    }
  }
}

/** Whether every zero point is 8: the projection is weft's symmetric int4 as it stands. */
function isSymmetric(m: UnpackedInt4): boolean {
  return m.zeros.every((z) => z === 8);
}

/**
 * weft's int4 (every zero 8: the code is q) or int8 (q - z) of an unpacked projection `<prefix>`, scales rounded to
 * bf16. int4 of one whose zero points are not all 8 is refused naming its qzeros.
 */
export function toWeftMatrix(prefix: string, m: UnpackedInt4, kind: 'int8' | 'int4'): QuantizedMatrix {
  const scaleBits = new Uint16Array(m.n * m.groups);
  for (let i = 0; i < scaleBits.length; i++) scaleBits[i] = bf16Bits(f16Value(m.scalesF16[i]!));
  const scales = new Uint8Array(scaleBits.buffer);
  if (kind === 'int4') {
    if (!isSymmetric(m)) throw new WeftError('WEFT_BAD_WEIGHTS', `${prefix}.qzeros: zero points other than 8 in a checkpoint config.json calls symmetric (sym: true); weft reads it as int4`);
    const data = new Uint8Array((m.n * m.k) / 2);
    for (let i = 0; i < data.length; i++) data[i] = m.codes[2 * i]! | (m.codes[2 * i + 1]! << 4);
    return { data, scales };
  }
  const group = m.k / m.groups;
  const data = new Uint8Array(m.n * m.k);
  for (let row = 0; row < m.n; row++) {
    for (let c = 0; c < m.k; c++) data[row * m.k + c] = (m.codes[row * m.k + c]! - m.zeros[row * m.groups + Math.floor(c / group)]!) & 0xff;
  }
  return { data, scales };
}

/** `<prefix>`'s packed tensors read from `files`, unpacked and turned into weft's `kind`: the whole [N, K] matrix. */
export async function readWeftMatrix(files: Pick<WeightFiles, 'tensor' | 'has' | 'readAll'>, prefix: string, config: PackedInt4Config,
  kind: 'int8' | 'int4'): Promise<QuantizedMatrix & { readonly n: number; readonly k: number; readonly groups: number }> {
  const read = async (part: string) => {
    const entry = files.tensor(`${prefix}.${part}`)!;
    return { bytes: await files.readAll(`${prefix}.${part}`), dtype: entry.dtype, shape: entry.shape };
  };
  const gIdx = files.has(`${prefix}.g_idx`) ? await read('g_idx') : undefined;
  const m = unpackInt4(prefix, { qweight: await read('qweight'), qzeros: await read('qzeros'), scales: await read('scales'), ...(gIdx ? { gIdx } : {}) }, config);
  return { n: m.n, k: m.k, groups: m.groups, ...toWeftMatrix(prefix, m, kind) };
}
