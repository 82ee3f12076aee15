/**
 * One rank's weights: ShardPlan × safetensors files → host tensors named the weft way, reading only this rank's
 * bytes. The tensors and where each comes from are the model family's layout table (worker/models/*-family.ts),
 * walked here without knowing the family. Every source tensor's presence, dtype and shape is checked against
 * the layout before the first data byte is read.
 */
import { WeftError } from '../../core/errors.ts';
import type { ModelSpec } from '../../core/model-spec.ts';
import type { ShardPlan } from '../../core/shard-plan.ts';
import { weftDType, WeightFiles } from '../../core/safetensors.ts';
import { dense, denseDType, formatBytes, scalesShape, storedBytes, type QuantizedFormat, type WeightDType } from '../../core/weight-format.ts';
import { quantizeMatrix, scalesName, toFloat32 } from '../../core/weight-quantize.ts';
import { familyOf, layoutContext } from '../models/registry.ts';
import type { HostTensor, ShardTensor, SourceSlice } from './layout.ts';
import { checkPackedSource, readPacked } from './read-packed.ts';

export type { HostTensor, ShardTensor, SourceSlice };

const PROGRESS_STEP_BYTES = 64 << 20;

/** The tensors rank `rank` holds, in load order, and where each comes from: its family's layout. Pure. */
export function shardLayout(spec: ModelSpec, plan: ShardPlan, rank: number): ShardTensor[] {
  return familyOf(spec).layout(layoutContext(spec, plan, rank));
}

/** Bytes of tensor data rank `rank` holds (aliases counted once, scales included): the total for progress reports. */
export function shardBytes(spec: ModelSpec, plan: ShardPlan, rank: number): number {
  return shardLayout(spec, plan, rank)
    .filter((t) => t.aliasOf === null)
    .reduce((sum, t) => sum + storedBytes(t.format, t.shape, t.name), 0);
}

/**
 * How one layout tensor is read: the checkpoint slices of its values and, quantized, of its scales, each with
 * the stored dtype it must have. A dense tensor reads as itself; one quantized at load reads the dense
 * checkpoint (spec.dtype) and is quantized after; a quantized checkpoint's int4 values are [N, K / 2] bytes (so
 * column ranges halve) and its scales [N, K / group] bf16 beside each `.weight` as `.scales`.
 */
interface ReadPlan {
  readonly values: readonly SourceSlice[];
  readonly valuesDType: string; // safetensors dtype: 'BF16', 'I8', 'U8', ...
  readonly scales: readonly SourceSlice[];
  readonly quantizeAtLoad: QuantizedFormat | null;
}

const STORED: Record<string, string> = { f32: 'F32', f16: 'F16', bf16: 'BF16' };

function readPlan(spec: ModelSpec, t: ShardTensor): ReadPlan {
  const format = t.format;
  if (format.kind === 'dense') return { values: t.sources, valuesDType: STORED[t.widenedFrom ?? format.dtype]!, scales: [], quantizeAtLoad: null };
  if (spec.quantization?.atLoad) return { values: t.sources, valuesDType: STORED[spec.dtype]!, scales: [], quantizeAtLoad: format };
  const int4 = format.kind === 'int4';
  const values = t.sources.map((s): SourceSlice => {
    if (!int4) return s;
    const [n, k] = s.hfShape as [number, number];
    return { ...s, hfShape: [n, k / 2], range: s.cut === 'cols' ? { start: s.range!.start / 2, end: s.range!.end / 2 } : s.range };
  });
  const scales = t.sources.map((s): SourceSlice => {
    const shape = scalesShape(format, s.hfShape);
    const base = { hfName: scalesName(s.hfName), hfShape: shape };
    if (s.cut !== 'cols') return { ...base, cut: s.cut, range: s.range };
    if (format.groupSize === 'channel') return { ...base, cut: 'all', range: null }; // one scale per row, every rank
    return { ...base, cut: 'cols', range: { start: s.range!.start / format.groupSize, end: s.range!.end / format.groupSize } };
  });
  return { values, valuesDType: int4 ? 'U8' : 'I8', scales, quantizeAtLoad: null };
}

/**
 * Reads rank `rank`'s tensors from `dir` (model.safetensors or an index of shards). Throws WEFT_BAD_WEIGHTS for
 * a missing tensor, a dtype other than the layout's format (config.json's dtype), or a shape other than the spec
 * implies, naming the tensor, the file and both shapes, before reading any tensor data. `onProgress` is called
 * after each tensor and every 64 MiB. A tied LM head is the embedding's HostTensor itself (same bytes, read once).
 * @example const weights = await loadShard(dir, spec, planShards(spec, 2), 1); weights.get('layers.0.wqkv')
 */
export async function loadShard(
  dir: string,
  spec: ModelSpec,
  plan: ShardPlan,
  rank: number,
  onProgress?: (bytesRead: number, bytesTotal: number) => void,
): Promise<Map<string, HostTensor>> {
  const layout = shardLayout(spec, plan, rank);
  const bytesTotal = shardBytes(spec, plan, rank);
  // Column slices are read row by row: report after each tensor and every 64 MiB, not after every read.
  let bytesRead = 0;
  let reported = 0;
  const report = () => {
    reported = bytesRead;
    onProgress?.(Math.min(bytesRead, bytesTotal), bytesTotal); // a GPTQ/AWQ rank reads whole packed tensors
  };
  const onRead = (n: number) => {
    bytesRead += n;
    if (bytesRead - reported >= PROGRESS_STEP_BYTES) report();
  };
  const files = await WeightFiles.open(dir, { onRead });
  try {
    const plans = new Map(layout.map((t) => [t.name, readPlan(spec, t)]));
    const packing = spec.quantization?.packed;
    const packed = (t: ShardTensor) => packing !== undefined && t.format.kind !== 'dense';
    for (const t of layout) {
      if (packed(t)) {
        for (const s of t.sources) checkPackedSource(files, t, s, packing!);
        continue;
      }
      const plan = plans.get(t.name)!;
      for (const s of plan.values) checkSource(files, t, s, plan.valuesDType, spec);
      for (const s of plan.scales) checkSource(files, t, s, 'BF16', spec);
    }
    const weights = new Map<string, HostTensor>();
    for (const t of layout) {
      if (t.aliasOf !== null) {
        weights.set(t.name, weights.get(t.aliasOf)!);
        continue;
      }
      if (packed(t)) {
        const { data, scales } = await readPacked(files, t, t.format as QuantizedFormat, packing!);
        weights.set(t.name, { format: t.format, shape: t.shape, data, scales });
        if (bytesRead > reported) report();
        continue;
      }
      const plan = plans.get(t.name)!;
      const readFormat = plan.quantizeAtLoad ? dense(spec.dtype) : t.widenedFrom ? dense(t.widenedFrom) : t.format;
      const read = await readParts(files, t.name, plan.values, formatBytes(readFormat, t.shape, t.name));
      const data = t.widenedFrom ? widen(read, t.widenedFrom) : read;
      bytesRead += data.length - read.length; // progress counts the bytes held (shardBytes), widened ones included
      if (plan.quantizeAtLoad) {
        const k = t.shape.at(-1)!;
        const q = quantizeMatrix(toFloat32(data, spec.dtype), data.length / dtypeBytesOf(spec.dtype) / k, k, plan.quantizeAtLoad);
        weights.set(t.name, { format: t.format, shape: t.shape, data: q.data, scales: q.scales });
      } else {
        const scalesBytes = t.format.kind === 'dense' ? 0 : scalesShape(t.format, t.shape).reduce((a, d) => a * d, 1) * 2;
        const scales = plan.scales.length > 0 ? await readParts(files, t.name, plan.scales, scalesBytes) : null;
        weights.set(t.name, { format: t.format, shape: t.shape, data, scales });
      }
      if (bytesRead > reported) report();
    }
    return weights;
  } finally {
    await files.close();
  }
}

/** The concatenated bytes of `parts` (along dim 0). Not zero-filled: the reads overwrite every byte (checked). */
async function readParts(files: WeightFiles, name: string, parts: readonly SourceSlice[], bytes: number): Promise<Uint8Array> {
  const data = new Uint8Array(Buffer.allocUnsafeSlow(bytes).buffer, 0, bytes);
  let offset = 0;
  for (const s of parts) {
    const part =
      s.cut === 'rows' ? await files.readRows(s.hfName, s.range!.start, s.range!.end, data, offset)
      : s.cut === 'cols' ? await files.readColumns(s.hfName, s.range!.start, s.range!.end, data, offset)
      : await files.readAll(s.hfName, data, offset);
    offset += part.length;
  }
  if (offset !== bytes) throw new Error(`loadShard: ${name} read ${offset} of ${bytes} bytes`); // unreachable
  return data;
}

/** bf16 or f16 values as f32 bytes (exact). */
function widen(data: Uint8Array, from: WeightDType): Uint8Array {
  const values = toFloat32(data, from);
  return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
}

function dtypeBytesOf(dtype: ModelSpec['dtype']): number {
  return dtype === 'f32' ? 4 : 2;
}

function checkSource(files: WeightFiles, t: ShardTensor, s: SourceSlice, stored: string, spec: ModelSpec): void {
  const where = `${files.dir} (${files.fileNames.join(', ')})`;
  const entry = files.tensor(s.hfName);
  if (entry === undefined) {
    const hint = s.hfName === 'lm_head.weight' ? '; if the LM head is tied to the embedding, config.json should say tie_word_embeddings: true' : '';
    throw new WeftError('WEFT_BAD_WEIGHTS', `${where}: tensor "${s.hfName}" (for weft's ${t.name}) is missing${hint}`);
  }
  if (t.format.kind === 'dense' || spec.quantization?.atLoad) {
    const dtype = weftDType(entry);
    const expected = t.format.kind === 'dense' ? (t.widenedFrom ?? denseDType(t.format, t.name)) : spec.dtype;
    if (dtype !== expected) {
      throw new WeftError('WEFT_BAD_WEIGHTS', `${entry.file}: tensor "${s.hfName}" is ${entry.dtype} but config.json declares ${expected} (weft does not convert weights)`);
    }
  } else if (entry.dtype !== stored) {
    throw new WeftError('WEFT_BAD_WEIGHTS', `${entry.file}: tensor "${s.hfName}" is ${entry.dtype} but config.json's quantization block (${t.format.kind}) stores it as ${stored}`);
  }
  if (entry.shape.length !== s.hfShape.length || entry.shape.some((d, i) => d !== s.hfShape[i])) {
    const what = t.format.kind === 'dense' || spec.quantization?.atLoad ? 'config.json' : `config.json (${t.format.kind}, group size ${t.format.groupSize})`;
    throw new WeftError('WEFT_BAD_WEIGHTS', `${entry.file}: tensor "${s.hfName}" has shape [${entry.shape.join(', ')}], expected [${s.hfShape.join(', ')}] from ${what}`);
  }
}
