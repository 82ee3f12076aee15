/**
 * One rank's weights: ShardPlan × safetensors files → host tensors named the weft way, reading only this rank's
 * bytes. Every source tensor's presence, dtype and shape is checked against the spec before the first data byte
 * is read. This file is the weight map: Hugging Face tensor names appear here and nowhere else.
 */
import { WeftError } from '../../core/errors.ts';
import type { ModelSpec, WeightDType } from '../../core/model-spec.ts';
import type { Range, RankShard, ShardPlan } from '../../core/shard-plan.ts';
import { dtypeBytes, weftDType, WeightFiles } from '../../core/safetensors.ts';

const PROGRESS_STEP_BYTES = 64 << 20;

export interface HostTensor { readonly dtype: WeightDType; readonly shape: readonly number[]; readonly data: Uint8Array } // raw little-endian bytes

/** Where one part of a weft tensor comes from: a whole HF tensor, a row range, or a column range of a matrix. */
export interface SourceSlice {
  readonly hfName: string;
  readonly hfShape: readonly number[]; // the full tensor's shape the spec implies
  readonly cut: 'all' | 'rows' | 'cols';
  readonly range: Range | null; // rows or columns taken; null for 'all'
}

/** A tensor this rank holds: its parts' bytes are concatenated, in order (along dim 0). */
export interface ShardTensor {
  readonly name: string;
  readonly shape: readonly number[];
  readonly sources: readonly SourceSlice[];
  /** Same bytes as another tensor of the shard (tied LM head = embedding rows); read once, shared. */
  readonly aliasOf: string | null;
}

/** The tensors rank `rank` holds, in load order, and where each comes from. Pure. */
export function shardLayout(spec: ModelSpec, plan: ShardPlan, rank: number): ShardTensor[] {
  const r = rankShard(plan, rank);
  const { hidden, headDim: hd, ffnDim, vocabSize } = spec;
  const vocabRows = len(r.vocab);
  const out: ShardTensor[] = [
    tensor('embed', [vocabRows, hidden], [rows('model.embed_tokens.weight', [vocabSize, hidden], r.vocab)]),
    tensor('norm', [hidden], [whole('model.norm.weight', [hidden])]),
    spec.tieWordEmbeddings
      ? { ...tensor('lmHead', [vocabRows, hidden], [rows('model.embed_tokens.weight', [vocabSize, hidden], r.vocab)]), aliasOf: 'embed' }
      : tensor('lmHead', [vocabRows, hidden], [rows('lm_head.weight', [vocabSize, hidden], r.vocab)]),
  ];
  const qRows = scale(r.qHeads, hd);
  const kvRows = scale(r.kvHeads, hd);
  const ffn = r.ffn;
  for (let i = 0; i < spec.nLayers; i++) {
    const hf = `model.layers.${i}.`;
    const at = `layers.${i}.`;
    out.push(
      tensor(`${at}attnNorm`, [hidden], [whole(`${hf}input_layernorm.weight`, [hidden])]),
      tensor(`${at}ffnNorm`, [hidden], [whole(`${hf}post_attention_layernorm.weight`, [hidden])]),
      tensor(`${at}wqkv`, [len(qRows) + 2 * len(kvRows), hidden], [
        rows(`${hf}self_attn.q_proj.weight`, [spec.nHeads * hd, hidden], qRows),
        rows(`${hf}self_attn.k_proj.weight`, [spec.nKvHeads * hd, hidden], kvRows),
        rows(`${hf}self_attn.v_proj.weight`, [spec.nKvHeads * hd, hidden], kvRows),
      ]),
      tensor(`${at}wo`, [hidden, len(qRows)], [cols(`${hf}self_attn.o_proj.weight`, [hidden, spec.nHeads * hd], qRows)]),
    );
    if (spec.family === 'mixtral') {
      const moe = `${hf}block_sparse_moe.`;
      out.push(tensor(`${at}router`, [spec.nExperts, hidden], [whole(`${moe}gate.weight`, [spec.nExperts, hidden])]));
      // The rank's experts stacked, [nLocal, ...]: expert e's gate and up rows, then its down columns.
      const held = Array.from({ length: len(r.experts) }, (_, i) => `${moe}experts.${r.experts.start + i}.`);
      const f = r.expertFfn;
      out.push(
        tensor(`${at}experts.w13`, [held.length, 2 * len(f), hidden], held.flatMap((ex) => [rows(`${ex}w1.weight`, [ffnDim, hidden], f), rows(`${ex}w3.weight`, [ffnDim, hidden], f)])),
        tensor(`${at}experts.w2`, [held.length, hidden, len(f)], held.map((ex) => cols(`${ex}w2.weight`, [hidden, ffnDim], f))),
      );
    } else {
      out.push(...mlp(at, `${hf}mlp.gate_proj.weight`, `${hf}mlp.up_proj.weight`, `${hf}mlp.down_proj.weight`, hidden, ffnDim, ffn));
    }
  }
  return out;
}

/** Bytes of tensor data rank `rank` reads (aliases counted once): the total for progress reports. */
export function shardBytes(spec: ModelSpec, plan: ShardPlan, rank: number): number {
  return shardLayout(spec, plan, rank)
    .filter((t) => t.aliasOf === null)
    .reduce((sum, t) => sum + numel(t.shape) * dtypeBytes(spec.dtype), 0);
}

/**
 * Reads rank `rank`'s tensors from `dir` (model.safetensors or an index of shards). Throws WEFT_BAD_WEIGHTS for
 * a missing tensor, a dtype other than `spec.dtype`, or a shape other than the spec implies, naming the tensor,
 * the file and both shapes, before reading any tensor data. `onProgress` is called after each tensor and every
 * 64 MiB. A tied LM head is the embedding's HostTensor itself (same bytes, read once).
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
    for (const t of layout) for (const s of t.sources) checkSource(files, spec, t, s);
    const weights = new Map<string, HostTensor>();
    for (const t of layout) {
      if (t.aliasOf !== null) {
        weights.set(t.name, weights.get(t.aliasOf)!);
        continue;
      }
      const bytes = numel(t.shape) * dtypeBytes(spec.dtype);
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
      weights.set(t.name, { dtype: spec.dtype, shape: t.shape, data });
      if (bytesRead > reported) report();
    }
    return weights;
  } finally {
    await files.close();
  }
}

function checkSource(files: WeightFiles, spec: ModelSpec, t: ShardTensor, s: SourceSlice): void {
  const where = `${files.dir} (${files.fileNames.join(', ')})`;
  const entry = files.tensor(s.hfName);
  if (entry === undefined) {
    const hint = s.hfName === 'lm_head.weight' ? '; if the LM head is tied to the embedding, config.json should say tie_word_embeddings: true' : '';
    throw new WeftError('WEFT_BAD_WEIGHTS', `${where}: tensor "${s.hfName}" (for weft's ${t.name}) is missing${hint}`);
  }
  const dtype = weftDType(entry);
  if (dtype !== spec.dtype) {
    throw new WeftError('WEFT_BAD_WEIGHTS', `${entry.file}: tensor "${s.hfName}" is ${entry.dtype} but config.json declares ${spec.dtype} (weft does not convert weights)`);
  }
  if (entry.shape.length !== s.hfShape.length || entry.shape.some((d, i) => d !== s.hfShape[i])) {
    throw new WeftError('WEFT_BAD_WEIGHTS', `${entry.file}: tensor "${s.hfName}" has shape [${entry.shape.join(', ')}], expected [${s.hfShape.join(', ')}] from config.json`);
  }
}

function mlp(at: string, gate: string, up: string, down: string, hidden: number, ffnDim: number, ffn: Range): ShardTensor[] {
  return [
    tensor(`${at}w13`, [2 * len(ffn), hidden], [rows(gate, [ffnDim, hidden], ffn), rows(up, [ffnDim, hidden], ffn)]),
    tensor(`${at}w2`, [hidden, len(ffn)], [cols(down, [hidden, ffnDim], ffn)]),
  ];
}

function rankShard(plan: ShardPlan, rank: number): RankShard {
  const r = plan.ranks[rank];
  if (!Number.isInteger(rank) || r === undefined || r.rank !== rank) {
    throw new WeftError('WEFT_BAD_SHARD', `rank ${rank} is not in the shard plan (tp=${plan.tp}: ranks 0..${plan.tp - 1})`);
  }
  return r;
}

function tensor(name: string, shape: number[], sources: SourceSlice[]): ShardTensor {
  return { name, shape, sources, aliasOf: null };
}
function whole(hfName: string, hfShape: number[]): SourceSlice {
  return { hfName, hfShape, cut: 'all', range: null };
}
function rows(hfName: string, hfShape: number[], range: Range): SourceSlice {
  return { hfName, hfShape, cut: 'rows', range };
}
function cols(hfName: string, hfShape: number[], range: Range): SourceSlice {
  return { hfName, hfShape, cut: 'cols', range };
}
function scale(r: Range, k: number): Range {
  return { start: r.start * k, end: r.end * k };
}
function len(r: Range): number {
  return r.end - r.start;
}
function numel(shape: readonly number[]): number {
  return shape.reduce((a, d) => a * d, 1);
}
