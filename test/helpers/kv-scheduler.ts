/**
 * The tiny llama loaded in-process under the scheduler, on the CPU: what the paged-KV tests (kv-paged, kv-quant)
 * drive end to end. Steps run one after another, as a worker runs them.
 */
import assert from 'node:assert/strict';
import { createEngine } from '../../worker/native.ts';
import { readModelSpec } from '../../core/model-spec.ts';
import { planShards } from '../../core/shard-plan.ts';
import { loadShard } from '../../worker/weights/load-shard.ts';
import { buildRankModel, hostWeights } from '../../worker/models/registry.ts';
import { soloCollectives } from '../../worker/collectives/collectives.ts';
import { StepRunner } from '../../worker/runner.ts';
import { KvBlockTable, kvCacheLayout, type KvCacheSizes } from '../../core/kv-block-table.ts';
import { Scheduler } from '../../coordinator/scheduler.ts';
import { SequenceState, type GenerationEvent } from '../../coordinator/generate.ts';
import { parseSamplingParams } from '../../coordinator/sampling-params.ts';
import type { StepBatch } from '../../core/worker-protocol.ts';
import { fixtureDir } from './fixtures.ts';

export const MAX_CONTEXT = 64;
const dir = fixtureDir('llama-tiny');
export const spec = readModelSpec(dir);
const plan = planShards(spec, 1);

export interface Request {
  readonly prompt: number[];
  readonly sampling: Record<string, unknown>;
}

/** A scheduler over an in-process runner of the tiny model with the given KV sizes; steps run one after another. */
export async function tinyScheduler(sizes: Omit<KvCacheSizes, 'maxContext' | 'device'>, prefixCaching = false) {
  const kv = kvCacheLayout({ ...sizes, maxContext: MAX_CONTEXT, device: 'cpu' });
  const engine = createEngine({ backend: 'cpu', threads: 1 });
  const model = buildRankModel(engine, spec, plan, 0, hostWeights(engine, 0, await loadShard(dir, spec, plan, 0)), kv);
  const runner = new StepRunner(engine, soloCollectives(), model, kv);
  let previous: Promise<unknown> = Promise.resolve();
  const step = (batch: StepBatch) => {
    const result = previous.then(() => runner.step(batch));
    previous = result.catch(() => undefined);
    return result;
  };
  const kvCache = new KvBlockTable(kv);
  let preempted = 0;
  const prefix = { queried: 0, hit: 0 };
  const observer = { preempted: () => preempted++, prefixCache: (queried: number, hit: number) => ((prefix.queried += queried), (prefix.hit += hit)) };
  const scheduler = new Scheduler({ kvCache, maxQueue: 64, step, prefixCaching, observer });
  return { scheduler, kvCache, preemptions: () => preempted, prefix };
}

/** Every stream's tokens, checked against its `done` event (each token once, in order). */
export async function run(scheduler: Scheduler, batch: readonly Request[]): Promise<number[][]> {
  const streams = batch.map(({ prompt, sampling }) => {
    const params = parseSamplingParams(sampling, { maxContext: MAX_CONTEXT, promptLength: prompt.length, vocabSize: spec.vocabSize });
    return scheduler.submitGenerate(new SequenceState(prompt, params, [], { push: () => '', flush: () => '' })).events;
  });
  return Promise.all(streams.map(async (events: AsyncIterable<GenerationEvent>) => {
    const tokens: number[] = [];
    let done: number[] | null = null;
    for await (const event of events) {
      if (event.type === 'token') tokens.push(event.token);
      else done = event.tokens;
    }
    assert.deepEqual(tokens, done, 'the stream carries the tokens of its done event, each once');
    return tokens;
  }));
}

