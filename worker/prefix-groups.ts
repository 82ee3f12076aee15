/**
 * Prefix groups of a decode step, for bifurcated decode attention (Engine.attentionBifurcated): tokens whose
 * sequences' block-table rows begin with the same physical blocks (the n samples of one prompt, forked by
 * coordinator/sample-group.ts, or sequences sharing cached prompt blocks) read those blocks once per step for
 * the whole group. Found from the table alone, so the coordinator sends nothing new and every rank finds the
 * same groups.
 */
import type { StepBatch } from '../core/step-batch.ts';
import type { KvCacheLayout } from '../core/kv-block-table.ts';
import { WeftError } from '../core/errors.ts';
import { int32Tensor, type Ops, type PrefixGroups, type StepIndex } from './models/ops.ts';

/** Tokens a step may hold to use the bifurcated kernel: the decode kernel's limit (cuda/attention.cuh kDecodeMaxTokens). */
export const MAX_BIFURCATED_TOKENS = 64;

/** The op's descriptors: tokenGroup [T] i32 (-1: none), groupShared [G] i32 (positions shared by group g). */
export interface PrefixGroupArrays {
  readonly tokenGroup: Int32Array;
  readonly groupShared: Int32Array;
}

/** Cache element types the bifurcated kernels read (quantized caches, with their scales, are not wired in yet). */
const BIFURCATED_KV_DTYPES: readonly string[] = ['f32', 'bf16'];

/**
 * The groups of a decode step (one token per sequence row, at most MAX_BIFURCATED_TOKENS), or null when it has
 * none or is not such a step, or the cache's type is not one the kernels read. A group is two or more tokens
 * whose rows begin with the same blocks; it shares those whole blocks, cut to what every member's position
 * reaches (a member attends to its own positions only).
 */
export function prefixGroupArrays(batch: Pick<StepBatch, 'positions' | 'tokenSeq' | 'kvBlockTable'>, kv: Pick<KvCacheLayout, 'kvBlockSize' | 'kvDtype'>): PrefixGroupArrays | null {
  const T = batch.tokenSeq.length;
  if (T < 2 || T > MAX_BIFURCATED_TOKENS || !BIFURCATED_KV_DTYPES.includes(kv.kvDtype) || new Set(batch.tokenSeq).size !== T) return null;
  const kvBlockSize = kv.kvBlockSize;
  const byFirstBlock = new Map<number, number[]>(); // first block -> tokens
  batch.tokenSeq.forEach((seq, t) => {
    const first = batch.kvBlockTable[seq]![0]!;
    byFirstBlock.set(first, [...(byFirstBlock.get(first) ?? []), t]);
  });
  const tokenGroup = new Int32Array(T).fill(-1);
  const groupShared: number[] = [];
  for (const members of byFirstBlock.values()) {
    if (members.length < 2) continue;
    const rows = members.map((t) => batch.kvBlockTable[batch.tokenSeq[t]!]!);
    let common = 0;
    while (rows.every((row) => common < row.length && row[common] === rows[0]![common])) common++;
    const reach = Math.min(...members.map((t) => batch.positions[t]! + 1));
    const shared = Math.min(common, Math.floor(reach / kvBlockSize)) * kvBlockSize;
    if (shared === 0) continue;
    for (const t of members) tokenGroup[t] = groupShared.length;
    groupShared.push(shared);
  }
  return groupShared.length ? { tokenGroup, groupShared: Int32Array.from(groupShared) } : null;
}

/** The step index with the batch's prefix groups uploaded, when it has any (models/llama.ts then attends bifurcated). */
export function withPrefixGroups(ops: Ops, step: StepIndex, batch: StepBatch, kv: KvCacheLayout): StepIndex {
  const groups = prefixGroupArrays(batch, kv);
  if (!groups) return step;
  return { ...step, prefixGroups: { tokenGroup: int32Tensor(ops, groups.tokenGroup), groupShared: int32Tensor(ops, groups.groupShared) } };
}

/**
 * The group slots of the decode graph a step with `groups` prefix groups runs in: the next power of two, at most
 * the bucket. The CUDA kernel sizes its prefix partitions from the slot count (its plan comes from shapes alone,
 * fixed when the graph is captured): with a slot per row, one group's prompt got the few long partitions planned
 * for 16 groups' work. Measured on H200, 8K prompt, 16 samples, Llama-2-7B: 22.1 ms a step with 16 slots, about
 * what 16 unshared sequences cost. One graph per (bucket, slots) used.
 */
export function groupSlots(groups: number, bucket: number): number {
  let slots = 1;
  while (slots < groups) slots *= 2;
  return Math.min(slots, bucket);
}

/** A decode graph's descriptors for `bucket` rows and `slots` groups (none until written): persistent, rewritten before each replay. */
export function prefixGroupTensors(ops: Ops, bucket: number, slots: number): PrefixGroups {
  return { tokenGroup: int32Tensor(ops, new Int32Array(bucket).fill(-1)), groupShared: int32Tensor(ops, new Int32Array(slots)) };
}

/** Write a step's groups into a graph's descriptors: its tokens first (padding rows of no group), unused group slots shared 0. */
export function writePrefixGroups(ops: Ops, tensors: PrefixGroups, groups: PrefixGroupArrays): void {
  const bucket = tensors.tokenGroup.shape[0]!, slots = tensors.groupShared.shape[0]!;
  if (groups.groupShared.length > slots) throw new WeftError('WEFT_BAD_REQUEST', `a step of ${groups.groupShared.length} prefix groups in a graph of ${slots} group slots`);
  const tokenGroup = new Int32Array(bucket).fill(-1);
  tokenGroup.set(groups.tokenGroup);
  const groupShared = new Int32Array(slots);
  groupShared.set(groups.groupShared);
  ops.write(tensors.tokenGroup, new Uint8Array(tokenGroup.buffer));
  ops.write(tensors.groupShared, new Uint8Array(groupShared.buffer));
}
