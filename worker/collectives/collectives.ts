/**
 * The collectives a tensor-parallel forward needs, as one interface with two implementations: NCCL on the
 * engine's stream for the CUDA backend, and a ZeroMQ hub for the CPU backend (development and CI).
 * Every rank must issue the same collectives in the same order.
 */
import type { Tensor } from '../native.ts';

export interface Collectives {
  readonly rank: number;
  readonly world: number;
  /** Element-wise sum of `x` over all ranks; every rank gets the result. */
  allReduce(x: Tensor): Promise<Tensor>;
  /** Concatenate every rank's [T, Nr] along the last dimension in rank order; every rank gets [T, ΣNr]. */
  allGatherCols(x: Tensor): Promise<Tensor>;
  close(): void;
}

/** A group of one: nothing to combine. */
export function soloCollectives(): Collectives {
  return { rank: 0, world: 1, allReduce: async (x) => x, allGatherCols: async (x) => x, close: () => undefined };
}
