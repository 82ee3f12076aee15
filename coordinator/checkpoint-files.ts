/**
 * What `weft quantize` writes around the tensors, for a dense checkpoint quantized (coordinator/quantize.ts) and a
 * GPTQ/AWQ one converted (coordinator/convert-packed.ts): its options and summary, config.json's `quantization`
 * block, and the files beside the safetensors.
 */
import { copyFile, readFile, readdir, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { INDEX_FILE } from '../core/safetensors.ts';
import type { QuantizedFormat } from '../core/weight-format.ts';

export interface QuantizeOptions {
  readonly modelDir: string;
  readonly out: string;
  /** required for a dense checkpoint; a GPTQ/AWQ one's is its zero points' (int4 if symmetric, else int8) */
  readonly format?: 'int8' | 'int4';
  /** a dense checkpoint's columns per scale ('32' from the command line; 'channel': one scale per output row); a
   * GPTQ/AWQ one keeps its own */
  readonly groupSize: number | string;
  /** the LM head quantized too (`--quantize-lm-head`); a dense checkpoint's only */
  readonly quantizeLmHead?: boolean;
}

export interface QuantizeSummary {
  readonly out: string;
  readonly format: string;
  readonly groupSize: number | 'channel';
  readonly tensorsQuantized: number;
  readonly bytesIn: number;
  readonly bytesOut: number;
}

/** config.json's `quantization` block (core/model-spec.ts reads it) for a format. */
export function quantizationBlock(format: QuantizedFormat, lmHead = false): Record<string, unknown> {
  const block = { format: format.kind, bits: format.kind === 'int8' ? 8 : 4, group_size: format.groupSize === 'channel' ? -1 : format.groupSize, scales_dtype: 'bfloat16' };
  return lmHead ? { ...block, lm_head: true } : block;
}

/**
 * The files around a written checkpoint's tensors: every other file of `modelDir` copied, config.json with the
 * `quantization` block (and without a `quantization_config`), and a sharded checkpoint's index with its weight map
 * edited by `editWeightMap` (names → shard file) and the new total size.
 */
export async function finishCheckpoint(modelDir: string, out: string, quantization: Record<string, unknown>, bytesOut: number,
  editWeightMap: (weightMap: Record<string, string>) => void): Promise<void> {
  for (const entry of await readdir(modelDir, { withFileTypes: true })) {
    if (!entry.isFile() || entry.name.endsWith('.safetensors') || entry.name === 'config.json' || entry.name === INDEX_FILE) continue;
    await copyFile(path.join(modelDir, entry.name), path.join(out, entry.name));
  }
  const config = JSON.parse(await readFile(path.join(modelDir, 'config.json'), 'utf8')) as Record<string, unknown>;
  delete config.quantization_config;
  config.quantization = quantization;
  if (quantization.lm_head === true) config.tie_word_embeddings = false;  // the quantized head is lm_head.weight, its own tensor
  await writeFile(path.join(out, 'config.json'), JSON.stringify(config, null, 2) + '\n');
  if (existsSync(path.join(modelDir, INDEX_FILE))) {
    const index = JSON.parse(await readFile(path.join(modelDir, INDEX_FILE), 'utf8')) as { metadata?: Record<string, unknown>; weight_map: Record<string, string> };
    editWeightMap(index.weight_map);
    index.metadata = { ...index.metadata, total_size: bytesOut };
    await writeFile(path.join(out, INDEX_FILE), JSON.stringify(index, null, 2) + '\n');
  }
}
