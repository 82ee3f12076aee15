/**
 * The collectives a tensor-parallel forward needs, as one interface with three implementations: a group of
 * one (below), NCCL on the engine's stream for the CUDA backend (nccl.ts), and a ZeroMQ hub for the CPU
 * backend (cpu.ts, development and CI). Every rank must issue the same collectives in the same order.
 * test/unit/collectives.test.ts holds every implementation to the same contract.
 */
import { WeftError } from '../../core/errors.ts';
import type { Tensor } from '../native.ts';

/** What the collectives will carry, told once before the first step. */
export interface CollectivePlan {
  /**
   * allGatherCols: the columns each rank contributes, in rank order (they may differ: the last rank's vocab
   * slice is shorter). NCCL sizes its receive buffers from them; the CPU hub learns widths from the pieces.
   */
  readonly gatherWidths: readonly number[];
}

export interface Collectives {
  readonly rank: number;
  readonly world: number;
  /**
   * Learn the plan and make what the collectives need. Call once before the first step, outside any step:
   * nothing may be uploaded or exchanged on the host while a CUDA graph is being captured.
   */
  prepare(plan: CollectivePlan): void;
  /** Element-wise sum of `x` over all ranks; every rank gets the result. */
  allReduce(x: Tensor): Promise<Tensor>;
  /**
   * Concatenate every rank's [T, Nr] along the last dimension in rank order; every rank gets [T, ΣNr].
   * Any T (the same on every rank); Nr may differ per rank (as prepared).
   */
  allGatherCols(x: Tensor): Promise<Tensor>;
  /** A failure seen outside a call (a peer gone, a broken link), or null while healthy; polled by the heartbeat. */
  asyncError(): string | null;
  close(): void;
}

/** The prepared widths, after checking that `x` has this rank's declared width; null when nothing was prepared. */
export function preparedWidths(plan: CollectivePlan | null, rank: number, world: number, x: Tensor): readonly number[] | null {
  if (plan === null) return null;
  const width = x.shape[1] ?? 0;
  if (plan.gatherWidths.length !== world) {
    throw new WeftError('WEFT_PROTOCOL', `rank ${rank}: prepare() gave ${plan.gatherWidths.length} gather widths for a group of ${world}`);
  }
  if (plan.gatherWidths[rank] !== width) {
    throw new WeftError('WEFT_PROTOCOL', `rank ${rank}: allGatherCols of [${x.shape.join(', ')}], but prepare() declared ${plan.gatherWidths[rank]} columns for rank ${rank}`);
  }
  return plan.gatherWidths;
}

/** A group of one: nothing to combine. */
export function soloCollectives(): Collectives {
  let plan: CollectivePlan | null = null;
  return {
    rank: 0,
    world: 1,
    prepare: (p) => void (plan = p),
    allReduce: async (x) => x,
    allGatherCols: async (x) => (preparedWidths(plan, 0, 1, x), x),
    asyncError: () => null,
    close: () => undefined,
  };
}
