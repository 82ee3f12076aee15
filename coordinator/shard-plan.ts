/**
 * Which slice of the model each tensor-parallel rank holds (Megatron layout, as gpt-fast's tp.py): attention by
 * head, the MLP (and each Mixtral expert) along its intermediate dimension, embedding and LM head by vocab rows.
 * Pure data; a split the model cannot take is refused here, before any weight is read.
 */
import { WeftError } from './errors.ts';
import type { ModelSpec } from './model-spec.ts';

export interface Range { readonly start: number; readonly end: number } // [start, end)
export interface RankShard {
  readonly rank: number;
  readonly qHeads: Range; // query heads this rank computes
  readonly kvHeads: Range; // kv heads it holds (one replicated head when nKvHeads < tp)
  readonly ffn: Range; // slice of the intermediate dimension (also each Mixtral expert's)
  readonly vocab: Range; // rows of the embedding and the LM head
}
export interface ShardPlan {
  readonly tp: number; readonly nHeadsPerRank: number; readonly nKvHeadsPerRank: number; readonly ffnPerRank: number;
  readonly ranks: readonly RankShard[];
}

/**
 * Splits `spec` over `tp` ranks, or throws WEFT_BAD_SHARD naming every constraint broken and the TP sizes that work.
 * @example planShards(spec, 2).ranks[1].qHeads // { start: 16, end: 32 } for 32 heads
 */
export function planShards(spec: ModelSpec, tp: number): ShardPlan {
  const problems = splitProblems(spec, tp);
  if (problems.length > 0) {
    throw new WeftError(
      'WEFT_BAD_SHARD',
      `cannot split ${spec.architecture} over tp=${tp}: ${problems.join('; ')}. TP sizes that work for this model: ${workingTpSizes(spec).join(', ')}`,
    );
  }
  const nHeadsPerRank = spec.nHeads / tp;
  const nKvHeadsPerRank = spec.nKvHeads >= tp ? spec.nKvHeads / tp : 1;
  const ffnPerRank = spec.ffnDim / tp;
  const ranks: RankShard[] = [];
  for (let rank = 0; rank < tp; rank++) {
    // With fewer kv heads than ranks, rank r's query heads all read kv head floor(r * nKvHeads / tp).
    const kv = spec.nKvHeads >= tp ? rank * nKvHeadsPerRank : Math.floor((rank * spec.nKvHeads) / tp);
    ranks.push({
      rank,
      qHeads: range(rank * nHeadsPerRank, nHeadsPerRank),
      kvHeads: range(kv, nKvHeadsPerRank),
      ffn: range(rank * ffnPerRank, ffnPerRank),
      vocab: vocabRange(spec.vocabSize, tp, rank),
    });
  }
  return { tp, nHeadsPerRank, nKvHeadsPerRank, ffnPerRank, ranks };
}

/** TP sizes (1 ≤ tp ≤ nHeads) that `planShards` accepts for this model. */
export function workingTpSizes(spec: ModelSpec): number[] {
  const sizes: number[] = [];
  for (let tp = 1; tp <= spec.nHeads; tp++) if (splitProblems(spec, tp).length === 0) sizes.push(tp);
  return sizes;
}

function splitProblems(spec: ModelSpec, tp: number): string[] {
  if (!Number.isInteger(tp) || tp < 1) return [`tp must be a positive integer, got ${tp}`];
  const problems: string[] = [];
  if (spec.nHeads % tp !== 0) problems.push(`${spec.nHeads} query heads do not divide by ${tp} (remainder ${spec.nHeads % tp})`);
  if (spec.nKvHeads >= tp && spec.nKvHeads % tp !== 0) {
    problems.push(`${spec.nKvHeads} kv heads do not divide by ${tp} (remainder ${spec.nKvHeads % tp})`);
  }
  if (spec.nKvHeads < tp && tp % spec.nKvHeads !== 0) {
    problems.push(`${spec.nKvHeads} kv heads cannot be replicated evenly over ${tp} ranks (${tp} is not a multiple of ${spec.nKvHeads})`);
  }
  if (spec.ffnDim % tp !== 0) problems.push(`intermediate size ${spec.ffnDim} does not divide by ${tp} (remainder ${spec.ffnDim % tp})`);
  const perRank = Math.ceil(spec.vocabSize / tp);
  const empty = Array.from({ length: tp }, (_, r) => r).filter((r) => vocabRange(spec.vocabSize, tp, r).end === vocabRange(spec.vocabSize, tp, r).start);
  if (empty.length > 0) {
    problems.push(`vocab ${spec.vocabSize} at ceil(${spec.vocabSize}/${tp}) = ${perRank} rows per rank leaves rank${empty.length > 1 ? 's' : ''} ${empty.join(', ')} with no rows`);
  }
  return problems;
}

/** ceil(vocab / tp) rows per rank; the last rank holds what is left. */
function vocabRange(vocab: number, tp: number, rank: number): Range {
  const perRank = Math.ceil(vocab / tp);
  const start = Math.min(rank * perRank, vocab);
  return { start, end: Math.min(start + perRank, vocab) };
}

function range(start: number, length: number): Range {
  return { start, end: start + length };
}
