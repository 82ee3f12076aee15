/** What tests do with a running cluster and a device, in one place. */
import type { Cluster } from '../../coordinator/cluster.ts';
import { createEngine, nativeInfo } from '../../worker/native.ts';

/** The tokens a greedy generation gives (the done event's, EOS included when it stopped there). */
export async function greedy(cluster: Cluster, promptIds: readonly number[], maxNewTokens: number, ignoreEos = true): Promise<number[]> {
  for await (const event of cluster.generate({ promptIds: [...promptIds], sampling: { maxNewTokens, ignoreEos } }))
    if (event.type === 'done') return event.tokens;
  throw new Error('generate ended without a done event');
}

/** Why the GPU suites cannot run here (no CUDA build, no usable GPU), or false when they can. */
export function gpuSkipReason(): string | false {
  if (!nativeInfo().cuda) return 'weft was built without CUDA (WEFT_CUDA=1 node native/build.mjs)';
  try {
    createEngine({ backend: 'cuda' });
    return false;
  } catch (err) {
    return `no usable GPU: ${(err as Error).message}`;
  }
}
