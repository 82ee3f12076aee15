/**
 * A Scheduler over an in-process StepRunner of the hf-tiny llama on the CPU (one rank, steps run one after
 * another as a worker runs them), with the KV sizes and scheduler options a test gives: what the chunked-prefill
 * and paged-KV tests drive end to end; and a way to run requests through it that checks each stream against its
 * `done` event.
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
import { Scheduler, type SchedulerOptions } from '../../coordinator/scheduler.ts';
import { SequenceState, type GenerationEvent } from '../../coordinator/generate.ts';
import { parseSamplingParams } from '../../coordinator/sampling-params.ts';
import type { StepBatch } from '../../core/worker-protocol.ts';
import { fixtureDir } from './fixtures.ts';

const dir = fixtureDir('llama-tiny');
export const tinySpec = readModelSpec(dir);
const plan = planShards(tinySpec, 1);

export interface TinyRequest {
  readonly prompt: readonly number[];
  readonly sampling: Record<string, unknown>;
}

/** The scheduler, its allocator, every batch it sent, and what its observer counted (preemptions, prefix-cache lookups). */
export async function tinyScheduler(sizes: Omit<KvCacheSizes, 'device'>, options: Partial<Omit<SchedulerOptions, 'kvCache' | 'step'>> = {}) {
  const kv = kvCacheLayout({ ...sizes, device: 'cpu' });
  const engine = createEngine({ backend: 'cpu', threads: 1 });
  const model = buildRankModel(engine, tinySpec, plan, 0, hostWeights(engine, 0, await loadShard(dir, tinySpec, plan, 0)), kv);
  const runner = new StepRunner(engine, soloCollectives(), model, kv);
  const batches: StepBatch[] = [];
  let previous: Promise<unknown> = Promise.resolve();
  const step = (batch: StepBatch) => {
    batches.push(batch);
    const result = previous.then(() => runner.step(batch));
    previous = result.catch(() => undefined);
    return result;
  };
  const kvCache = new KvBlockTable(kv);
  let preempted = 0;
  const prefix = { queried: 0, hit: 0 };
  const observer = { preempted: () => preempted++, prefixCache: (queried: number, hit: number) => ((prefix.queried += queried), (prefix.hit += hit)) };
  const scheduler = new Scheduler({ maxQueue: 64, observer, ...options, kvCache, step });
  return { scheduler, kvCache, batches, preemptions: () => preempted, prefix };
}

/** Submit every request at once; each stream's tokens, checked against its `done` event (each token once, in order). */
export async function runRequests(scheduler: Scheduler, requests: readonly TinyRequest[], maxContext: number): Promise<number[][]> {
  const streams = requests.map(({ prompt, sampling }) => {
    const params = parseSamplingParams(sampling, { maxContext, promptLength: prompt.length, vocabSize: tinySpec.vocabSize });
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

/** The paged-KV tests' context: the tiny model's scheduler at PAGED_MAX_CONTEXT, and requests run through it. */
export const PAGED_MAX_CONTEXT = 64;
export const pagedScheduler = (sizes: Omit<KvCacheSizes, 'maxContext' | 'device'>, prefixCaching = false) =>
  tinyScheduler({ ...sizes, maxContext: PAGED_MAX_CONTEXT }, { prefixCaching });
export const runPaged = (scheduler: Scheduler, requests: readonly TinyRequest[]): Promise<number[][]> => runRequests(scheduler, requests, PAGED_MAX_CONTEXT);
