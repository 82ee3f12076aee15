/**
 * Which Collectives a rank uses (`--collectives auto|nccl|shared-gpu`) and on which CUDA device, from what the
 * rank knows before its group forms. Plain logic, tested on the CPU (test/unit/collectives-choice.test.ts).
 */
import { WeftError } from '../../core/errors.ts';

export const COLLECTIVES_CHOICES = ['auto', 'nccl', 'shared-gpu'] as const;
export type CollectivesChoice = (typeof COLLECTIVES_CHOICES)[number];

export interface RankPlacement {
  readonly device: 'cpu' | 'cuda';
  readonly world: number;
  /** the CUDA ordinal the coordinator gave this rank (the rank itself for spawned workers, unless --gpus) */
  readonly deviceIndex: number;
  /** the CUDA devices this process sees */
  readonly visibleDevices: number;
}

export interface CollectivesPlan {
  /**
   * solo: a group of one; cpu: the ZeroMQ hub; nccl; shared-gpu; 'shared-gpu-if-one-host': shared-gpu when every
   * rank turns out to be on this host (they share its too few GPUs), else NCCL (ranks on hosts of their own).
   */
  readonly kind: 'solo' | 'cpu' | 'nccl' | 'shared-gpu' | 'shared-gpu-if-one-host';
  /** the CUDA device this rank opens */
  readonly deviceIndex: number;
}

/**
 * auto on CUDA: NCCL when this host has a GPU for every rank (NCCL refuses two ranks on one GPU), otherwise the
 * ranks share the GPUs there are (rank r on GPU r mod count) through shared-gpu, provided they share one host.
 */
export function chooseCollectives(choice: CollectivesChoice, placement: RankPlacement): CollectivesPlan {
  const { device, world, deviceIndex, visibleDevices } = placement;
  if (device === 'cpu') {
    if (choice !== 'auto') throw new WeftError('WEFT_BAD_REQUEST', `--collectives ${choice} needs --device cuda (cpu groups use the ZeroMQ hub)`);
    return { kind: world === 1 ? 'solo' : 'cpu', deviceIndex };
  }
  if (world === 1) return { kind: 'solo', deviceIndex };
  const shared = visibleDevices > 0 ? deviceIndex % visibleDevices : deviceIndex;
  if (choice === 'nccl') return { kind: 'nccl', deviceIndex };
  if (choice === 'shared-gpu') return { kind: 'shared-gpu', deviceIndex: shared };
  return visibleDevices >= world ? { kind: 'nccl', deviceIndex } : { kind: 'shared-gpu-if-one-host', deviceIndex: shared };
}
