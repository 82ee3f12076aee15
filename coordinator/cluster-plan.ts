/**
 * What a cluster will run, checked before a worker starts: the model's spec and split, its tokenizer, the draft
 * model's, the context and the KV pool, the attention setting and the step budget. A model that cannot run is
 * refused here, before any weight byte is read.
 */
import { join } from 'node:path';
import { existsSync } from 'node:fs';
import { readModelSpec, withQuantizeAtLoad, type ModelSpec } from '../core/model-spec.ts';
import { planShards, type ShardPlan } from '../core/shard-plan.ts';
import { WeftError } from '../core/errors.ts';
import { checkSparqSetting } from '../core/sparq.ts';
import { checkPrefillAttention, type PrefillAttention } from '../core/prefill-attention.ts';
import { DEFAULT_KV_CACHE_SEQUENCES, kvCacheLayout, resolveKvDtype } from '../core/kv-block-table.ts';
import { loadTokenizer, type WeftTokenizer } from './tokenizer.ts';
import { checkMaxNumBatchedTokens } from './step-composer.ts';
import type { ClusterSettings, GroupInitCommand } from './cluster-types.ts';

export interface ClusterPlan {
  readonly spec: ModelSpec;
  readonly plan: ShardPlan;
  readonly tokenizer: WeftTokenizer;
  /** the context every sequence may use: the model's (and the draft's), capped by the maxContext option */
  readonly maxContext: number;
  /** the target ranks' init command, without the SparQ setting (the draft attends densely) */
  readonly initCommand: GroupInitCommand;
  readonly sparq: { readonly r: number; readonly k: number } | undefined;
  /** the prompt steps' attention (the draft's stays exact) */
  readonly prefillAttention: PrefillAttention;
  /** the draft model, with draftModelDir */
  readonly draft: { readonly spec: ModelSpec; readonly plan: ShardPlan } | null;
}

/** Read and check everything `options` names; throws the first problem found. */
export function planCluster(options: ClusterSettings): ClusterPlan {
  const spec = withQuantizeAtLoad(readModelSpec(options.modelDir), options.quantize, options.groupSize, options.quantizeLmHead);
  const { tp, device, kvSlots, threads } = options;
  const plan = planShards(spec, tp, { expertParallel: options.expertParallel });
  const tokenizer = loadTokenizer(options.modelDir);
  if (!existsSync(join(options.modelDir, 'model.safetensors')) && !existsSync(join(options.modelDir, 'model.safetensors.index.json')))
    throw new WeftError('WEFT_BAD_WEIGHTS', `${options.modelDir} has neither model.safetensors nor model.safetensors.index.json`);
  const draftSpec = options.draftModelDir !== undefined ? readModelSpec(options.draftModelDir) : null;
  if (draftSpec && draftSpec.vocabSize !== spec.vocabSize)
    throw new WeftError('WEFT_BAD_MODEL', `the draft model's vocabulary (${draftSpec.vocabSize} tokens) differs from the target's (${spec.vocabSize}): speculative decoding needs the same vocabulary`);
  // draftTp and speculateK are set whenever draftModelDir is (their declarations need it)
  const draftPlan = draftSpec ? planShards(draftSpec, options.draftTp!) : null;
  const maxContext = Math.min(spec.maxContext, draftSpec?.maxContext ?? Infinity, options.maxContext);
  // cuda: a pool not given is sized by each rank from --gpu-memory-fraction (not beside a draft, which shares the GPUs and needs the same pool)
  const byFraction = device === 'cuda' && options.kvCacheTokens === undefined && options.draftModelDir === undefined;
  const kvCache = byFraction
    ? { kvBlockSize: options.kvBlockSize, gpuMemoryFraction: options.gpuMemoryFraction }
    : { kvBlockSize: options.kvBlockSize, kvCacheTokens: options.kvCacheTokens ?? DEFAULT_KV_CACHE_SEQUENCES * maxContext };
  const initCommand = { modelDir: options.modelDir, spec, plan, device, kvSlots, maxContext, kvDtype: resolveKvDtype(options.kvDtype, device), ...kvCache, threads, collectives: options.collectives };
  kvCacheLayout(initCommand); // a pool too small for one sequence is refused before anything starts
  const sparq = options.attention === 'sparq' ? { r: options.sparqR, k: options.sparqK } : undefined;
  if (sparq) checkSparqSetting(sparq, spec, device, 'WEFT_BAD_CONFIG'); // refused before anything starts
  // SparQ's kernels read f32 and bf16 caches; fp8/int8 codes with their scales are not wired into its passes yet
  if (sparq && (initCommand.kvDtype === 'fp8' || initCommand.kvDtype === 'int8'))
    throw new WeftError('WEFT_BAD_CONFIG', `--attention sparq reads f32 or bf16 KV caches, not --kv-dtype ${initCommand.kvDtype}; use --kv-dtype bf16 with SparQ`);
  const prefillAttention = options.prefillAttention ?? 'exact';
  checkPrefillAttention(prefillAttention, spec, device, options.attention, options.prefillAttentionSlots); // refused before anything starts
  checkMaxNumBatchedTokens(options.maxNumBatchedTokens, kvSlots); // and a step budget below the decode rows
  return { spec, plan, tokenizer, maxContext, initCommand, sparq, prefillAttention, draft: draftSpec && draftPlan ? { spec: draftSpec, plan: draftPlan } : null };
}

/** Waits for every start; when one fails, closes those that started and throws its error. */
export async function allStarted<T extends readonly Promise<{ close(): Promise<void> }>[]>(starts: T): Promise<{ -readonly [K in keyof T]: Awaited<T[K]> }> {
  const results = await Promise.allSettled(starts);
  const failed = results.find((r) => r.status === 'rejected');
  if (!failed) return results.map((r) => (r as PromiseFulfilledResult<unknown>).value) as { -readonly [K in keyof T]: Awaited<T[K]> };
  await Promise.all(results.flatMap((r) => (r.status === 'fulfilled' ? [r.value.close()] : [])));
  throw failed.reason;
}
