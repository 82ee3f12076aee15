/**
 * `weft quantize`: a dense checkpoint → a weight-only int8 or int4 one (a GPTQ or AWQ checkpoint → the same in weft's
 * format: coordinator/convert-packed.ts) that `--model` loads like any other. Every
 * projection `<name>.weight` [N, K] becomes int8 [N, K] (I8) or int4 codes [N, K / 2] (U8, core/weight-format.ts
 * QuantizedFormat), with `<name>.scales` [N, K / group] bf16 beside it in the same file; every other tensor is
 * copied as stored. config.json gains the `quantization` block core/model-spec.ts reads; the other files (tokenizer,
 * generation config) are copied. Files keep their names and the index its shards. With `--quantize-lm-head` the LM head
 * is quantized the same way (a tied one written as lm_head.weight, the config untied).
 */
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { WeftError } from '../core/errors.ts';
import { readModelSpec } from '../core/model-spec.ts';
import { SafetensorsFile, WeightFiles, weftDType, writeSafetensorsFile, type TensorEntry, type TensorToWrite } from '../core/safetensors.ts';
import { groupProblems, workingGroupSizes, type QuantizedFormat } from '../core/weight-format.ts';
import { isProjection, quantizeMatrix, scalesName, toFloat32 } from '../core/weight-quantize.ts';
import { finishCheckpoint, quantizationBlock, type QuantizeOptions, type QuantizeSummary } from './checkpoint-files.ts';
import { convertPackedCheckpoint, packedInt4Config } from './convert-packed.ts';

export type { QuantizeOptions, QuantizeSummary };

export async function quantizeCheckpoint(options: QuantizeOptions): Promise<QuantizeSummary> {
  const { modelDir, out } = options;
  const packing = packedInt4Config(modelDir);
  if (packing && options.quantizeLmHead) throw new WeftError('WEFT_BAD_MODEL', `${modelDir}: --quantize-lm-head: a GPTQ/AWQ checkpoint converts as it was quantized, with its LM head dense`);
  if (packing) return convertPackedCheckpoint(options, packing);
  if (options.format === undefined) throw new WeftError('WEFT_BAD_MODEL', `${modelDir}: --format int8|int4 is required to quantize a dense checkpoint`);
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
  const head = options.quantizeLmHead ? { tied: spec.tieWordEmbeddings } : null;
  const addedShard = new Map<string, string>();  // tensors the dense checkpoint did not have: scales, an untied head
  for (const shard of shardNames) {
    const written = await quantizeFile(path.join(modelDir, shard), path.join(out, shard), format, head);
    tensorsQuantized += written.quantized.length;
    bytesIn += written.bytesIn;
    bytesOut += written.bytesOut;
    for (const name of written.quantized) addedShard.set(scalesName(name), shard);
    if (head?.tied && written.quantized.includes(LM_HEAD)) addedShard.set(LM_HEAD, shard);
  }

  await finishCheckpoint(modelDir, out, quantizationBlock(format, head !== null), bytesOut, (weightMap) => {
    for (const [name, shard] of addedShard) weightMap[name] = shard;
  });
  return { out, format: format.kind, groupSize: format.groupSize, tensorsQuantized, bytesIn, bytesOut };
}

const LM_HEAD = 'lm_head.weight';
const EMBEDDING = 'model.embed_tokens.weight';

/**
 * One safetensors file: projections quantized (values, then scales), the rest copied, in header order. With `head`,
 * the LM head is quantized too; a tied one is written as lm_head.weight, quantized from the embedding (which stays).
 */
async function quantizeFile(from: string, to: string, format: QuantizedFormat, head: { tied: boolean } | null) {
  const file = await SafetensorsFile.open(from);
  try {
    const entries = [...file.header.tensors.values()].sort((a, b) => a.begin - b.begin);
    const planned: TensorToWrite[] = [];
    const quantized: string[] = [];
    let bytesIn = 0;
    const plan = (name: string, entry: TensorEntry) => {
      const [n, k] = entry.shape as [number, number];
      if (entry.shape.length !== 2) throw new WeftError('WEFT_BAD_WEIGHTS', `${from}: "${entry.name}" has shape [${entry.shape.join(', ')}], expected [N, K] to quantize`);
      const group = format.groupSize === 'channel' ? k : format.groupSize;
      let result: Promise<ReturnType<typeof quantizeMatrix>> | null = null;
      const once = () => (result ??= quantizeEntry(file, entry, n, k, format));
      quantized.push(name);
      planned.push({ name, dtype: format.kind === 'int8' ? 'I8' : 'U8', shape: format.kind === 'int8' ? [n, k] : [n, k / 2], bytes: async () => (await once()).data });
      planned.push({ name: scalesName(name), dtype: 'BF16', shape: [n, k / group], bytes: async () => (await once()).scales });
    };
    for (const entry of entries) {
      bytesIn += entry.end - entry.begin;
      if (head?.tied && entry.name === LM_HEAD) continue;  // a stored copy of the tied embedding: its quantized copy replaces it
      if (isProjection(entry.name) || (head && !head.tied && entry.name === LM_HEAD)) {
        plan(entry.name, entry);
        continue;
      }
      planned.push({ name: entry.name, dtype: entry.dtype, shape: [...entry.shape], bytes: () => file.readAll(entry) });
      if (head?.tied && entry.name === EMBEDDING) plan(LM_HEAD, entry);
    }
    const bytesOut = await writeSafetensorsFile(to, planned);
    return { quantized, bytesIn, bytesOut };
  } finally {
    await file.close();
  }
}

async function quantizeEntry(file: SafetensorsFile, entry: TensorEntry, n: number, k: number, format: QuantizedFormat) {
  const values = toFloat32(await file.readAll(entry), weftDType(entry));
  return quantizeMatrix(values, n, k, format);
}
