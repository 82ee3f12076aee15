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
import { denseDType, formatBytes } from '../../core/weight-format.ts';
import { familyOf, layoutContext } from '../models/registry.ts';
import type { HostTensor, ShardTensor, SourceSlice } from './layout.ts';

export type { HostTensor, ShardTensor, SourceSlice };

const PROGRESS_STEP_BYTES = 64 << 20;

/** The tensors rank `rank` holds, in load order, and where each comes from: its family's layout. Pure. */
export function shardLayout(spec: ModelSpec, plan: ShardPlan, rank: number): ShardTensor[] {
  return familyOf(spec).layout(layoutContext(spec, plan, rank));
}

/** Bytes of tensor data rank `rank` reads (aliases counted once): the total for progress reports. */
export function shardBytes(spec: ModelSpec, plan: ShardPlan, rank: number): number {
  return shardLayout(spec, plan, rank)
    .filter((t) => t.aliasOf === null)
    .reduce((sum, t) => sum + formatBytes(t.format, t.shape, t.name), 0);
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
    onProgress?.(bytesRead, bytesTotal);
  };
  const onRead = (n: number) => {
    bytesRead += n;
    if (bytesRead - reported >= PROGRESS_STEP_BYTES) report();
  };
  const files = await WeightFiles.open(dir, { onRead });
  try {
    for (const t of layout) for (const s of t.sources) checkSource(files, t, s);
    const weights = new Map<string, HostTensor>();
    for (const t of layout) {
      if (t.aliasOf !== null) {
        weights.set(t.name, weights.get(t.aliasOf)!);
        continue;
      }
      const bytes = formatBytes(t.format, t.shape, t.name);
      // Not zero-filled: the reads below overwrite every byte (checked).
      const data = new Uint8Array(Buffer.allocUnsafeSlow(bytes).buffer, 0, bytes);
      let offset = 0;
      for (const s of t.sources) {
        const part =
          s.cut === 'rows' ? await files.readRows(s.hfName, s.range!.start, s.range!.end, data, offset)
          : s.cut === 'cols' ? await files.readColumns(s.hfName, s.range!.start, s.range!.end, data, offset)
          : await files.readAll(s.hfName, data, offset);
        offset += part.length;
      }
      if (offset !== bytes) throw new Error(`loadShard: ${t.name} read ${offset} of ${bytes} bytes`); // unreachable
      weights.set(t.name, { format: t.format, shape: t.shape, data });
      if (bytesRead > reported) report();
    }
    return weights;
  } finally {
    await files.close();
  }
}

function checkSource(files: WeightFiles, t: ShardTensor, s: SourceSlice): void {
  const where = `${files.dir} (${files.fileNames.join(', ')})`;
  const entry = files.tensor(s.hfName);
  if (entry === undefined) {
    const hint = s.hfName === 'lm_head.weight' ? '; if the LM head is tied to the embedding, config.json should say tie_word_embeddings: true' : '';
    throw new WeftError('WEFT_BAD_WEIGHTS', `${where}: tensor "${s.hfName}" (for weft's ${t.name}) is missing${hint}`);
  }
  const dtype = weftDType(entry);
  const expected = denseDType(t.format, t.name);
  if (dtype !== expected) {
    throw new WeftError('WEFT_BAD_WEIGHTS', `${entry.file}: tensor "${s.hfName}" is ${entry.dtype} but config.json declares ${expected} (weft does not convert weights)`);
  }
  if (entry.shape.length !== s.hfShape.length || entry.shape.some((d, i) => d !== s.hfShape[i])) {
    throw new WeftError('WEFT_BAD_WEIGHTS', `${entry.file}: tensor "${s.hfName}" has shape [${entry.shape.join(', ')}], expected [${s.hfShape.join(', ')}] from config.json`);
  }
}
