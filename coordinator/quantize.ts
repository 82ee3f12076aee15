/**
 * `weft quantize`: a dense checkpoint → a weight-only int8 or int4 one that `--model` loads like any other. Every
 * projection `<name>.weight` [N, K] becomes int8 [N, K] (I8) or int4 codes [N, K / 2] (U8, core/weight-format.ts
 * QuantizedFormat), with `<name>.scales` [N, K / group] bf16 beside it in the same file; every other tensor is
 * copied as stored. config.json gains the `quantization` block core/model-spec.ts reads; the other files (tokenizer,
 * generation config) are copied. Files keep their names and the index its shards.
 */
import { copyFile, mkdir, open, readFile, readdir, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { WeftError } from '../core/errors.ts';
import { readModelSpec } from '../core/model-spec.ts';
import { INDEX_FILE, SafetensorsFile, WeightFiles, weftDType, type TensorEntry } from '../core/safetensors.ts';
import { groupProblems, workingGroupSizes, type QuantizedFormat } from '../core/weight-format.ts';
import { isProjection, quantizeMatrix, scalesName, toFloat32 } from '../core/weight-quantize.ts';

export interface QuantizeOptions {
  readonly modelDir: string;
  readonly out: string;
  readonly format: 'int8' | 'int4';
  /** columns per scale ('32' from the command line); 'channel': one scale per output row */
  readonly groupSize: number | string;
}

export interface QuantizeSummary {
  readonly out: string;
  readonly format: string;
  readonly groupSize: number | 'channel';
  readonly tensorsQuantized: number;
  readonly bytesIn: number;
  readonly bytesOut: number;
}

export async function quantizeCheckpoint(options: QuantizeOptions): Promise<QuantizeSummary> {
  const { modelDir, out } = options;
  const spec = readModelSpec(modelDir);
  if (spec.quantization) throw new WeftError('WEFT_BAD_MODEL', `${modelDir}: the checkpoint is already quantized (${spec.quantization.kind}); quantize a dense one`);
  const groupSize = options.groupSize === 'channel' ? 'channel' : Number(options.groupSize);
  if (groupSize !== 'channel' && !(Number.isSafeInteger(groupSize) && groupSize >= 2 && groupSize % 2 === 0)) {
    throw new WeftError('WEFT_BAD_MODEL', `group size ${options.groupSize} must be an even number of columns or 'channel'`);
  }
  const format: QuantizedFormat = { kind: options.format, groupSize, scales: 'bf16' };
  const widths = { hidden: spec.hidden, attention_output: spec.nHeads * spec.headDim, mlp_down: spec.ffnDim };
  const problems = groupProblems(format, widths);
  if (problems.length > 0) throw new WeftError('WEFT_BAD_MODEL', `${modelDir}: ${problems.join('; ')} (${format.kind} group sizes that fit: ${workingGroupSizes(format.kind, widths)})`);
  if (path.resolve(out) === path.resolve(modelDir)) throw new WeftError('WEFT_BAD_MODEL', `--out ${out} is the model directory; write the quantized checkpoint elsewhere`);
  await mkdir(out, { recursive: true });

  const files = await WeightFiles.open(modelDir);
  const shardNames = files.fileNames;
  await files.close();
  let tensorsQuantized = 0;
  let bytesIn = 0;
  let bytesOut = 0;
  const scalesShard = new Map<string, string>();
  for (const shard of shardNames) {
    const written = await quantizeFile(path.join(modelDir, shard), path.join(out, shard), format);
    tensorsQuantized += written.quantized.length;
    bytesIn += written.bytesIn;
    bytesOut += written.bytesOut;
    for (const name of written.quantized) scalesShard.set(scalesName(name), shard);
  }

  for (const entry of await readdir(modelDir, { withFileTypes: true })) {
    if (!entry.isFile() || entry.name.endsWith('.safetensors') || entry.name === 'config.json' || entry.name === INDEX_FILE) continue;
    await copyFile(path.join(modelDir, entry.name), path.join(out, entry.name));
  }
  const config = JSON.parse(await readFile(path.join(modelDir, 'config.json'), 'utf8')) as Record<string, unknown>;
  config.quantization = { format: format.kind, bits: format.kind === 'int8' ? 8 : 4, group_size: format.groupSize === 'channel' ? -1 : format.groupSize, scales_dtype: 'bfloat16' };
  await writeFile(path.join(out, 'config.json'), JSON.stringify(config, null, 2) + '\n');
  if (existsSync(path.join(modelDir, INDEX_FILE))) {
    const index = JSON.parse(await readFile(path.join(modelDir, INDEX_FILE), 'utf8')) as { metadata?: Record<string, unknown>; weight_map: Record<string, string> };
    for (const [name, shard] of scalesShard) index.weight_map[name] = shard;
    index.metadata = { ...index.metadata, total_size: bytesOut };
    await writeFile(path.join(out, INDEX_FILE), JSON.stringify(index, null, 2) + '\n');
  }
  return { out, format: format.kind, groupSize: format.groupSize, tensorsQuantized, bytesIn, bytesOut };
}

/** One safetensors file: projections quantized (values, then scales), the rest copied, in header order. */
async function quantizeFile(from: string, to: string, format: QuantizedFormat) {
  const file = await SafetensorsFile.open(from);
  try {
    const entries = [...file.header.tensors.values()].sort((a, b) => a.begin - b.begin);
    const planned: { name: string; dtype: string; shape: number[]; bytes: () => Promise<Uint8Array> }[] = [];
    const quantized: string[] = [];
    let bytesIn = 0;
    for (const entry of entries) {
      bytesIn += entry.end - entry.begin;
      if (!isProjection(entry.name)) {
        planned.push({ name: entry.name, dtype: entry.dtype, shape: [...entry.shape], bytes: () => file.readAll(entry) });
        continue;
      }
      const [n, k] = entry.shape as [number, number];
      if (entry.shape.length !== 2) throw new WeftError('WEFT_BAD_WEIGHTS', `${from}: projection "${entry.name}" has shape [${entry.shape.join(', ')}], expected [N, K]`);
      const group = format.groupSize === 'channel' ? k : format.groupSize;
      let result: Promise<ReturnType<typeof quantizeMatrix>> | null = null;
      const once = () => (result ??= quantizeEntry(file, entry, n, k, format));
      quantized.push(entry.name);
      planned.push({ name: entry.name, dtype: format.kind === 'int8' ? 'I8' : 'U8', shape: format.kind === 'int8' ? [n, k] : [n, k / 2], bytes: async () => (await once()).data });
      planned.push({ name: scalesName(entry.name), dtype: 'BF16', shape: [n, k / group], bytes: async () => (await once()).scales });
    }
    const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
    let offset = 0;
    for (const t of planned) {
      const size = t.shape.reduce((a, d) => a * d, 1) * (t.dtype === 'BF16' || t.dtype === 'F16' ? 2 : t.dtype === 'F32' ? 4 : 1);
      header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + size] };
      offset += size;
    }
    const json = Buffer.from(JSON.stringify(header));
    const padded = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)]); // data 8-byte aligned
    const length = Buffer.alloc(8);
    length.writeBigUInt64LE(BigInt(padded.length));
    const handle = await open(to, 'w');
    try {
      await handle.write(length);
      await handle.write(padded);
      for (const t of planned) await handle.write(await t.bytes());
    } finally {
      await handle.close();
    }
    return { quantized, bytesIn, bytesOut: offset };
  } finally {
    await file.close();
  }
}

async function quantizeEntry(file: SafetensorsFile, entry: TensorEntry, n: number, k: number, format: QuantizedFormat) {
  const values = toFloat32(await file.readAll(entry), weftDType(entry));
  return quantizeMatrix(values, n, k, format);
}
