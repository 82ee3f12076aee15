/**
 * Which slice of the model each tensor-parallel rank holds (Megatron layout, as gpt-fast's tp.py): attention by
 * head, the MLP (and each Mixtral expert) along its intermediate dimension, embedding and LM head by vocab rows.
 * Pure data; a split the model cannot take is refused here, before any weight is read.
 */
import { WeftError } from './errors.ts';
import type { ModelSpec } from './model-spec.ts';
import { groupProblems, workingGroupSizes } from './weight-format.ts';

export interface Range { readonly start: number; readonly end: number } // [start, end)
export interface RankShard {
  readonly rank: number;
  readonly qHeads: Range; // query heads this rank computes
  readonly kvHeads: Range; // kv heads it holds (one replicated head when nKvHeads < tp)
  readonly ffn: Range; // slice of the intermediate dimension of the dense MLP
  readonly vocab: Range; // rows of the embedding and the LM head
  readonly experts: Range; // Mixtral experts this rank holds: all of them, or its share with expert parallelism
  readonly expertFfn: Range; // slice of each held expert's intermediate dimension: `ffn`, or all of it with expert parallelism
}
export interface ShardPlan {
  readonly tp: number; readonly nHeadsPerRank: number; readonly nKvHeadsPerRank: number; readonly ffnPerRank: number;
  /** Mixtral experts split across ranks (each whole) instead of every expert cut across all ranks */
  readonly expertParallel: boolean;
  readonly ranks: readonly RankShard[];
}

export interface PlanOptions {
  /**
   * Mixtral: give each rank whole experts (nExperts / tp of them) instead of a slice of every expert. Both
   * cost one all-reduce per layer; expert parallelism reads fewer, larger weights per rank, which can pay
   * when a large batch routes tokens to every expert. Defaults to false.
   */
  readonly expertParallel?: boolean;
}

/**
 * Splits `spec` over `tp` ranks, or throws WEFT_BAD_SHARD naming every constraint broken and the TP sizes that work.
 * @example planShards(spec, 2).ranks[1].qHeads // { start: 16, end: 32 } for 32 heads
 */
export function planShards(spec: ModelSpec, tp: number, options: PlanOptions = {}): ShardPlan {
  const expertParallel = options.expertParallel ?? false;
  const problems = splitProblems(spec, tp, expertParallel);
  if (problems.length > 0) {
    throw new WeftError(
      'WEFT_BAD_SHARD',
      `cannot split ${spec.architecture} over tp=${tp}: ${problems.join('; ')}. TP sizes that work for this model: ${workingTpSizes(spec).join(', ')}`,
    );
  }
  const nHeadsPerRank = spec.nHeads / tp;
  const nKvHeadsPerRank = spec.nKvHeads >= tp ? spec.nKvHeads / tp : 1;
  // With expert parallelism nothing is cut along the intermediate dimension (a Mixtral has no dense MLP).
  const ffnPerRank = expertParallel ? spec.ffnDim : spec.ffnDim / tp;
  const expertsPerRank = expertParallel ? spec.nExperts / tp : spec.nExperts;
  const ranks: RankShard[] = [];
  for (let rank = 0; rank < tp; rank++) {
    // With fewer kv heads than ranks, rank r's query heads all read kv head floor(r * nKvHeads / tp).
    const kv = spec.nKvHeads >= tp ? rank * nKvHeadsPerRank : Math.floor((rank * spec.nKvHeads) / tp);
    ranks.push({
      rank,
      qHeads: range(rank * nHeadsPerRank, nHeadsPerRank),
      kvHeads: range(kv, nKvHeadsPerRank),
      ffn: range(expertParallel ? 0 : rank * ffnPerRank, ffnPerRank),
      vocab: vocabRange(spec.vocabSize, tp, rank),
      experts: range(expertParallel ? rank * expertsPerRank : 0, expertsPerRank),
      expertFfn: range(expertParallel ? 0 : rank * ffnPerRank, ffnPerRank),
    });
  }
  return { tp, nHeadsPerRank, nKvHeadsPerRank, ffnPerRank, expertParallel, ranks };
}

/** TP sizes (1 ≤ tp ≤ nHeads) that `planShards` accepts for this model. */
export function workingTpSizes(spec: ModelSpec): number[] {
  const sizes: number[] = [];
  for (let tp = 1; tp <= spec.nHeads; tp++) if (splitProblems(spec, tp).length === 0) sizes.push(tp);
  return sizes;
}

function splitProblems(spec: ModelSpec, tp: number, expertParallel = false): string[] {
  if (!Number.isInteger(tp) || tp < 1) return [`tp must be a positive integer, got ${tp}`];
  const problems: string[] = [];
  if (expertParallel && spec.nExperts === 0) return [`expert parallelism needs a mixture-of-experts model; ${spec.architecture} has no experts`];
  if (expertParallel && spec.nExperts % tp !== 0) problems.push(`${spec.nExperts} experts do not divide by ${tp} (remainder ${spec.nExperts % tp})`);
  if (spec.nHeads % tp !== 0) problems.push(`${spec.nHeads} query heads do not divide by ${tp} (remainder ${spec.nHeads % tp})`);
  if (spec.nKvHeads >= tp && spec.nKvHeads % tp !== 0) {
    problems.push(`${spec.nKvHeads} kv heads do not divide by ${tp} (remainder ${spec.nKvHeads % tp})`);
  }
  if (spec.nKvHeads < tp && tp % spec.nKvHeads !== 0) {
    problems.push(`${spec.nKvHeads} kv heads cannot be replicated evenly over ${tp} ranks (${tp} is not a multiple of ${spec.nKvHeads})`);
  }
  if (!expertParallel && spec.ffnDim % tp !== 0) problems.push(`intermediate size ${spec.ffnDim} does not divide by ${tp} (remainder ${spec.ffnDim % tp})`);
  const q = spec.quantization;
  if (q && spec.nHeads % tp === 0 && (expertParallel || spec.ffnDim % tp === 0)) {
    // The row-parallel projections (o, down) split their input columns: each rank's share must hold whole groups.
    const widths = { o_proj: (spec.nHeads / tp) * spec.headDim, [spec.nExperts > 0 ? 'experts w2' : 'down_proj']: expertParallel ? spec.ffnDim : spec.ffnDim / tp };
    const wrong = groupProblems(q, widths);
    if (wrong.length > 0) problems.push(`per rank ${wrong.join('; ')} (${q.kind} group sizes that work at tp=${tp}: ${workingGroupSizes(q.kind, widths)})`);
  }
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
