/**
 * `weft quantize` on a GPTQ or AWQ checkpoint (config.json's quantization_config): the same checkpoint in weft's
 * quantized format written once (loading the packed checkpoint converts it at every load instead), which `--model`
 * loads like any other (core/packed-int4.ts says how each packing is read). Every
 * projection's `qweight`, `qzeros`, `scales` (and GPTQ's `g_idx`) become `<p>.weight` and `<p>.scales` in the
 * shard file that held `<p>.qweight`; every other tensor is copied as stored. Symmetric checkpoints (GPTQ's
 * sym: every zero point 8) become int4, others int8 in the same groups, as loading them does: both exact but for the
 * scales' rounding to bf16.
 */
import { readFileSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { WeftError } from '../core/errors.ts';
import { parseModelConfig, readModelSpec } from '../core/model-spec.ts';
import { checkGroupIndex, checkPackedShapes, packedDims, readPackedInt4Config, readWeftMatrix, type PackedInt4Config } from '../core/packed-int4.ts';
import { WeightFiles, writeSafetensorsFile, type TensorToWrite } from '../core/safetensors.ts';
import { isProjection } from '../core/weight-quantize.ts';
import { finishCheckpoint, quantizationBlock, type QuantizeOptions, type QuantizeSummary } from './checkpoint-files.ts';

const PACKED_PARTS = ['qweight', 'qzeros', 'scales', 'g_idx'] as const;

/** The packing of `modelDir`'s checkpoint, or null for a checkpoint without quantization_config. */
export function packedInt4Config(modelDir: string): PackedInt4Config | null {
  const file = path.join(modelDir, 'config.json');
  let config: Record<string, unknown>;
  try {
    config = JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;
  } catch {
    return null; // readModelSpec names what is wrong with the file
  }
  return config.quantization_config === undefined ? null : readPackedInt4Config(config.quantization_config, file);
}

export async function convertPackedCheckpoint(options: QuantizeOptions, packing: PackedInt4Config): Promise<QuantizeSummary> {
  const { modelDir, out } = options;
  const configFile = path.join(modelDir, 'config.json');
  const config = JSON.parse(readFileSync(configFile, 'utf8')) as Record<string, unknown>;
  delete config.quantization_config;
  parseModelConfig(config, configFile); // the model itself is one weft runs
  if (path.resolve(out) === path.resolve(modelDir)) throw new WeftError('WEFT_BAD_MODEL', `--out ${out} is the model directory; write the converted checkpoint elsewhere`);

  const files = await WeightFiles.open(modelDir);
  try {
    const prefixes = files.names.filter((n) => n.endsWith('.qweight')).map((n) => n.slice(0, -'.qweight'.length));
    if (prefixes.length === 0) throw new WeftError('WEFT_BAD_WEIGHTS', `${modelDir}: config.json says ${packing.method} but no tensor is named <projection>.qweight`);
    for (const p of prefixes) {
      if (!isProjection(`${p}.weight`)) {
        throw new WeftError('WEFT_UNSUPPORTED_MODEL', `${p}.qweight: weft quantizes the attention and MLP projections only; ${p} must be stored dense`);
      }
    }
    // Shapes and group indices first, so a checkpoint weft cannot read leaves no output behind.
    for (const p of prefixes) {
      const stored = files.tensor(`${p}.qweight`)!.shape;
      const [n, k] = packedDims(packing, stored);
      checkPackedShapes(p, packing, n, k, files, `from ${p}.qweight [${stored.join(', ')}]`);
      if (files.has(`${p}.g_idx`)) {
        const entry = files.tensor(`${p}.g_idx`)!;
        checkGroupIndex(p, { bytes: await files.readAll(`${p}.g_idx`), dtype: entry.dtype, shape: entry.shape }, k, packing.groupSize === 'channel' ? k : packing.groupSize);
      }
    }
    // The format loading the checkpoint gives (core/model-spec.ts): int4 where config.json says symmetric.
    const kind = options.format ?? (packing.symmetric ? 'int4' : 'int8');
    if (kind === 'int4' && !packing.symmetric) {
      throw new WeftError('WEFT_UNSUPPORTED_MODEL', `${modelDir}: the ${packing.method} checkpoint has zero points other than 8 (asymmetric), which weft's int4 cannot hold exactly; leave out --format int4 to write int8 in the same groups (exact), or quantize the dense model`);
    }
    const groupSize = packing.groupSize;
    await mkdir(out, { recursive: true });
    const packedNames = new Set(prefixes.flatMap((p) => PACKED_PARTS.map((part) => `${p}.${part}`)));
    let bytesIn = 0;
    let bytesOut = 0;
    const shardOf = new Map<string, string>();
    for (const shard of files.fileNames) {
      const planned: TensorToWrite[] = [];
      for (const name of files.namesInFile(shard)) {
        const entry = files.tensor(name)!;
        bytesIn += entry.end - entry.begin;
        if (!packedNames.has(name)) {
          planned.push({ name, dtype: entry.dtype, shape: entry.shape, bytes: () => files.readAll(name) });
          continue;
        }
        if (!name.endsWith('.qweight')) continue;
        const p = name.slice(0, -'.qweight'.length);
        let converted: ReturnType<typeof readWeftMatrix> | null = null;
        const once = () => (converted ??= readWeftMatrix(files, p, packing, kind));
        const [n, k] = packedDims(packing, entry.shape);
        const groups = packing.groupSize === 'channel' ? 1 : k / packing.groupSize;
        planned.push({ name: `${p}.weight`, dtype: kind === 'int4' ? 'U8' : 'I8', shape: kind === 'int4' ? [n, k / 2] : [n, k], bytes: async () => (await once()).data });
        planned.push({ name: `${p}.scales`, dtype: 'BF16', shape: [n, groups], bytes: async () => (await once()).scales });
        shardOf.set(`${p}.weight`, shard);
        shardOf.set(`${p}.scales`, shard);
      }
      bytesOut += await writeSafetensorsFile(path.join(out, shard), planned);
    }
    await finishCheckpoint(modelDir, out, quantizationBlock({ kind, groupSize, scales: 'bf16' }), bytesOut, (weightMap) => {
      for (const name of packedNames) delete weightMap[name];
      for (const [name, shard] of shardOf) weightMap[name] = shard;
    });
    readModelSpec(out); // the block fits the model's widths (a group inside each projection's columns)
    return { out, format: kind, groupSize, tensorsQuantized: prefixes.length, bytesIn, bytesOut };
  } finally {
    await files.close();
  }
}
