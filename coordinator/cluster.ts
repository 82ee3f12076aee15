/**
 * A running cluster: the model's spec and tokenizer, its shard plan, one worker group, and the requests it
 * runs. Everything is checked before a worker starts (the model's config, the split, the tokenizer), so a
 * model that cannot run is refused before any weight byte is read.
 */
import { join } from 'node:path';
import { availableParallelism } from 'node:os';
import { existsSync } from 'node:fs';
import { readModelSpec, type ModelSpec } from './model-spec.ts';
import { planShards, type ShardPlan } from './shard-plan.ts';
import { loadTokenizer, type WeftTokenizer } from './tokenizer.ts';
import { parseSamplingParams, validatePromptIds } from './sampling-params.ts';
import { WorkerGroup } from './worker-group.ts';
import { generateSequence, type GenerationEvent } from './generate.ts';
import { WeftError } from './errors.ts';
import { toFloat32 } from './wire.ts';
import type { StepBatch, StepResult } from '../worker/protocol.ts';

export interface ClusterOptions {
  /** Hugging Face model directory (config.json, safetensors, tokenizer.json). */
  readonly modelDir: string;
  /** Tensor-parallel degree: the number of worker processes. Defaults to 1. */
  readonly tp?: number;
  /** Defaults to 'cpu'. */
  readonly device?: 'cpu' | 'cuda';
  /** Sequences that can hold a KV cache at once. Defaults to 4. */
  readonly kvSlots?: number;
  /** Cap on the context length (KV cache size per sequence). Defaults to the model's, at most 4096. */
  readonly maxContext?: number;
  /** CPU threads per worker. Defaults to the machine's cores divided among the ranks. */
  readonly threads?: number;
  /** A silent worker is declared dead after this long. Defaults to 30000 ms. */
  readonly heartbeatTimeoutMs?: number;
  readonly onProgress?: (rank: number, bytesRead: number, bytesTotal: number) => void;
}

export interface GenerateRequest {
  /** Text prompt, encoded with the model's tokenizer (BOS added). */
  readonly prompt?: string;
  /** Token ids, used as given. */
  readonly promptIds?: readonly number[];
  /** temperature, topK, topP, seed, maxNewTokens, ignoreEos, stopTokenIds (see SamplingParams). */
  readonly sampling?: Record<string, unknown>;
}

export interface ScoreResult {
  /** entry i (i >= 1) is log p(ids[i] | ids[0..i-1]); entry 0 is null */
  readonly logprobs: (number | null)[];
  /** with `full`: the log-softmax row for every position, [ids.length][vocab] */
  readonly full?: Float32Array[];
}

export class Cluster {
  private readonly freeSlots: number[];
  /** steps run one at a time (continuous batching comes with the scheduler) */
  private stepChain: Promise<unknown> = Promise.resolve();

  private constructor(
    readonly spec: ModelSpec,
    readonly plan: ShardPlan,
    readonly tokenizer: WeftTokenizer,
    readonly maxContext: number,
    private readonly group: WorkerGroup,
    private readonly kvSlots: number,
  ) {
    this.freeSlots = Array.from({ length: kvSlots }, (_, i) => i);
  }

  static async start(options: ClusterOptions): Promise<Cluster> {
    const spec = readModelSpec(options.modelDir);
    const tp = options.tp ?? 1;
    const plan = planShards(spec, tp);
    const tokenizer = loadTokenizer(options.modelDir);
    const device = options.device ?? 'cpu';
    if (device === 'cuda') throw new WeftError('WEFT_UNSUPPORTED_MODEL', 'the CUDA backend is not built into this version of weft yet; use --device cpu');
    if (!existsSync(join(options.modelDir, 'model.safetensors')) && !existsSync(join(options.modelDir, 'model.safetensors.index.json')))
      throw new WeftError('WEFT_BAD_WEIGHTS', `${options.modelDir} has neither model.safetensors nor model.safetensors.index.json`);
    const maxContext = Math.min(spec.maxContext, options.maxContext ?? 4096);
    const kvSlots = options.kvSlots ?? 4;
    const threads = options.threads ?? Math.max(1, Math.floor(availableParallelism() / tp));
    const group = await WorkerGroup.start({
      world: tp,
      spawnLocal: true,
      ...(options.heartbeatTimeoutMs !== undefined && { heartbeatTimeoutMs: options.heartbeatTimeoutMs }),
      ...(options.onProgress && { onProgress: options.onProgress }),
    });
    try {
      await group.init({ modelDir: options.modelDir, spec, plan, device, kvSlots, maxContext, threads });
    } catch (err) {
      await group.close();
      throw err;
    }
    return new Cluster(spec, plan, tokenizer, maxContext, group, kvSlots);
  }

  private step(batch: StepBatch): Promise<StepResult> {
    const result = this.stepChain.then(() => this.group.step(batch));
    this.stepChain = result.catch(() => undefined);
    return result;
  }

  private takeSlot(): number {
    const slot = this.freeSlots.shift();
    if (slot === undefined) throw new WeftError('WEFT_BAD_REQUEST', `all ${this.kvSlots} KV slots are busy`);
    return slot;
  }

  private promptIds(request: GenerateRequest): number[] {
    if ((request.prompt === undefined) === (request.promptIds === undefined))
      throw new WeftError('WEFT_BAD_REQUEST', 'give exactly one of prompt (text) and promptIds (token ids)');
    const ids = request.prompt !== undefined ? this.tokenizer.encode(request.prompt) : request.promptIds;
    return validatePromptIds(ids, this.spec.vocabSize, this.maxContext);
  }

  /** Stream a generation: token events, then one `done` event with the totals. */
  async *generate(request: GenerateRequest): AsyncGenerator<GenerationEvent> {
    const promptIds = this.promptIds(request);
    const params = parseSamplingParams(request.sampling ?? {}, { maxContext: this.maxContext, promptLength: promptIds.length, vocabSize: this.spec.vocabSize });
    const slot = this.takeSlot();
    try {
      yield* generateSequence({
        slot,
        promptIds,
        params,
        eosTokenIds: this.tokenizer.eosTokenIds,
        step: (batch) => this.step(batch),
        decoder: this.tokenizer.createStreamDecoder(),
      });
    } finally {
      this.freeSlots.push(slot);
    }
  }

  /** Log-probabilities of each token of `ids` given the ones before it, in one forward pass. */
  async score(ids: readonly number[], options: { full?: boolean } = {}): Promise<ScoreResult> {
    const promptIds = validatePromptIds(ids, this.spec.vocabSize, this.maxContext);
    const slot = this.takeSlot();
    try {
      const positions = promptIds.map((_, i) => i);
      const full = options.full === true;
      const rows = full ? positions : positions.slice(0, -1);
      if (rows.length === 0) return { logprobs: [null] };
      const result = await this.step({
        tokens: promptIds,
        slots: promptIds.map(() => slot),
        positions,
        logitRows: rows,
        scoreIds: rows.map((r) => promptIds[r + 1] ?? 0),
        ...(full && { fullLogprobs: true }),
      });
      const logprobs = [null, ...(result.logprobs ?? []).slice(0, promptIds.length - 1)];
      if (!full || !result.fullLogprobs) return { logprobs };
      const flat = toFloat32(result.fullLogprobs);
      const vocab = flat.length / rows.length;
      return { logprobs, full: rows.map((r) => flat.slice(r * vocab, (r + 1) * vocab)) };
    } finally {
      this.freeSlots.push(slot);
    }
  }

  /** Process ids of the workers, by rank. */
  workerPids(): number[] {
    return this.group.pids();
  }

  async close(): Promise<void> {
    await this.group.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

export function startCluster(options: ClusterOptions): Promise<Cluster> {
  return Cluster.start(options);
}
